"""LRP-0 equals Input x Gradient on ReLU networks (METHOD_SPEC §7.1; Ancona et al., ICLR 2018)."""
from __future__ import annotations

import pytest
import torch

import lrpfx
import lrpfx.compiler.match
from lrpfx.relevance.rules import Epsilon
from conftest import input_x_gradient, rel_err, tv_model

ARCHS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_lrp0_equals_input_x_gradient(arch: str) -> None:
    model = tv_model(arch)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([3, 7])
    relevance, logits = lrpfx.compile(model, rules="lrp0")(x, target)
    assert relevance.shape == x.shape
    assert rel_err(logits, model(x)) < 1e-12  # BatchNorm folding keeps the function (float64)
    assert rel_err(relevance, input_x_gradient(model, x, target)) < 1e-6


def test_softmax_top_scales_by_p_over_f(resnet18_f64: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    target = torch.tensor([1, 5])
    relevance, _ = lrpfx.compile(resnet18_f64, rules="lrp0", top="softmax")(x, target)
    assert rel_err(relevance, input_x_gradient(resnet18_f64, x, target, top="softmax")) < 1e-6


@pytest.mark.parametrize("form", ["none", "int", "long", "float"])
def test_target_forms(resnet18_f64: torch.nn.Module, form: str) -> None:
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    explainer = lrpfx.compile(resnet18_f64, rules="lrp0")
    logits = resnet18_f64(x)
    index = {"none": logits.argmax(1), "int": torch.full((3,), 4), "long": torch.tensor([0, 9, 2]),
             "float": torch.tensor([0, 9, 2])}[form]
    target = {"none": None, "int": 4, "long": index,
              "float": torch.nn.functional.one_hot(index, 10).double() * logits}[form]
    relevance, _ = explainer(x, target)
    assert rel_err(relevance, input_x_gradient(resnet18_f64, x, index)) < 1e-6


def test_runs_under_inference_mode(resnet18_f64: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    explainer = lrpfx.compile(resnet18_f64, rules="lrp0")
    with torch.inference_mode():
        relevance, _ = explainer(x, 2)
    assert rel_err(relevance, input_x_gradient(resnet18_f64, x, torch.tensor([2]))) < 1e-6


def test_lrp0_is_emitted_in_ratio_form_and_epsilon_is_not(resnet18_f64: torch.nn.Module) -> None:
    """LRP-0 propagates c = R / value (one transposed layer and one ReLU mask per layer, no division);
    a stabilizer (eps > 0) makes the division real, so `epsilon` keeps the relevance form."""
    def forms(rules: str, **kw: object) -> set[str]:
        gm = lrpfx.compile(resnet18_f64, rules, **kw)
        return {n.meta["lrpfx"]["form"] for n in gm.graph.nodes if "form" in n.meta.get("lrpfx", {})}

    assert forms("lrp0") == {"ratio"}
    assert "emitted in ratio form" in str(lrpfx.inspect(resnet18_f64, "lrp0"))
    assert "ratio form" not in str(lrpfx.inspect(resnet18_f64, "epsilon"))
    assert forms("epsilon") == {"relevance"}
    assert forms("lrp0", bindings={"add": Epsilon(eps=1e-6)}) == {"relevance"}  # one op without a ratio form
    code = lrpfx.compile(resnet18_f64, "lrp0").code
    assert "ratio_linear" in code and "stabilize" not in code and "lrpfx_kernels_epsilon" not in code


def test_relevance_form_of_lrp0_equals_input_x_gradient_too(resnet18_f64: torch.nn.Module,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The relevance form (what LRP-0 falls back to next to a rule with no ratio form) meets the same oracle."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = resnet18_f64(x).argmax(1)
    monkeypatch.setattr(lrpfx.compiler.match.Plan, "ratio_form", lambda self: False)
    explainer = lrpfx.compile(resnet18_f64, "lrp0")
    assert "ratio_linear" not in explainer.code
    relevance, _ = explainer(x, target)
    assert rel_err(relevance, input_x_gradient(resnet18_f64, x, target)) < 1e-10
