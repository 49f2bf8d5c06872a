"""C3 at any input size: the tensor backend's area resizing against cv2 INTER_AREA, the masks of
both backends across sizes and targets, maps smaller than the target, and the compiled stage."""
from __future__ import annotations

import json

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import lrpfx
from conftest import tv_model
from lrpfx.postprocess import C3Config, c3_opencv, c3_tensor
from lrpfx.postprocess.c3 import area_is_fast, area_taps, selection_size
from lrpfx.postprocess.tensor_backend import area_resize, area_resize_matrix, area_weights, binarize, select

torch.set_num_threads(1)  # small ops: threads only contend on the shared 2-core machine
cv2.setNumThreads(1)

SIDES = [32, 50, 64, 97, 100, 224, 299, 384, 512]
SHAPES = [(s, s) for s in SIDES] + [(333, 500), (500, 333), (97, 224)]
TARGETS = [(28, 28), (14, 14), (32, 32), (28, 40), (9, 7)]
OPTIONS = [{}, {"connectivity": 4, "threshold": "quantile:0.8"}, {"threshold": "mass:0.5", "contour_rank": "peak"},
           {"threshold": "otsu", "component_rank": "mass"}]


def maps(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """n maps (n, h, w) from five families, vectorized: noise, blobs, tied blocks, spikes, signed waves."""
    g = np.random.default_rng(seed)
    yy, xx = np.linspace(0, 1, h)[:, None], np.linspace(0, 1, w)[None, :]
    out = np.empty((n, h, w))
    for i in range(n):
        kind = i % 5
        if kind == 0:  # white noise
            out[i] = g.random((h, w))
        elif kind == 1:  # separable Gaussian blobs, some centred past the border
            m = np.zeros((h, w))
            for _ in range(g.integers(1, 5)):
                cy, cx, s = g.uniform(-0.1, 1.1), g.uniform(-0.1, 1.1), g.uniform(0.03, 0.2)
                m += g.uniform(0.2, 1) * np.exp(-(yy - cy) ** 2 / s ** 2) * np.exp(-(xx - cx) ** 2 / s ** 2)
            out[i] = m
        elif kind == 2:  # small integers on coarse blocks: many exact ties after resizing
            coarse = g.integers(0, 4, size=(g.integers(2, 9), g.integers(2, 9))).astype(float)
            out[i] = coarse[(np.arange(h) * coarse.shape[0]) // h][:, (np.arange(w) * coarse.shape[1]) // w]
        elif kind == 3:  # sparse spikes on a weak background
            m = g.random((h, w)) * 0.01
            m.flat[g.choice(h * w, size=g.integers(1, 20), replace=False)] = g.uniform(1, 5, size=1)[0]
            out[i] = m
        else:  # signed waves (clipped at 0 by positive_only)
            fy, fx = g.uniform(1, 8, size=2)
            out[i] = np.sin(2 * np.pi * fy * yy + g.uniform(0, 6)) * np.cos(2 * np.pi * fx * xx) + g.normal(0, 0.05, (h, w))
    return out


def per_combo(shape: tuple[int, int], scale: int = 1) -> int:
    """Maps per (shape, target): fewer of the large ones, which cost time and show nothing new."""
    pixels = shape[0] * shape[1]
    return scale * (40 if pixels <= 100 * 100 else 16 if pixels <= 300 * 300 else 6)


def _cv2_area(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = selection_size(x.shape[1:], size)
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) for m in x])


# ----------------------------------------------------------------------------- the resizing
def test_area_weights_in_graph_ops_equal_cv2s_table() -> None:
    """The tensor-op weights (for symbolic sizes) equal the Python replay of computeResizeAreaTab."""
    for src in [5, 20, 32, 50, 64, 97, 100, 224, 299, 333, 384, 500, 512]:
        for dst in [1, 3, 7, 9, 14, 20, 28, 32, 40]:
            if dst > src:
                continue
            weights, _, _ = area_weights(src, dst, torch.device("cpu"))
            index, taps = area_taps(src, dst)
            table = np.zeros((dst, src))
            for d in range(dst):
                for i, wt in zip(index[d], taps[d]):
                    table[d, i] += wt
            assert np.array_equal(weights.numpy(), table), (src, dst)


@pytest.mark.parametrize("shape", SHAPES)
def test_area_resize_equals_cv2_bit_for_bit(shape: tuple[int, int]) -> None:
    """The eager path (cv2's integer-factor path where cv2 takes it, else its general path) is cv2
    bit for bit; the matrix form for symbolic sizes is cv2 up to rounding."""
    x = maps(sum(shape), 10, *shape)
    for target in TARGETS:
        expected = _cv2_area(x, target)
        size = expected.shape[1:]
        ours = area_resize(torch.from_numpy(x), target).numpy()
        assert np.array_equal(ours, expected), (shape, target)
        matrix = area_resize_matrix(torch.from_numpy(x), size).numpy()
        np.testing.assert_allclose(matrix, expected, rtol=1e-13, atol=1e-15 * np.abs(x).max())


