"""Exact adjoints (transposes) of the linear ops in the op table: plain tensor functions, no fx, no autograd.

A linear op z = A a (+ b) takes every LRP rule of the linear family through its transpose:
``s = R / stabilize(z)``, ``c = A^T s``, ``R_a = a * c`` (Montavon et al., 2019, the same four
steps as for a convolution). This module holds the ``A^T`` of each op class:

* **Routing ops** (slice, pad, permute, reshape, expand, cat, stack, roll, nearest upsampling,
  channel shuffle, ...): A is a 0/1 matrix. Its transpose is found without writing one adjoint
  per op: the op is replayed on an *index tensor* (each input element holds its own position,
  1-based; 0 marks "no source", e.g. padding), which reveals which input element each output
  element copies; relevance is then scatter-added back. This is exact, conserves relevance
  wherever the op drops nothing, and exports (``arange``, ``scatter_add``, no data-dependent shapes).
* **Linear ops in one tensor**: products with a constant or held factor, sums and means,
  matrix products with a constant, bilinear interpolation, and normalizations with their
  scale held constant (CP-LRP; Ali et al., 2022): one small transpose each.

Every function branches only on static facts (shapes, literal arguments), so the explainer exports.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lrpfx.relevance.kernels import _in_place, stabilize


# --------------------------------------------------------------------------- routing ops
def source_index(a: torch.Tensor, *before: torch.Tensor) -> torch.Tensor:
    """``a``'s shape, holding each element's 1-based position after the elements of ``before``.

    int64: routing ops replay on integers (interpolation, which needs floats, has its own
    spatial replay, :func:`spatial_index`).
    """
    offset = 1
    for b in before:
        offset = offset + b.numel()
    return torch.arange(a.numel(), dtype=torch.int64, device=a.device).add_(offset).view(a.shape)


def no_source(t: torch.Tensor) -> torch.Tensor:
    """Index tensor for an operand that takes no relevance (a constant): every element is 0, "no source"."""
    return torch.zeros(t.shape, dtype=torch.int64, device=t.device)


def call_method(obj: torch.Tensor, name: str, *args: Any, **kwargs: Any) -> Any:
    """``obj.name(*args, **kwargs)``: replays a routing method (``x.permute(...)``) on an index tensor."""
    return getattr(obj, name)(*args, **kwargs)


def route_back(rel: torch.Tensor, index: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The adjoint of a routing op: scatter-add ``rel`` to the input positions ``index`` names.

    ``index`` is the op replayed on :func:`source_index` tensors of ``inputs`` (in order); slot 0
    collects what came from no input (padding, constants) and is dropped. Returns one tensor
    per input, of its shape.
    """
    total = 1
    for a in inputs:
        total = total + a.numel()
    flat = rel.new_zeros(total)
    flat.scatter_add_(0, index.reshape(-1).to(torch.int64), rel.reshape(-1))
    out = []
    start = 1
    for a in inputs:
        out.append(flat.narrow(0, start, a.numel()).view(a.shape))
        start = start + a.numel()
    return tuple(out)


def permute_back(rel: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """The adjoint of ``a.permute(dims)``: ``rel`` permuted by the inverse permutation (a bijection: each
    element goes back to its one source, as :func:`route_back` would send it, without the scatter)."""
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d % len(dims)] = i
    return rel.permute(inverse)


