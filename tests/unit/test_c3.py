"""C3 region selection: options, the OpenCV reference against the tensor backend pixel for
pixel, the oracles of METHOD_SPEC §7.13, the labelling primitives, and exportability."""
from __future__ import annotations

import operator
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpfx.errors import InputError
from lrpfx.postprocess import C3Config, c3_opencv, c3_tensor, connected_components, outside_background
from lrpfx.postprocess.labeling import merge_rounds
from lrpfx.postprocess.tensor_backend import area_resize, otsu_threshold

torch.set_num_threads(1)
cv2.setNumThreads(1)


# ----------------------------------------------------------------------------- random maps
def _blobs(g: np.random.Generator, h: int, w: int, signed: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((h, w))
    for _ in range(g.integers(1, 5)):
        cy, cx = g.uniform(-1, h), g.uniform(-1, w)  # centres on or past the border too
        s = g.uniform(0.6, max(h, w) / 4)
        amp = g.uniform(-0.6 if signed else 0.2, 1.0)
        out += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return out + 0.05 * g.standard_normal((h, w))


def _rings(g: np.random.Generator, h: int, w: int, nested: bool) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy, cx = g.uniform(0, h), g.uniform(0, w)
    d = np.hypot(yy - cy, xx - cx)
    r = g.uniform(2, max(h, w) / 2)
    out = np.where(np.abs(d - r) < g.uniform(0.5, 1.5), 1.0, 0.0) + 0.2 * g.random((h, w))
    if nested:
        out += np.where(d < r / 3, g.uniform(0.5, 2.0), 0.0)
    return out


def _diagonal(g: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pixels that touch only at corners: one 8-component, many 4-components."""
    yy, xx = np.mgrid[:h, :w]
    stride = int(g.integers(2, 5))
    on = ((yy + xx) % stride == 0) | ((yy - xx) % (stride + 1) == 0)
    return np.where(on & (g.random((h, w)) < 0.9), g.uniform(1, 2, (h, w)), g.uniform(0, 0.3, (h, w)))


def _maze(g: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A serpentine one-pixel path: the longest geodesics a labelling has to cover."""
    out = np.zeros((h, w))
    for row in range(0, h, 2):
        out[row, :] = 1.0
        if row + 1 < h:
            out[row + 1, (w - 1) if (row // 2) % 2 == 0 else 0] = 1.0
    return out * g.uniform(0.5, 2.0, (h, w)) if g.random() < 0.5 else out


def random_map(g: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """One of ten families, kind % 10: noise, blobs, rings, nested rings, integer ties,
    dyadic blurs, diagonals, mazes, positive blobs, sparse spikes."""
    kind %= 10
    if kind == 0:
        return g.random((h, w))
    if kind in (1, 8):
        return _blobs(g, h, w, signed=kind == 1)
    if kind in (2, 3):
        return _rings(g, h, w, nested=kind == 3)
    if kind == 4:
        return g.integers(-1, 4, (h, w)).astype(np.float64)  # many exact ties, τ often a pixel value
    if kind == 5:
        return np.round(cv2.GaussianBlur(g.standard_normal((h, w)), (0, 0), 1.2) * 8) / 8
    if kind == 6:
        return _diagonal(g, h, w)
    if kind == 7:
        return _maze(g, h, w)
    return np.where(g.random((h, w)) < 0.08, g.uniform(0.5, 3, (h, w)), 0.0)


def random_batch(seed: int, n: int, h: int, w: int, channels: int = 1) -> np.ndarray:
    g = np.random.default_rng(seed)
    maps = np.stack([random_map(g, h, w, k) for k in range(n)])
    if channels == 1:
        return maps[:, None]
    # split each map into signed channel parts that sum back to it (pooling is exercised)
    parts = g.standard_normal((n, channels - 1, h, w)) * 0.3
    return np.concatenate([parts, (maps - parts.sum(1))[:, None]], 1)


# ----------------------------------------------------------------------------- the two backends agree
COMBOS = [
    dict(),
    dict(connectivity=4),
    dict(threshold="otsu", contour_rank="peak"),
    dict(threshold="quantile:0.7", component_rank="mass", connectivity=4),
    dict(threshold="mass:0.5", contour_rank="area", component_rank="area"),
    dict(threshold="fixed:0.5", contour_rank="opencv_index", component_rank="label_order"),
    dict(threshold="fixed:0.5", contour_rank="opencv_index", component_rank="label_order", connectivity=4),
    dict(contour_threshold="quantile:0.4", fallback="union", connectivity=4, pool="abs_sum"),
    dict(positive_only=False, fallback="component", output="masked_low_res", scale=3.0),
    dict(fallback="empty", pool="l2_norm", threshold="quantile:0.9", contour_rank="mass"),
]
SIZES = [(12, 12), (16, 20), (24, 24), (28, 28), (13, 17)]


@pytest.mark.parametrize("combo", range(len(COMBOS)))
def test_backends_identical(combo: int) -> None:
    """≥ 1000 random maps over all combos (120 per combo here, 10 combos, 5 sizes): same masks."""
    options = COMBOS[combo]
    for s, (h, w) in enumerate(SIZES):
        x = random_batch(100 * combo + s, 24, h, w, channels=3 if combo % 3 == 0 else 1)
        resize = (h // 2, w // 2) if h % 2 == 0 and w % 2 == 0 and combo % 2 == 0 else None
        ref = c3_opencv(x, resize_to=resize, **options)
        out, mask = c3_tensor(torch.from_numpy(x), resize_to=resize, **options)
        expected = ref.mask if options.get("output") == "masked_low_res" else ref.mask_full
        diff = np.flatnonzero((mask.numpy() != expected).reshape(len(x), -1).any(1))
        assert diff.size == 0, f"masks differ for samples {diff.tolist()} at size {(h, w)} with {options}"
        np.testing.assert_allclose(out.numpy(), ref.map, rtol=1e-12, atol=0)


def test_property_test_covers_1000_maps() -> None:
    assert len(COMBOS) * len(SIZES) * 24 >= 1000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), h=st.integers(2, 9), w=st.integers(2, 9))
def test_backends_identical_hypothesis(data: st.DataObject, h: int, w: int) -> None:
    """Small integer grids, where ties and one-pixel shapes are the rule, with random options."""
    grid = np.array(data.draw(st.lists(st.integers(-1, 3), min_size=h * w, max_size=h * w)), float).reshape(h, w)
    options = dict(
        connectivity=data.draw(st.sampled_from([8, 4])),
        threshold=data.draw(st.sampled_from(["mean", "otsu", "quantile:0.5", "fixed:1", "mass:0.6"])),
        contour_rank=data.draw(st.sampled_from(["mass", "peak", "area", "opencv_index"])),
        component_rank=data.draw(st.sampled_from(["peak", "mass", "area", "label_order"])),
        fallback=data.draw(st.sampled_from(["contour", "component", "union", "empty"])),
        positive_only=data.draw(st.booleans()), resize_to=None)
    ref = c3_opencv(grid, **options)
    _, mask = c3_tensor(torch.from_numpy(grid), **options)
    assert np.array_equal(mask.numpy(), ref.mask_full), options


# ----------------------------------------------------------------------------- oracles (§7.13)
def _b(low: np.ndarray) -> np.ndarray:
    return low > np.cumsum(low.ravel())[-1] / low.size


def test_mask_inside_b_and_connected() -> None:
    for connectivity in (8, 4):
        x = random_batch(7 + connectivity, 200, 20, 20)
        res = c3_opencv(x, resize_to=None, connectivity=connectivity)
        for i in range(len(x)):
            assert not (res.mask[i] & ~_b(res.low_res[i])).any(), f"sample {i}: mask ⊄ B"
            if not res.empty[i] and not res.fallback[i]:
                count, _ = cv2.connectedComponents(res.mask[i].astype(np.uint8), connectivity=connectivity)
                assert count == 2, f"sample {i}: the mask has {count - 1} {connectivity}-components"


def test_contains_argmax_with_peak_ranking() -> None:
    """With ties the blob with the earlier first pixel wins: it holds *a* maximum, not always
    the raster-first one, so the oracle is "the mask reaches max R"."""
    x = random_batch(3, 200, 16, 16)
    res = c3_opencv(x, resize_to=None, contour_rank="peak", component_rank="peak")
    for i in range(len(x)):
        low = res.low_res[i]
        if low.max() > res.threshold[i]:
            assert low[res.mask[i]].max() == low.max(), f"sample {i} lost its argmax"
            if (low == low.max()).sum() == 1:
                assert res.mask[i].ravel()[low.argmax()]


@pytest.mark.parametrize("threshold", ["mean", "quantile:0.7"])
def test_invariant_to_positive_affine_maps(threshold: str) -> None:
    """Exact in real arithmetic; a and b are dyadic so that the integer and dyadic families,
    whose τ often equals a pixel value, stay exact in floating point too."""
    x = random_batch(11, 120, 16, 16)
    options = dict(threshold=threshold, positive_only=False, contour_rank="peak", resize_to=(8, 8))
    base = c3_opencv(x, **options).mask_full
    for a, b in [(2.0, 0.0), (0.375, 5.0), (13.0, -2.5)]:
        assert np.array_equal(c3_opencv(a * x + b, **options).mask_full, base), (a, b)
        _, mask = c3_tensor(torch.from_numpy(a * x + b), **options)
        assert np.array_equal(mask.numpy(), base), (a, b)


def _peak_component(low: np.ndarray) -> np.ndarray | None:
    """C1C computed by cv2 directly: the 8-component of B holding the largest value (None when
    two components share that value: then the degeneracy depends on the tie rules)."""
    count, labels = cv2.connectedComponents(_b(low).astype(np.uint8), connectivity=8)
    if count == 1:
        return np.zeros(low.shape, bool)
    peaks = np.array([low[labels == k].max() for k in range(1, count)])
    if (peaks == peaks.max()).sum() > 1:
        return None
    return labels == 1 + int(np.argmax(peaks))


def test_degeneracy_c3_is_the_peak_component() -> None:
    """Same B, 8-connectivity, peak ranking in both stages: C3 ≡ the peak component (C1C)."""
    x = random_batch(5, 300, 20, 20)
    res = c3_opencv(x, resize_to=None, contour_rank="peak")
    _, mask = c3_tensor(torch.from_numpy(x), resize_to=None, contour_rank="peak")
    checked = 0
    for i in range(len(x)):
        expected = _peak_component(res.low_res[i])
        if expected is None:
            continue
        checked += 1
        assert np.array_equal(res.mask[i], expected) and not res.fallback[i], f"sample {i}"
        assert np.array_equal(mask[i].numpy(), expected), f"sample {i}"
    assert checked > 250


def test_default_ranks_gate_an_isolated_spike() -> None:
    """Contour by mass, component by peak: a spike elsewhere loses to the high-mass region."""
    r = np.zeros((20, 20))
    r[4:14, 4:14] = 1.0  # the broad region carries the mass
    r[17, 17] = 5.0  # an isolated spike holds the peak
    res = c3_opencv(r, resize_to=None)
    assert res.fallback[0] and np.array_equal(res.mask[0], r == 1.0)
    assert np.array_equal(c3_tensor(torch.from_numpy(r), resize_to=None)[1][0].numpy(), r == 1.0)
    spike = c3_opencv(r, resize_to=None, fallback="component").mask[0]
    assert spike.sum() == 1 and spike[17, 17]


def test_connectivity_4_inside_an_8_contour() -> None:
    """A non-trivial AND: a 4-component inside one 8-connected contour."""
    r = np.zeros((8, 8))
    r[1:4, 1:4] = 1.0
    r[4, 4], r[5:7, 5:7] = 1.0, 2.0  # joined to the square only diagonally
    res = c3_opencv(r, resize_to=None, connectivity=4)
    assert np.array_equal(res.mask[0], r == 2.0) and not res.fallback[0]
    assert np.array_equal(c3_tensor(torch.from_numpy(r), resize_to=None, connectivity=4)[1][0].numpy(), r == 2.0)


@pytest.mark.parametrize("r", [np.zeros((12, 12)), np.full((12, 12), 3.0), -np.random.default_rng(0).random((12, 12))],
                         ids=["zero", "constant", "negative"])
def test_empty_selection(r: np.ndarray) -> None:
    res = c3_opencv(r, resize_to=(6, 6))
    assert res.empty[0] and not res.map.any() and not res.mask.any()
    out, mask = c3_tensor(torch.from_numpy(r), resize_to=(6, 6))
    assert not out.any() and not mask.any()


def test_nan_raises_naming_the_sample_and_zero_policy() -> None:
    x = random_batch(1, 3, 16, 16)
    x[1, 0, 3, 4] = np.nan
    x[2, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"sample\(s\) \[1, 2\] contain NaN or inf.*nan_policy='zero'"):
        c3_opencv(x)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1, 2\]"):
        c3_tensor(torch.from_numpy(x))
    cleaned = np.where(np.isfinite(x), x, 0.0)
    expected = c3_opencv(cleaned, resize_to=(8, 8)).mask_full
    assert np.array_equal(c3_opencv(x, resize_to=(8, 8), nan_policy="zero").mask_full, expected)
    assert np.array_equal(c3_tensor(torch.from_numpy(x), resize_to=(8, 8), nan_policy="zero")[1].numpy(), expected)


def test_batch_samples_are_independent() -> None:
    x = random_batch(9, 12, 16, 16, channels=3)
    res = c3_opencv(x, resize_to=(8, 8))
    out, mask = c3_tensor(torch.from_numpy(x), resize_to=(8, 8))
    for i in range(len(x)):
        alone = c3_opencv(x[i:i + 1], resize_to=(8, 8))
        assert np.array_equal(alone.map[0], res.map[i]) and alone.contour_id[0] == res.contour_id[i]
        out_i, mask_i = c3_tensor(torch.from_numpy(x[i:i + 1]), resize_to=(8, 8))
        assert torch.equal(out_i[0], out[i]) and torch.equal(mask_i[0], mask[i])


# ----------------------------------------------------------------------------- results and options
def test_result_fields_and_shapes() -> None:
    x = torch.from_numpy(random_batch(2, 4, 56, 56, channels=3)).float()
    res = c3_opencv(x)
    assert res.map.shape == (4, 56, 56) and res.mask.shape == (4, 28, 28) and res.mask_full.shape == (4, 56, 56)
    assert res.low_res.shape == (4, 28, 28) and res.mask.dtype == bool
    assert res.contour_id.shape == res.component_id.shape == res.empty.shape == (4,)
    assert np.array_equal(res.mask_full, res.mask.repeat(2, 1).repeat(2, 2))
    low = c3_opencv(x, output="masked_low_res", scale=3.0)
    np.testing.assert_allclose(low.map, np.where(low.mask, low.low_res, 0) * 3.0)
    out, mask = c3_tensor(x)
    assert out.dtype == torch.float32 and out.shape == (4, 56, 56) and mask.dtype == torch.bool
    single = c3_opencv(np.asarray(x[0, 0]))
    assert single.map.shape == (1, 56, 56)


def test_selection_on_a_map_that_is_not_a_multiple_of_the_target() -> None:
    """Both backends shrink by any factor (the full sweep is tests/test_c3_any_size.py); a
    dimension smaller than resize_to keeps its native size instead of being enlarged."""
    x = random_batch(4, 2, 30, 30)
    assert c3_opencv(x).mask.shape == (2, 28, 28)
    _, low_mask = c3_tensor(torch.from_numpy(x), output="masked_low_res")
    assert np.array_equal(low_mask.numpy(), c3_opencv(x).mask)
    small = random_batch(5, 2, 12, 40)
    assert c3_opencv(small).mask.shape == (2, 12, 28)
    assert c3_tensor(torch.from_numpy(small), output="masked_low_res")[1].shape == (2, 12, 28)


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold="foo"), r"threshold='foo' is not one of 'mean', 'otsu', 'quantile:q', 'fixed:v', 'mass:f'; use e.g. 'quantile:0.8'"),
    (dict(threshold="quantile:x"), r"'x' is not a number; use e.g. 'quantile:0.8'"),
    (dict(threshold="quantile:1.5"), r"q must lie in \[0, 1\]"),
    (dict(threshold="mass:0"), r"f must lie in \(0, 1\]"),
    (dict(contour_threshold="otsu:3"), r"contour_threshold='otsu:3' is not one of"),
    (dict(connectivity=6), r"connectivity=6 is not one of 8, 4; use e.g. connectivity=8"),
    (dict(contour_rank="largest"), r"contour_rank='largest' is not one of 'mass', 'peak', 'area', 'opencv_index'"),
    (dict(component_rank="first"), r"component_rank='first' is not one of"),
    (dict(fallback="none"), r"fallback='none' is not one of"),
    (dict(nan_policy="ignore"), r"nan_policy='ignore' is not one of 'raise', 'zero'"),
    (dict(output="full"), r"output='full' is not one of"),
    (dict(pool="mean"), r"pool='mean' is not one of"),
    (dict(resize_to=(0, 28)), r"resize_to=\(0, 28\) must be None or \(height, width\)"),
    (dict(scale=float("nan")), r"scale=nan must be a finite number"),
])
def test_option_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        C3Config(**kwargs)
    with pytest.raises(ValueError, match=message):
        c3_tensor(torch.rand(1, 1, 8, 8), **kwargs)