def test_integer_factor_path_against_the_general_one() -> None:
    """cv2's block-sum path (kept: it is cv2's own for integer factors) against the general
    weights applied to the same sizes: equal up to the float32 rounding of 1/area vs its factors."""
    for src, dst in [(224, 28), (64, 16), (96, 32), (100, 25), (512, 32), (97, 1)]:
        assert area_is_fast(src, dst)
        x = torch.from_numpy(maps(src, 5, src, src))
        blocks = area_resize(x, (dst, dst))
        wy, _, _ = area_weights(src, dst, torch.device("cpu"))
        general = wy @ x @ wy.T
        torch.testing.assert_close(blocks, general, rtol=1e-6, atol=0)
        assert torch.equal(blocks, torch.from_numpy(_cv2_area(x.numpy(), (dst, dst))))
    assert not area_is_fast(299, 28) and not area_is_fast(64, 28)


# ----------------------------------------------------------------------------- the masks
def _sweep(shapes: list[tuple[int, int]], scale: int = 1) -> tuple[int, int]:
    """Masks of both backends on every shape x target, options rotating; returns (maps, mismatching maps)."""
    n_maps = differing = 0
    for s, shape in enumerate(shapes):
        for t, target in enumerate(TARGETS):
            options = OPTIONS[(s + t) % len(OPTIONS)]
            x = maps(1000 * s + t, per_combo(shape, scale), *shape)
            ref = c3_opencv(x, resize_to=target, **options)
            out, mask = c3_tensor(torch.from_numpy(x), resize_to=target, **options)
            bad = (mask.numpy() != ref.mask_full).reshape(len(x), -1).any(1)
            assert not bad.any(), f"masks differ for samples {np.flatnonzero(bad)} at {shape} -> {target}, {options}"
            np.testing.assert_allclose(out.numpy(), ref.map, rtol=1e-12, atol=0)
            n_maps += len(x)
            differing += int(bad.sum())
    return n_maps, differing


def test_backends_identical_at_any_size() -> None:
    """1360 maps (12 shapes x 5 targets, 40 per pair up to 100 x 100, 16 up to 299 x 299, 6
    above; five families, four option sets): 0 differ."""
    n_maps, differing = _sweep(SHAPES)
    assert n_maps >= 1000 and differing == 0


@pytest.mark.slow
def test_backends_identical_at_any_size_large() -> None:
    n_maps, differing = _sweep(SHAPES + [(s + 1, s + 3) for s in SIDES], 4)
    assert n_maps >= 8000 and differing == 0


def test_matrix_form_differs_from_cv2_only_within_rounding_of_the_threshold() -> None:
    """The matrix form (what a dynamic-size export runs) against cv2: B may differ only at
    pixels within 1e-6 (relative) of τ; the count is reported, and the masks are compared."""
    near = flipped = maps_done = mask_diff = 0
    cfg = C3Config()
    for s, shape in enumerate(SHAPES):
        for t, target in enumerate(TARGETS):
            x = np.maximum(maps(7000 + 10 * s + t, per_combo(shape), *shape), 0)
            expected = _cv2_area(x, target)
            low = area_resize_matrix(torch.from_numpy(x), expected.shape[1:])
            ref = c3_opencv(expected, resize_to=None)
            b_ours = binarize(low, cfg.threshold_spec).numpy()
            b_ref = np.stack([m > t for m, t in zip(expected, ref.threshold)])
            diff = b_ours != b_ref
            tau = ref.threshold[:, None, None]
            within = np.abs(expected - tau) <= 1e-6 * np.abs(tau)
            assert not (diff & ~within).any(), f"a pixel away from τ flipped at {shape} -> {target}"
            flipped += int(diff.sum())
            near += int(within.sum())
            mask_diff += int((select(low, cfg).numpy() != ref.mask).reshape(len(x), -1).any(1).sum())
            maps_done += len(x)
    print(f"\nmatrix form: {maps_done} maps, {near} pixels within 1e-6 of tau, {flipped} flipped, "
          f"{mask_diff} masks differ")
    assert maps_done >= 1000 and flipped <= near and mask_diff <= flipped


# ----------------------------------------------------------------------------- small maps
@pytest.mark.parametrize(("shape", "expected"), [((16, 16), (16, 16)), ((20, 40), (20, 28)), ((40, 20), (28, 20))])
def test_maps_smaller_than_the_target_run_at_native_size_in_that_dimension(shape, expected) -> None:
    x = maps(3, 25, *shape)
    ref = c3_opencv(x)  # resize_to=(28, 28)
    assert ref.mask.shape[1:] == expected and ref.mask_full.shape[1:] == shape
    out, mask = c3_tensor(torch.from_numpy(x))
    assert torch.equal(mask, torch.from_numpy(ref.mask_full))
    low, low_mask = c3_tensor(torch.from_numpy(x), output="masked_low_res")
    assert low_mask.shape[1:] == expected and np.array_equal(low_mask.numpy(), ref.mask)
    if shape == (16, 16):  # native size: exactly C3 without resizing
        assert np.array_equal(ref.mask, c3_opencv(x, resize_to=None).mask)


# ----------------------------------------------------------------------------- the compiled stage
@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    return tv_model("resnet18", dtype=torch.float32)


