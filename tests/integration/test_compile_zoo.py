"""compile() on the torchvision zoo: every ResNet, ResNeXt, Wide-ResNet and VGG under every built-in rule set."""
from __future__ import annotations

import pytest
import torch
import torchvision

import lrpfx
from conftest import tv_model

ZOO = sorted(n for n in torchvision.models.list_models(module=torchvision.models)
             if n.startswith(("resnet", "resnext", "wide_resnet"))) + ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ZOO)
def test_zoo_compiles_under_every_builtin_ruleset(arch: str) -> None:
    model = tv_model(arch, dtype=torch.float32)
    x = torch.randn(1, 3, 32, 32)
    for name in lrpfx.builtin_rulesets():
        plan = lrpfx.inspect(model, name)
        assert not plan.unmatched, (name, plan.unmatched)
        relevance, logits = lrpfx.compile(model, rules=name)(x)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all(), name
