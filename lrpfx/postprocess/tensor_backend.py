"""C3 in pure torch: batched, device-agnostic, traceable by torch.export, ONNX and torch.compile.

Every step mirrors the OpenCV reference (:mod:`lrpfx.postprocess.opencv_backend`) operation
for operation in float64, so the masks agree pixel for pixel (tests/test_c3.py checks it):

* area resizing reproduces cv2's ``INTER_AREA`` at any shrink ratio: its integer-factor path
  (block sums grouped as cv2 adds them, times ``1.f/area``) and its general path (float32
  overlap weights, each axis summed in cv2's order); with symbolic (dynamic) sizes, the same
  weights as two matrix products; a map smaller than ``resize_to`` keeps its native size;
* Otsu replays cv2's sequential recurrence over the 256 histogram bins (256 unrolled steps);
* filled external contours are the 8-connected components of the complement of the background
  that is 4-connected to the image's outside (what ``findContours(RETR_EXTERNAL)`` +
  ``drawContours(thickness=-1)`` fill, holes and nested blobs included);
* connected components come from :func:`lrpfx.postprocess.labeling.connected_components`.

Value checks (NaN, inf) run in eager mode only: an exported or compiled graph cannot raise, so
there a non-finite sample under ``nan_policy="raise"`` yields an all-zero map and an empty mask.
"""
from __future__ import annotations

import torch

from lrpfx.errors import InputError
from lrpfx.postprocess.c3 import (FLT_EPSILON, C3Config, Threshold, area_is_fast, area_scale, area_taps,
                                  quantile_position, selection_size)
from lrpfx.postprocess.labeling import connected_components, eager, first_pixel, outside_background

_F64 = torch.float64