@pytest.mark.parametrize("shape", [(64, 64), (100, 100), (299, 299), (333, 500), (16, 16), (20, 40)])
def test_compiled_c3_runs_at_any_size_with_the_reference_masks(resnet18, shape) -> None:
    explainer = lrpfx.compile(resnet18, "c3_lrp", c3=True)
    x = torch.randn(2, 3, *shape)
    relevance, _, c3_map, c3_mask = explainer(x)
    reference = c3_opencv(relevance, C3Config(**lrpfx.RuleSet.builtin("c3_lrp").c3))
    assert c3_mask.shape == (2, *shape)
    assert torch.equal(c3_mask, torch.from_numpy(reference.mask_full))
    assert torch.allclose(c3_map, torch.as_tensor(reference.map, dtype=c3_map.dtype), atol=1e-6)


@pytest.mark.parametrize("resize_to", [(0, 28), (-4, 28), (28,), (28, 28, 28), "28", (28.5, 28)])
def test_bad_resize_to_fails_at_compile_time(resnet18, resize_to) -> None:
    with pytest.raises(ValueError, match=r"resize_to=.* must be None or \(height, width\) with positive ints"):
        lrpfx.compile(resnet18, "c3_lrp", c3={"resize_to": resize_to})


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five photos of five sizes, three of them non-square."""
    from PIL import Image
    root = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (480, 640), (333, 500), (97, 50), (224, 224)]):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").save(root / f"photo{i}.png")
    return root


def test_cli_explain_with_c3_on_photos_of_mixed_sizes(photos: Path, tmp_path: Path) -> None:
    """The bundled 64 px model: C3 at the rule set's (28, 28), a non-integer shrink of 64."""
    from lrpfx.cli import commands
    out = tmp_path / "out"
    assert commands.main(["explain", str(photos), "--model", "bundled", "--rules", "c3_lrp", "--c3", "--out",
                          str(out), "--batch-size", "2", "--workers", "0", "--quiet"]) == 0
    masks = sorted(out.rglob("*.c3mask.npy"))
    assert len(masks) == 5
    for path in masks:
        relevance = np.load(str(path).replace(".c3mask.npy", ".input_relevance.npy"))
        model_mask = c3_opencv(relevance[None], C3Config(**lrpfx.RuleSet.builtin("c3_lrp").c3)).mask_full[0]
        assert model_mask.shape == (64, 64) and 0 < model_mask.sum() < model_mask.size
        # the saved mask is at the photo's size: each photo pixel takes the model pixel its centre falls in,
        # by torchvision's resize (shorter side to 64) and centre crop, written out here independently
        mask = np.load(path)
        h, w = (int(v) for v in json.loads(Path(str(path).replace(".c3mask.npy", ".json")).read_text())["image_size"])
        assert mask.shape == (h, w) and mask.dtype == bool
        short, long = min(h, w), max(h, w)
        rh, rw = (64, int(64 * long / short)) if h <= w else (int(64 * long / short), 64)
        top, left = round((rh - 64) / 2), round((rw - 64) / 2)
        v = (np.arange(h) + 0.5) * rh / h - 0.5 - top  # photo row centre in model rows
        u = (np.arange(w) + 0.5) * rw / w - 0.5 - left
        vi, ui = np.floor(v + 0.5).astype(int), np.floor(u + 0.5).astype(int)
        clear_v = np.abs(v - np.round(v)) != 0.5  # away from a tie between two model pixels
        clear_u = np.abs(u - np.round(u)) != 0.5
        inside_v, inside_u = (vi >= 0) & (vi < 64), (ui >= 0) & (ui < 64)
        expected = np.zeros((h, w), bool)
        expected[np.ix_(inside_v, inside_u)] = model_mask[np.ix_(vi[inside_v], ui[inside_u])]
        check = np.ix_(clear_v & (np.abs(v - 31.5) < 32.4), clear_u & (np.abs(u - 31.5) < 32.4))
        assert np.array_equal(mask[check], expected[check])
        assert not mask[~inside_v].any() and not mask[:, ~inside_u].any()  # nothing outside the crop


@pytest.mark.slow  # torch.export and ONNX
def test_cli_export_with_c3_runs_at_any_size_with_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`lrpfx export bundled --c3`: a torch.export program with the target input (-1: predicted)."""
    from lrpfx.cli import commands
    from lrpfx.cli.loading import load_model
    path = tmp_path / "explainer.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a size-fixing op, if any, is named in a warning
        assert commands.main(["export", "bundled", "--rules", "c3_lrp", "--c3", "--format", "torch-export",
                              "--out", str(path)]) == 0
    assert "inputs: x, target" in capsys.readouterr().out
    program = torch.export.load(str(path)).module()
    explainer = lrpfx.compile(load_model("bundled").model, "c3_lrp", c3=True)
    x, target = torch.randn(3, 3, 64, 64), torch.tensor([-1, 0, -1])
    ours, exported = explainer(x, target), program(x, target)
    assert ((exported[0] - ours[0]).norm() / ours[0].norm()).item() <= 1e-5
    assert torch.equal(exported[3], ours[3])
