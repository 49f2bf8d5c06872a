"""Exported explainers with a target input (-1: the predicted class) and a dynamic height and width,
against the eager explainer (torch.export) and onnxruntime."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lrpfx
from conftest import rel_err, tv_model
from lrpfx.export import ExportError

pytestmark = pytest.mark.slow  # torch.export and ONNX programs


@pytest.fixture(scope="module")
def avgpool_model() -> torch.nn.Module:
    return tv_model("resnet18", dtype=torch.float32)


@pytest.fixture(scope="module")
def maxpool_model() -> torch.nn.Module:
    """resnet18 with a global max-pool head: every op of its explainer takes a dynamic size."""
    model = tv_model("resnet18", dtype=torch.float32)
    model.avgpool = torch.nn.AdaptiveMaxPool2d(1)
    return model.eval()


MIXED = torch.tensor([-1, 3, -1, 9])


def _explicit(explainer: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    predicted = explainer(x)[1].argmax(1)
    return torch.where(target < 0, predicted, target)


def test_eager_target_minus_one_is_the_predicted_class(avgpool_model) -> None:
    explainer = lrpfx.compile(avgpool_model, "c3_lrp", c3=True)
    x = torch.randn(4, 3, 40, 40)
    mixed = explainer(x, MIXED)
    explicit = explainer(x, _explicit(explainer, x, MIXED))
    assert all(torch.equal(a, b) for a, b in zip(mixed, explicit))
    assert torch.equal(explainer(x, -1)[0], explainer(x)[0])


@pytest.mark.parametrize("target", [torch.tensor([0, -2, 1, 2]), torch.tensor([10, 0, 0, 0]), 10, -2])
def test_eager_target_out_of_range_is_refused(avgpool_model, target) -> None:
    explainer = lrpfx.compile(avgpool_model, "epsilon_plus_flat")
    with pytest.raises(lrpfx.InputError, match=r"out of range for a model with 10 classes"):
        explainer(torch.randn(4, 3, 32, 32), target)


def test_program_with_per_sample_targets_matches_eager(avgpool_model) -> None:
    explainer = lrpfx.compile(avgpool_model, "c3_lrp", c3=True)
    program = lrpfx.export_program(explainer, torch.randn(2, 3, 48, 48), dynamic_size=False)
    x = torch.randn(4, 3, 48, 48)  # another batch size than the example
    ours, exported = explainer(x, MIXED), program.module()(x, MIXED)
    assert rel_err(exported[0], ours[0]) <= 1e-5 and torch.allclose(exported[1], ours[1], atol=1e-5)
    assert torch.equal(exported[3], ours[3])
    one_input = lrpfx.export_program(explainer, torch.randn(2, 3, 48, 48), dynamic_size=False, target_input=False)
    assert rel_err(one_input.module()(x)[0], explainer(x)[0]) <= 1e-5


def test_dynamic_size_program_matches_eager_at_three_sizes(maxpool_model) -> None:
    """One program, exported at 64 x 64, run at 64, 100 and 224 (and a non-square size)."""
    explainer = lrpfx.compile(maxpool_model, "c3_lrp", c3=True)
    program = lrpfx.export_program(explainer, torch.randn(2, 3, 64, 64), dynamic_size=True)
    run = program.module()
    for size in [(64, 64), (100, 100), (224, 224), (97, 130)]:
        x = torch.randn(4, 3, *size)
        ours, exported = explainer(x, MIXED), run(x, MIXED)
        assert rel_err(exported[0], ours[0]) <= 1e-5, size
        assert torch.equal(exported[3], ours[3]), size  # the C3 masks (matrix-form resize) agree
        assert torch.allclose(exported[2], ours[2], rtol=1e-4, atol=1e-7), size


def test_dynamic_size_refusal_names_the_op(avgpool_model, maxpool_model) -> None:
    """An op that fixes the size: an error naming it (dynamic_size=True), or a warning and the
    fixed-size export (the default)."""
    explainer = lrpfx.compile(avgpool_model, "epsilon_plus_flat")
    example = torch.randn(2, 3, 64, 64)
    try:
        program = lrpfx.export_program(explainer, example, dynamic_size=True)
    except ExportError as e:  # the global-average-pool kernel turned h * w into a Python float
        assert "ratio_adaptive_avgpool2d" in str(e) and "dynamic_size=False" in str(e)
        with pytest.warns(UserWarning, match="ratio_adaptive_avgpool2d.*exported for the example's size"):
            program = lrpfx.export_program(explainer, example)
        x = torch.randn(3, 3, 64, 64)
        assert rel_err(program.module()(x, MIXED[:3])[0], explainer(x, MIXED[:3])[0]) <= 1e-5
    else:  # the kernel takes a dynamic size by now: then it must be right at another size
        x = torch.randn(3, 3, 100, 100)
        assert rel_err(program.module()(x, MIXED[:3])[0], explainer(x, MIXED[:3])[0]) <= 1e-5
    c3 = lrpfx.compile(maxpool_model, "c3_lrp", c3={"resize_to": None})
    with pytest.raises(ExportError, match=r"connected_components.*fixed by the map size"):
        lrpfx.export_program(c3, example, dynamic_size=True)


def test_dynamic_size_example_smaller_than_resize_to(maxpool_model) -> None:
    explainer = lrpfx.compile(maxpool_model, "c3_lrp", c3=True)
    with pytest.raises(ExportError, match=r"example input is 20 x 20, below .* \(28 x 28"):
        lrpfx.export_program(explainer, torch.randn(1, 3, 20, 20), dynamic_size=True)


def test_example_smaller_than_the_network_minimum_names_the_minimum() -> None:
    """Three unpadded 2 x 2 max-pools: the network takes nothing below 8 x 8."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for c_in in (3, 4, 4):
        layers += [torch.nn.Conv2d(c_in, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    explainer = lrpfx.compile(model.eval(), "epsilon_plus_flat")
    assert lrpfx.export.minimum_input_size(explainer, torch.randn(1, 3, 64, 64)) == 8
    with pytest.raises(ExportError, match=r"example input is 4 x 4, smaller than the smallest input this network "
                                          r"takes \(8 x 8\)"):
        lrpfx.export_program(explainer, torch.randn(2, 3, 4, 4))
    program = lrpfx.export_program(explainer, torch.randn(2, 3, 16, 16), dynamic_size=True)
    # torch.export assumes a dynamic size is never 1: every feature map must stay at least 2 wide
    x = torch.randn(2, 3, 16, 24)
    assert rel_err(program.module()(x, MIXED[:2])[0], explainer(x, MIXED[:2])[0]) <= 1e-5


ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_onnx_target_input_in_onnxruntime_at_any_size(maxpool_model, tmp_path: Path) -> None:
    """ONNX with the target input, per-sample targets mixing -1 and classes, C3 included, with a
    dynamic height and width: one file, run in onnxruntime at even and odd sizes other than the
    example's (the transposed convolutions of strided layers carry no size-dependent
    output_padding in an exported graph)."""
    explainer = lrpfx.compile(maxpool_model, "c3_lrp", c3=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to a fixed size
        path = lrpfx.export_onnx(explainer, tmp_path / "explainer.onnx", torch.randn(2, 3, 64, 64), dynamic_size=True)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x", "target"]
    assert [o.name for o in session.get_outputs()] == ["relevance", "logits", "c3_map", "c3_mask"]
    for size in ((64, 64), (57, 91), (96, 70)):
        x = torch.randn(4, 3, *size)
        relevance, logits, c3_map, c3_mask = session.run(None, {"x": x.numpy(), "target": MIXED.numpy()})
        ours = explainer(x, MIXED)
        assert relevance.shape == (4, 3, *size)
        assert rel_err(torch.from_numpy(relevance), ours[0]) <= 1e-4
        assert np.allclose(logits, ours[1].numpy(), rtol=1e-4, atol=1e-4)
        assert int((torch.from_numpy(c3_mask) != ours[3]).sum()) == 0
        assert np.allclose(c3_map, ours[2].numpy(), rtol=1e-3, atol=1e-5)
