"""The C3 stage appended to a compiled explainer: same masks as the OpenCV reference."""
from __future__ import annotations

import pytest
import torch

import lrpfx
from conftest import tv_model
from lrpfx.postprocess import c3_opencv

pytestmark = pytest.mark.slow  # ResNet-50


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tv_model("resnet50", dtype=torch.float32)


@pytest.mark.parametrize("options", [{}, {"connectivity": 4, "contour_rank": "peak"}, {"threshold": "otsu"},
                                     {"resize_to": None, "threshold": "quantile:0.9"}])
def test_c3_stage_equals_opencv_reference(model: torch.nn.Module, options: dict) -> None:
    explainer = lrpfx.compile(model, "c3_lrp", c3=options or True)
    x = torch.randn(3, 3, 56, 56)
    relevance, logits, c3_map, c3_mask = explainer(x)
    reference = c3_opencv(relevance, **({"resize_to": (28, 28)} | options))
    assert c3_mask.shape == (3, 56, 56) and c3_mask.dtype == torch.bool
    assert torch.equal(c3_mask, torch.as_tensor(reference.mask_full))
    assert torch.allclose(c3_map, torch.as_tensor(reference.map, dtype=c3_map.dtype), atol=1e-6)
    assert (c3_map[~c3_mask] == 0).all()


def test_c3_options_come_from_the_ruleset_and_are_validated(model: torch.nn.Module) -> None:
    rs = lrpfx.RuleSet.builtin("c3_lrp")
    assert rs.c3["threshold"] == "mean" and rs.c3["connectivity"] == 8
    with pytest.raises(lrpfx.RuleSetError, match="C3 options"):
        lrpfx.compile(model, "c3_lrp", c3={"nonsense": 1})
    with pytest.raises(ValueError, match="threshold"):
        lrpfx.compile(model, "c3_lrp", c3={"threshold": "foo"})
    assert len(lrpfx.compile(model, "c3_lrp")(torch.randn(1, 3, 32, 32))) == 2  # no stage unless asked
