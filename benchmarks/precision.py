"""Accuracy of the explainer in bfloat16/float16 against float32 (the table in docs/deploy.md).

    python benchmarks/precision.py

resnet50 with random weights and randomized BatchNorm statistics, a 2 x 3 x 64 x 64 batch,
the predicted classes; prints the relative L2 error and the per-sample cosine similarity.
"""
import copy
import sys
from pathlib import Path

import torch

import lrpfx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tv_model  # noqa: E402

torch.manual_seed(0)
model = tv_model("resnet50", dtype=torch.float32, num_classes=1000)
x = torch.randn(2, 3, 64, 64)
for rules in ["lrp0", "epsilon_plus_flat", "epsilon_gamma_box", "c3_lrp", "eccv2024"]:
    target = model(x).argmax(1)
    reference, _ = lrpfx.compile(model, rules)(x, target)
    for dtype in (torch.bfloat16, torch.float16):
        low, _ = lrpfx.compile(copy.deepcopy(model).to(dtype), rules)(x.to(dtype), target)
        low = low.float()
        cos = torch.nn.functional.cosine_similarity(low.flatten(1), reference.flatten(1)).tolist()
        err = ((low - reference).norm() / reference.norm()).item()
        print(f"{rules:20s} {str(dtype):15s} finite={torch.isfinite(low).all().item()} rel.err={err:.3f} "
              f"cos={[round(c, 4) for c in cos]}")
