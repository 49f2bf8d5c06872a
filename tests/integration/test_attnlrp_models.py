"""AttnLRP on real architectures (slow): the transformers and attention-augmented ResNets of issue #21
compile under ``attnlrp`` with a finite map and the model's own logits; Swin's window attention is
expanded exactly (LRP-0 against Input x Gradient with the softmax, LayerNorm std and GELU linearized
by patching torch's functions, not lrpfx's code); ViT under ``attnlrp`` exports to ONNX.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import lrpfx
from lrpfx.eval import twin, zoo

pytestmark = pytest.mark.slow

#: (spec, input size): the smallest size each model accepts (fixed position embeddings need 256)
MODELS = [("vit_b_16", 32), ("vit_b_32", 32), ("swin_t", 64), ("swin_v2_t", 64), ("maxvit_t", 224),
          ("timm:botnet26t_256", 256), ("timm:halonet26t", 256), ("timm:lambda_resnet26t", 32),
          ("timm:skresnet18", 32), ("timm:resnest14d", 32)]


def build(spec: str, size: int) -> torch.nn.Module:
    if spec.startswith("vit_"):
        import torchvision
        model = torchvision.models.get_model(spec, weights=None, num_classes=10, image_size=size).eval()
    else:
        model = zoo.build(spec)[0]
    torch.manual_seed(0)
    return zoo.randomize(model)  # BatchNorm statistics and zero-initialized heads drawn, seeded


@pytest.mark.parametrize(("spec", "size"), MODELS, ids=[m[0] for m in MODELS])
def test_compiles_under_attnlrp_with_a_finite_map(spec: str, size: int) -> None:
    model = build(spec, size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    plan = lrpfx.inspect(model, "attnlrp")
    assert not plan.unmatched
    assert any(plan.kinds.get(n) in ("softmax", "product") for n in plan.path), "no attention on the relevance path"
    relevance, logits = lrpfx.compile(model, "attnlrp")(x)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5)


@contextmanager
def linearized_functions() -> Iterator[None]:
    """Softmax outputs and LayerNorm stds detached, GELU as x * stopgrad(gelu(x) / x): torch's own functions
    patched, so that they act inside torchvision's fx-opaque ``shifted_window_attention`` too."""
    softmax, layer_norm, gelu = F.softmax, F.layer_norm, F.gelu
    with mock.patch.object(F, "softmax", lambda *a, **k: softmax(*a, **k).detach()), \
         mock.patch.object(F, "layer_norm", lambda x, shape, w=None, b=None, eps=1e-5: twin.layer_norm(x, shape, w, b, eps)), \
         mock.patch.object(F, "gelu", lambda x, approximate="none": twin.secant(lambda t: gelu(t, approximate=approximate), x)):
        yield


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_window_attention_expansion_is_exact_under_lrp0(name: str) -> None:
    """64 px: stage 1 pads 16 -> 21 and shifts, the last stage (2 x 2) neither pads to a shift nor shifts."""
    model = build(name, 64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 4])
    relevance, logits = lrpfx.compile(model, "lrp0")(x, target)
    assert torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    with linearized_functions():
        reference = twin.input_x_gradient(model, x, target)
        linearized = twin.input_x_gradient(twin.linearized_twin(model), x, target)  # the twin, with the softmax
    assert float((relevance - reference).norm() / reference.norm()) < 1e-6     # inside Swin's function detached
    assert float((linearized - reference).norm() / reference.norm()) < 1e-10  # (V2: sigmoid(0) of the bias MLP)


def test_vit_under_attnlrp_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build("vit_b_16", 32)
    explainer = lrpfx.compile(model, "attnlrp")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = lrpfx.export_onnx(explainer, tmp_path / "vit_attnlrp.onnx", x, target_input=False, dynamic_size=False)
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]).double()
    eager = explainer(x)[0].double()
    exact = lrpfx.compile(model.double(), "attnlrp")(x.double())[0]  # float64: the map both approximate
    err_eager = float((eager - exact).norm() / exact.norm())
    err_onnx = float((got - exact).norm() / exact.norm())
    # AttnLRP's divisions cost float32 1e-3 to 4e-3 on ViT-B (LRP-0: 1e-6), eager and onnxruntime alike (measured
    # 8.7e-4 and 2.3e-3 with this seed): both must be float32 approximations of the float64 map
    assert err_eager < 1e-2 and err_onnx < 1e-2