def cast_like(rel: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Adjoint of a value-preserving op (``contiguous``, ``clone``, a dtype cast): ``rel`` in ``a``'s dtype."""
    return rel.to(a.dtype)


def spatial_index(a: torch.Tensor) -> torch.Tensor:
    """(1, 1, *spatial) float32 tensor of 1-based spatial positions (exact: far below 2**24 pixels).

    Interpolation is the same map for every sample and channel, so its adjoint is found by
    replaying it on the spatial positions alone, in float32 (ONNX's Resize has no float64 kernel).
    """
    spatial = a.shape[2:]
    count = 1
    for d in spatial:
        count = count * d
    return torch.arange(1, count + 1, dtype=torch.float32, device=a.device).view(1, 1, *spatial)


def route_back_spatial(rel: torch.Tensor, index: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The adjoint of nearest interpolation: ``index`` (1, 1, *out spatial) names each output's source pixel."""
    n, c = a.shape[0], a.shape[1]
    count = 1
    for d in a.shape[2:]:
        count = count * d
    flat = rel.new_zeros(n, c, count + 1)
    source = index.reshape(1, 1, -1).to(torch.int64).expand(n, c, -1)
    flat.scatter_add_(2, source, rel.reshape(n, c, -1))
    return flat.narrow(2, 1, count).reshape(a.shape)


def pixel_shuffle(t: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """``F.pixel_shuffle`` as reshape and permute: the same routing, for index tensors in every runtime."""
    n, c, h, w = t.shape
    r = upscale_factor
    return t.reshape(n, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def pixel_unshuffle(t: torch.Tensor, downscale_factor: int) -> torch.Tensor:
    """``F.pixel_unshuffle`` as reshape and permute."""
    n, c, h, w = t.shape
    r = downscale_factor
    return t.reshape(n, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


def channel_shuffle(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``torch.channel_shuffle`` as reshape and transpose."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, groups, c // groups, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def split_item(x: torch.Tensor, how: str, spec: Any, dim: int, item: int) -> torch.Tensor:
    """Item ``item`` of ``x.split(spec, dim)`` / ``chunk`` / ``tensor_split`` / ``unbind``: one routing op.

    Canonicalization replaces ``split(...)[i]`` by this call, so that every part is a plain
    tensor op whose adjoint :func:`route_back` finds.
    """
    if how == "unbind":
        return x.select(dim, item)
    parts = getattr(torch, how)(x, spec, dim)
    return parts[item]


# --------------------------------------------------------------------------- linear ops in one tensor
def sum_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t`` summed over the dimensions that broadcasting added or expanded to reach its shape from ``shape``."""
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


def sum_like(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``t`` summed to ``a``'s shape (the adjoint of broadcasting ``a``)."""
    return sum_to(t, a.shape)


def times(s: torch.Tensor, a: torch.Tensor, factor: Any) -> torch.Tensor:
    """Transpose of z = a * factor (factor a constant or a held value): ``sum_to(s * factor)``."""
    return sum_to(s * factor, a.shape)


def plus_times(total: torch.Tensor, s: torch.Tensor, a: torch.Tensor, factor: Any) -> torch.Tensor:
    """``total + times(s, a, factor)``: one pass (``addcmul``) where the product already has ``a``'s
    and ``total``'s shape, e.g. a residual sum's skip share added to the other share of its input."""
    if isinstance(factor, torch.Tensor) and s.shape == factor.shape == a.shape == total.shape:
        return torch.addcmul(total, s, factor)
    return total + times(s, a, factor)


def divided(s: torch.Tensor, a: torch.Tensor, divisor: Any) -> torch.Tensor:
    """Transpose of z = a / divisor: ``sum_to(s / divisor)``."""
    return sum_to(s / divisor, a.shape)


def reduced(s: torch.Tensor, a: torch.Tensor, dim: Any = None, keepdim: bool = False, *,
            mean: bool) -> torch.Tensor:
    """Transpose of z = a.sum(dim) / a.mean(dim): broadcast back (divided by the count for a mean)."""
    dims = tuple(range(a.dim())) if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    dims = tuple(sorted(d % a.dim() for d in dims))
    if not keepdim:
        for d in dims:
            s = s.unsqueeze(d)
    out = s.expand(a.shape)
    if mean:
        count = 1
        for d in dims:
            count = count * a.shape[d]
        out = out / count
    return out


def matmul_right(s: torch.Tensor, a: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Transpose of z = a @ other (``other`` constant or held): ``s @ other^T``, summed to ``a``'s shape."""
    if other.dim() == 1:
        return sum_to(s.unsqueeze(-1) * other, a.shape)
    return sum_to(s @ other.transpose(-1, -2), a.shape)


def matmul_left(s: torch.Tensor, a: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Transpose of z = other @ a (``other`` constant or held): ``other^T @ s``, summed to ``a``'s shape."""
    if other.dim() == 1:
        return sum_to(other.unsqueeze(-1) * s.unsqueeze(-2), a.shape)
    return sum_to(other.transpose(-1, -2) @ s, a.shape)


def einsum_operand(s: torch.Tensor, equation: str, k: int, *operands: torch.Tensor) -> torch.Tensor:
    """Transpose of z = einsum(equation, *operands) in operand ``k`` (the others constant or held).

    ``einsum(other operands' subscripts, output subscripts -> operand k's subscripts)``; exact when
    every index of operand k appears in the output or in another operand (no diagonal, no ellipsis).
    """
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    others = [(subs[i], operands[i]) for i in range(len(operands)) if i != k]
    spec = ",".join([sub for sub, _ in others] + [out]) + "->" + subs[k]
    return torch.einsum(spec, *[t for _, t in others], s)


def interpolate_linear(s: torch.Tensor, a: torch.Tensor, size: Any = None, scale_factor: Any = None,
                       mode: str = "bilinear", align_corners: bool | None = None,
                       recompute_scale_factor: bool | None = None, antialias: bool = False) -> torch.Tensor:
    """Transpose of bilinear ``F.interpolate`` (2-D): Wy^T s Wx, with Wy and Wx read off the same call.

    Bilinear interpolation is separable, Y = Wy X Wx^T. Interpolating the identity along one axis
    (the other axis of size 1, whose weights are copies) with the same arguments gives that
    axis's weights exactly, so the transpose exports with plain ops.
    """
    if mode != "bilinear" or antialias:
        raise NotImplementedError(f"interpolate mode={mode!r} antialias={antialias}")
    h, w = a.shape[-2], a.shape[-1]
    kw = {"size": size, "scale_factor": scale_factor, "mode": mode, "align_corners": align_corners,
          "recompute_scale_factor": recompute_scale_factor}
    eye_y = torch.eye(h, dtype=s.dtype, device=s.device).view(1, h, h, 1)
    eye_x = torch.eye(w, dtype=s.dtype, device=s.device).view(1, w, 1, w)
    wy = torch.nn.functional.interpolate(eye_y, **kw)[0, :, :, 0]    # (h, Ho): Wy^T
    wx = torch.nn.functional.interpolate(eye_x, **kw)[0, :, 0, :]    # (w, Wo): Wx^T
    return wy @ s @ wx.transpose(0, 1)


# --------------------------------------------------------------------------- normalizations, scale held
def _std(a: torch.Tensor, dims: tuple[int, ...], eps: float, centered: bool) -> torch.Tensor:
    if centered:
        var = a.var(dim=dims, keepdim=True, unbiased=False)
    else:
        var = a.pow(2).mean(dim=dims, keepdim=True)
    return (var + eps).sqrt()


def layer_norm(s: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None, *, ndim: int, eps: float | None,
               centered: bool = True) -> torch.Tensor:
    """Transpose of LayerNorm / RMSNorm over the last ``ndim`` dims with the std held constant.

    y = C(a) / std * w + b with C the centering (symmetric), so A^T s = C(s * w / std).
    ``centered=False`` is RMSNorm (no centering; std is the root mean square).
    """
    dims = tuple(range(a.dim() - ndim, a.dim()))
    eps = torch.finfo(a.dtype).eps if eps is None else eps  # RMSNorm's default
    t = s * weight if weight is not None else s
    if centered and _in_place(a) and a.dtype in (torch.float32, torch.float64):
        # 1 / std from LayerNorm's own kernel (one fused pass; ``var`` takes about five times as long)
        t = t * torch.native_layer_norm(a, a.shape[a.dim() - ndim:], None, None, eps)[2]
    else:
        t = t / _std(a, dims, eps, centered)
    return t - t.mean(dim=dims, keepdim=True) if centered else t


def group_norm(s: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None, *, groups: int,
               eps: float) -> torch.Tensor:
    """Transpose of GroupNorm (InstanceNorm: groups = channels) with the std held constant."""
    n, c = a.shape[0], a.shape[1]
    if weight is not None:
        s = s * weight.view(1, c, *([1] * (a.dim() - 2)))
    g = a.reshape(n, groups, -1)
    t = s.reshape(n, groups, -1) / _std(g, (2,), eps, True)
    return (t - t.mean(dim=2, keepdim=True)).reshape(a.shape)


def divide(rel: torch.Tensor, z: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``s = R / stabilize(z)`` for the linear-op rules (eps = 0: LRP-0, exact zeros give 0)."""
    return rel / stabilize(z, eps)
