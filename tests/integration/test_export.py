"""The explainer as a deployable model: ONNX in onnxruntime, torch.export, torch.compile, bf16/fp16."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lrpfx
from conftest import rel_err, tv_model

pytestmark = pytest.mark.slow  # exports (ONNX, torch.export, torch.compile) of ResNet-18 and ResNet-50

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {a: tv_model(a, dtype=torch.float32, num_classes=10) for a in ("resnet18", "resnet50")}


@pytest.mark.parametrize(("arch", "rules"), [(a, r) for a in ("resnet18", "resnet50")
                                             for r in ("epsilon_plus_flat", "c3_lrp")] + [("resnet18", "lrp0")])
def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch(models, tmp_path: Path, arch: str, rules: str) -> None:
    explainer = lrpfx.compile(models[arch], rules)
    path = lrpfx.export_onnx(explainer, tmp_path / "explainer.onnx", torch.randn(2, 3, 64, 64), dynamic_size=False)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x", "target"]
    assert [o.name for o in session.get_outputs()] == ["relevance", "logits"]
    x = torch.randn(3, 3, 64, 64)  # another batch size than the example
    target = torch.tensor([-1, 7, -1])  # -1: the predicted class
    outputs = session.run(None, {"x": x.numpy(), "target": target.numpy()})
    relevance, logits = explainer(x, target)
    assert rel_err(torch.from_numpy(outputs[0]), relevance) <= 1e-4
    assert np.allclose(outputs[1], logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_onnx_with_the_c3_stage_gives_identical_masks(models, tmp_path: Path, arch: str) -> None:
    explainer = lrpfx.compile(models[arch], "c3_lrp", c3=True)
    path = lrpfx.export_onnx(explainer, tmp_path / "c3.onnx", torch.randn(2, 3, 56, 56), dynamic_size=False,
                             target_input=False)  # the one-input form: the predicted class
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["relevance", "logits", "c3_map", "c3_mask"]
    x = torch.randn(4, 3, 56, 56)
    # outputs asked for by name, in another order than the file's
    c3_mask, relevance, c3_map = session.run(["c3_mask", "relevance", "c3_map"], {"x": x.numpy()})
    ours = explainer(x)
    assert rel_err(torch.from_numpy(relevance), ours[0]) <= 1e-4
    # the masks come from thresholds on the relevance; they agree unless a pixel sits exactly at a
    # threshold tie, which float noise of 1e-7 could flip: then the masks differ in that pixel only
    differing = (torch.from_numpy(c3_mask) != ours[3]).sum().item()
    assert differing == 0, f"{differing} pixels differ"
    assert np.allclose(c3_map, ours[2].numpy(), rtol=1e-3, atol=1e-5)


def test_torch_export_reproduces_outputs(models) -> None:
    explainer = lrpfx.compile(models["resnet50"], "c3_lrp", c3=True)
    program = lrpfx.export_program(explainer, torch.randn(2, 3, 56, 56), dynamic_size=False)
    x = torch.randn(5, 3, 56, 56)
    target = torch.tensor([-1, 0, 9, -1, 4])
    ours, exported = explainer(x, target), program.module()(x, target)
    assert len(ours) == len(exported) == 4
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(ours, exported))


def test_torch_jit_trace_reproduces_outputs_on_another_batch_size(models) -> None:
    """jit.trace records the fixed-count C3 graph (no eager early exit) and no value check."""
    explainer = lrpfx.compile(models["resnet18"], "c3_lrp", c3=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
        traced = torch.jit.trace(explainer, (torch.randn(2, 3, 56, 56),), check_trace=False)
    x = torch.randn(3, 3, 56, 56)
    ours, theirs = explainer(x), traced(x)
    assert rel_err(theirs[0], ours[0]) < 1e-6 and torch.equal(theirs[1], ours[1])
    assert torch.equal(theirs[3], ours[3])


def test_torch_compile_fullgraph_matches_eager(models) -> None:
    explainer = lrpfx.compile(models["resnet18"], "c3_lrp", c3=True)
    compiled = torch.compile(explainer, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(2, 3, 56, 56)
    ours, theirs = explainer(x, torch.tensor([1, 4])), compiled(x, torch.tensor([1, 4]))
    assert rel_err(theirs[0], ours[0]) < 1e-4
    assert torch.equal(theirs[3], ours[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rules", ["epsilon_plus_flat", "epsilon_gamma_box", "c3_lrp", "eccv2024"])
def test_reduced_precision_is_finite_and_close_to_float32(models, dtype: torch.dtype, rules: str) -> None:
    model = models["resnet50"]
    x = torch.randn(2, 3, 64, 64)
    target = model(x).argmax(1)
    reference, _ = lrpfx.compile(model, rules)(x, target)
    low, _ = lrpfx.compile(copy.deepcopy(model).to(dtype), rules)(x.to(dtype), target)
    assert torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(1), reference.flatten(1))
    assert (cos > 0.99).all(), cos
