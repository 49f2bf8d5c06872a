"""The explainer as a deployable model: ONNX in onnxruntime, torch.export, torch.compile, bf16/fp16."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import lrpfx
from conftest import rel_err, tv_model

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {a: tv_model(a, dtype=torch.float32, num_classes=10) for a in ("resnet18", "resnet50")}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("rules", ["epsilon_plus_flat", "c3_lrp"])
def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch(models, tmp_path: Path, arch: str, rules: str) -> None:
    explainer = lrpfx.compile(models[arch], rules)
    path = lrpfx.export_onnx(explainer, tmp_path / "explainer.onnx", torch.randn(2, 3, 64, 64))
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = torch.randn(3, 3, 64, 64)  # another batch size than the example
    outputs = session.run(None, {"x": x.numpy()})
    relevance, logits = explainer(x)
    assert rel_err(torch.from_numpy(outputs[0]), relevance) <= 1e-4
    assert np.allclose(outputs[1], logits.numpy(), rtol=1e-4, atol=1e-4)


def test_torch_export_reproduces_outputs(models) -> None:
    explainer = lrpfx.compile(models["resnet50"], "c3_lrp")
    program = lrpfx.export_program(explainer, torch.randn(2, 3, 64, 64))
    x = torch.randn(5, 3, 64, 64)
    ours, exported = explainer(x), program.module()(x)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours, exported))


def test_torch_compile_fullgraph_matches_eager(models) -> None:
    explainer = lrpfx.compile(models["resnet18"], "c3_lrp")
    compiled = torch.compile(explainer, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(compiled(x, torch.tensor([1, 4]))[0], explainer(x, torch.tensor([1, 4]))[0]) < 1e-4


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
