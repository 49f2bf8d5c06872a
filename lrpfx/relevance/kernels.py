"""The tensor math of every rule: plain functions of tensors, no fx, no autograd.

Each kernel maps the relevance of a layer's output to the relevance of its input(s).
They are called from the generated forward of a compiled explainer as ``call_function``
nodes whose hyperparameters are keyword literals, so every kernel must

* use only ops that export (``conv_transpose*`` with an explicit ``output_padding``
  instead of ``torch.nn.grad.conv2d_input``; ``scatter_add`` instead of ``max_unpool``),
* branch only on static facts (shapes, dtypes, literal keyword arguments), never on values.

Notation (METHOD_SPEC §1): ``a`` is the layer input, ``z`` its output (the pre-activation,
reused from the forward replay where the rule allows it), ``rel`` the relevance of ``z``.
Every linear-type rule follows the same four steps (Montavon et al., 2019):
``z = rho(layer)(a)``; ``s = rel / stabilize(z)``; ``c = rho(layer)^T s``; ``R = a * c``.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lrpfx.errors import InputError

Geometry = tuple[Sequence[int], Sequence[int], Sequence[int], int]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# --------------------------------------------------------------------------- helpers
def effective_eps(eps: float, dtype: torch.dtype) -> float:
    """The stabilizer actually used: ``eps``, raised to the dtype's resolution.

    In float16/bfloat16 an epsilon of 1e-6 vanishes next to any activation and its
    reciprocal overflows float16, so the stabilizer scales with ``finfo(dtype).eps``.
    ``eps == 0`` (LRP-0) stays exactly zero.
    """
    if eps == 0.0 or not dtype.is_floating_point:
        return eps
    return max(eps, torch.finfo(dtype).eps) if dtype in (torch.float16, torch.bfloat16) else eps


def stabilize(z: torch.Tensor, eps: float, nonneg: bool = False, rectified: bool = False) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (zennit's stabilizer).

    With ``eps == 0`` (LRP-0) exact zeros are replaced by one: on a ReLU network the
    relevance arriving at a zero pre-activation is itself zero, so the share stays 0
    instead of becoming NaN. ``nonneg=True`` (z known to be >= 0) saves the sign.
    ``rectified=True`` says more: z >= 0 *and* the relevance is 0 wherever z == 0; then LRP-0
    clamps z to the dtype's smallest normal number in one pass (a subnormal z changes its
    share by at most its own, subnormal, relevance).
    """
    eps = effective_eps(eps, z.dtype)
    if eps == 0.0 and rectified and z.dtype.is_floating_point:
        # one pass instead of two: 0 becomes the smallest normal number, and 0 / tiny = 0
        return z.clamp(min=torch.finfo(z.dtype).tiny)
    if eps == 0.0:
        return z.masked_fill(z == 0, 1.0)
    if nonneg:
        return z + eps
    if _in_place(z):  # eager: the sign by copysign, one pass where a comparison and a select take two
        return torch.copysign(z.new_full((), eps), z).add_(z)  # sign(-0.0) = -1 there: see _div_stabilized
    # 0-dim tensors of z's dtype: Python scalars in torch.where would round eps to float32
    return z + torch.where(z >= 0, z.new_full((), eps), z.new_full((), -eps))


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             stride: Sequence[int] | None, padding: Sequence[int] | None,
             dilation: Sequence[int] | None, groups: int) -> torch.Tensor:
    """The layer itself: a convolution when ``stride`` is given, else a dense layer."""
    if stride is None:
        return F.linear(x, weight, bias)
    return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def _ones_sample(a: torch.Tensor) -> torch.Tensor:
    """One all-ones sample shaped like a sample of ``a``: the input of an input-independent term."""
    return a.new_ones((1, *a.shape[1:]))


