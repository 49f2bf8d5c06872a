"""torchvision's vit_b_16 under CP-LRP (``lrp0``) against LXT 2.1's ``monkey_patch(vision_transformer)``:
the reference relevance is committed in tests/reference/vit_b_16_cplrp.npz (benchmarks/lxt_reference.py);
the model is rebuilt from its seed by tests/attn_models.py, without LXT (slow: vit_b_16 at 48 px).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpfx
from attn_models import load_reference, vit_reference_model

pytestmark = pytest.mark.slow


def test_vit_b_16_lrp0_equals_lxt_cplrp() -> None:
    ref = load_reference("vit_b_16_cplrp")
    model, x = vit_reference_model()
    assert np.array_equal(x.numpy(), ref["x"])
    target = torch.tensor([int(ref["target"])])
    relevance, logits = lrpfx.compile(model, "lrp0")(x, target)
    assert np.allclose(logits.numpy(), ref["logits"], rtol=1e-10, atol=1e-12), "the model was not rebuilt exactly"
    expected = torch.from_numpy(ref["relevance"])
    # LXT's identity rule divides by (x + 1e-10): the rest of the difference is rounding
    assert float((relevance - expected).norm() / expected.norm()) < 1e-6
    attn = lrpfx.compile(model, "attnlrp")(x, target)[0]  # the reference tells the conventions apart
    assert float((attn - expected).norm() / expected.norm()) > 1e-2
