"""Small models, one per op class of the op table, shared by the unit tests (twin oracle) and the
integration tests (export). Built in the default dtype: the tests set float64 where exactness is claimed."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Routing(nn.Module):
    """CIFAR option-A shortcut (strided slice + channel pad), permute, split/chunk/cat, stack, roll, flip,
    nearest upsampling, pixel and channel shuffle, expand, indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(16, 5)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))                                            # (N, 4, 8, 8)
        short = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))             # option A: (N, 8, 4, 4)
        h = torch.cat([h, h.flip(1)], 1)                                 # (N, 8, 8, 8)
        h = F.relu(self.b(h)) + short                                    # (N, 8, 4, 4)
        u, v = h.chunk(2, dim=1)
        h = torch.cat([v.roll(1, dims=2), u], 1).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        h = torch.channel_shuffle(h, 2)
        h = F.interpolate(self.shuffle(self.c(h)), scale_factor=2, mode="nearest")   # (N, 2, 16, 16)
        parts = torch.stack([h[:, 0], h[:, 1]], 1)                       # (N, 2, 16, 16)
        pooled = F.adaptive_avg_pool2d(parts, (2, 4))
        return self.fc(pooled.flatten(1).expand(2, -1, -1)[0])


class Linear(nn.Module):
    """LayerScale (mul by a parameter), a constant gain, a model that normalizes its own input, mean and
    sum over a dim, matmul with a parameter, einsum with a parameter, bilinear interpolation."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.e = nn.Parameter(torch.randn(6, 4) / 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 0.25
        h = F.relu(self.a(x)) * self.gamma * 2.0
        h = F.interpolate(h, scale_factor=1.5, mode="bilinear", align_corners=False)
        t = h.flatten(2).transpose(1, 2) @ self.w                          # (N, HW, 6)
        t = t - t.mean(-1, keepdim=True) * 0.5
        t = torch.einsum("nlc,cd->nld", t, self.e)
        return self.fc(t.sum(1) / 7.0)


class StdConv(nn.Conv2d):
    """Weight standardization computed in forward (BiT's StdConv): a parameter-only subgraph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
        return F.conv2d(x, w * self.gain, self.bias, self.stride, self.padding)


class ParamOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv(3, 6, 3, padding=1)
        self.conv.gain = nn.Parameter(torch.rand(6, 1, 1, 1) + 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 65, 6) * 0.1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.relu(self.conv(x)).flatten(2).transpose(1, 2)             # (N, 64, 6)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos * 2
        return self.fc(t[:, 0] + t[:, 1:].mean(1))


ACTIVATIONS = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Mish(), nn.ELU(),
               nn.LeakyReLU(0.1), nn.Tanh(), nn.Softplus(), nn.SELU(), nn.CELU(), nn.Sigmoid()]


class Elementwise(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.act, self.b, self.fc = nn.Conv2d(3, 6, 3, padding=1), act, nn.Conv2d(6, 6, 3), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.act(self.a(x)))
        return self.fc(F.silu(h, inplace=True).mean((2, 3)))


class Norms(nn.Module):
    """GroupNorm, LayerNorm over channels after a permute (ConvNeXt), over two trailing dims,
    InstanceNorm, RMSNorm, and timm's LayerNorm2d spelled functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.ln, self.ln2 = nn.LayerNorm(8), nn.LayerNorm([8, 8])
        self.inorm, self.rms = nn.InstanceNorm2d(8, affine=True), nn.RMSNorm(8)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gn(self.a(x)))
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.inorm(self.ln2(h))
        h = F.layer_norm(h.permute(0, 2, 3, 1), (8,), self.w, None, 1e-6).permute(0, 3, 1, 2)
        return self.fc(self.rms(h.mean((2, 3))))


class Attention(nn.Module):
    """Explicit softmax attention, F.scaled_dot_product_attention, nn.MultiheadAttention, a
    squeeze-and-excitation gate and SK-style split attention (softmax over branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.qkv, self.mha = nn.Linear(8, 24), nn.MultiheadAttention(8, 2, batch_first=True)
        self.sel, self.se = nn.Linear(8, 16), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = F.relu(self.a(x)), F.relu(self.b(x))
        s = (u + v).mean((2, 3))                                           # SK: softmax over the two branches
        w = self.sel(s).view(-1, 2, 8).softmax(1)
        h = u * w[:, 0, :, None, None] + v * w[:, 1, :, None, None]
        h = h * torch.sigmoid(self.se(h.mean((2, 3), keepdim=True)))     # squeeze-and-excitation
        t = h.flatten(2).transpose(1, 2)                                   # (N, L, 8)
        q, k, val = self.qkv(t).chunk(3, -1)
        t = t + (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1) @ val
        t = t + F.scaled_dot_product_attention(q[:, None], k[:, None], t[:, None])[:, 0]
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


MODELS = {"routing": Routing, "linear_op": Linear, "parameter-only": ParamOnly, "norm": Norms,
          "held products": Attention}