def _transpose(s: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int],
               stride: Sequence[int] | None, padding: Sequence[int] | None,
               dilation: Sequence[int] | None, groups: int) -> torch.Tensor:
    """The transposed layer ``W^T s`` (the vector-Jacobian product w.r.t. the input)."""
    if stride is None:
        return s @ weight
    assert padding is not None and dilation is not None
    nd = weight.dim() - 2
    if all(k == 1 for k in weight.shape[2:]) and not any(padding):
        if any(st > 1 for st in stride):
            return _strided_pointwise_transpose(s, weight, in_shape, stride, groups)
        if _is_matmul(s, groups):
            return _pointwise_transpose(s, weight)
    if torch.compiler.is_exporting():
        return _transpose_any_size(s, weight, in_shape, stride, padding, dilation, groups)
    out_pad = [
        in_shape[2 + i] - ((s.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                           + dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(nd)
    ]
    return _CONV_T[nd](s, weight, None, stride, padding, out_pad, groups, dilation)


def _transpose_any_size(s: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``_transpose`` without an ``output_padding`` that depends on the input size (exports).

    ONNX's ConvTranspose takes output_padding only as a constant, and it depends on whether
    the input size was even or odd. So: the full transposed convolution (padding 0: every
    position any window touches), padded by stride - 1 at the end (a constant that always
    covers the rows the stride dropped), then cut to the input's rows [padding, padding + size).
    The same numbers; the cut's bounds are the only size-dependent values, and ONNX's Slice
    takes them as tensors.
    """
    nd = weight.dim() - 2
    full = _CONV_T[nd](s, weight, None, stride, 0, 0, groups, dilation)
    ends = [v for i in reversed(range(nd)) for v in (0, stride[i] - 1)]
    full = F.pad(full, ends) if any(ends) else full
    return full[(slice(None), slice(None),
                 *(slice(padding[i], padding[i] + in_shape[2 + i]) for i in range(nd)))]


def _strided_pointwise_transpose(s: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int],
                                 stride: Sequence[int], groups: int) -> torch.Tensor:
    """W^T s for a 1x1 convolution with stride > 1 (a ResNet projection): W^T s at the output's
    resolution, written into every stride-th input position, zeros elsewhere. The same sums as the
    strided transposed convolution, which PyTorch's CPU backend runs several times slower."""
    small = (_pointwise_transpose(s, weight) if _is_matmul(s, groups)
             else _CONV_T[weight.dim() - 2](s, weight, None, 1, 0, 0, groups))
    out = small.new_zeros((s.shape[0], small.shape[1], *in_shape[2:]))
    out[(slice(None), slice(None), *(slice(None, None, st) for st in stride))] = small
    return out


def _is_matmul(s: torch.Tensor, groups: int) -> bool:
    """Whether a 1x1 transposed layer runs as a matrix product (:func:`_pointwise_transpose`): on the
    CPU, one group, the relevance in the default memory layout (a static fact of the graph)."""
    return s.device.type == "cpu" and groups == 1 and s.is_contiguous()


def _pointwise_transpose(s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W^T s for a 1x1 convolution with stride 1: a matrix product over the channels at every position.
    The same sums as the transposed convolution, which PyTorch's CPU backend runs up to 3x slower
    (its 1x1 deconvolution is not a plain matrix product)."""
    n, c_out = s.shape[0], s.shape[1]
    w = weight.reshape(c_out, -1)  # (out, in)
    return torch.matmul(w.t(), s.reshape(n, c_out, -1)).reshape(n, w.shape[1], *s.shape[2:])


# --------------------------------------------------------------------------- compile-time constants
# The weights a rule modifies (w+, w-, w + gamma w+, the box weights, w^2, ...) depend on the
# parameters only. A rule asks for them as Calls on the parameter handles; the emitter evaluates
# every call of a function marked with @constant whose inputs are all parameters or literals ONCE,
# at compile time, and stores the result as a buffer of the explainer (``<param>_<suffix>``), so
# the generated forward does no weight arithmetic and exported files carry the prepared weights.
def constant(suffix: str) -> Any:
    """Mark ``fn`` as a pure function of parameters: the emitter folds its calls into buffers named ``*_<suffix>``."""
    def mark(fn: Any) -> Any:
        fn.lrpfx_constant = suffix
        return fn
    return mark


def is_constant(fn: Any) -> bool:
    """Whether calls of ``fn`` on parameters and literals are folded into buffers at compile time."""
    return bool(getattr(fn, "lrpfx_constant", None))


@constant("pos")
def positive_part(t: torch.Tensor) -> torch.Tensor:
    """t+ = max(t, 0) (a weight's or a bias's positive part)."""
    return t.clamp(min=0)


@constant("neg")
def negative_part(t: torch.Tensor) -> torch.Tensor:
    """t- = min(t, 0)."""
    return t.clamp(max=0)


@constant("gamma_up")
def gamma_up(t: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """t + gamma t+ (LRP-gamma's weights and bias for outputs with z > 0)."""
    return t + gamma * t.clamp(min=0)


@constant("gamma_down")
def gamma_down(t: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """t + gamma t- (LRP-gamma's weights and bias for outputs with z < 0)."""
    return t + gamma * t.clamp(max=0)


@constant("gamma_p")
def gamma_p_weight(weight: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """gamma w+: the weight of the gamma kernel's extra convolution p = gamma (W+ a + b+) + eps."""
    return gamma * weight.clamp(min=0)


@constant("gamma_p_bias")
def gamma_p_bias(weight: torch.Tensor, bias: torch.Tensor | None, *, gamma: float, eps: float) -> torch.Tensor:
    """gamma b+ + eps: the bias of the gamma kernel's extra convolution p = gamma (W+ a + b+) + eps."""
    b_p = torch.full((weight.shape[0],), eps, dtype=weight.dtype, device=weight.device)
    return b_p if bias is None else b_p + gamma * bias.clamp(min=0)


@constant("gamma_down_scaled")
def gamma_down_scaled(weight: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """(w + gamma w-) / (1 + gamma): the gamma kernel's z < 0 weights, its denominator's factor folded in."""
    return (weight + gamma * weight.clamp(max=0)) / (1 + gamma)


@constant("ones")
def ones_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ones shaped like ``t`` (the flat rule's weights)."""
    return torch.ones_like(t)


@constant("sq")
def square(t: torch.Tensor) -> torch.Tensor:
    """t * t (the w^2 rule's weights and bias)."""
    return t * t


@constant("scale")
def batchnorm_scale(running_var: torch.Tensor, weight: torch.Tensor | None, *, bn_eps: float) -> torch.Tensor:
    """A BatchNorm's scale s = weight / sqrt(running_var + eps), per channel."""
    scale = torch.rsqrt(running_var + bn_eps)
    return scale if weight is None else scale * weight


def _half_eps_shift(eps: float, dtype: torch.dtype) -> float:
    """What to add to a folded eps where float16/bfloat16 raise the stabilizer (0 otherwise)."""
    return effective_eps(eps, dtype) - eps


# --------------------------------------------------------------------------- linear-type rules
def epsilon(a: torch.Tensor, z: torch.Tensor | None, rel: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None, *, eps: float, stride: Sequence[int] | None = None,
            padding: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
            groups: int = 1, z_rectified: bool = False) -> torch.Tensor:
    """LRP-epsilon (Bach et al., 2015); ``eps=0`` is LRP-0.

    ``z`` is the layer's forward output, reused; pass ``z=None`` to recompute it from
    ``weight`` and ``bias`` (e.g. with the bias dropped). ``z_rectified=True`` says the
    forward applied its ReLU in place on z: where that changed z (z < 0) the relevance is
    0 anyway, so only the cheaper non-negative stabilizer differs, and not in the result.
    """
    if z is None:
        z = _forward(a, weight, bias, stride, padding, dilation, groups)
    s = rel / stabilize(z, eps, nonneg=z_rectified, rectified=z_rectified)
    return _transpose(s, weight, a.shape, stride, padding, dilation, groups).mul_(a)  # in place: a fresh tensor


def ratio_linear(c: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, *, stride: Sequence[int] | None = None,
                 padding: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
                 groups: int = 1) -> torch.Tensor:
    """LRP-0 on ratios: with R_z = z * c, R_a = a * W^T c, so c_a = W^T c (no division, no product)."""
    return _transpose(c, weight, a.shape, stride, padding, dilation, groups)


def ratio_relu(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The ratio below a ReLU a = relu(z): c where a > 0, else 0 (one pass, autograd's own kernel)."""
    return torch.ops.aten.threshold_backward(c, a, 0)


def ratio_top(logits: torch.Tensor, target: torch.Tensor | int | None, *, top: str) -> torch.Tensor:
    """The output relevance as a ratio to the logits, c = R / z (LRP-0's division at the top; 0 / 0 = 0)."""
    return top_relevance(logits, target, top=top) / stabilize(logits, 0.0)


def zplus(a: torch.Tensor, rel: torch.Tensor, wp: torch.Tensor, bp: torch.Tensor | None = None,
          wn: torch.Tensor | None = None, *, eps: float, nonneg: bool = False, stride: Sequence[int] | None = None,
          padding: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
          groups: int = 1) -> torch.Tensor:
    """z+ as zennit's ``ZPlus`` = alpha1-beta0 (Bach et al., 2015; Montavon et al., 2017).

    Positive contributions ``w+ a+ + w- a-``, with ``b+`` in the denominator when a bias is
    given. ``wp``/``bp``/``wn`` are w+, b+ and w- (prepared at compile time). ``nonneg=True``
    states that ``a >= 0`` (proven at compile time), which drops the two terms that vanish
    then (and ``wn``).
    """
    geo = (stride, padding, dilation, groups)
    if nonneg:
        z = _forward(a, wp, bp, *geo)  # >= 0: a >= 0, w+ >= 0, b+ >= 0, so no sign to take
        return _transpose(rel / stabilize(z, eps, nonneg=True), wp, a.shape, *geo).mul_(a)
    assert wn is not None, "zplus on a signed input needs w-"
    ap, an = a.clamp(min=0), a.clamp(max=0)
    z = _forward(ap, wp, bp, *geo) + _forward(an, wn, None, *geo)
    s = rel / stabilize(z, eps)
    return ap * _transpose(s, wp, a.shape, *geo) + an * _transpose(s, wn, a.shape, *geo)


def alpha_beta(a: torch.Tensor, rel: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor,
               bp: torch.Tensor | None = None, bn: torch.Tensor | None = None, *, alpha: float, beta: float, eps: float,
               nonneg: bool = False, stride: Sequence[int] | None = None,
               padding: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
               groups: int = 1) -> torch.Tensor:
    """LRP-alpha-beta (Bach et al., 2015), zennit's handling of signed inputs.

    Positive part ``w+ a+ + w- a-`` (+ ``b+``), negative part ``w- a+ + w+ a-`` (+ ``b-``);
    ``wp``, ``wn``, ``bp``, ``bn`` are w+, w-, b+, b- (prepared at compile time).
    """
    geo = (stride, padding, dilation, groups)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    zp = _forward(ap, wp, bp, *geo)
    zn = _forward(ap, wn, bn, *geo)
    if not nonneg:
        zp = zp + _forward(an, wn, None, *geo)
        zn = zn + _forward(an, wp, None, *geo)
    sp = rel / stabilize(zp, eps)
    sn = rel / stabilize(zn, eps)
    out = alpha * ap * _transpose(sp, wp, a.shape, *geo) - beta * ap * _transpose(sn, wn, a.shape, *geo)
    if not nonneg:
        out = out + alpha * an * _transpose(sp, wn, a.shape, *geo) - beta * an * _transpose(sn, wp, a.shape, *geo)
    return out


def gamma(a: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, w_p: torch.Tensor, b_p: torch.Tensor,
          w_up: torch.Tensor, w_dn: torch.Tensor | None = None, *, gamma: float, eps: float,
          z_rectified: bool = False, stride: Sequence[int] | None = None, padding: Sequence[int] | None = None,
          dilation: Sequence[int] | None = None, groups: int = 1) -> torch.Tensor:
    """Generalized LRP-gamma (Montavon et al., 2019; Andeol et al., 2021) on a non-negative input ``a``.

    Outputs with ``z > 0`` propagate through ``w_up = w + gamma w+``, outputs with ``z < 0``
    through ``w + gamma w-``; ``z`` is the layer's real output, reused. One extra convolution
    p = gamma (W+ a + b+) + eps (``w_p = gamma w+``, ``b_p = gamma b+ + eps``, prepared at compile
    time) gives both stabilized denominators: z_up + eps = z + p and
    z_dn - eps = (1 + gamma) (z - p / (1 + gamma)) (the stabilizer's sign is known: z_up >= z > 0
    and z_dn <= z < 0 where they are used); the factor 1 + gamma is folded into
    ``w_dn = (w + gamma w-) / (1 + gamma)``. ``z_rectified`` (the forward applied its ReLU in place
    on z, and the relevance is 0 wherever z <= 0) drops the z < 0 branch, whose relevance is 0:
    one transposed convolution, and ``w_dn`` is not needed. Signed inputs: :func:`gamma_signed`.

    Elementwise work is done in place on the fresh tensors (p, the masked relevances), never on
    ``z``, ``rel`` or ``a``, which the forward replay may still use; the masks are ReLU/Hardtanh
    backward kernels (one vectorized pass each, where a comparison and a select take two).
    """
    geo = (stride, padding, dilation, groups)
    shift = _half_eps_shift(eps, z.dtype)
    if shift:  # float16/bfloat16 raise the stabilizer: a static branch on the dtype
        b_p = b_p + shift
    p = _forward(a, w_p, b_p, *geo)  # fresh
    if z_rectified:
        s_up = _div_into(rel, p.add_(z))
        return _transpose(s_up, w_up, a.shape, *geo).mul_(a)
    assert w_dn is not None, "gamma on an output that is not rectified needs (w + gamma w-) / (1 + gamma)"
    # each quotient is masked after the division (a select: 0/0 where a denominator vanishes is dropped)
    s_up = torch.add(z, p)
    s_up = _where_positive(_div_into(rel, s_up), z)
    s_dn = torch.add(z, p, alpha=-1 / (1 + gamma), **({"out": p} if _in_place(p, z) else {}))
    s_dn = _where_negative(_div_into(rel, s_dn), z)
    return _transpose(s_up, w_up, a.shape, *geo).add_(_transpose(s_dn, w_dn, a.shape, *geo)).mul_(a)


def _in_place(*ts: torch.Tensor) -> bool:
    """Whether to write into fresh tensors with ``out=`` and use the eager-only fast kernels: in eager
    mode when autograd records nothing on ``ts`` (it refuses ``out=``). Exported, traced and compiled
    graphs get the plain ops (the compilers fuse them; ONNX has no ``copysign``)."""
    return _validating() and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _div_into(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, written into ``den`` (a fresh tensor of the result's shape) where allowed."""
    return torch.div(num, den, out=den) if _in_place(num, den) else num / den


def _where_positive(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t`` where ``z > 0``, else 0, written into ``t`` (ReLU's backward kernel: one vectorized pass)."""
    if _in_place(t, z):
        return torch.ops.aten.threshold_backward.grad_input(t, z, 0, grad_input=t)
    return torch.where(z > 0, t, t.new_zeros(()))


def _where_negative(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t`` where ``z < 0``, else 0, written into ``t`` (Hardtanh's backward kernel on (-inf, 0))."""
    if _in_place(t, z):
        return torch.ops.aten.hardtanh_backward.grad_input(t, z, -math.inf, 0.0, grad_input=t)
    return torch.where(z < 0, t, t.new_zeros(()))


def gamma_signed(a: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, w_up: torch.Tensor, w_dn: torch.Tensor,
                 b_up: torch.Tensor | None = None, b_dn: torch.Tensor | None = None, *, gamma: float, eps: float,
                 nonneg: bool = False, stride: Sequence[int] | None = None, padding: Sequence[int] | None = None,
                 dilation: Sequence[int] | None = None, groups: int = 1) -> torch.Tensor:
    """Generalized LRP-gamma, zennit's ``Gamma`` for any input sign (and for gamma = 0).

    ``w_up = w + gamma w+``, ``w_dn = w + gamma w-``, ``b_up``, ``b_dn`` likewise (prepared at
    compile time). Outputs with ``z > 0`` take contributions ``a+ w_up + a- w_dn``, outputs
    with ``z < 0`` take ``a+ w_dn + a- w_up``.
    """
    geo = (stride, padding, dilation, groups)
    ap = a.clamp(min=0)
    z_up = _forward(ap, w_up, b_up, *geo)
    z_dn = _forward(ap, w_dn, b_dn, *geo)
    if not nonneg:
        an = a.clamp(max=0)
        z_up = z_up + _forward(an, w_dn, None, *geo)
        z_dn = z_dn + _forward(an, w_up, None, *geo)
    s_up = (z > 0).to(rel.dtype) * rel / stabilize(z_up, eps)
    s_dn = (z < 0).to(rel.dtype) * rel / stabilize(z_dn, eps)
    if nonneg:
        return _transpose(s_up, w_up, a.shape, *geo).add_(_transpose(s_dn, w_dn, a.shape, *geo)).mul_(a)
    an = a.clamp(max=0)
    return (ap * _transpose(s_up, w_up, a.shape, *geo) + an * _transpose(s_up, w_dn, a.shape, *geo)
            + ap * _transpose(s_dn, w_dn, a.shape, *geo) + an * _transpose(s_dn, w_up, a.shape, *geo))


def _input_channel_bound(value: Sequence[float] | float, weight: torch.Tensor, groups: int) -> torch.Tensor | float:
    """A per-input-channel bound laid out like ``weight`` (out, in / groups, ...), or a scalar as is."""
    if not isinstance(value, Sequence):
        return float(value)
    t = torch.as_tensor(value, dtype=weight.dtype, device=weight.device)
    out, per_group = weight.shape[0], weight.shape[1]
    channel = (torch.arange(out, device=weight.device) // (out // groups))[:, None] * per_group \
        + torch.arange(per_group, device=weight.device)[None, :]  # input channel of weight[k, j]
    return t[channel].view(out, per_group, *([1] * (weight.dim() - 2)))


@constant("box")
def box_weight(weight: torch.Tensor, *, low: Sequence[float] | float, high: Sequence[float] | float,
               groups: int = 1) -> torch.Tensor:
    """[W, W_box] stacked along the input channels (per group), W_box = l_c w+ + h_c w- per input channel c:
    the z^B rule's weight and both of its bound terms, so that one transposed layer gives both products."""
    lo, hi = _input_channel_bound(low, weight, groups), _input_channel_bound(high, weight, groups)
    return torch.cat([weight, weight.clamp(min=0) * lo + weight.clamp(max=0) * hi], dim=1)


def zbox(a: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor, w_box: torch.Tensor, *, eps: float, stride: Sequence[int] | None = None,
         padding: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
         groups: int = 1) -> torch.Tensor:
    """The z^B (box) rule for bounded inputs (Montavon et al., 2017), as zennit's ``ZBox``.

    R_j = sum_k (a_j w_jk - l_j w+_jk - h_j w-_jk) / z_k R_k, with ``l``/``h`` the lowest and
    highest (normalized) input values per channel, zero-padded like the input; biases cancel.
    Both bound terms fold into one weight W_box = l w+ + h w-, and their input is a constant, so
    z = W a - W_box 1 takes one convolution of ``a`` and one of a single all-ones sample broadcast
    over the batch. ``w_box`` is [W, W_box] stacked along the input channels (:func:`box_weight`):
    one transposed layer gives W^T s and W_box^T s together, R = a * W^T s - W_box^T s (where the
    three-term form takes three convolutions and three transposed ones at full batch). On a first
    layer of few input channels the transposed layer's cost hardly depends on how many channels it
    writes, so the stacked one costs about what one of the two separate ones did.
    """
    geo = (stride, padding, dilation, groups)
    per_group = weight.shape[1]
    bound = _forward(_ones_sample(a), w_box[:, per_group:], None, *geo)  # the same for every sample
    z = _forward(a, weight, None, *geo).sub_(bound)  # in place: a fresh output
    s = _div_stabilized(rel, z, eps)
    both = _transpose(s, w_box, (a.shape[0], 2 * a.shape[1], *a.shape[2:]), *geo)
    both = both.unflatten(1, (groups, 2, per_group))  # per group: W^T s, then W_box^T s
    return (both[:, :, 0].flatten(1, 2) * a).sub_(both[:, :, 1].flatten(1, 2))  # contiguous, like ``a``


def flat(a: torch.Tensor, rel: torch.Tensor, ones_w: torch.Tensor, *, eps: float,
         stride: Sequence[int] | None = None, padding: Sequence[int] | None = None,
         dilation: Sequence[int] | None = None, groups: int = 1) -> torch.Tensor:
    """The flat rule (Lapuschkin et al., 2019): relevance spread uniformly over the receptive field.

    ``ones_w`` is a tensor of ones shaped like the weight (prepared at compile time).
    """
    geo = (stride, padding, dilation, groups)
    z = _forward(_ones_sample(a), ones_w, None, *geo)  # input-independent: one sample, broadcast
    return _transpose(rel / stabilize(z, eps), ones_w, a.shape, *geo)


def wsquare(a: torch.Tensor, rel: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None = None,
            *, eps: float, stride: Sequence[int] | None = None, padding: Sequence[int] | None = None,
            dilation: Sequence[int] | None = None, groups: int = 1) -> torch.Tensor:
    """The w^2 rule (Montavon et al., 2017), as zennit's ``WSquare`` (squared bias in the denominator).

    ``w2``/``b2`` are the squared weight and bias (prepared at compile time).
    """
    geo = (stride, padding, dilation, groups)
    z = _forward(_ones_sample(a), w2, b2, *geo)  # input-independent: one sample, broadcast
    return _transpose(rel / stabilize(z, eps), w2, a.shape, *geo)


# --------------------------------------------------------------------------- other ops
def batchnorm_epsilon(a: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, scale: torch.Tensor, *,
                      eps: float) -> torch.Tensor:
    """Elementwise LRP-epsilon on an un-folded BatchNorm ``y = s x + t`` (METHOD_SPEC §1.3 (b)).

    ``scale`` is s per channel (:func:`batchnorm_scale`, prepared at compile time).
    """
    scale = scale.view(1, -1, *([1] * (a.dim() - 2)))
    return a * scale * (rel / stabilize(z, eps))


#: (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override) of a 2-D average pooling
PoolSpec = tuple[Sequence[int], Sequence[int], Sequence[int], bool, bool, "int | None"]


def _window_inverse(a: torch.Tensor, out_shape: Sequence[int], *, kernel_size: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                    divisor_override: int | None) -> torch.Tensor:
    """1 / n_k, the weight of average pooling's window k, as a (1, 1, *out) tensor.

    avg_pool(ones) = valid_k / n_k, valid_k being the window's input (non-padding) elements,
    counted by summing ones; this holds for every ``ceil_mode``, ``count_include_pad`` and
    ``divisor_override``, and valid_k >= 1 (PyTorch's windows always start inside the input
    or its left padding).
    """
    one = torch.ones_like(a[:1, :1])
    pooled = F.avg_pool2d(one, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    extra = [max(0, (o - 1) * s + k - (n + 2 * p)) for o, s, k, n, p in
             zip(out_shape[-2:], stride, kernel_size, a.shape[-2:], padding)]
    ones_k = torch.ones((1, 1, *kernel_size), dtype=a.dtype, device=a.device)
    valid = F.conv2d(F.pad(one, (0, extra[1], 0, extra[0])), ones_k, None, stride, padding)
    return pooled / valid


def _avgpool_transpose(t: torch.Tensor, in_shape: Sequence[int], *, kernel_size: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """The transposed sum pooling: every input gets the sum of ``t`` over the windows that contain it.

    With ``ceil_mode`` the last windows may reach past the padded input; the transposed
    convolution then produces a larger map, cut back to ``in_shape``.
    """
    channels = in_shape[1]
    ones = torch.ones((channels, 1, *kernel_size), dtype=t.dtype, device=t.device)
    if torch.compiler.is_exporting():  # no size-dependent output_padding in an exported graph
        return _transpose_any_size(t, ones, in_shape, stride, padding, (1, 1), channels)
    full = [(o - 1) * s - 2 * p + k for o, s, p, k in zip(t.shape[-2:], stride, padding, kernel_size)]
    out_pad = [max(0, n - f) for n, f in zip(in_shape[-2:], full)]
    g = F.conv_transpose2d(t, ones, None, stride, padding, out_pad, channels)
    return g[..., :in_shape[-2], :in_shape[-1]]


def avgpool(a: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, *, eps: float,
            kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
            count_include_pad: bool = True, ceil_mode: bool = False,
            divisor_override: int | None = None) -> torch.Tensor:
    """Average pooling as a linear layer with weights 1/n_k (zennit's ``Norm``).

    ``z`` is the pooled forward output; R_j = a_j * sum_{k: j in win(k)} R_k / (n_k * stabilize(z_k)).
    Any ``ceil_mode``, ``count_include_pad`` and ``divisor_override`` (n_k as PyTorch divides).
    """
    return a * ratio_avgpool(rel / stabilize(z, eps), a, z, kernel_size=kernel_size, stride=stride,
                             padding=padding, count_include_pad=count_include_pad, ceil_mode=ceil_mode,
                             divisor_override=divisor_override)


def ratio_avgpool(c: torch.Tensor, a: torch.Tensor, z: torch.Tensor, *, kernel_size: Sequence[int],
                  stride: Sequence[int], padding: Sequence[int], count_include_pad: bool = True,
                  ceil_mode: bool = False, divisor_override: int | None = None) -> torch.Tensor:
    """L^T c for average pooling L (weights 1/n_k): the pooling's share of c, without the product with a."""
    if count_include_pad and not ceil_mode and divisor_override is None:
        c = c / float(math.prod(kernel_size))  # every window has n = k_h * k_w
    else:
        c = c * _window_inverse(a, z.shape, kernel_size=kernel_size, stride=stride, padding=padding,
                                ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                                divisor_override=divisor_override)
    return _avgpool_transpose(c, a.shape, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool(a: torch.Tensor, *, kernel_size: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], ceil_mode: bool = False, count_include_pad: bool = True,
             divisor_override: int | None = None) -> torch.Tensor:
    """2-D average pooling (the forward of a max-pool treated as an average, or of a pooled shortcut)."""
    return F.avg_pool2d(a, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """The (n_out, n_in) averaging matrix of adaptive pooling along one axis."""
    rows = []
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(n_in)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def adaptive_avgpool2d(a: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Adaptive 2-D average pooling as a linear layer (Norm rule), any output size."""
    return a * ratio_adaptive_avgpool2d(rel / stabilize(z, eps), a, z)


def ratio_adaptive_avgpool2d(c: torch.Tensor, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """L^T c for adaptive average pooling L (any output size); global pooling broadcasts."""
    (h, w), (oh, ow) = a.shape[-2:], z.shape[-2:]
    if oh == 1 and ow == 1:  # global pooling, the common case: a broadcast
        return (c / (h * w)).expand(a.shape)
    ph, pw = _adaptive_matrix(h, oh, a), _adaptive_matrix(w, ow, a)
    return ph.t() @ c @ pw


def maxpool_wta(a: torch.Tensor, rel: torch.Tensor, *, kernel_size: Sequence[int],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                ceil_mode: bool) -> torch.Tensor:
    """Max pooling, winner takes all: each output's relevance goes to its argmax input.

    Overlapping windows accumulate; ties go to the index PyTorch picks, as in autograd.
    Routed by ``scatter_add`` on the pooling indices, which exports (``max_unpool`` does not).
    """
    _, idx = F.max_pool2d(a, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    return _route(a, idx, rel)


def max_pool_with_indices(a: torch.Tensor, *, kernel_size: Sequence[int], stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int],
                          ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's max pooling with the argmax indices kept for :func:`maxpool_wta_indexed`: the
    kernel the CPU runs for a max-pool anyway, so the backward need not run it again."""
    return F.max_pool2d(a, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def maxpool_wta_indexed(a: torch.Tensor, rel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Max pooling, winner takes all (:func:`maxpool_wta`), at the argmax ``indices`` of the forward."""
    return _route(a, indices, rel)


def adaptive_maxpool_wta(a: torch.Tensor, rel: torch.Tensor, *, output_size: Sequence[int | None]) -> torch.Tensor:
    """Adaptive max pooling, winner takes all (as :func:`maxpool_wta`)."""
    _, idx = F.adaptive_max_pool2d(a, output_size, return_indices=True)
    return _route(a, idx, rel)


def _route(a: torch.Tensor, idx: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Each output's relevance to the input position ``idx`` holds (flat over H*W), accumulated."""
    n, c = rel.shape[:2]
    out = torch.zeros((n, c, a.shape[2] * a.shape[3]), dtype=rel.dtype, device=rel.device)
    return out.scatter_add(2, idx.flatten(2), rel.flatten(2)).view(a.shape)


def add_split(u: torch.Tensor, rel: torch.Tensor, *, eps: float, rectified: bool = False) -> torch.Tensor:
    """The shared factor of the proportional split at ``u = h_1 + h_2``: R_i = h_i * (R / stabilize(u)).

    The stabilizer's sign is taken with ``copysign`` (one vectorized pass, then two in place):
    it differs from sign(0) = +1 only at u = -0.0, which a sum reaches only when every summand
    is a zero, so every share h_i * factor is 0 either way. ``rectified=True``: ``u`` holds
    relu(sum) (the forward ran its ReLU in place) and ``rel`` is 0 wherever the sum was <= 0, so
    the stabilizer is +eps (one pass, and the division in place); the factor is the same where
    the sum was > 0 and 0 elsewhere.
    """
    if rectified:
        den = stabilize(u, eps, nonneg=True, rectified=True)  # fresh
        return _div_into(rel, den)
    return _div_stabilized(rel, u, eps)


def _div_stabilized(rel: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``rel / stabilize(z, eps)``, in eager mode with the stabilizer's sign by ``copysign``: one
    vectorized pass and two in place, where the comparison, the select and the sum take three.
    It differs from sign(0) = +1 only at z = -0.0, which a sum reaches only when every summand is
    a zero (a product with a zero input), whose share of the quotient is then 0 either way."""
    if effective_eps(eps, z.dtype) == 0.0 or not _in_place(rel, z):  # (copysign's backward reads its output)
        return rel / stabilize(z, eps)
    den = torch.copysign(z.new_full((), effective_eps(eps, z.dtype)), z)  # fresh, z's shape
    return torch.div(rel, den.add_(z), out=den)


def reshape_as(rel: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Pass relevance back through a reshape (flatten, view) or an elementwise pass-through."""
    return rel.reshape(a.shape)


def signal_takes_all(rel: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The gated product y = signal * gate: all of R_y to the signal (summed over broadcast dims)."""
    return rel.sum_to_size(signal.shape)


def cat_slice(rel: torch.Tensor, parts: Sequence[torch.Tensor], *, dim: int, index: int) -> torch.Tensor:
    """The slice of a concatenation's relevance that belongs to ``parts[index]`` (exact: R is split, not shared)."""
    start = sum(p.shape[dim] for p in parts[:index])
    return rel.narrow(dim, start, parts[index].shape[dim])


# --------------------------------------------------------------------------- entry and exit
def _validating() -> bool:
    """Value checks run in eager mode only: exported and compiled graphs carry none."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def check_input(x: torch.Tensor, *, ndim: int, channels: int | None) -> torch.Tensor:
    """Refuse input of the wrong rank or channel count, and non-finite input, with a clear message."""
    if x.dim() != ndim:
        raise InputError(
            f"input has shape {tuple(x.shape)} but the model expects {ndim} dimensions "
            f"(N, C{', H, W' if ndim == 4 else ', ...'}). Hint: add a batch dimension with x.unsqueeze(0).")
    if channels is not None and x.shape[1] != channels:
        raise InputError(
            f"input has {x.shape[1]} channels (shape {tuple(x.shape)}) but the first layer expects "
            f"{channels}. Hint: convert grayscale/RGBA images to the model's channel count.")
    if _validating() and not bool(torch.isfinite(x).all()):
        bad = _bad_samples(x)
        raise InputError(f"input contains NaN or inf in sample(s) {bad}. Hint: clean the input; "
                         "LRP of a non-finite input is undefined.")
    return x


def top_relevance(logits: torch.Tensor, target: torch.Tensor | int | None, *, top: str) -> torch.Tensor:
    """The relevance put on the output: the target logit (``top="logit"``) or its softmax probability.

    ``target`` is ``None`` (argmax per sample), an int, a LongTensor (N,) or a float tensor
    (N, classes), which is used as the output relevance itself. A class index of -1 means the
    predicted class (the argmax) of that sample, so one integer tensor can mix explicit classes
    and predictions (the exported explainers' ``target`` input).
    """
    if logits.dim() != 2:
        raise InputError(f"the model's output has shape {tuple(logits.shape)}; lrpfx explains (N, classes) "
                         "outputs. Hint: wrap the model so that it returns class scores.")
    _check_finite_logits(logits)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return _float_target(target, logits)
    n, classes = logits.shape
    if isinstance(target, numbers.Integral) and not isinstance(target, bool) and int(target) == -1:
        target = None
    elif isinstance(target, torch.Tensor) and target.dtype != torch.bool and not target.is_complex():
        index = target.reshape(-1).to(device=logits.device, dtype=torch.long)
        if _validating():
            if index.numel() not in (1, n):
                raise InputError(f"target has {index.numel()} entries for a batch of {n}. Hint: pass one class "
                                 "per sample (-1: the predicted class), an int, or None for the argmax.")
            if bool(((index < -1) | (index >= classes)).any()):
                raise InputError(f"target {index.tolist()} out of range for a model with {classes} classes "
                                 f"(valid: -1 for the predicted class, or 0..{classes - 1}). Hint: pass class "
                                 f"indices in -1..{classes - 1}.")
        # -1 selects the argmax; in graphs (no checks, no shape branch) the shapes broadcast as they are
        index = torch.where(index < 0, logits.argmax(1), index)
        score = logits.softmax(1) if top == "softmax" else logits
        return F.one_hot(index, classes).to(logits.dtype) * score
    index = _class_index(target, logits)
    score = logits.softmax(1) if top == "softmax" else logits
    return F.one_hot(index, logits.shape[1]).to(logits.dtype) * score


def _float_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A float target, used as the output relevance: the logits' shape, finite."""
    if tuple(target.shape) != tuple(logits.shape):
        raise InputError(f"a float target is used as the output relevance and must have the logits' "
                         f"shape {tuple(logits.shape)}, got {tuple(target.shape)}. Hint: pass class indices as a "
                         "LongTensor (target.long()), or a float tensor of the logits' shape.")
    if _validating() and not bool(torch.isfinite(target).all()):
        raise InputError(f"the float target (the output relevance) is NaN or inf in sample(s) {_bad_samples(target)}. "
                         "Hint: build it from finite scores, e.g. one_hot(index) * logits.softmax(1).")
    return target.to(logits.dtype)


def _class_index(target: object, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample class indices from None (the argmax), an int, or an integer tensor (N,) or (1,)."""
    n, classes = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        _check_range(torch.tensor([int(target)]), classes)
        return torch.full((n,), int(target), dtype=torch.long, device=logits.device)
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and not target.is_complex() \
            and target.dtype != torch.bool:
        index = target.reshape(-1).to(device=logits.device, dtype=torch.long)
        if index.numel() == 1 and n != 1:
            index = index.expand(n)
        if index.shape[0] != n:
            raise InputError(f"target has {index.shape[0]} entries for a batch of {n}. "
                             "Hint: pass one class per sample, an int, or None for the argmax.")
        _check_range(index, classes)
        return index
    got = type(target).__name__ + (f" of dtype {target.dtype}" if isinstance(target, torch.Tensor) else "")
    raise InputError(f"target must be None, an int, a LongTensor (N,) or a float tensor (N, classes); "
                     f"got {got}. Hint: convert class indices with torch.as_tensor(target).long().")


def _check_range(index: torch.Tensor, classes: int) -> None:
    if _validating() and bool(((index < 0) | (index >= classes)).any()):
        raise InputError(f"target {index.tolist()} out of range for a model with {classes} classes "
                         f"(valid: 0..{classes - 1}). Hint: pass class indices in 0..{classes - 1}, or None "
                         "for the predicted class.")


def _bad_samples(t: torch.Tensor) -> list[int]:
    return sorted({int(i) for i in (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten()})


def _check_finite_logits(logits: torch.Tensor) -> None:
    if _validating() and not bool(torch.isfinite(logits).all()):
        raise InputError(
            f"the model's output (logits) is NaN or inf in sample(s) {_bad_samples(logits)} (dtype "
            f"{logits.dtype}): the forward pass itself overflowed. Hint: run the model in float32 or bfloat16, "
            "or bring the input to the range the model was trained on.")


def check_relevance(rel: torch.Tensor) -> torch.Tensor:
    """Refuse to return a non-finite relevance map (eager mode only), naming the samples and the dtype."""
    if _validating() and not bool(torch.isfinite(rel).all()):
        raise InputError(
            f"the relevance of sample(s) {_bad_samples(rel)} is NaN or inf (dtype {rel.dtype}): a rule's "
            "denominator underflowed or its products overflowed in this precision. Hint: compute the "
            "explanation in float32 (or bfloat16, which has float32's range), or use a rule with a "
            "stabilizer (epsilon > 0) instead of LRP-0.")
    return rel


# --------------------------------------------------------------------------- whole residual blocks
# A block: u = F(x) + S(x), O = relu(u); F = conv_n(... relu(conv_1(x))), optionally times a gate
# g (squeeze-and-excitation: F = g * conv_n(...), g a constant for the explanation, "signal takes
# all"); S = identity, a 1x1 conv, or an average pooling then a 1x1 conv (ResNet-D's shortcut).
# ``acts`` are the ReLU outputs inside the main branch (the inputs of conv_2 ... conv_n);
# ``geometry`` holds one (stride, padding, dilation, groups) tuple per conv; ``skip_pool`` is
# the shortcut's pooling as a :data:`PoolSpec`.
Geo = tuple[Sequence[int], Sequence[int], Sequence[int], int]


def _float16_in_float32(fn: Any) -> Any:
    """Run a block kernel in float32 when its input is float16.

    A path sum through a whole block (J+ x) can exceed float16's range (65504) where each
    layer alone does not; bfloat16 has float32's range and runs as is.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        x = args[0] if args else kwargs["x"]  # called with keywords from the generated code
        if x.dtype != torch.float16:
            return fn(*args, **kwargs)
        up = [_to(a, torch.float32) for a in args]
        return fn(*up, **{k: _to(v, torch.float32) for k, v in kwargs.items()}).half()
    return wrapper


def _to(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(dtype)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(a, dtype) for a in v)
    return v


def _block_transpose(g: torch.Tensor, x: torch.Tensor, acts: Sequence[torch.Tensor],
                     weights: Sequence[torch.Tensor], geometry: Sequence[Geo],
                     gate: torch.Tensor | None = None) -> torch.Tensor:
    """J_F^T g through the main branch, with the gate and the ReLU masks of the real forward.

    Returns a fresh tensor (a transposed convolution's output, masked in place). A ReLU is off where
    its output is 0 (it is never negative), so each mask is ReLU's backward kernel on the ReLU's
    output: one pass, with no mask tensor to build.
    """
    if gate is not None:
        g = g * gate
    ins = [x, *acts]
    for i in reversed(range(len(weights))):
        g = _transpose(g, weights[i], ins[i].shape, *geometry[i])
        if i > 0:
            g = _where_positive(g, acts[i - 1])  # in place: a fresh transpose output
    return g


def _main_twin(x: torch.Tensor, acts: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
               geometry: Sequence[Geo], gate: torch.Tensor | None) -> torch.Tensor:
    """The main branch with ``weights``, biases dropped, the forward's ReLU masks and gate: J_F x (fresh)."""
    h = x
    for i, w in enumerate(weights):
        h = _forward(h, w, None, *geometry[i])
        if i < len(acts):
            h = _where_positive(h, acts[i])  # in place: a fresh convolution output
    return h if gate is None else h * gate


def _block_output_share(rel: torch.Tensor, den: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rel / den`` where the block's output is positive, 0 elsewhere (the block's output is a ReLU's,
    never negative; ``den`` is fresh and may be 0 there): written into ``den`` where allowed."""
    return _where_positive(_div_into(rel, den), out)


def _pool(x: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = spec
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _pool_transpose(t: torch.Tensor, x: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """L^T t for the average pooling L of ``x`` described by ``spec`` (weights 1/n_k)."""
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = spec
    inv = _window_inverse(x, t.shape, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                          count_include_pad=count_include_pad, divisor_override=divisor_override)
    return _avgpool_transpose(t * inv, x.shape, kernel_size=kernel_size, stride=stride, padding=padding)


def _skip_forward(x: torch.Tensor, skip_weight: torch.Tensor | None, skip_geometry: Geo | None,
                  skip_pool: PoolSpec | None) -> torch.Tensor:
    """The shortcut S x without bias: x, W_s x, or W_s pool(x)."""
    if skip_weight is None:
        return x
    assert skip_geometry is not None
    return _forward(x if skip_pool is None else _pool(x, skip_pool), skip_weight, None, *skip_geometry)


def _skip_transpose(g: torch.Tensor, x: torch.Tensor, skip_weight: torch.Tensor | None,
                    skip_geometry: Geo | None, skip_pool: PoolSpec | None = None) -> torch.Tensor:
    """S^T g: g, W_s^T g, or pool^T W_s^T g."""
    if skip_weight is None:
        return g
    assert skip_geometry is not None
    if skip_pool is None:
        return _transpose(g, skip_weight, x.shape, *skip_geometry)
    pooled = _pool(x, skip_pool)
    return _pool_transpose(_transpose(g, skip_weight, pooled.shape, *skip_geometry), x, skip_pool)


@_float16_in_float32
def block_dense_eps(x: torch.Tensor, out: torch.Tensor, rel: torch.Tensor, acts: Sequence[torch.Tensor],
                    weights: Sequence[torch.Tensor], skip_weight: torch.Tensor | None = None,
                    gate: torch.Tensor | None = None, *, geometry: Sequence[Geo], skip_geometry: Geo | None = None,
                    skip_pool: PoolSpec | None = None, eps: float) -> torch.Tensor:
    """C3-LRP's block rule, read literally (METHOD_SPEC §2, Formulation A): the block as one dense layer.

    R_x = x * J^T (R_O / (O + eps)), J = dO/dx at x (ReLU masks from the forward, BatchNorm
    folded, a gate held constant). At eps = 0 a chain of these equals Input x Gradient (of the
    model with its gates detached); the effective bias of the block (its BatchNorm shifts,
    through the ReLU gates) absorbs or adds relevance.
    """
    # where O > 0, stabilize(O) = O + eps; elsewhere the share is masked to 0 whatever the division gives
    g = _block_output_share(rel, out + effective_eps(eps, out.dtype), out)
    total = _block_transpose(g, x, acts, weights, geometry, gate)
    return total.add_(_skip_transpose(g, x, skip_weight, skip_geometry, skip_pool)).mul_(x)


@_float16_in_float32
def block_dense_zplus(x: torch.Tensor, out: torch.Tensor, rel: torch.Tensor, acts: Sequence[torch.Tensor],
                      weights: Sequence[torch.Tensor], skip_weight: torch.Tensor | None = None,
                      gate: torch.Tensor | None = None, *, geometry: Sequence[Geo],
                      skip_geometry: Geo | None = None, skip_pool: PoolSpec | None = None,
                      eps: float, nonneg: bool = False) -> torch.Tensor:
    """The block as one positive dense layer (METHOD_SPEC §2, Formulation B).

    The block's positive twin: folded weights clamped at 0 (``weights`` and ``skip_weight`` are
    these clamped weights, prepared at compile time), biases dropped, each ReLU
    replaced by its mask from the real forward, the gate (>= 0) kept as a constant, the
    projection clamped too (after the shortcut's average pooling, itself positive). It is
    linear, u+ = J+ x with J+ >= 0, and R_x = x * (J+)^T (R_O / (u+ + eps)): non-negative for
    x >= 0 and conserving up to eps. The split between shortcut and main branch is implicit.
    ``nonneg=True`` states that x >= 0 (proven at compile time), so u+ >= 0 and the
    stabilizer needs no sign.
    """
    wp, swp = weights, skip_weight
    u_plus = _main_twin(x, acts, wp, geometry, gate)
    u_plus = u_plus.add_(_skip_forward(x, swp, skip_geometry, skip_pool))  # in place: fresh
    if nonneg and effective_eps(eps, u_plus.dtype) > 0:  # u+ >= 0: the stabilizer is + eps, in place
        den = u_plus.add_(effective_eps(eps, u_plus.dtype))
    else:
        den = stabilize(u_plus, eps, nonneg=nonneg)
    g = _block_output_share(rel, den, out)
    total = _block_transpose(g, x, acts, wp, geometry, gate)
    return total.add_(_skip_transpose(g, x, swp, skip_geometry, skip_pool)).mul_(x)


def split_ratio(h_main: torch.Tensor, h_skip: torch.Tensor, *, split: str, eps: float) -> torch.Tensor:
    """The main branch's share at a residual add (ECCV 2024 relevance splitting, METHOD_SPEC §1.4).

    ``ratio``: |h_m| / (|h_m| + |h_s| + eps), 0.5 where both are 0; ``symmetric``: 0.5;
    ``main``: 1 (everything to the main branch).
    """
    if split == "symmetric":
        return torch.full_like(h_main, 0.5)
    if split == "main":
        return torch.ones_like(h_main)
    am, as_ = h_main.abs(), h_skip.abs()
    both_zero = (am == 0) & (as_ == 0)
    return torch.where(both_zero, torch.full_like(am, 0.5), am / (am + as_ + eps))


@_float16_in_float32
def block_eccv(x: torch.Tensor, rel: torch.Tensor, acts: Sequence[torch.Tensor], h_main: torch.Tensor,
               h_skip: torch.Tensor, weights: Sequence[torch.Tensor], skip_weight: torch.Tensor | None = None, *,
               geometry: Sequence[Geo], skip_geometry: Geo | None = None, skip_pool: PoolSpec | None = None,
               split: str, eps: float) -> torch.Tensor:
    """The ECCV 2024 bottleneck backward (Otsuki et al.; METHOD_SPEC §1.4, "Exact ECCV Bottleneck backward").

    Split R at the add into R_m = r R and R_s = R - R_m (so R_m + R_s = R exactly), then
    z+ through the main branch's convs (ReLUs and a gate pass) and through the projection,
    if any; a pooled shortcut's average pooling then takes the Norm rule. ``weights`` and
    ``skip_weight`` are the convs' positive parts w+ (prepared at compile time).
    """
    r_main = split_ratio(h_main, h_skip, split=split, eps=eps) * rel
    r_skip = rel - r_main
    ins = [x, *acts]
    for i in reversed(range(len(weights))):
        r_main = zplus(ins[i], r_main, weights[i], None, eps=eps, nonneg=True, stride=geometry[i][0],
                       padding=geometry[i][1], dilation=geometry[i][2], groups=geometry[i][3])
    if skip_weight is not None:
        assert skip_geometry is not None
        xs = x if skip_pool is None else _pool(x, skip_pool)
        r_skip = zplus(xs, r_skip, skip_weight, None, eps=eps, nonneg=True, stride=skip_geometry[0],
                       padding=skip_geometry[1], dilation=skip_geometry[2], groups=skip_geometry[3])
        if skip_pool is not None:
            r_skip = x * _pool_transpose(r_skip / stabilize(xs, eps, nonneg=True), x, skip_pool)
    return r_main + r_skip


def renormalize(rel_in: torch.Tensor, rel_out: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Rescale a block's input relevance to carry its output relevance, per sample (Formulation C)."""
    dims = tuple(range(1, rel_in.dim()))
    total_in = rel_in.sum(dims, keepdim=True)
    total_out = rel_out.sum(tuple(range(1, rel_out.dim())), keepdim=True).view_as(total_in)
    return rel_in * total_out / stabilize(total_in, eps)


def flat_positive(a: torch.Tensor, rel: torch.Tensor, wp: torch.Tensor, *, eps: float,
                  stride: Sequence[int] | None = None, padding: Sequence[int] | None = None,
                  dilation: Sequence[int] | None = None, groups: int = 1) -> torch.Tensor:
    """z+ on an all-ones input, the ECCV release's first layer: R_j = sum_k w+_jk / sum_j w+_jk R_k.

    ``wp`` is w+ (prepared at compile time).
    """
    geo = (stride, padding, dilation, groups)
    z = _forward(_ones_sample(a), wp, None, *geo)  # input-independent: one sample, broadcast
    return _transpose(rel / stabilize(z, eps), wp, a.shape, *geo)


def avg_substitute(a: torch.Tensor, rel: torch.Tensor, *, kernel: int, eps: float) -> torch.Tensor:
    """The ECCV release's max-pool substitute: relevance through AvgPool2d(kernel) (stride = kernel)."""
    z = F.avg_pool2d(a, kernel)
    return avgpool(a, z, rel, eps=eps, kernel_size=(kernel, kernel), stride=(kernel, kernel), padding=(0, 0))
