"""LRP rules as frozen dataclasses of hyperparameters.

A rule knows which op kinds it applies to and which kernel computes it; ``apply`` turns a
description of one op (:class:`Op`, whose tensors are opaque handles: fx nodes when the
compiler emits a graph, real tensors in a test) into one :class:`Call` per input that
receives relevance. The math lives in :mod:`lrpfx.relevance.kernels`.

``Epsilon(eps=1e-06)`` prints as itself, so a plan and the generated code read as data.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lrpfx.errors import RuleSetError
from lrpfx.relevance import adjoints, kernels
from lrpfx.relevance.base import BlockOp, Call, Op, Rule, register_rule, registered_rules, rule_class


#: op kinds of a linear layer (weights and an optional bias)
LINEAR_KINDS = frozenset({"conv", "linear"})
#: op-table kinds whose rule goes through the op's transpose (``op.attrs["transpose"]``)
TRANSPOSE_KINDS = frozenset({"linear_op", "norm"})


def _geometry(op: Op) -> dict[str, Any]:
    if op.kind == "linear":
        return {}
    return {k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")}


def _bias(op: Op, zero_bias: bool) -> Any:
    return None if zero_bias else op.params.get("bias")


# Weight transforms are Calls on the parameter handles: the emitter folds them into buffers at
# compile time (kernels.constant), so the generated forward does no weight arithmetic.
def _const(fn: Any, t: Any, **kwargs: Any) -> Call | None:
    """``fn(t, **kwargs)`` as a deferred call, or None when there is no tensor (no bias)."""
    return None if t is None else Call(fn, (t,), kwargs)


def _pos(t: Any) -> Call | None:
    return _const(kernels.positive_part, t)


def _neg(t: Any) -> Call | None:
    return _const(kernels.negative_part, t)


# --------------------------------------------------------------------------- linear-type rules
@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al., 2015, PLoS ONE); on pooling and sums it is zennit's Norm rule.

    Args:
        eps: the stabilizer, added with the sign of z (sign(0) = +1).
        zero_bias: drop the bias from the denominator (then the rule conserves relevance).
    """

    zero_at_zero: ClassVar[str] = "proportional"
    rectified_sum: ClassVar[bool] = True  # R_i = h_i R / stabilize(u): where u <= 0, R = 0 and so is every share
    name: ClassVar[str] = "epsilon"
    kinds: ClassVar[frozenset[str]] = frozenset(
        {"conv", "linear", "batchnorm", "avgpool", "adaptive_avgpool", "add", "linear_op", "norm"})
    eps: float = 1e-6
    zero_bias: bool = False

    def apply(self, op: Op) -> tuple[Call, ...]:
        a = op.inputs[0] if op.inputs else None
        if op.kind in TRANSPOSE_KINDS:  # the generic modified-linear form: a * A^T (R / stabilize(z))
            s = Call(adjoints.divide, (op.rel, op.out), {"eps": self.eps})
            return (Call(operator.mul, (a, op.attrs["transpose"](s))),)
        if op.kind in LINEAR_KINDS:
            z = None if (self.zero_bias and op.params.get("bias") is not None) else op.out
            rectified = {"z_rectified": True} if op.attrs.get("z_rectified") and z is not None else {}
            return (Call(kernels.epsilon, (a, z, op.rel, op.params["weight"], _bias(op, self.zero_bias)),
                         {"eps": self.eps, **_geometry(op), **rectified}),)
        if op.kind == "batchnorm":
            scale = Call(kernels.batchnorm_scale, (op.params["running_var"], op.params.get("weight")),
                         {"bn_eps": op.attrs["bn_eps"]})
            return (Call(kernels.batchnorm_epsilon, (a, op.out, op.rel, scale), {"eps": self.eps}),)
        if op.kind == "avgpool":
            pool = {k: op.attrs[k] for k in ("kernel_size", "stride", "padding", "count_include_pad")}
            if op.attrs.get("ceil_mode") or op.attrs.get("divisor_override") is not None:
                pool.update(ceil_mode=op.attrs["ceil_mode"], divisor_override=op.attrs["divisor_override"])
            return (Call(kernels.avgpool, (a, op.out, op.rel), {"eps": self.eps, **pool}),)
        if op.kind == "adaptive_avgpool":
            return (Call(kernels.adaptive_avgpool2d, (a, op.out, op.rel), {"eps": self.eps}),)
        rectified = {"rectified": True} if op.attrs.get("z_rectified") else {}
        factor = Call(kernels.add_split, (op.out, op.rel), {"eps": self.eps, **rectified})
        # a summand broadcast to the sum's shape (a global-context add) takes the sum of its shares
        return tuple(Call(adjoints.times, (factor, h, h)) for h in op.inputs)

    def ratio_kinds(self) -> frozenset[str]:
        # R_in = a * T(R / z) is a * T(c): exact when no stabilizer and no dropped bias changes z
        if self.eps != 0 or self.zero_bias:
            return frozenset()
        return frozenset({"conv", "linear", "avgpool", "adaptive_avgpool", "add"}) | TRANSPOSE_KINDS

    def apply_ratio(self, op: Op) -> tuple[Call, ...]:
        if op.kind in TRANSPOSE_KINDS:  # c_a = A^T c_z
            return (op.attrs["transpose"](op.rel),)
        if op.kind in LINEAR_KINDS:
            return (Call(kernels.ratio_linear, (op.rel, op.inputs[0], op.params["weight"]), _geometry(op)),)
        if op.kind == "avgpool":
            pool = {k: op.attrs[k] for k in ("kernel_size", "stride", "padding", "count_include_pad",
                                             "ceil_mode", "divisor_override")}
            return (Call(kernels.ratio_avgpool, (op.rel, op.inputs[0], op.out), pool),)
        if op.kind == "adaptive_avgpool":
            return (Call(kernels.ratio_adaptive_avgpool2d, (op.rel, op.inputs[0], op.out)),)
        return tuple(Call(adjoints.sum_like, (op.rel, h)) for h in op.inputs)  # add: every summand keeps c