def c3_tensor(relevance: torch.Tensor, *, pool: str = "sum", positive_only: bool = True,
              resize_to: tuple[int, int] | None = (28, 28), threshold: str = "mean",
              contour_threshold: str | None = None, contour_rank: str = "mass",
              component_rank: str = "peak", connectivity: int = 8, fallback: str = "contour",
              nan_policy: str = "raise", output: str = "masked_full_res",
              scale: float = 1.0, rank: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """C3 region selection of a batch of relevance maps, in torch ops only.

    The options and their defaults are those of :class:`lrpfx.postprocess.C3Config`.

    Args:
        relevance: (N, C, H, W) relevance (also accepted: (N, H, W) and (H, W)), any float
            dtype and device.

    Returns:
        ``(c3_map, mask)``. With ``output="masked_full_res"`` both are (N, H, W): the pooled
        map (clipped at 0 when ``positive_only``) times ``scale`` inside the nearest-upsampled
        mask, 0 elsewhere, in the input's dtype, and the bool mask. With
        ``output="masked_low_res"`` both are at the selection size: ``resize_to``, except that
        a dimension smaller than ``resize_to`` keeps its native size. An empty selection
        (constant or non-positive map, empty B) gives zeros and an all-False mask.

    Raises:
        ValueError: an invalid option; in a graph with a dynamic height or width, a selection
            at that dynamic size (``resize_to=None``, whose labelling needs a fixed size).
        lrpfx.errors.InputError: a badly shaped input, or NaN/inf under ``nan_policy="raise"``
            (eager mode only).
    """
    # validating the options is plain Python: export and dynamo run it at trace time, no graph op
    cfg = C3Config(pool=pool, positive_only=positive_only, resize_to=resize_to, threshold=threshold,
                   contour_threshold=contour_threshold, contour_rank=contour_rank,
                   component_rank=component_rank, connectivity=connectivity, fallback=fallback,
                   nan_policy=nan_policy, output=output, scale=scale, rank=rank)
    r, valid = _apply_nan_policy(_as_batch(relevance), cfg.nan_policy)
    full = pool_channels(r, cfg.pool, cfg.positive_only)
    low = area_resize(full, cfg.resize_to)
    if _symbolic(*low.shape[-2:]):
        raise ValueError(
            f"C3 with resize_to={cfg.resize_to} runs its selection at the input's dynamic size: the labelling "
            "(lrpfx.postprocess.labeling.connected_components) runs a number of rounds fixed by the map size, "
            "so it cannot take a dynamic height or width. Hint: export with a fixed size (dynamic_size=False, "
            "`lrpfx export --fixed-size`), or set resize_to, e.g. (28, 28), and export with a minimum height and "
            "width (min_size) of at least resize_to.")
    mask = select(low, cfg) & valid.view(-1, 1, 1)
    dtype = relevance.dtype if relevance.is_floating_point() else _F64
    if cfg.output == "masked_low_res":
        return _masked(low, mask, cfg.scale, dtype), mask
    mask_full = upsample_nearest(mask, full.shape[-2:])
    return _masked(full, mask_full, cfg.scale, dtype), mask_full


def _masked(values: torch.Tensor, mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.where(mask, values, 0.0) * scale).to(dtype)


# ----------------------------------------------------------------------------- input
def _validating() -> bool:
    """Value checks run in eager mode only: exported and compiled graphs carry none."""
    return eager()


def _as_batch(relevance: torch.Tensor) -> torch.Tensor:
    if not isinstance(relevance, torch.Tensor):
        raise InputError(f"c3_tensor takes a torch.Tensor, got {type(relevance).__name__}. "
                         "Hint: use c3_opencv for numpy arrays, or torch.as_tensor(x).")
    if relevance.dim() not in (2, 3, 4) or relevance.numel() == 0:
        raise InputError(f"relevance has shape {tuple(relevance.shape)}; C3 takes (N, C, H, W), "
                         "(N, H, W) or (H, W) with no empty dimension. Hint: pass the explainer's "
                         "input relevance.")
    r = relevance.to(_F64)
    if r.dim() == 2:
        return r[None, None]
    return r[:, None] if r.dim() == 3 else r


def _apply_nan_policy(r: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(r)
    valid = finite.flatten(1).all(1)
    if policy == "raise" and _validating() and not bool(valid.all()):
        bad = [int(i) for i in (~valid).nonzero().flatten()]
        raise InputError(f"relevance sample(s) {bad} contain NaN or inf. Hint: fix the explainer's "
                         "input, or pass nan_policy='zero' to map non-finite values to 0.")
    if policy == "zero":
        valid = torch.ones_like(valid)
    elif _validating():
        return r, valid  # eager mode raised above on any non-finite value: nothing to replace
    return torch.where(finite, r, 0.0), valid


def pool_channels(r: torch.Tensor, pool: str, positive_only: bool) -> torch.Tensor:
    """(N, C, H, W) → (N, H, W); channels are added one after the other, as the reference does."""
    parts = [r[:, c] for c in range(r.shape[1])]
    if pool == "pos_sum":
        parts = [p.clamp(min=0) for p in parts]
    elif pool in ("abs_sum", "max_norm"):
        parts = [p.abs() for p in parts]
    elif pool == "l2_norm":
        parts = [p * p for p in parts]
    out = parts[0]
    for p in parts[1:]:
        out = torch.maximum(out, p) if pool == "max_norm" else out + p
    if pool == "l2_norm":
        out = out.sqrt()
    return out.clamp(min=0) if positive_only else out


def area_resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """cv2 ``INTER_AREA`` to the selection size (``size``, never larger than the map), any ratio.

    Bit for bit in float64 with static sizes: cv2's integer-factor path (block sums) where cv2
    takes it, else its general path (a weighted sum per axis, horizontal first, in cv2's order
    and with its float32 weights). With symbolic sizes (an export with a dynamic height and
    width) the same weights are built from the sizes in graph ops and applied as two matrix
    products, ``Wy @ X @ Wx^T``: equal to cv2 up to the rounding of the sums.
    """
    if size is None:
        return x
    h_in, w_in = x.shape[-2:]
    if torch.jit.is_tracing():  # jit.trace records sizes as tensors: the trace keeps this map size
        h_in, w_in = int(h_in), int(w_in)
    h, w = selection_size((h_in, w_in), size)
    if _symbolic(h_in, w_in, h, w):
        return area_resize_matrix(x, (h, w))
    if (h, w) == (h_in, w_in):
        return x
    if area_is_fast(h_in, h) and area_is_fast(w_in, w):
        return _area_blocks(x, h, w)
    # cv2 sums along each source row first, then combines the rows; the taps gather whole rows
    # (dim 1), which is much faster than gathering columns, hence the transposes
    cols = _weighted_taps(x.transpose(1, 2).contiguous(), *area_taps(w_in, w))  # (N, w, H_in)
    return _weighted_taps(cols.transpose(1, 2).contiguous(), *area_taps(h_in, h))


def _symbolic(*sizes: object) -> bool:
    return any(isinstance(s, torch.SymInt) for s in sizes)


def _area_blocks(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """cv2's integer-factor path: block sums grouped as cv2 adds them, times ``1.f/area``."""
    n_img, h_in, w_in = x.shape
    fy, fx = h_in // h, w_in // w
    blocks = x.reshape(n_img, h, fy, w, fx).permute(0, 1, 3, 2, 4).reshape(n_img, h, w, fy * fx)
    return _cv2_block_sum(blocks) * area_scale(fy * fx)


def _weighted_taps(x: torch.Tensor, index: tuple[tuple[int, ...], ...],
                   weight: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """Σ_k x[:, idx[d, k]] · w[d, k] along dim 1, added in k order (cv2's); padding taps add 0."""
    idx = torch.tensor(index, device=x.device)
    wt = torch.tensor(weight, dtype=_F64, device=x.device).unsqueeze(-1)
    out = x.index_select(1, idx[:, 0]) * wt[:, 0]
    for k in range(1, idx.shape[1]):
        out = out + x.index_select(1, idx[:, k]) * wt[:, k]
    return out


def area_weights(src: int | torch.SymInt, dst: int | torch.SymInt,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cv2's ``INTER_AREA`` weights ``src -> dst`` as (dst, src) float64 matrices, in graph ops.

    Returns ``(weights, block, scale)``: the general path's table (the same as
    :func:`lrpfx.postprocess.c3.area_taps`: overlap fractions rounded to float32, overlaps of at
    most 1e-3 left out), the 0/1 block matrix of the integer-factor path, and cv2's scale
    (a float64 scalar). Built from the sizes with tensor operations only, so that it exports
    with symbolic sizes and runs on any device.
    """
    cols = torch.arange(src, dtype=_F64, device=device)
    rows = torch.arange(dst, dtype=_F64, device=device).unsqueeze(1)
    n_src, n_dst = cols[-1] + 1, rows[-1, 0] + 1  # the sizes as float64 scalars (exact)
    scale = 1.0 / (n_dst / n_src)  # cv2: scale = 1. / ((double)dsize / ssize)
    fs1 = rows * scale
    fs2 = fs1 + scale
    cell = torch.minimum(scale, n_src - fs1)
    s2 = torch.minimum(fs2.floor(), n_src - 1)
    s1 = torch.minimum(fs1.ceil(), s2)
    lead = (cols == s1 - 1) & (s1 - fs1 > 1e-3)
    mid = (cols >= s1) & (cols < s2)
    tail = (cols == s2) & (fs2 - s2 > 1e-3)
    weights = (torch.where(lead, (s1 - fs1) / cell, 0.0) + torch.where(mid, 1.0 / cell, 0.0)
               + torch.where(tail, torch.minimum(torch.minimum(fs2 - s2, torch.ones_like(fs2)), cell) / cell, 0.0))
    # cv2 keeps the weights as float; with an integer scale, ``mid | tail`` are the blocks
    return weights.to(torch.float32).to(_F64), (mid | tail).to(_F64), scale


def area_resize_matrix(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2 ``INTER_AREA`` at any ratio as matrix products, equal to cv2 up to rounding.

    ``Wy @ X @ Wxᵀ`` with the weights of :func:`area_weights`; where cv2 takes its
    integer-factor path (both scales integers, decided in the graph), block sums times cv2's
    float32 ``1.f/area`` instead. Exportable with symbolic sizes (a dynamic height and width);
    ``size`` must not exceed the map's (see :func:`lrpfx.postprocess.c3.selection_size`).
    """
    h_in, w_in = x.shape[-2:]
    wy, by, sy = area_weights(h_in, size[0], x.device)
    wx, bx, sx = area_weights(w_in, size[1], x.device)
    general = torch.matmul(torch.matmul(wy, x), wx.transpose(0, 1))
    iy, ix = sy.round(), sx.round()
    fast = ((sy - iy).abs() < 2.0 ** -52) & ((sx - ix).abs() < 2.0 ** -52)
    inv_area = (1.0 / (iy * ix).to(torch.float32)).to(_F64)  # cv2: float scale = 1.f/area
    blocks = torch.matmul(torch.matmul(by, x), bx.transpose(0, 1)) * inv_area
    return torch.where(fast, blocks, general)


def _cv2_block_sum(blocks: torch.Tensor) -> torch.Tensor:
    # cv2 adds a block four values at a time, ((a + b) + c) + d, then one at a time: the groups of
    # four are summed for all groups at once, and the running total adds them in cv2's order
    area = blocks.shape[-1]
    n_groups = area // 4
    total = torch.zeros_like(blocks[..., 0])
    if n_groups:
        quads = blocks[..., :4 * n_groups].unflatten(-1, (n_groups, 4))
        sums = ((quads[..., 0] + quads[..., 1]) + quads[..., 2]) + quads[..., 3]
        for group in sums.unbind(-1):
            total = total + group
    for j in range(4 * n_groups, area):
        total = total + blocks[..., j]
    return total


def upsample_nearest(mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour enlargement with source index ``(i * src) // dst`` (as the reference)."""
    h, w = mask.shape[-2:]
    if not _symbolic(*size) and (h, w) == tuple(size):
        return mask
    # index arithmetic in tensors, so that a symbolic (dynamic) output size exports
    rows = torch.div(torch.arange(size[0], device=mask.device) * h, size[0], rounding_mode="floor")
    cols = torch.div(torch.arange(size[1], device=mask.device) * w, size[1], rounding_mode="floor")
    return mask.index_select(1, rows).index_select(2, cols)


# ----------------------------------------------------------------------------- thresholds
def binarize(low: torch.Tensor, spec: Threshold) -> torch.Tensor:
    """B = R > τ per map (for ``mass``: R ≥ v_k and R > 0; for ``otsu``: 8-bit level > t)."""
    flat = low.flatten(1)
    n = flat.shape[1]
    if spec.kind == "mean":
        tau = flat.cumsum(1)[:, -1:] / n  # a sequential sum, as the reference's np.cumsum
        return low > tau.view(-1, 1, 1)
    if spec.kind == "fixed":
        return low > spec.value
    if spec.kind == "quantile":
        return low > _quantile(flat, float(spec.value)).view(-1, 1, 1)
    if spec.kind == "mass":
        return (low >= _mass_value(flat, float(spec.value)).view(-1, 1, 1)) & (low > 0)
    levels = otsu_levels(low)
    return levels > otsu_threshold(levels.flatten(1)).view(-1, 1, 1)


def _quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    below, above, t = quantile_position(flat.shape[1], q)
    ordered = flat.sort(1).values
    a, b = ordered[:, below], ordered[:, above]
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t  # numpy's _lerp


def _mass_value(flat: torch.Tensor, f: float) -> torch.Tensor:
    ordered = flat.sort(1, descending=True).values
    cum = ordered.clamp(min=0).cumsum(1)
    k = (cum < f * cum[:, -1:]).sum(1, keepdim=True).clamp(max=flat.shape[1] - 1)
    return ordered.gather(1, k).squeeze(1)


def otsu_levels(low: torch.Tensor) -> torch.Tensor:
    """The map min-max scaled to 0..255 and rounded (half to even), as int64."""
    lo = low.flatten(1).amin(1).view(-1, 1, 1)
    hi = low.flatten(1).amax(1).view(-1, 1, 1)
    span = torch.where(hi > lo, hi - lo, 1.0)
    return torch.round((low - lo) * (255.0 / span)).long()


def otsu_threshold(levels: torch.Tensor) -> torch.Tensor:
    """cv2's Otsu threshold of each row of 8-bit levels (N, n), bit for bit.

    cv2 walks the 256 bins once: ``q1 += p_i`` (a sequential sum, which ``cumsum`` reproduces)
    and ``mu1 = (mu1 * q1_prev + i * p_i) / q1``, a rounding-dependent recurrence that only a
    loop reproduces; everything else is vectorised, and the first strict maximum of the
    between-class variance wins, as in cv2.
    """
    n_img, n = levels.shape
    hist = torch.zeros(n_img, 256, dtype=_F64, device=levels.device)
    hist = hist.scatter_add(1, levels, torch.ones_like(levels, dtype=_F64))
    scale = 1.0 / n
    bins = torch.arange(256, dtype=_F64, device=levels.device)
    mu = (hist * bins).sum(1, keepdim=True) * scale  # integer sums: exact in any order
    p = hist * scale
    q1 = p.cumsum(1)
    q2 = 1.0 - q1
    ok = (torch.minimum(q1, q2) >= FLT_EPSILON) & (torch.maximum(q1, q2) <= 1.0 - FLT_EPSILON)
    mu1 = _otsu_mu1(q1, bins * p, ok)
    d = mu1 - (mu - q1 * mu1) / q2
    sigma = torch.where(ok, q1 * q2 * d * d, -1.0)
    best = sigma.argmax(1)
    return torch.where(sigma.amax(1) > 0, best, 0)


def _otsu_mu1(q1: torch.Tensor, moment: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """cv2's running class-1 mean (N, 256): the only sequential part of its Otsu."""
    q1s, moments, oks = q1.unbind(1), moment.unbind(1), ok.unbind(1)
    mu1 = torch.zeros_like(q1s[0])
    previous = mu1
    out = []
    for i in range(256):
        mu1 = mu1 * previous
        mu1 = torch.where(oks[i], (mu1 + moments[i]) / q1s[i], mu1)
        previous = q1s[i]
        out.append(mu1)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- selection
def select(low: torch.Tensor, cfg: C3Config) -> torch.Tensor:
    """The C3 mask (N, h, w) of maps already pooled and resized."""
    flat = low.flatten(1)
    # a constant map has no region (with positive_only that includes every non-positive map)
    gate = (flat.amax(1) > flat.amin(1)).view(-1, 1, 1)
    b = binarize(low, cfg.threshold_spec) & gate
    bc = b if cfg.contour_threshold is None else binarize(low, cfg.contour_threshold_spec) & gate
    filled = ~outside_background(bc)
    regions, comps = _label_stages(filled, b, cfg.connectivity)
    region = regions == _pick_contour(regions, low, bc, cfg.contour_rank).view(-1, 1, 1)
    comp = comps == _pick_component(comps, low, cfg.component_rank, cfg.connectivity).view(-1, 1, 1)
    return _apply_fallback(region & comp, region & b, comp, cfg.fallback)


def _label_stages(filled: torch.Tensor, b: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    if connectivity == 8:  # one labelling pass for both stages
        both = connected_components(torch.cat([filled, b]), 8)
        return both[:filled.shape[0]], both[filled.shape[0]:]
    return connected_components(filled, 8), connected_components(b, 4)


def _apply_fallback(mask: torch.Tensor, contour: torch.Tensor, comp: torch.Tensor, fallback: str) -> torch.Tensor:
    if fallback == "empty":
        return mask
    alternative = {"contour": contour, "component": comp, "union": contour | comp}[fallback]
    empty = ~mask.flatten(1).any(1).view(-1, 1, 1)
    return mask | (empty & alternative)  # not torch.where: onnxruntime has no bool Where


def _pick_contour(labels: torch.Tensor, low: torch.Tensor, bc: torch.Tensor, rank: str) -> torch.Tensor:
    first = first_pixel(labels)
    if rank == "opencv_index":  # cv2 lists external contours bottom-up: the last-found comes first
        score = first.to(_F64)
    elif rank == "area":
        score = _segment_sum(labels, torch.ones_like(low))
    else:
        score = _blob_score(labels, low, bc, rank)
    return _pick(score, first)


def _pick_component(labels: torch.Tensor, low: torch.Tensor, rank: str, connectivity: int) -> torch.Tensor:
    first = first_pixel(labels)
    if rank == "label_order":
        score = -first_pixel(labels, _label_order_key(labels, connectivity)).to(_F64)
    elif rank == "area":
        score = _segment_sum(labels, torch.ones_like(low))
    else:
        score = _blob_score(labels, low, labels < labels.shape[1] * labels.shape[2], rank)
    return _pick(score, first)


def _label_order_key(labels: torch.Tensor, connectivity: int) -> torch.Tensor | None:
    """cv2 numbers 8-connected components by their first 2×2 block, 4-connected by first pixel."""
    if connectivity == 4:
        return None
    n_img, h, w = labels.shape
    rows = torch.arange(h, device=labels.device).view(h, 1) // 2
    cols = torch.arange(w, device=labels.device).view(1, w) // 2
    return (rows * ((w + 1) // 2) + cols).expand(n_img, h, w)


def _blob_score(labels: torch.Tensor, low: torch.Tensor, inside: torch.Tensor, rank: str) -> torch.Tensor:
    if rank == "mass":
        return _segment_sum(labels, torch.where(inside, low.clamp(min=0), 0.0))
    peak = torch.full((low.shape[0], low[0].numel() + 1), float("-inf"), dtype=_F64, device=low.device)
    return peak.scatter_reduce(1, labels.flatten(1), torch.where(inside, low, float("-inf")).flatten(1), "amax")


def _segment_sum(labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((values.shape[0], values[0].numel() + 1), dtype=_F64, device=values.device)
    return total.scatter_add(1, labels.flatten(1), values.flatten(1))


def _pick(score: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The label with the highest score, ties to the smaller first pixel; -1 when none exists."""
    n = score.shape[1] - 1
    # column n collects the background: never a candidate
    exists = (first < n) & (torch.arange(n + 1, device=first.device) < n)
    score = torch.where(exists, score, float("-inf"))
    top = exists & (score == score.amax(1, keepdim=True))
    choice = torch.where(top, first, n + 1).argmin(1)
    return torch.where(exists.any(1), choice, -1)
