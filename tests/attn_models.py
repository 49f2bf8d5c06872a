"""Models of the attention tests, built from a seed, shared by the tests and by
``benchmarks/lxt_reference.py`` (which runs them under LXT in a venv of its own): the test rebuilds
the same model and input without LXT and compares lrpfx's relevance with the committed reference.

* :func:`vit_reference_model`: torchvision ``vit_b_16`` at a small image size, random init, the
  zero-initialized head re-drawn; reference (a), CP-LRP through LXT's ``monkey_patch``.
* :class:`TinyTransformer`: a two-block pre-norm transformer over token embeddings; reference (b),
  AttnLRP through ``lxt.explicit.functional`` (the script writes the same forward with LXT's functions
  and this module's parameters).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REFERENCE_DIR = Path(__file__).parent / "reference"
VIT_SEED, VIT_IMAGE_SIZE = 0, 48
TINY_SEED, TINY_TOKENS, TINY_DIM, TINY_HEADS, TINY_BLOCKS, TINY_CLASSES = 0, 7, 16, 2, 2, 5


def vit_reference_model() -> tuple[nn.Module, torch.Tensor]:
    """(model, x): torchvision ``vit_b_16(image_size=48)`` seeded, head re-drawn, float64, eval; x seeded."""
    import torchvision

    torch.manual_seed(VIT_SEED)
    model = torchvision.models.vit_b_16(image_size=VIT_IMAGE_SIZE)
    g = torch.Generator().manual_seed(VIT_SEED + 1)
    head = model.heads.head
    with torch.no_grad():  # torchvision initializes the head to zero: every logit would be 0
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.02)
        x = torch.randn(1, 3, VIT_IMAGE_SIZE, VIT_IMAGE_SIZE, generator=g)
    return model.eval().double(), x.double()


class TinyBlock(nn.Module):
    """Pre-norm block: x + proj(softmax((q @ k^T) * scale) @ v), then x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln1(x)
        q, k, v = self.split(self.q(a)), self.split(self.k(a)), self.split(self.v(a))
        p = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token embeddings (B, T, D) -> blocks -> LayerNorm -> linear head on token 0."""

    def __init__(self, dim: int = TINY_DIM, heads: int = TINY_HEADS, blocks: int = TINY_BLOCKS,
                 classes: int = TINY_CLASSES) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, 0])


def tiny_reference_model(zero_bias: bool = False) -> tuple[TinyTransformer, torch.Tensor]:
    """(model, x): the tiny transformer with seeded weights (LayerNorm affine too), float64, eval; x seeded.

    ``zero_bias=True`` zeroes every bias (linear layers and LayerNorm shifts): then the softmax rule's
    bias term is the only relevance the network absorbs (the uniform rule's eps aside).
    """
    g = torch.Generator().manual_seed(TINY_SEED)
    model = TinyTransformer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.zeros_like(p) if zero_bias else 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # LayerNorm gains
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        x = torch.randn(1, TINY_TOKENS, TINY_DIM, generator=g)
    return model.eval().double(), x.double()


def load_reference(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``tests/reference/<name>.npz`` (written by ``benchmarks/lxt_reference.py``)."""
    with np.load(REFERENCE_DIR / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}