@dataclass(frozen=True)
class Zero(Epsilon):
    """LRP-0 (Bach et al., 2015): LRP-epsilon with eps = 0. On ReLU networks it equals Input x Gradient."""

    name: ClassVar[str] = "zero"
    eps: float = 0.0


@dataclass(frozen=True)
class Norm(Epsilon):
    """zennit's Norm rule for parameter-free linear ops (pooling, sums): LRP-epsilon with a small stabilizer."""

    name: ClassVar[str] = "norm"
    kinds: ClassVar[frozenset[str]] = frozenset({"avgpool", "adaptive_avgpool", "add", "linear_op", "norm"})


@dataclass(frozen=True)
class ZPlus(Rule):
    """z+ = alpha1-beta0 (Bach et al., 2015; Montavon et al., 2017, Pattern Recognition).

    zennit's ``ZPlus`` semantics: positive contributions ``w+ a+ + w- a-``, ``b+`` in the
    denominator unless ``zero_bias`` (DTD's z+ proper, which conserves relevance).
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "zplus"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def apply(self, op: Op) -> tuple[Call, ...]:
        w, nonneg = op.params["weight"], op.nonneg[0]
        args = (op.inputs[0], op.rel, _pos(w), _pos(_bias(op, self.zero_bias))) + (() if nonneg else (_neg(w),))
        return (Call(kernels.zplus, args, {"eps": self.stabilizer, "nonneg": nonneg, **_geometry(op)}),)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta with alpha - beta = 1 (Bach et al., 2015), zennit's signed-input form."""

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "alpha_beta"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise RuleSetError(f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1; got alpha={self.alpha}, "
                               f"beta={self.beta}. Hint: use alpha=2, beta=1 or alpha=1, beta=0.")

    def apply(self, op: Op) -> tuple[Call, ...]:
        w, b = op.params["weight"], _bias(op, self.zero_bias)
        return (Call(kernels.alpha_beta, (op.inputs[0], op.rel, _pos(w), _neg(w), _pos(b), _neg(b)),
                     {"alpha": self.alpha, "beta": self.beta, "eps": self.stabilizer,
                      "nonneg": op.nonneg[0], **_geometry(op)}),)


