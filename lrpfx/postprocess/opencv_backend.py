"""C3 with OpenCV: the reference backend, one map at a time, written to be read.

It follows METHOD_SPEC §3 literally: ``cv2.resize(INTER_AREA)``, ``cv2.threshold(THRESH_OTSU)``,
``cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_NONE)`` filled with
``cv2.drawContours(thickness=-1)``, and ``cv2.connectedComponents``. Everything is float64.
Sums that decide a comparison (the mean, the masses, the cumulative mass) are sequential
(``np.cumsum``) so that the tensor backend can reproduce them bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lrpfx.errors import InputError
from lrpfx.postprocess.c3 import C3Config, Threshold, nearest_indices, quantile_position, selection_size


@dataclass(frozen=True)
class C3Result:
    """What :func:`c3_opencv` returns; arrays have a leading batch dimension N.

    Attributes:
        map: the C3 map: (N, H, W) for ``output="masked_full_res"``, else (N, h, w).
        mask: bool (N, h, w), at the resolution the selection ran at.
        mask_full: bool (N, H, W), ``mask`` nearest-upsampled to the input resolution.
        low_res: (N, h, w), the pooled (clipped, resized) map the selection ran on.
        contour_id: (N,) index into cv2's contour list of the chosen contour, -1 if none.
        component_id: (N,) cv2 label of the chosen component, -1 if none.
        empty: (N,) True where nothing was selected (the map is zero there).
        fallback: (N,) True where contour ∧ component was empty and ``config.fallback`` applied.
        threshold: (N,) τ of the component stage (for Otsu, the 8-bit threshold mapped back
            to the map's scale); NaN for constant or non-positive maps.
        config: the options used.
    """

    map: np.ndarray
    mask: np.ndarray
    mask_full: np.ndarray
    low_res: np.ndarray
    contour_id: np.ndarray
    component_id: np.ndarray
    empty: np.ndarray
    fallback: np.ndarray
    threshold: np.ndarray
    config: C3Config


@dataclass(frozen=True)
class _Selection:
    mask: np.ndarray
    contour_id: int
    component_id: int
    fallback: bool
    tau: float


def c3_opencv(relevance: np.ndarray | torch.Tensor, config: C3Config | None = None, **overrides: object) -> C3Result:
    """C3 region selection with OpenCV (the reference backend).

    Args:
        relevance: numpy array or torch tensor of shape (H, W), (N, H, W) or (N, C, H, W).
        config: the options; default :class:`C3Config`'s defaults.
        **overrides: options replacing those of ``config``, e.g. ``connectivity=4``.

    Returns:
        A :class:`C3Result`, batched even for a single (H, W) map.

    Raises:
        ValueError: an unknown or invalid option.
        lrpfx.errors.InputError: a badly shaped input, or NaN/inf under ``nan_policy="raise"``
            (the message names the samples).
    """
    cfg = (config or C3Config()).replace(**overrides)
    r = _nan_policy(_as_batch(relevance), cfg.nan_policy)
    full = _pool(r, cfg.pool, cfg.positive_only)
    low = np.stack([_resize(m, cfg.resize_to) for m in full])
    picks = [_select(m, cfg) for m in low]
    mask = np.stack([p.mask for p in picks])
    rows, cols = nearest_indices(mask.shape[1], full.shape[1]), nearest_indices(mask.shape[2], full.shape[2])
    mask_full = mask[:, rows][:, :, cols]
    shown, shown_mask = (full, mask_full) if cfg.output == "masked_full_res" else (low, mask)
    return C3Result(
        map=np.where(shown_mask, shown, 0.0) * cfg.scale, mask=mask, mask_full=mask_full, low_res=low,
        contour_id=np.array([p.contour_id for p in picks], dtype=np.int64),
        component_id=np.array([p.component_id for p in picks], dtype=np.int64),
        empty=~mask.reshape(len(mask), -1).any(1), fallback=np.array([p.fallback for p in picks]),
        threshold=np.array([p.tau for p in picks]), config=cfg)


# ----------------------------------------------------------------------------- input
def _as_batch(relevance: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(relevance, torch.Tensor):
        relevance = relevance.detach().cpu().numpy()
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim not in (2, 3, 4) or r.size == 0:
        raise InputError(f"relevance has shape {r.shape}; C3 takes (N, C, H, W), (N, H, W) or (H, W) "
                         "with no empty dimension. Hint: pass the explainer's input relevance.")
    if r.ndim == 2:
        return r[None, None]
    return r[:, None] if r.ndim == 3 else r


def _nan_policy(r: np.ndarray, policy: str) -> np.ndarray:
    finite = np.isfinite(r)
    bad = np.flatnonzero(~finite.reshape(len(r), -1).all(1)).tolist()
    if bad and policy == "raise":
        raise InputError(f"relevance sample(s) {bad} contain NaN or inf. Hint: fix the explainer's "
                         "input, or pass nan_policy='zero' to map non-finite values to 0.")
    return np.where(finite, r, 0.0)


def _pool(r: np.ndarray, pool: str, positive_only: bool) -> np.ndarray:
    parts = [r[:, c] for c in range(r.shape[1])]
    if pool == "pos_sum":
        parts = [np.maximum(p, 0.0) for p in parts]
    elif pool in ("abs_sum", "max_norm"):
        parts = [np.abs(p) for p in parts]
    elif pool == "l2_norm":
        parts = [p * p for p in parts]
    out = parts[0]
    for p in parts[1:]:  # one channel after the other: the tensor backend adds in this order
        out = np.maximum(out, p) if pool == "max_norm" else out + p
    if pool == "l2_norm":
        out = np.sqrt(out)
    return np.maximum(out, 0.0) if positive_only else out


def _resize(m: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    # a dimension smaller than resize_to keeps its native size: cv2's INTER_AREA only shrinks
    # (it enlarges by a bilinear-like rule that even breaks constant maps)
    h, w = selection_size(m.shape, size)
    if (h, w) == m.shape:
        return m
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- one map
def _select(low: np.ndarray, cfg: C3Config) -> _Selection:
    if not low.max() > low.min():  # constant; with positive_only, also every non-positive map
        return _Selection(np.zeros(low.shape, bool), -1, -1, False, float("nan"))
    b, tau = _binarize(low, cfg.threshold_spec)
    bc = b if cfg.contour_threshold is None else _binarize(low, cfg.contour_threshold_spec)[0]
    contour_id, region = _best_contour(low, bc, cfg.contour_rank)
    component_id, comp = _best_component(low, b, cfg.component_rank, cfg.connectivity)
    mask = region & comp
    if mask.any() or cfg.fallback == "empty":
        return _Selection(mask, contour_id, component_id, False, tau)
    alternative = {"contour": region & b, "component": comp, "union": (region & b) | comp}[cfg.fallback]
    return _Selection(alternative, contour_id, component_id, bool(alternative.any()), tau)


def _binarize(low: np.ndarray, spec: Threshold) -> tuple[np.ndarray, float]:
    flat = low.ravel()
    if spec.kind == "mean":
        tau = np.cumsum(flat)[-1] / flat.size  # sequential, unlike np.mean's pairwise sum
    elif spec.kind == "fixed":
        tau = float(spec.value)
    elif spec.kind == "quantile":
        tau = _quantile(flat, float(spec.value))
    elif spec.kind == "mass":
        v = _mass_value(flat, float(spec.value))
        return (low >= v) & (low > 0), float(v)
    else:
        return _otsu(low)
    return low > tau, float(tau)


def _quantile(flat: np.ndarray, q: float) -> float:
    below, above, t = quantile_position(flat.size, q)
    ordered = np.sort(flat)
    a, b = ordered[below], ordered[above]
    diff = b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)


def _mass_value(flat: np.ndarray, f: float) -> float:
    ordered = np.sort(flat)[::-1]
    cum = np.cumsum(np.maximum(ordered, 0.0))
    k = min(int(np.count_nonzero(cum < f * cum[-1])), flat.size - 1)
    return float(ordered[k])


def _otsu(low: np.ndarray) -> tuple[np.ndarray, float]:
    lo, hi = low.min(), low.max()
    levels = np.round((low - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return levels > t, float(lo + t * (hi - lo) / 255.0)


def _first_pixel(region: np.ndarray) -> int:
    return int(np.flatnonzero(region.ravel())[0])


def _seq_sum(values: np.ndarray) -> float:
    return float(np.cumsum(values.ravel())[-1])


def _best_contour(low: np.ndarray, bc: np.ndarray, rank: str) -> tuple[int, np.ndarray]:
    contours, _ = cv2.findContours(bc.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    best: tuple[float, int] | None = None
    chosen, region = -1, np.zeros(low.shape, bool)
    for j in range(len(contours)):
        filled = np.zeros(low.shape, np.uint8)
        cv2.drawContours(filled, contours, j, 1, thickness=-1)
        p = filled.astype(bool)
        key = (-_contour_score(low, bc, p, rank, j), _first_pixel(p))
        if best is None or key < best:
            best, chosen, region = key, j, p
    return chosen, region


def _contour_score(low: np.ndarray, bc: np.ndarray, p: np.ndarray, rank: str, index: int) -> float:
    if rank == "opencv_index":
        return -float(index)
    if rank == "area":
        return float(p.sum())  # pixels of the filled region (cv2.contourArea is a polygon area)
    if rank == "peak":
        return float(low[p & bc].max())
    return _seq_sum(np.where(p & bc, np.maximum(low, 0.0), 0.0))


def _best_component(low: np.ndarray, b: np.ndarray, rank: str, connectivity: int) -> tuple[int, np.ndarray]:
    count, labels = cv2.connectedComponents(b.astype(np.uint8), connectivity=connectivity)
    best: tuple[float, int] | None = None
    chosen = -1
    for label in range(1, count):  # label 0 is the background
        q = labels == label
        key = (-_component_score(low, q, rank, label), _first_pixel(q))
        if best is None or key < best:
            best, chosen = key, label
    return chosen, (labels == chosen) if chosen > 0 else np.zeros(low.shape, bool)


def _component_score(low: np.ndarray, q: np.ndarray, rank: str, label: int) -> float:
    if rank == "label_order":
        return -float(label)
    if rank == "area":
        return float(q.sum())
    if rank == "peak":
        return float(low[q].max())
    return _seq_sum(np.where(q, np.maximum(low, 0.0), 0.0))
