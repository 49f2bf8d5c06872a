"""Write the LXT reference relevances that tests/unit/test_attnlrp.py compares lrpfx with.

LXT (Achtibat et al., "AttnLRP", ICML 2024; https://github.com/rachtibat/LRP-eXplains-Transformers) is
the reference implementation of CP-LRP and AttnLRP. It is not a dependency of lrpfx: this script runs in
a venv of its own, and its output is committed under tests/reference/, so the tests need no LXT.

Install (LXT 2.1 pulls in transformers 5.x, whose import breaks ``lxt.efficient``; 4.52.4 works, and the
``kernels`` package it drags in must go)::

    python3 -m venv /work/lxt-venv
    /work/lxt-venv/bin/pip install lxt==2.1 transformers==4.52.4 torch==2.14.1 torchvision
    /work/lxt-venv/bin/pip uninstall -y kernels
    /work/lxt-venv/bin/python benchmarks/lxt_reference.py          # from the repository root

It writes, in float64 (npz, compressed):

* ``tests/reference/vit_b_16_cplrp.npz``: (a) torchvision ``vit_b_16`` (image size 48, random init with a
  fixed seed, the zero-initialized head re-drawn) under CP-LRP, through LXT's
  ``monkey_patch(torchvision.models.vision_transformer)`` (GELU: identity rule; LayerNorm: std held;
  ``nn.MultiheadAttention``: q and k detached), relevance = x * grad of the top logit, as LXT's
  ``examples/vit_torch.py`` computes it (without its zennit gamma rules: plain gradient on linear layers).
* ``tests/reference/tiny_transformer_attnlrp.npz``: (b) the two-block transformer of tests/attn_models.py
  written with ``lxt.explicit.functional`` (``linear_epsilon``, ``matmul``, ``softmax``, ``layer_norm``,
  ``add2``, ``mul2`` with a constant) and ``lxt.explicit.rules.identity`` on GELU, under AttnLRP; the
  backward pass returns relevance, started at the top logit. Also with every bias zero (``_zero_bias``).

Each file holds the input ``x``, the ``logits``, the ``target`` class and the ``relevance``; the model is
rebuilt from the seed by tests/attn_models.py (the tests check the logits first).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import attn_models  # noqa: E402  (tests/attn_models.py: the shared construction code)


def vit_cplrp() -> dict[str, np.ndarray]:
    """(a): vit_b_16 under CP-LRP through LXT's monkey patch of torchvision's vision_transformer."""
    import lxt.efficient
    from torchvision.models import vision_transformer

    lxt.efficient.monkey_patch(vision_transformer, verbose=True)
    model, x = attn_models.vit_reference_model()
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    logits = model(x)
    target = int(logits.argmax(1))
    logits[0, target].backward()
    relevance = (x * x.grad).detach()
    return {"x": x.detach().numpy(), "logits": logits.detach().numpy(), "target": np.array(target),
            "relevance": relevance.numpy()}


def tiny_lxt_forward(model: attn_models.TinyTransformer, x: torch.Tensor) -> torch.Tensor:
    """The forward of :class:`attn_models.TinyTransformer` written with LXT's explicit AttnLRP functions."""
    import lxt.explicit.functional as lf
    from lxt.explicit.rules import identity

    def linear(m: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return lf.linear_epsilon(t, m.weight, m.bias)  # epsilon 1e-6

    def norm(m: torch.nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        return lf.layer_norm(t, m.weight, m.bias, m.eps)

    for blk in model.blocks:
        a = norm(blk.ln1, x)
        q, k, v = blk.split(linear(blk.q, a)), blk.split(linear(blk.k, a)), blk.split(linear(blk.v, a))
        scores = lf.mul2(lf.matmul(q, k.transpose(-2, -1)), blk.scale)  # a constant factor: identity
        p = lf.softmax(scores, -1)
        o = lf.matmul(p, v).transpose(1, 2).reshape(x.shape)
        x = lf.add2(x, linear(blk.proj, o))
        x = lf.add2(x, linear(blk.fc2, identity(F.gelu, linear(blk.fc1, norm(blk.ln2, x)))))
    return linear(model.head, norm(model.ln, x)[:, 0])


def tiny_attnlrp(zero_bias: bool) -> dict[str, np.ndarray]:
    """(b): the tiny transformer under AttnLRP (LXT explicit: the backward returns relevance)."""
    model, x = attn_models.tiny_reference_model(zero_bias=zero_bias)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        plain = model(x)
    x = x.clone().requires_grad_(True)
    logits = tiny_lxt_forward(model, x)
    assert torch.allclose(logits, plain, rtol=1e-12, atol=1e-12), "LXT forward differs from the model's"
    target = int(logits.argmax(1))
    logits[0, target].backward(logits[0, target].detach())  # the top relevance: the logit
    return {"x": x.detach().numpy(), "logits": logits.detach().numpy(), "target": np.array(target),
            "relevance": x.grad.numpy()}


def main() -> None:
    out = attn_models.REFERENCE_DIR
    out.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    for name, make in (("tiny_transformer_attnlrp", lambda: tiny_attnlrp(False)),
                       ("tiny_transformer_attnlrp_zero_bias", lambda: tiny_attnlrp(True)),
                       ("vit_b_16_cplrp", vit_cplrp)):
        arrays = make()
        np.savez_compressed(out / f"{name}.npz", **arrays)
        r = arrays["relevance"]
        print(f"{name}: target {int(arrays['target'])}, logit {float(arrays['logits'][0, int(arrays['target'])]):.6g}, "
              f"sum R {r.sum():.6g}, |R|max {abs(r).max():.3g}, {(out / f'{name}.npz').stat().st_size} bytes")


if __name__ == "__main__":
    main()