@dataclass(frozen=True)
class Gamma(Rule):
    """Generalized LRP-gamma (Montavon et al., 2019, LNCS 11700; Andeol et al., 2021)."""

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "gamma"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def apply(self, op: Op) -> tuple[Call, ...]:
        w, b, g = op.params["weight"], _bias(op, self.zero_bias), self.gamma
        w_up = _const(kernels.gamma_up, w, gamma=g)
        hyper = {"gamma": g, "eps": self.stabilizer}
        if op.nonneg[0] and g > 0:  # one extra convolution p = gamma (W+ a + b+) + eps gives both denominators
            p = (_const(kernels.gamma_p_weight, w, gamma=g),
                 Call(kernels.gamma_p_bias, (w, b), {"gamma": g, "eps": self.stabilizer}))
            if op.attrs.get("z_rectified"):
                return (Call(kernels.gamma, (op.inputs[0], op.out, op.rel, *p, w_up),
                             {**hyper, **_geometry(op), "z_rectified": True}),)
            return (Call(kernels.gamma, (op.inputs[0], op.out, op.rel, *p, w_up,
                                         _const(kernels.gamma_down_scaled, w, gamma=g)), {**hyper, **_geometry(op)}),)
        return (Call(kernels.gamma_signed, (op.inputs[0], op.out, op.rel, w_up, _const(kernels.gamma_down, w, gamma=g),
                                            _const(kernels.gamma_up, b, gamma=g), _const(kernels.gamma_down, b, gamma=g)),
                     {**hyper, "nonneg": op.nonneg[0], **_geometry(op)}),)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZBox(Rule):
    """The z^B rule for the first layer (Montavon et al., 2017).

    ``low``/``high`` are the lowest and highest normalized input values, per channel. They
    default to the images in [0, 1] after normalization with ``mean``/``std`` (ImageNet's
    unless given): low = (0 - mean) / std, high = (1 - mean) / std.
    """

    name: ClassVar[str] = "zbox"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    low: tuple[float, ...] | float | None = None
    high: tuple[float, ...] | float | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    stabilizer: float = 1e-6

    def bounds(self) -> tuple[Any, Any]:
        """(low, high), derived from mean/std where not given."""
        low = self.low if self.low is not None else tuple((0 - m) / s for m, s in zip(self.mean, self.std))
        high = self.high if self.high is not None else tuple((1 - m) / s for m, s in zip(self.mean, self.std))
        return (tuple(low) if isinstance(low, Sequence) else low), (tuple(high) if isinstance(high, Sequence) else high)

    def apply(self, op: Op) -> tuple[Call, ...]:
        low, high = self.bounds()
        channels = op.attrs.get("in_channels")
        for label, value in (("low", low), ("high", high)):
            if isinstance(value, tuple) and channels is not None and len(value) != channels:
                raise RuleSetError(
                    f"node {op.node}: zbox bound {label}={value} has {len(value)} channel(s) but the layer takes "
                    f"{channels} input channel(s) (the default bounds are ImageNet's, for RGB). Hint: bind the "
                    f"first layer with {channels} values, e.g. bindings={{'first_layer': lrpfx.ZBox(mean=..., "
                    "std=...)}}, or scalar low/high.")
        w, geo = op.params["weight"], _geometry(op)
        w_box = Call(kernels.box_weight, (w,), {"low": low, "high": high, "groups": geo.get("groups", 1)})
        return (Call(kernels.zbox, (op.inputs[0], op.rel, w, w_box), {"eps": self.stabilizer, **geo}),)


@dataclass(frozen=True)
class Flat(Rule):
    """The flat rule (Lapuschkin et al., 2019, Nature Communications): uniform over the receptive field."""

    name: ClassVar[str] = "flat"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    stabilizer: float = 1e-6

    def apply(self, op: Op) -> tuple[Call, ...]:
        return (Call(kernels.flat, (op.inputs[0], op.rel, _const(kernels.ones_like, op.params["weight"])),
                     {"eps": self.stabilizer, **_geometry(op)}),)


@dataclass(frozen=True)
class WSquare(Rule):
    """The w^2 rule (Montavon et al., 2017), for unbounded first-layer inputs."""

    name: ClassVar[str] = "wsquare"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def apply(self, op: Op) -> tuple[Call, ...]:
        return (Call(kernels.wsquare, (op.inputs[0], op.rel, _const(kernels.square, op.params["weight"]),
                                       _const(kernels.square, _bias(op, self.zero_bias))),
                     {"eps": self.stabilizer, **_geometry(op)}),)


