"""LRP-0 equals Input x Gradient on ReLU networks (METHOD_SPEC §7.1; Ancona et al., ICLR 2018)."""
from __future__ import annotations

import pytest
import torch

import lrpfx
from conftest import input_x_gradient, rel_err, tv_model

ARCHS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", ARCHS)
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