def test_unknown_override_and_bad_input() -> None:
    with pytest.raises(ValueError, match=r"unknown C3 option\(s\) \['treshold'\]. Hint: the options are pool, "):
        c3_opencv(np.ones((4, 4)), treshold="mean")
    with pytest.raises(InputError, match=r"relevance has shape \(4,\); C3 takes"):
        c3_opencv(np.ones(4))
    with pytest.raises(InputError, match=r"c3_tensor takes a torch.Tensor, got ndarray. Hint"):
        c3_tensor(np.ones((4, 4)))  # type: ignore[arg-type]
    assert C3Config(resize_to=[14, 14]).resize_to == (14, 14)
    assert C3Config(threshold="quantile:0.8").threshold_spec.value == 0.8


# ----------------------------------------------------------------------------- primitives
def _same_partition(labels: np.ndarray, reference: np.ndarray) -> bool:
    pairs = set(zip(labels.ravel().tolist(), reference.ravel().tolist()))
    return len(pairs) == len(np.unique(labels)) == len(np.unique(reference))


@pytest.mark.parametrize("early_exit", [True, False])  # eager mode's early stop; the traced graphs' fixed count
@pytest.mark.parametrize("connectivity", [8, 4])
def test_connected_components_against_cv2(connectivity: int, early_exit: bool) -> None:
    g = np.random.default_rng(connectivity)
    for h, w in [(1, 1), (1, 9), (9, 1), (15, 15), (28, 28)]:
        imgs = [g.random((h, w)) < p for p in g.uniform(0.1, 0.9, 40)]
        imgs += [_maze(g, h, w) > 0, _diagonal(g, h, w) > 1, np.ones((h, w), bool), np.zeros((h, w), bool)]
        fg = torch.from_numpy(np.stack(imgs))
        labels = connected_components(fg, connectivity, early_exit=early_exit).numpy()
        for img, lab in zip(imgs, labels):
            _, expected = cv2.connectedComponents(img.astype(np.uint8), connectivity=connectivity)
            assert _same_partition(lab, expected)
            assert (lab[~img] == h * w).all()