# --------------------------------------------------------------------------- parameter-free ops
@dataclass(frozen=True)
class Pass(Rule):
    """Pass relevance through unchanged: activations, reshapes, and BatchNorm as in zennit.

    Activations: ReLU, and ReLU6/Hardtanh/clamp(lo, hi) with lo <= 0 <= hi, piecewise linear
    through 0. For these the pass-through is LRP-0 on a = (a / z) z, i.e. the secant slope
    a/z as the derivative: where the clip is inactive (lo < z < hi) it is the gradient, where
    it clips it is not (so LRP-0 equals Input x Gradient only while no unit saturates).
    """

    zero_at_zero: ClassVar[str] = "transmit"
    name: ClassVar[str] = "pass"
    kinds: ClassVar[frozenset[str]] = frozenset({"relu", "hardtanh", "reshape", "batchnorm"})

    def apply(self, op: Op) -> tuple[Any, ...]:
        if op.kind == "reshape":
            return (Call(kernels.reshape_as, (op.rel, op.inputs[0])),)
        return (op.rel,)  # same shape: the relevance itself, no line of code

    def ratio_kinds(self) -> frozenset[str]:
        return frozenset({"relu", "reshape"})  # not the clipping activations: their a/z is no mask

    def apply_ratio(self, op: Op) -> tuple[Call, ...]:
        if op.kind == "relu":  # R_z = R_a = a * c, so c_z = c where a = z > 0, else 0
            return (Call(kernels.ratio_relu, (op.rel, op.out)),)
        return self.apply(op)


@dataclass(frozen=True)
class Identity(Rule):
    """The identity rule for elementwise activations: R_in = R_out (Achtibat et al., 2024, "AttnLRP", ICML).

    For an activation f it is LRP-0 on f(x) = x * (f(x) / x) with the ratio held constant, so
    a network explained with it (and LRP-0 elsewhere) is explained as its linearized twin. Bound
    to a whole module by type (``bindings={MyLayer: lrpfx.Identity()}``, kind ``module``), it passes
    the relevance of a shape-preserving module through unchanged.
    """

    name: ClassVar[str] = "identity"
    kinds: ClassVar[frozenset[str]] = frozenset({"elementwise", "module"})

    def apply(self, op: Op) -> tuple[Any, ...]:
        return (op.rel,)


@dataclass(frozen=True)
class Route(Rule):
    """Routing ops (slice, pad, permute, expand, stack, roll, ...): the op's exact adjoint, R_in = A^T R_out.

    A is a 0/1 matrix, so every linear-family rule reduces to this (no stabilizer, no division),
    and relevance is conserved wherever the op drops no element. The adjoint is found by
    replaying the op on index tensors (:func:`lrpfx.relevance.adjoints.route_back`).
    """

    zero_at_zero: ClassVar[str] = "transmit"
    name: ClassVar[str] = "route"
    kinds: ClassVar[frozenset[str]] = frozenset({"routing"})

    def apply(self, op: Op) -> tuple[Any, ...]:
        return tuple(op.attrs["transpose"](op.rel))

    def ratio_kinds(self) -> frozenset[str]:
        return self.kinds  # each output copies one input element, so c routes as R does

    def apply_ratio(self, op: Op) -> tuple[Any, ...]:
        return self.apply(op)


