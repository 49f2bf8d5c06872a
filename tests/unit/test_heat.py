"""Heat quantization (METHOD_SPEC §4, oracles §7.12) against a literal port of the ECCV loop."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lrpfx.postprocess import heat_quantize

torch.set_num_threads(1)


def eccv_heat_quantization(a: np.ndarray, q: int = 8) -> np.ndarray:
    """The ECCV 2024 code's ``apply_heat_quantization``, ported literally (on a copy)."""
    a = a.copy()
    bins = np.linspace(a.min(), a.max(), q)
    for i in range(q - 1):
        a[(a >= bins[i]) & (a < bins[i + 1])] = bins[i]
    return a


def maps(seed: int, dtype: type = np.float64) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    out = [g.standard_normal((16, 16)), g.random((7, 13)) * 1e-3, g.integers(-3, 5, (10, 10)).astype(float),
           np.round(g.standard_normal((12, 12)) * 4) / 4, g.exponential(1.0, (20, 20)), np.full((5, 5), 2.5),
           1.0 + g.random((6, 6)) * 1e-15, g.random((1, 9)), g.standard_normal((9, 1)) * 1e6,
           np.r_[0.0, 5e-324, 1e-323].reshape(1, 3)]  # a range that underflows numpy's step
    out += [g.standard_normal((8, 8)) * 10.0 ** g.uniform(-6, 6) for _ in range(30)]
    return [m.astype(dtype) for m in out]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_equals_the_eccv_loop(dtype: type) -> None:
    for i, a in enumerate(maps(0, dtype)):
        expected = eccv_heat_quantization(a)
        assert np.array_equal(heat_quantize(a), expected), f"map {i}"
        assert np.array_equal(heat_quantize(torch.from_numpy(a)).numpy(), expected), f"map {i} (torch)"


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                  elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)),
       st.integers(2, 12))
def test_equals_the_eccv_loop_hypothesis(a: np.ndarray, q: int) -> None:
    assert np.array_equal(heat_quantize(a, q), eccv_heat_quantization(a, q))


def test_equals_the_searchsorted_form() -> None:
    for a in maps(1):
        bins = np.linspace(a.min(), a.max(), 8)
        assert np.array_equal(heat_quantize(a), bins[np.searchsorted(bins, a, side="right") - 1])


@pytest.mark.parametrize("q", [2, 3, 8, 16])
def test_properties(q: int) -> None:
    """At most q values, min and max kept, monotone, idempotent, input untouched."""
    for a in maps(2) + maps(3, np.float32):
        before = a.copy()
        out = heat_quantize(a, q)
        assert np.array_equal(a, before), "the input was modified"
        assert len(np.unique(out)) <= q
        assert out.min() == a.min() and out.max() == a.max()
        order = np.argsort(a, axis=None, kind="stable")
        assert (np.diff(out.ravel()[order]) >= 0).all(), "not monotone"
        assert np.array_equal(heat_quantize(out, q), out), "not idempotent"
        assert out.dtype == a.dtype


def test_torch_input_is_not_mutated_and_keeps_dtype() -> None:
    t = torch.randn(2, 3, 8, 8, dtype=torch.float32)
    before = t.clone()
    out = heat_quantize(t)
    assert torch.equal(t, before) and out.dtype == torch.float32 and out.shape == t.shape
    assert out.data_ptr() != t.data_ptr()


def test_per_two_dimensional_map() -> None:
    """min and max are those of each (H, W) map, as the ECCV code sees one map at a time."""
    g = np.random.default_rng(4)
    batch = g.standard_normal((3, 2, 9, 9)) * np.array([1.0, 100.0])[None, :, None, None]
    out = heat_quantize(batch)
    out_t = heat_quantize(torch.from_numpy(batch)).numpy()
    for n in range(3):
        for c in range(2):
            assert np.array_equal(out[n, c], eccv_heat_quantization(batch[n, c]))
            assert np.array_equal(out_t[n, c], out[n, c])


def test_constant_nan_and_inf() -> None:
    assert np.array_equal(heat_quantize(np.full((4, 4), -1.5)), np.full((4, 4), -1.5))
    g = np.random.default_rng(5)
    a = g.standard_normal((10, 10))
    b = a.copy()
    b[2, 3], b[7, 7], b[0, 0] = np.nan, np.inf, -np.inf
    out = heat_quantize(b)
    assert np.isnan(out[2, 3]) and out[7, 7] == np.inf and out[0, 0] == -np.inf
    finite = np.isfinite(b)
    lo, hi = b[finite].min(), b[finite].max()
    bins = np.linspace(lo, hi, 8)
    expected = bins[np.searchsorted(bins, b[finite], side="right") - 1]
    assert np.array_equal(out[finite], expected)  # the finite values are quantized as usual
    out_t = heat_quantize(torch.from_numpy(b)).numpy()
    assert np.array_equal(out_t, out, equal_nan=True)
    assert np.isnan(heat_quantize(np.full((2, 2), np.nan))).all()


def test_integer_and_one_dimensional_input() -> None:
    out = heat_quantize(np.arange(10))
    assert out.dtype == np.float64 and np.array_equal(out, eccv_heat_quantization(np.arange(10.0)))
    assert np.array_equal(heat_quantize(torch.arange(10)).numpy(), out)


def test_q_must_be_an_int_of_at_least_two() -> None:
    for q in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"q=.* must be an int ≥ 2 \(the number of bin edges\); use e.g. q=8"):
            heat_quantize(np.ones((2, 2)), q)  # type: ignore[arg-type]


class _Heat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return heat_quantize(x, 8)


@pytest.mark.slow  # torch.export and ONNX
def test_torch_form_exports_and_compiles() -> None:
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 1, 12, 12)
    x[1] = 0.5  # a constant map inside the batch
    expected = heat_quantize(x)
    program = torch.export.export(_Heat(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    assert torch.equal(program.module()(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(got, expected.numpy())
    assert torch.equal(torch.compile(_Heat(), fullgraph=True, backend="aot_eager")(x), expected)
