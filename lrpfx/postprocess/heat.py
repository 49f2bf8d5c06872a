"""Heat quantization (METHOD_SPEC §4): snap a map to at most q levels, as the ECCV 2024 code does.

The ECCV function ``apply_heat_quantization`` is, per 2-D map A::

    bins = np.linspace(A.min(), A.max(), q)
    for i in range(q - 1):
        A[(A >= bins[i]) & (A < bins[i + 1])] = bins[i]      # in place

Here it is one vectorised step, ``bins[searchsorted(bins, A, side="right") - 1]``, for numpy
arrays and torch tensors alike (the torch form has no data-dependent control flow, so it runs
inside exported and compiled graphs). Choices where the ECCV code is silent or awkward:

* min and max are taken **per 2-D map** (the last two dimensions); a 1-D input is one map;
* the input is never modified (the ECCV code mutates it);
* NaN and ±inf stay as they are, and the bins come from the finite values (the ECCV code leaves
  a map that contains a NaN wholly unchanged, since its bins are NaN); constant maps are
  unchanged;
* the bins follow numpy's linspace formula in the map's own dtype, as ``np.linspace`` does
  under numpy 2 for a float32 map's min and max. The result equals the ECCV code run with
  numpy 2 exactly, and it is idempotent: every bin is representable in the map's dtype. (Under
  numpy 1 the ECCV code computed float32 maps' bins in float64; a value snapped to
  float32(bins[k]) < bins[k] then drops one level on a second pass.)
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def heat_quantize(a: ArrayT, q: int = 8) -> ArrayT:
    """Quantize each 2-D map of ``a`` to the q−1 lower edges of linspace(min, max, q) plus max.

    Args:
        a: numpy array or torch tensor, (..., H, W) or 1-D; integer arrays are converted to
            float64.
        q: number of bin edges (≥ 2); the result has at most q distinct values per map.

    Returns:
        A new array or tensor of the same shape (and float dtype) and the same device.
    """
    if not isinstance(q, int) or isinstance(q, bool) or q < 2:
        raise ValueError(f"q={q!r} must be an int ≥ 2 (the number of bin edges); use e.g. q=8.")
    if isinstance(a, torch.Tensor):
        return _quantize_torch(a, q)
    return _quantize_numpy(np.asarray(a), q)


def _quantize_numpy(a: np.ndarray, q: int) -> np.ndarray:
    x = a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)
    maps = x.reshape(-1, x.shape[-1] * x.shape[-2]) if x.ndim >= 2 else x.reshape(1, -1)
    finite = np.isfinite(maps)
    lo = np.where(finite, maps, np.inf).min(1, initial=np.inf)
    hi = np.where(finite, maps, -np.inf).max(1, initial=-np.inf)
    some = finite.any(1)
    bins = _linspace(np.where(some, lo, 0.0), np.where(some, hi, 0.0), q, np.arange(q, dtype=x.dtype))
    level = sum((maps >= bins[:, k:k + 1]).astype(np.int64) for k in range(q)) - 1
    snapped = np.take_along_axis(bins, np.clip(level, 0, q - 1), 1)
    return np.where(finite, snapped, maps).reshape(x.shape)


def _quantize_torch(a: torch.Tensor, q: int) -> torch.Tensor:
    x = a if a.is_floating_point() else a.to(torch.float64)
    maps = x.reshape(-1, x.shape[-1] * x.shape[-2]) if x.dim() >= 2 else x.reshape(1, -1)
    finite = torch.isfinite(maps)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(finite, maps, inf).amin(1)
    hi = torch.where(finite, maps, -inf).amax(1)
    some = finite.any(1)
    steps = torch.arange(q, dtype=x.dtype, device=x.device)
    bins = _linspace(torch.where(some, lo, 0.0), torch.where(some, hi, 0.0), q, steps)
    level = sum((maps >= bins[:, k:k + 1]).long() for k in range(q)) - 1
    snapped = bins.gather(1, level.clamp(0, q - 1))
    return torch.where(finite, snapped, maps).reshape(x.shape)


def _linspace(start: ArrayT, stop: ArrayT, q: int, steps: ArrayT) -> ArrayT:
    """numpy's ``linspace(start, stop, q)`` per row, (M,) → (M, q), in the rows' dtype.

    numpy computes ``i * step + start`` with ``step = (stop - start) / (q - 1)``, falls back to
    ``i / (q - 1) * delta + start`` when the step underflows to 0, and sets the last point to
    ``stop``. Batched ``np.linspace`` would pick the fallback for every row if one row needs
    it, which is why this is written out.
    """
    delta = stop - start
    step = delta / (q - 1)
    regular = steps[None, :] * step[:, None] + start[:, None]
    tiny = (steps[None, :] / (q - 1)) * delta[:, None] + start[:, None]
    body = _where(step[:, None] == 0, tiny, regular)
    return _concat(body[:, :-1], stop[:, None])


def _where(cond: ArrayT, a: ArrayT, b: ArrayT) -> ArrayT:
    return torch.where(cond, a, b) if isinstance(cond, torch.Tensor) else np.where(cond, a, b)


def _concat(a: ArrayT, b: ArrayT) -> ArrayT:
    return torch.cat([a, b], 1) if isinstance(a, torch.Tensor) else np.concatenate([a, b], 1)