@dataclass(frozen=True)
class WinnerTakesAll(Rule):
    """Max pooling: all relevance of a window goes to its maximum (the gradient; zennit's default)."""

    zero_at_zero: ClassVar[str] = "transmit"
    name: ClassVar[str] = "wta"
    kinds: ClassVar[frozenset[str]] = frozenset({"maxpool"})

    def apply(self, op: Op) -> tuple[Call, ...]:
        if "output_size" in op.attrs:  # adaptive max pooling
            return (Call(kernels.adaptive_maxpool_wta, (op.inputs[0], op.rel),
                         {"output_size": op.attrs["output_size"]}),)
        if "indices" in op.attrs:  # the forward kept the argmax of every window
            return (Call(kernels.maxpool_wta_indexed, (op.inputs[0], op.rel, op.attrs["indices"])),)
        return (Call(kernels.maxpool_wta, (op.inputs[0], op.rel),
                     {k: op.attrs[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}),)

    def ratio_kinds(self) -> frozenset[str]:
        return self.kinds  # the winner holds the output's value, so c routes as R does

    def apply_ratio(self, op: Op) -> tuple[Call, ...]:
        return self.apply(op)


@dataclass(frozen=True)
class SignalTakesAll(Rule):
    """A multiplicative gate y = x * g: the signal x takes all relevance, the gate g none.

    "Signal-take-all" (Arras et al., 2017, "Explaining recurrent neural network predictions in
    sentiment analysis", WASSA; Arras et al., 2019, LNCS 11700, ch. 11) for the gates of LSTMs:
    the gate decides how much of the signal passes and is not itself an explanation of the
    output. Applied here to squeeze-and-excitation (Hu et al., 2018), where g = sigmoid(...)
    is computed from the signal's channel means: R_x = R_y, and the gate's branch is not on
    the relevance path at all. It is LRP-0 (and LRP-eps as eps -> 0) on y = g x with g held
    constant, so LRP-0 equals Input x Gradient of the model with its gates detached.
    """

    zero_at_zero: ClassVar[str] = "transmit"
    name: ClassVar[str] = "signal_takes_all"
    kinds: ClassVar[frozenset[str]] = frozenset({"gate"})

    def apply(self, op: Op) -> tuple[Call, ...]:
        return (Call(kernels.signal_takes_all, (op.rel, op.inputs[0])),)


@dataclass(frozen=True)
class Slice(Rule):
    """Concatenation y = cat(x_1, ..., x_n): each x_i takes its own slice of R_y (exact conservation).

    Concatenation is routing, not mixing: LRP-0, epsilon and z+ all reduce to this, and so does
    the gradient (each output unit has exactly one input, with weight 1).
    """

    zero_at_zero: ClassVar[str] = "transmit"
    name: ClassVar[str] = "slice"
    kinds: ClassVar[frozenset[str]] = frozenset({"cat"})

    def apply(self, op: Op) -> tuple[Call, ...]:
        return tuple(Call(kernels.cat_slice, (op.rel, op.attrs["parts"]), {"dim": op.attrs["dim"], "index": i})
                     for i in op.attrs["index"])

    def ratio_kinds(self) -> frozenset[str]:
        return self.kinds

    def apply_ratio(self, op: Op) -> tuple[Call, ...]:
        return self.apply(op)


@dataclass(frozen=True)
class AvgMatched(Rule):
    """Max pooling treated as average pooling with the max-pool's own window (METHOD_SPEC §1.3, [DER]).

    R_j = sum_k a_j / sum_{j' in win(k)} a_j' * R_k; ``count_include_pad`` cancels.
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "avg_matched"
    kinds: ClassVar[frozenset[str]] = frozenset({"maxpool"})
    stabilizer: float = 1e-6

    def apply(self, op: Op) -> tuple[Call, ...]:
        _not_adaptive(self, op)
        if op.attrs["dilation"] != (1, 1) or op.attrs["ceil_mode"]:
            raise RuleSetError(f"node {op.node}: avg_matched needs a max-pool without dilation and ceil_mode. "
                               "Hint: bind 'wta' to this max-pool instead.")
        a = op.inputs[0]
        attrs = {k: op.attrs[k] for k in ("kernel_size", "stride", "padding")}
        z = Call(kernels.avg_pool, (a,), attrs)
        return (Call(kernels.avgpool, (a, z, op.rel), {"eps": self.stabilizer, "count_include_pad": True, **attrs}),)


def _not_adaptive(rule: Rule, op: Op) -> None:
    if "output_size" in op.attrs:
        raise RuleSetError(f"node {op.node}: rule {rule.name!r} needs a max-pool with a fixed window, not an "
                           "adaptive one. Hint: bind 'wta' to this max-pool instead.")


# --------------------------------------------------------------------------- the ECCV release's choices
@dataclass(frozen=True)
class FlatPositive(Rule):
    """The ECCV 2024 release's first layer: z+ on an all-ones input (a "flat-z+", input-independent)."""

    name: ClassVar[str] = "flat_positive"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    stabilizer: float = 1e-5

    def apply(self, op: Op) -> tuple[Call, ...]:
        return (Call(kernels.flat_positive, (op.inputs[0], op.rel, _pos(op.params["weight"])),
                     {"eps": self.stabilizer, **_geometry(op)}),)


@dataclass(frozen=True)
class AvgSubstitute(Rule):
    """The ECCV 2024 release's max-pool rule: relevance as through ``AvgPool2d(kernel)`` (METHOD_SPEC §1.3).

    Its windows are misaligned with ResNet's 3x3/s2/p1 max-pool; the shapes still match.
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "avg_substitute"
    kinds: ClassVar[frozenset[str]] = frozenset({"maxpool"})
    kernel: int = 2
    stabilizer: float = 1e-5

    def apply(self, op: Op) -> tuple[Call, ...]:
        _not_adaptive(self, op)
        return (Call(kernels.avg_substitute, (op.inputs[0], op.rel), {"kernel": self.kernel, "eps": self.stabilizer}),)


# --------------------------------------------------------------------------- whole-block rules
BLOCK_KINDS = frozenset({"bottleneck", "basic_block"})
#: ECCV code modes (``--skip-connection-prop-type``) -> (split, identity_skip); METHOD_SPEC §1.4
ECCV_MODES = {"simple": ("symmetric", False), "flows_skip_simple": ("symmetric", True),
              "latest": ("ratio", False), "flows_skip": ("ratio", True)}


def _block_tensors(op: Op, *names: str) -> dict[str, Any]:
    """The block's tensors and static geometry as keyword arguments (None values left out)."""
    b = op.block
    assert b is not None, f"{op.node}: a block rule needs a block op"
    values = {"x": op.inputs[0], "out": op.out, "rel": op.rel, "acts": b.acts, "h_main": b.h_main,
              "h_skip": b.h_skip, "weights": b.weights, "skip_weight": b.skip_weight, "gate": b.gate,
              "geometry": b.geometry, "skip_geometry": b.skip_geometry, "skip_pool": b.skip_pool}
    return {k: values[k] for k in names if values[k] is not None}


_BLOCK_STATIC = ("weights", "skip_weight", "gate", "geometry", "skip_geometry", "skip_pool")


def _positive_weights(kw: dict[str, Any]) -> dict[str, Any]:
    """The block's conv weights replaced by their positive parts (folded at compile time)."""
    kw["weights"] = [_pos(w) for w in kw["weights"]]
    if "skip_weight" in kw:
        kw["skip_weight"] = _pos(kw["skip_weight"])
    return kw


def _needs_folded(rule: Rule, op: Op) -> None:
    if op.block is None or not op.block.folded:
        raise RuleSetError(f"block {op.node}: rule {rule.name!r} works on the block with BatchNorm folded, but "
                           "this rule set keeps BatchNorm (options.batchnorm = 'pass'). Hint: fold BatchNorm, or "
                           "use the 'eccv' block rule.")


@dataclass(frozen=True)
class DenseEpsilon(Rule):
    """C3-LRP's residual-block rule, literal reading (Doublet et al., JSAI 2024; METHOD_SPEC §2 A).

    "Each bottleneck block as a single dense layer": R_x = x * J^T (R_O / (O + eps)).
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "dense_eps"
    kinds: ClassVar[frozenset[str]] = BLOCK_KINDS
    eps: float = 1e-6

    def apply(self, op: Op) -> tuple[Call, ...]:
        _needs_folded(self, op)
        kw = _block_tensors(op, "x", "out", "rel", "acts", *_BLOCK_STATIC)
        return (Call(kernels.block_dense_eps, (), {**kw, "eps": self.eps}),)


@dataclass(frozen=True)
class DenseZPlus(Rule):
    """C3-LRP's residual-block rule on the block's positive twin (METHOD_SPEC §2 B; the recommended default)."""

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "dense_zplus"
    kinds: ClassVar[frozenset[str]] = BLOCK_KINDS
    stabilizer: float = 1e-6

    def apply(self, op: Op) -> tuple[Call, ...]:
        _needs_folded(self, op)
        kw = _positive_weights(_block_tensors(op, "x", "out", "rel", "acts", *_BLOCK_STATIC))
        return (Call(kernels.block_dense_zplus, (), {**kw, "eps": self.stabilizer, "nonneg": op.nonneg[0]}),)


@dataclass(frozen=True)
class EccvSplit(Rule):
    """Relevance splitting at the residual add, then z+ inside the block (Otsuki et al., ECCV 2024).

    Args:
        split: ``ratio`` (|h_m| / (|h_m| + |h_s| + eps)) or ``symmetric`` (0.5).
        identity_skip: whether identity shortcuts (S-blocks) take part in the split; if not,
            their relevance all goes to the main branch (the code's ``simple``/``latest``).
        mode: one of the code's modes (``simple``, ``flows_skip_simple``, ``latest``,
            ``flows_skip``), which sets ``split`` and ``identity_skip``.
        stabilizer: the code adds 1e-5 to every z+ denominator.
    """

    name: ClassVar[str] = "eccv"
    kinds: ClassVar[frozenset[str]] = BLOCK_KINDS
    split: str = "ratio"
    identity_skip: bool = True
    mode: str | None = None
    stabilizer: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode is not None:
            if self.mode not in ECCV_MODES:
                raise RuleSetError(f"eccv: mode={self.mode!r} is not one of {sorted(ECCV_MODES)}.")
            object.__setattr__(self, "split", ECCV_MODES[self.mode][0])
            object.__setattr__(self, "identity_skip", ECCV_MODES[self.mode][1])
        if self.split not in ("ratio", "symmetric"):
            raise RuleSetError(f"eccv: split={self.split!r} is not 'ratio' or 'symmetric'.")

    def block_split(self, op: Op) -> str:
        """The split used at this block's add."""
        return self.split if (op.block is not None and op.block.projection or self.identity_skip) else "main"

    def apply(self, op: Op) -> tuple[Call, ...]:
        kw = _positive_weights(_block_tensors(op, "x", "rel", "acts", "h_main", "h_skip", "weights", "skip_weight",
                                              "geometry", "skip_geometry", "skip_pool"))
        return (Call(kernels.block_eccv, (), {**kw, "split": self.block_split(op), "eps": self.stabilizer}),)


@dataclass(frozen=True)
class Renormalize(EccvSplit):
    """Any inner block rule, then the block's input relevance rescaled to conserve it (METHOD_SPEC §2 C).

    ``inner`` is ``eccv`` (the split of :class:`EccvSplit`, with its options) or ``dense_eps``.
    """

    name: ClassVar[str] = "renorm"
    inner: str = "eccv"

    def apply(self, op: Op) -> tuple[Call, ...]:
        if self.inner == "dense_eps":
            inner = DenseEpsilon(eps=self.stabilizer).apply(op)[0]
        elif self.inner == "eccv":
            inner = super().apply(op)[0]
        else:
            raise RuleSetError(f"renorm: inner={self.inner!r} is not 'eccv' or 'dense_eps'.")
        return (Call(kernels.renormalize, (inner, op.rel), {"eps": self.stabilizer}),)


for _cls in (Epsilon, Zero, Norm, ZPlus, AlphaBeta, Gamma, ZBox, Flat, WSquare, Pass, Identity, Route,
             WinnerTakesAll, AvgMatched,
             SignalTakesAll, Slice, FlatPositive, AvgSubstitute, DenseEpsilon, DenseZPlus, EccvSplit, Renormalize):
    register_rule(_cls)

#: the rules, and the base types and registry re-exported from :mod:`lrpfx.relevance.base`
__all__ = [
    "AlphaBeta",
    "AvgMatched",
    "AvgSubstitute",
    "BlockOp",
    "Call",
    "DenseEpsilon",
    "DenseZPlus",
    "EccvSplit",
    "Epsilon",
    "Flat",
    "FlatPositive",
    "Gamma",
    "Identity",
    "Norm",
    "Op",
    "Pass",
    "Renormalize",
    "Route",
    "Rule",
    "SignalTakesAll",
    "Slice",
    "WSquare",
    "WinnerTakesAll",
    "ZBox",
    "ZPlus",
    "Zero",
    "register_rule",
    "registered_rules",
    "rule_class",
]
