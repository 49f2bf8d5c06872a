"""A one-minute tour on an embedded default (no download): ``python -m lrpfx.cli.quickstart``.

Compiles torchvision's ResNet-50 (random weights, seeded) into relevance networks, checks
LRP-0 against autograd's Input x Gradient, and prints the plan and a piece of the code.
"""
from __future__ import annotations

import time

import torch
import torchvision

import lrpfx


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    t0 = time.perf_counter()
    explainer = lrpfx.compile(model, rules="epsilon_plus_flat")
    print(f"compiled resnet50 with 'epsilon_plus_flat' in {time.perf_counter() - t0:.2f} s")
    relevance, logits = explainer(x)
    print(f"relevance {tuple(relevance.shape)}, per-sample sums {relevance.sum((1, 2, 3)).tolist()}, "
          f"target logits {logits.max(1).values.tolist()}")
    lrp0, _ = lrpfx.compile(model.double(), rules="lrp0")(x.double(), logits.argmax(1))
    xg = x.double().requires_grad_(True)
    f = model(xg).gather(1, logits.argmax(1)[:, None]).sum()
    ixg = xg * torch.autograd.grad(f, xg)[0]
    print(f"LRP-0 vs Input x Gradient (float64): relative error {((lrp0 - ixg).norm() / ixg.norm()).item():.1e}")
    print("\nthe end of the generated forward:\n" + "\n".join(explainer.code.splitlines()[-6:]))
    print("\nplan (first rows):\n" + "\n".join(str(lrpfx.inspect(model, "epsilon_plus_flat")).splitlines()[:8]))


if __name__ == "__main__":
    main()
