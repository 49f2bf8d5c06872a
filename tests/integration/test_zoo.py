"""Issue #15's CI subset: one real architecture per op class, and every op class through ONNX and torch.export.

The full sweep is ``python -m lrpfx.eval.zoo`` (docs/coverage.md); here, in float64 at 32-64 px:
LRP-0 equals Input x Gradient of the linearized twin (:mod:`lrpfx.eval.twin`, autograd), and every
built-in rule set compiles to finite relevance.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import lrpfx
from conftest import rel_err
from lrpfx.eval.twin import input_x_gradient, linearized_twin
from lrpfx.eval.zoo import build, randomize
from opclass_models import MODELS, ACTIVATIONS, Elementwise

pytestmark = pytest.mark.slow

#: model -> (input size, what it stands for)
SUBSET = {
    "convnext_tiny": (32, "LayerNorm after permute, LayerScale, GELU, depthwise conv"),
    "efficientnet_b0": (32, "SiLU, squeeze-and-excitation gates, stochastic depth"),
    "mobilenet_v3_small": (32, "Hardswish, hard-sigmoid gates"),
    "shufflenet_v2_x0_5": (32, "chunk, channel shuffle, concatenation"),
    "vit_b_16": (32, "nn.MultiheadAttention, held softmax, class token, position embedding, slicing"),
    "timm:resnet50_gn": (32, "GroupNorm"),
    "timm:res2net50_14w_8s": (32, "split items, hierarchical residuals"),
    "timm:dm_nfnet_f0": (64, "weight standardization in forward (parameter-only), gains, timm's pad_same"),
    "timm:gcresnet33ts": (64, "global context: softmax-weighted matmul, a broadcast add"),
    "timm:resnest14d": (32, "split attention (softmax over radix)"),
}


@pytest.mark.parametrize("spec", list(SUBSET))
def test_architecture_equals_its_twin_and_compiles_under_every_ruleset(spec: str) -> None:
    model, name, _ = build(spec)
    size = SUBSET[spec][0]
    randomize(model)
    x, target = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])
    for rules in lrpfx.builtin_rulesets():
        relevance = lrpfx.compile(model, rules)(x, target)[0]
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0, rules
    m64, x64 = model.double(), x.double()
    relevance = lrpfx.compile(m64, "lrp0")(x64, target)[0]
    assert rel_err(relevance, input_x_gradient(linearized_twin(m64), x64, target)) < 1e-6


CLASSES = {**MODELS, "elementwise": lambda: Elementwise(ACTIVATIONS[0])}


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_op_class_exports_to_torch_export_and_onnx(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = CLASSES[name]().eval()
    explainer = lrpfx.compile(model, "epsilon_plus_flat")
    x = torch.randn(2, 3, 8, 8)
    relevance, logits = explainer(x)
    program = lrpfx.export_program(explainer, x, target_input=False, dynamic_size=False)
    assert rel_err(program.module()(x)[0], relevance) < 1e-5
    path = lrpfx.export_onnx(explainer, tmp_path / f"{name}.onnx", x, target_input=False, dynamic_size=False)
    x3 = torch.randn(3, 3, 8, 8)  # another batch size
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"x": x3.numpy()})[0])
    assert rel_err(got, explainer(x3)[0]) < 1e-4


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_lrp0_equals_the_twin_with_its_window_attention_held(name: str) -> None:
    """torchvision keeps Swin's window attention as one fx call (torch.fx.wrap): the twin runs it
    with its softmax held, lrpfx expands it; LRP-0 equals Input x Gradient of that twin, at the
    size where every stage shifts its windows with the attention mask."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval().double()
    size = 224 if name == "swin_t" else 256
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    target = torch.tensor([3])
    relevance = lrpfx.compile(model, "lrp0")(x, target)[0]
    assert rel_err(relevance, input_x_gradient(linearized_twin(model), x, target)) < 1e-6
