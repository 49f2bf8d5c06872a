"""The bundled ViT (``vit_w64``, issue #21 item 5): it loads, compiles under ``attnlrp`` and
``lrp0``, LRP-0 is Input x Gradient of its linearized twin (CP-LRP: the softmax, LayerNorm std
and GELU secant held constant), and the evaluation runs its own rows (CP-LRP vs AttnLRP, Grad-CAM
on the token grid, Input x Gradient, the controls) on a few images, with the ResNet rows left out
and said so.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

import lrpfx
from lrpfx.eval import evaluate
from lrpfx.eval.datasets import generate_batch
from lrpfx.eval.models import bundled_metadata, load_bundled, weights_dir
from lrpfx.eval.twin import input_x_gradient, linearized_twin

pytestmark = pytest.mark.slow

NAME = "vit_w64"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_bundled(NAME)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return generate_batch(0, 3, split="test")


def test_the_bundled_vit_loads_small_with_its_metadata(model: torch.nn.Module) -> None:
    assert isinstance(model, VisionTransformer) and not model.training
    assert model.image_size == 64 and model.patch_size == 8 and len(model.encoder.layers) == 4
    meta = bundled_metadata(NAME)
    assert meta["name"] == NAME and len(meta["classes"]) == 8
    assert 0.0 < meta["test_accuracy"] <= 1.0 and meta["val_accuracy"] is not None
    assert (weights_dir() / f"{NAME}.safetensors").stat().st_size < 3 * 2 ** 20
    assert evaluate.model_family(model) == "vit"
    assert evaluate.model_family(load_bundled("resnet18_w16")) == "resnet"


@pytest.mark.parametrize("rules", ["attnlrp", "lrp0"])
def test_compiles_with_a_finite_map_and_the_models_logits(model: torch.nn.Module, batch: tuple, rules: str) -> None:
    x, y, _ = batch
    relevance, logits = lrpfx.compile(model, rules)(x, y)
    with torch.no_grad():
        expected = model(x)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_lrp0_is_input_x_gradient_of_the_linearized_twin(model: torch.nn.Module, batch: tuple) -> None:
    x, y, _ = batch
    m64 = load_bundled(NAME).double()
    x64 = x.double()
    relevance = lrpfx.compile(m64, "lrp0")(x64, y)[0]
    assert rel_err(relevance, input_x_gradient(linearized_twin(m64), x64, y)) < 1e-6


def test_attnlrp_differs_from_cp_lrp(model: torch.nn.Module, batch: tuple) -> None:
    """The softmax and product rules change the map (otherwise the comparison would be empty)."""
    x, y, _ = batch
    cp = lrpfx.compile(model, "lrp0")(x, y)[0]
    attn = lrpfx.compile(model, "attnlrp")(x, y)[0]
    assert rel_err(attn, cp) > 1e-3


def test_the_resnet_rows_are_unchanged() -> None:
    assert list(evaluate.methods(50)) == list(evaluate.methods(50, "resnet"))
    assert evaluate.C3_DEFAULT in evaluate.methods(50) and "Guided Backprop" in evaluate.methods(50)
    vit = evaluate.methods(50, "vit")
    assert evaluate.ATTNLRP in vit and "CP-LRP-0 (lrp0)" in vit and evaluate.C3_DEFAULT not in vit


@pytest.fixture(scope="module")
def run() -> evaluate.Evaluation:
    return evaluate.evaluate(n_images=3, seed=0, batch_size=3, rise_masks=50, points=10, tie_seeds=2,
                             progress=False, model=f"bundled:{NAME}")


def test_the_evaluation_runs_the_vit_rows_without_failures(run: evaluate.Evaluation) -> None:
    result = run.result
    rows = result["methods"]
    expected = set(evaluate.methods(50, "vit")) | {"Ground-truth mask", "Random map", evaluate.BLOB}
    assert set(rows) == expected
    assert not {name: row["failed"] for name, row in rows.items() if "failed" in row}
    assert result["model"] == f"bundled:{NAME}" and result["abn"] is None
    assert "ABN block" in result["skipped"] and "Rows not run for this model" in evaluate.markdown(result)
    for name in ("CP-LRP-0 (lrp0)", evaluate.ATTNLRP):
        assert torch.isfinite(torch.tensor(rows[name]["sum R / top"][0]))
    grad_cam = run.maps["Grad-CAM"]
    assert grad_cam.shape == (3, 64, 64) and bool((grad_cam.flatten(1).std(1) > 0).all())
    assert rows["Ground-truth mask"]["RMA"][0] == pytest.approx(1.0)


def test_the_figure_falls_back_to_attnlrp(run: evaluate.Evaluation, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert evaluate.best_worst_figure(run, tmp_path / "bw.png", k=1) == tmp_path / "bw.png"
