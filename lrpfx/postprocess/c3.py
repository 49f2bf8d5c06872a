"""C3 ("Choice Contour Component") region selection: the options, parsed and validated once.

C3 keeps, per relevance map, the pixels that lie both in the first filled external contour and
in the first connected component of the binarized map (C3-LRP poster, JSAI 2024; METHOD_SPEC
§3). "First" is rank 1 under a score, not OpenCV's arbitrary order. Two backends compute it
with identical masks: :func:`lrpfx.postprocess.c3_opencv` (the OpenCV reference) and
:func:`lrpfx.postprocess.c3_tensor` (pure torch, batched, exportable). This module holds what
both share: :class:`C3Config` and the parsing of its option strings.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

POOLS = ("sum", "pos_sum", "abs_sum", "max_norm", "l2_norm")
CONTOUR_RANKS = ("mass", "peak", "area", "opencv_index")
COMPONENT_RANKS = ("peak", "mass", "area", "label_order")
FALLBACKS = ("contour", "component", "union", "empty")
RANK_PRESETS = {"mass": ("mass", "peak"), "opencv_order": ("opencv_index", "label_order")}
"""``rank`` presets: (contour_rank, component_rank). ``"mass"`` is the default ranking;
``"opencv_order"`` is the poster's literal reading, ``contours[0]`` ∧ label 1 in OpenCV's order."""
NAN_POLICIES = ("raise", "zero")
OUTPUTS = ("masked_full_res", "masked_low_res")
CONNECTIVITIES = (8, 4)
THRESHOLD_FORMS = ("mean", "otsu", "quantile:q", "fixed:v", "mass:f")

# cv2's Otsu skips splits whose class weight is below FLT_EPSILON; both backends use this value
FLT_EPSILON = 2.0 ** -23


@dataclass(frozen=True)
class Threshold:
    """A parsed threshold option: ``kind`` in mean/otsu/quantile/fixed/mass and its number."""

    kind: str
    value: float | None = None


@dataclass(frozen=True)
class C3Config:
    """Every option of the C3 stage, with the defaults of METHOD_SPEC §3.

    Attributes:
        pool: channel pooling of an (N, C, H, W) relevance into one map per sample:
            ``"sum"`` (Σ_c R_c, the ECCV map), ``"pos_sum"`` (Σ_c max(R_c, 0)), ``"abs_sum"``
            (Σ_c |R_c|), ``"max_norm"`` (max_c |R_c|), ``"l2_norm"`` (sqrt Σ_c R_c²).
        positive_only: clip the pooled map at 0 before anything else (a map with no positive
            value then selects nothing). With False, a signed map is thresholded as it is.
        resize_to: ``(height, width)`` the selection runs at, reached by area interpolation
            (cv2 ``INTER_AREA``) at any ratio; ``None`` keeps the native resolution. Area
            interpolation only shrinks: a dimension of the map smaller than ``resize_to``
            keeps its native size (a 20 x 40 map runs at 20 x 28 under (28, 28)).
        threshold: how τ is chosen; B = R > τ (strict). ``"mean"``, ``"otsu"`` (cv2 Otsu on
            the map min-max scaled to 8 bits, B = level > t), ``"quantile:q"``, ``"fixed:v"``,
            ``"mass:f"`` (the smallest top set holding a fraction f of ΣR⁺, ties included).
        contour_threshold: the threshold of the contour stage when it should differ from
            ``threshold`` (the two-scale variant); ``None`` uses ``threshold``.
        contour_rank: score of a filled external contour P_j, computed on P_j ∧ B:
            ``"mass"`` (Σ R⁺), ``"peak"`` (max R), ``"area"`` (pixel count of the filled
            region), ``"opencv_index"`` (cv2's list order: ``contours[0]`` wins).
        component_rank: score of a connected component: ``"peak"``, ``"mass"``, ``"area"``,
            ``"label_order"`` (cv2's label 1 wins). Label 0 (background) is never a candidate.
        connectivity: 8 or 4, for the component stage. External contours always follow
            8-connected foreground (that is what cv2 ``findContours`` traces).
        fallback: the mask when contour ∧ component is empty: ``"contour"`` (P* ∧ B),
            ``"component"`` (Q*), ``"union"`` (both), ``"empty"`` (nothing).
        nan_policy: ``"raise"`` (ValueError naming the samples) or ``"zero"`` (NaN/±inf → 0).
        output: ``"masked_full_res"`` (the input-resolution map ⊙ the nearest-upsampled mask)
            or ``"masked_low_res"`` (the map the selection ran on ⊙ the mask; ECCV style).
        scale: factor applied to the output map (the ECCV code uses 3.0 with its C1C).
        rank: a preset for both rankings, which it overrides when set: ``"mass"``
            (contour_rank="mass", component_rank="peak", the defaults) or ``"opencv_order"``
            (contour_rank="opencv_index", component_rank="label_order": the poster's literal
            "first contour" and "first component", ``contours[0]`` ∧ label 1 as OpenCV lists
            them). ``None`` (default) uses contour_rank and component_rank as given.

    Ties between candidates are broken by the smaller raster index of the blob's first pixel.
    """

    pool: str = "sum"
    positive_only: bool = True
    resize_to: tuple[int, int] | None = (28, 28)
    threshold: str = "mean"
    contour_threshold: str | None = None
    contour_rank: str = "mass"
    component_rank: str = "peak"
    connectivity: int = 8
    fallback: str = "contour"
    nan_policy: str = "raise"
    output: str = "masked_full_res"
    scale: float = 1.0
    rank: str | None = None
    _parsed: tuple[Threshold, Threshold] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # parse and validate every option here, once; the backends read the parsed form
        object.__setattr__(self, "resize_to", parse_resize(self.resize_to))
        threshold = parse_threshold(self.threshold, "threshold")
        contour = threshold if self.contour_threshold is None else parse_threshold(
            self.contour_threshold, "contour_threshold")
        object.__setattr__(self, "_parsed", (threshold, contour))
        if self.rank is not None:
            _check_choice("rank", self.rank, tuple(RANK_PRESETS))
            contour_rank, component_rank = RANK_PRESETS[self.rank]
            object.__setattr__(self, "contour_rank", contour_rank)
            object.__setattr__(self, "component_rank", component_rank)
        _check_choice("pool", self.pool, POOLS)
        _check_choice("contour_rank", self.contour_rank, CONTOUR_RANKS)
        _check_choice("component_rank", self.component_rank, COMPONENT_RANKS)
        _check_choice("connectivity", self.connectivity, CONNECTIVITIES)
        _check_choice("fallback", self.fallback, FALLBACKS)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _check_choice("output", self.output, OUTPUTS)
        if not isinstance(self.positive_only, bool):
            raise ValueError(f"positive_only={self.positive_only!r} must be True or False.")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"scale={self.scale!r} must be a finite number; use e.g. scale=3.0 for the ECCV output.")

    @property
    def threshold_spec(self) -> Threshold:
        """The parsed component-stage threshold."""
        return self._parsed[0]

    @property
    def contour_threshold_spec(self) -> Threshold:
        """The parsed contour-stage threshold (the component one unless set)."""
        return self._parsed[1]

    def replace(self, **overrides: Any) -> C3Config:
        """A copy with some options changed; unknown option names raise ValueError."""
        options = [f.name for f in dataclasses.fields(self) if f.init]
        unknown = sorted(set(overrides) - set(options))
        if unknown:
            names = ", ".join(options)
            raise ValueError(f"unknown C3 option(s) {unknown}. Hint: the options are {names}.")
        return dataclasses.replace(self, **overrides)


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices or isinstance(value, bool):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not one of {listed}; use e.g. {name}={choices[0]!r}.")


def parse_resize(value: object) -> tuple[int, int] | None:
    """``None`` or a ``(height, width)`` pair of positive ints (an int means a square)."""
    if value is None:
        return None
    if _is_int(value):
        value = (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"resize_to={value!r} must be None or (height, width) with positive ints; "
                     "use e.g. resize_to=(28, 28).")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def parse_threshold(spec: str, option: str = "threshold") -> Threshold:
    """Parse ``"mean"``, ``"otsu"``, ``"quantile:q"``, ``"fixed:v"`` or ``"mass:f"``."""
    forms = ", ".join(repr(f) for f in THRESHOLD_FORMS)
    if not isinstance(spec, str):
        raise ValueError(f"{option}={spec!r} must be a string, one of {forms}; use e.g. 'quantile:0.8'.")
    kind, sep, arg = spec.strip().partition(":")
    if kind in ("mean", "otsu") and not sep:
        return Threshold(kind)
    if kind not in ("quantile", "fixed", "mass") or not sep:
        raise ValueError(f"{option}={spec!r} is not one of {forms}; use e.g. 'quantile:0.8'.")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"{option}={spec!r}: {arg.strip()!r} is not a number; "
                         f"use e.g. '{kind}:0.8'.") from None
    _check_threshold_range(option, spec, kind, value)
    return Threshold(kind, value)


def _check_threshold_range(option: str, spec: str, kind: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{option}={spec!r}: the number must be finite; use e.g. '{kind}:0.8'.")
    if kind == "quantile" and not 0.0 <= value <= 1.0:
        raise ValueError(f"{option}={spec!r}: q must lie in [0, 1]; use e.g. 'quantile:0.8'.")
    if kind == "mass" and not 0.0 < value <= 1.0:
        raise ValueError(f"{option}={spec!r}: f must lie in (0, 1]; use e.g. 'mass:0.5'.")


# ----------------------------------------------------------------------------- shared arithmetic
# Both backends do the same float64 operations in the same order, so that their masks agree
# bit for bit (a pixel equal to τ must fall on the same side in both).

def quantile_position(n: int, q: float) -> tuple[int, int, float]:
    """Indices ``(below, above)`` in the ascending sort and the weight, as numpy's 'linear'."""
    pos = (n - 1) * q
    below = min(int(math.floor(pos)), n - 1)
    return below, min(below + 1, n - 1), pos - below


def nearest_indices(src: int, dst: int) -> list[int]:
    """Source index of each of ``dst`` outputs in nearest-neighbour resizing (integer arithmetic)."""
    return [(i * src) // dst for i in range(dst)]


def area_scale(area: int) -> float:
    """cv2 ``INTER_AREA`` multiplies a block sum by ``1.f/area``, a float32 quotient."""
    return float(np.float32(1.0) / np.float32(area))


def selection_size(native: tuple[int, int], resize_to: tuple[int, int] | None) -> tuple[int, int]:
    """The size the selection runs at: ``resize_to``, but never larger than the map.

    A map smaller than ``resize_to`` in a dimension keeps its native size in that dimension
    (area interpolation only shrinks): a 20 x 40 map with ``resize_to=(28, 28)`` runs at 20 x 28,
    a 16 x 16 map at 16 x 16. Both backends use this rule.
    """
    if resize_to is None:
        return native
    # not min(): with a symbolic (dynamic) size at least resize_to this returns resize_to's int
    return (native[0] if native[0] < resize_to[0] else resize_to[0],
            native[1] if native[1] < resize_to[1] else resize_to[1])


def area_scale_factor(src: int, dst: int) -> float:
    """cv2's ``scale_x = 1. / inv_scale_x`` with ``inv_scale_x = (double)dsize / ssize``."""
    return 1.0 / (dst / src)


def area_is_fast(src: int, dst: int) -> bool:
    """Whether cv2 takes its integer-factor ``INTER_AREA`` path along this axis.

    cv2 (``resize.cpp``): ``iscale = saturate_cast<int>(scale)``, fast when
    ``|scale - iscale| < DBL_EPSILON`` on both axes (and both scales >= 1).
    """
    scale = area_scale_factor(src, dst)
    return abs(scale - round(scale)) < 2.0 ** -52


@functools.lru_cache(maxsize=256)
def area_taps(src: int, dst: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """cv2's ``INTER_AREA`` table for a shrink ``src -> dst`` by any ratio (``computeResizeAreaTab``).

    Output ``d`` covers the source interval ``[d * s, d * s + s)`` (``s = src / dst`` as cv2
    computes it); each source pixel it overlaps gets the overlap fraction, a float32 number, and
    overlaps of at most 1e-3 are left out, exactly as cv2 does. Returns ``(indices, weights)``:
    per output, the source indices in increasing order (the order cv2 adds them) and their
    weights, padded with index 0 and weight 0 to a common length.
    """
    scale = area_scale_factor(src, dst)
    rows: list[list[tuple[int, float]]] = []
    for d in range(dst):
        fs1 = d * scale
        fs2 = fs1 + scale
        cell = min(scale, src - fs1)
        s2 = min(math.floor(fs2), src - 1)
        s1 = min(math.ceil(fs1), s2)
        taps = []
        if s1 - fs1 > 1e-3:
            taps.append((s1 - 1, _f32((s1 - fs1) / cell)))
        taps += [(s, _f32(1.0 / cell)) for s in range(s1, s2)]
        if fs2 - s2 > 1e-3:
            taps.append((s2, _f32(min(min(fs2 - s2, 1.0), cell) / cell)))
        rows.append(taps)
    width = max(len(t) for t in rows)
    rows = [t + [(0, 0.0)] * (width - len(t)) for t in rows]
    return (tuple(tuple(i for i, _ in t) for t in rows), tuple(tuple(w for _, w in t) for t in rows))


def _f32(v: float) -> float:
    return float(np.float32(v))
