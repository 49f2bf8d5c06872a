"""Weights a rule modifies are computed once, at compile time, and stored as buffers of the explainer.

The profiler checks the claim on the explainer's own forward: no clamp and no arithmetic op reads
a tensor shaped like one of the model's parameters (the shapes below are chosen so that no
activation has a parameter's shape). A control run of the unfolded arithmetic proves the check
sees such ops.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.resnet import BasicBlock

import lrpfx
from lrpfx.relevance import kernels

from conftest import randomize_batchnorm

#: ops that compute with their inputs (a weight read by one of these is weight arithmetic)
ARITHMETIC = {"aten::clamp", "aten::clamp_min", "aten::clamp_max", "aten::clamp_", "aten::add", "aten::add_",
              "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::pow",
              "aten::square", "aten::neg", "aten::rsqrt", "aten::sqrt", "aten::ones_like", "aten::full_like",
              "aten::where", "aten::abs", "aten::sign", "aten::cat", "aten::relu", "aten::maximum", "aten::minimum"}
RULE_SETS = ["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1_flat", "c3_lrp",
             "eccv2024", "epsilon", "lrp0"]


def small_net() -> nn.Module:
    """Conv stem, two basic blocks (one with a projection), a dense head; BatchNorm randomized (folded)."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), BasicBlock(8, 8), BasicBlock(8, 16, 2, down),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return randomize_batchnorm(net).eval()


def _weight_ops(fn, shapes: set[tuple[int, ...]]) -> list[tuple[str, list]]:
    """(op, input shapes) of every arithmetic op that ``fn`` runs on a parameter-shaped tensor."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in ARITHMETIC and any(tuple(s) in shapes for s in e.input_shapes if s)]


def _param_shapes(explainer: nn.Module) -> set[tuple[int, ...]]:
    shapes = {tuple(p.shape) for p in explainer.parameters()} | {tuple(b.shape) for b in explainer.buffers()}
    return {s for s in shapes if s}


@pytest.mark.parametrize("rules", RULE_SETS)
def test_no_weight_arithmetic_per_call(rules: str) -> None:
    model = small_net()
    explainer = lrpfx.compile(model, rules)
    x = torch.randn(2, 3, 13, 13)
    shapes = _param_shapes(explainer)
    activations = {tuple(t.shape) for t in (x, model[:3](x), model[:4](x), model[:5](x), model[:6](x))}
    assert not shapes & activations, "the check needs parameter shapes that no activation has"
    explainer(x)  # warm-up
    assert _weight_ops(lambda: explainer(x), shapes) == []


def test_the_profiler_check_sees_weight_arithmetic() -> None:
    """Control: the unfolded transforms, run per call, are reported (so the test above can fail)."""
    w = small_net()[0].weight.detach()
    found = _weight_ops(lambda: (kernels.gamma_up(w, gamma=0.25), kernels.positive_part(w)), {tuple(w.shape)})
    assert {"aten::clamp", "aten::add"} <= {name for name, _ in found} or \
        {"aten::clamp_min", "aten::add"} <= {name for name, _ in found}, found


def test_folded_weights_are_buffers_with_readable_names_and_the_model_is_untouched() -> None:
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    explainer = lrpfx.compile(model, "epsilon_gamma_box")
    buffers = dict(explainer.named_buffers())
    w = explainer.get_parameter("4.conv1.weight")
    assert torch.equal(buffers["4_conv1_weight_gamma_p"], 0.25 * w.clamp(min=0))
    assert torch.equal(buffers["4_conv1_weight_gamma_up"], w + 0.25 * w.clamp(min=0))
    assert "self.4_conv1_weight_gamma_up" not in explainer.code  # not a Python name: fx writes getattr
    assert "_weight_gamma_up" in explainer.code and ".clamp(" not in explainer.code
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(n.endswith(("_pos", "_neg", "_gamma_up")) for n, _ in model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_buffers_follow_to_and_half_precision_matches_a_half_compile(dtype: torch.dtype) -> None:
    """An explainer moved with .to(dtype) holds its prepared weights in that dtype and explains as
    one compiled from the converted model (the stabilizer raised to the dtype's resolution in both)."""
    model = small_net()
    x = torch.rand(2, 3, 13, 13)
    moved = lrpfx.compile(model, "epsilon_gamma_box").to(dtype)
    assert all(b.dtype == dtype for b in moved.buffers() if b.is_floating_point())
    direct = lrpfx.compile(copy.deepcopy(model).to(dtype), "epsilon_gamma_box")
    a, b = moved(x.to(dtype))[0].float(), direct(x.to(dtype))[0].float()
    assert torch.isfinite(a).all()
    assert ((a - b).norm() / b.norm()).item() < 0.05  # the folded weights rounded once vs transformed in dtype


@pytest.mark.parametrize("rules", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_in_place_kernels_leave_autograd_working(rules: str) -> None:
    """The kernels write into fresh tensors with out=, which autograd refuses; with an input that
    requires grad they take the out-of-place forms, and the map is the same."""
    explainer = lrpfx.compile(small_net(), rules)
    x = torch.rand(2, 3, 13, 13)
    with torch.no_grad():
        plain = explainer(x)[0]
    xg = x.clone().requires_grad_(True)
    tracked = explainer(xg)[0]
    assert tracked.requires_grad and torch.allclose(tracked, plain, rtol=1e-6, atol=1e-9)
    tracked.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