@pytest.mark.parametrize("connectivity", [8, 4])
def test_early_exit_gives_the_fixed_round_labels(connectivity: int) -> None:
    """Eager mode stops once nothing changes; the traced graph's fixed count must give the same labels."""
    g = np.random.default_rng(10 + connectivity)
    for h, w in [(1, 9), (15, 15), (28, 28), (30, 30)]:
        imgs = [g.random((h, w)) < p for p in g.uniform(0.1, 0.9, 30)]
        imgs += [_maze(g, h, w) > 0, _diagonal(g, h, w) > 1, np.ones((h, w), bool), np.zeros((h, w), bool)]
        fg = torch.from_numpy(np.stack(imgs))
        fixed = connected_components(fg, connectivity, early_exit=False)
        assert torch.equal(connected_components(fg, connectivity, early_exit=True), fixed)
        assert torch.equal(connected_components(fg, connectivity), fixed)  # eager default: early exit


def test_merge_rounds_bound() -> None:
    """⌈log₂ n⌉ rounds; the jumps shrink with the fragment count (10 rounds, 55 jumps at 28²)."""
    assert len(merge_rounds(784)) == 10 and sum(merge_rounds(784)) == 55
    assert merge_rounds(1) == [] and merge_rounds(2) == [1]


def test_filled_external_contours_are_the_complement_of_the_outside() -> None:
    """cv2 RETR_EXTERNAL + drawContours(thickness=-1) fill = not 4-connected to the outside."""
    g = np.random.default_rng(0)
    imgs = np.stack([g.random((14, 14)) < p for p in g.uniform(0.2, 0.8, 150)])
    inside = ~outside_background(torch.from_numpy(imgs)).numpy()
    for b, fill in zip(imgs, inside):
        contours, _ = cv2.findContours(b.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        drawn = np.zeros(b.shape, np.uint8)
        cv2.drawContours(drawn, contours, -1, 1, thickness=-1)
        assert np.array_equal(drawn.astype(bool), fill)


def test_area_resize_is_cv2_inter_area_bit_for_bit() -> None:
    g = np.random.default_rng(1)
    for fy, fx in [(1, 1), (2, 2), (3, 2), (4, 4), (5, 3), (8, 8)]:
        x = g.standard_normal((3, 7 * fy, 5 * fx))
        ours = area_resize(torch.from_numpy(x), (7, 5)).numpy()
        for i in range(3):
            assert np.array_equal(ours[i], cv2.resize(x[i], (5, 7), interpolation=cv2.INTER_AREA))


def test_otsu_is_cv2_bit_for_bit() -> None:
    g = np.random.default_rng(2)
    rows = [g.integers(0, 256, 300), np.repeat(g.integers(0, 256, 3), 100), g.choice([0, 255], 300),
            np.clip(g.normal(100, 40, 300), 0, 255).round(), np.r_[np.zeros(299), 255]]
    rows += [g.choice(g.integers(0, 256, g.integers(2, 6)), 300) for _ in range(40)]
    levels = torch.from_numpy(np.stack(rows).astype(np.int64))
    ours = otsu_threshold(levels).numpy()
    for row, t in zip(rows, ours):
        expected, _ = cv2.threshold(row.astype(np.uint8)[None], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert t == int(expected)


# ----------------------------------------------------------------------------- graphs and export
class _C3Head(torch.nn.Module):
    def forward(self, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return c3_tensor(relevance, resize_to=(4, 4))


def test_fx_call_function_node_with_literal_kwargs() -> None:
    graph = fx.Graph()
    r = graph.placeholder("relevance")
    res = graph.call_function(c3_tensor, (r,), {"resize_to": (8, 8), "connectivity": 4, "threshold": "quantile:0.6"})
    graph.output((graph.call_function(operator.getitem, (res, 0)), graph.call_function(operator.getitem, (res, 1))))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.from_numpy(random_batch(3, 4, 16, 16, channels=3))
    expected = c3_tensor(x, resize_to=(8, 8), connectivity=4, threshold="quantile:0.6")
    assert all(torch.equal(a, b) for a, b in zip(gm(x), expected))
    assert "c3_tensor" in gm.code and "connectivity = 4" in gm.code


@pytest.mark.slow  # torch.export and ONNX
def test_torch_export_onnx_and_compile_give_the_eager_masks() -> None:
    """One trace serves torch.export, ONNX (run in onnxruntime) and torch.compile(fullgraph=True)."""
    ort = pytest.importorskip("onnxruntime")
    x = torch.from_numpy(random_batch(6, 6, 8, 8, channels=3)).float()
    x[0] = 0.0  # an empty sample travels through the graph too
    eager_map, eager_mask = _C3Head()(x)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_C3Head(), (x[:2],), dynamic_shapes={"relevance": {0: batch}})
    assert all(torch.equal(a, b) for a, b in zip(program.module()(x), (eager_map, eager_mask)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_map, onnx_mask = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(onnx_mask, eager_mask.numpy()) and eager_mask.any()
    np.testing.assert_allclose(onnx_map, eager_map.numpy(), rtol=1e-6)
    # a graph cannot raise: under nan_policy="raise" a non-finite sample selects nothing
    poisoned = x.numpy().copy()
    poisoned[2, 1, 3, 3] = np.nan
    bad_map, bad_mask = session.run(None, {session.get_inputs()[0].name: poisoned})
    assert not bad_mask[2].any() and not bad_map[2].any()
    assert np.array_equal(np.delete(bad_mask, 2, 0), np.delete(onnx_mask, 2, 0))
    compiled = torch.compile(_C3Head(), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x)[1], eager_mask)
