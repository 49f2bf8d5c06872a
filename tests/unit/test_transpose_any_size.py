"""The exported form of W^T s (no size-dependent output_padding) against autograd's conv2d input gradient."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lrpfx.relevance.kernels import _avgpool_transpose, _transpose_any_size


def test_transpose_any_size_is_the_input_gradient_of_the_convolution() -> None:
    g = torch.Generator().manual_seed(0)
    checked = 0
    for h, k, stride, pad, dil, groups in itertools.product((5, 8, 13), (1, 2, 3, 5), (1, 2, 3), (0, 1, 3), (1, 2),
                                                            (1, 2)):
        x = torch.randn(2, 4, h, h + 1, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(6, 4 // groups, k, k, dtype=torch.float64, generator=g)
        try:
            z = F.conv2d(x, w, None, stride, pad, dil, groups)
        except RuntimeError:  # the kernel is larger than the padded input
            continue
        s = torch.randn(z.shape, dtype=torch.float64, generator=g)
        (expected,) = torch.autograd.grad(z, x, s)
        got = _transpose_any_size(s, w, x.shape, (stride, stride), (pad, pad), (dil, dil), groups)
        assert got.shape == x.shape and torch.allclose(got, expected, rtol=0, atol=1e-12), (h, k, stride, pad, dil)
        checked += 1
    assert checked > 150


def test_exported_sum_pooling_transpose_is_the_eager_one() -> None:
    """The average pool's transposed sum, eager form vs the exported form (traced under torch.export)."""
    g = torch.Generator().manual_seed(1)
    for h, k, stride, pad in ((7, 2, 2, 0), (8, 3, 2, 1), (11, 3, 3, 1), (8, 2, 1, 0)):
        if pad > k // 2:
            continue
        x = torch.randn(1, 3, h, h + 2, dtype=torch.float64, generator=g, requires_grad=True)
        z = F.avg_pool2d(x, k, stride, pad, count_include_pad=True) * k * k  # a sum pooling
        t = torch.randn(z.shape, dtype=torch.float64, generator=g)
        (expected,) = torch.autograd.grad(z, x, t)

        class Probe(torch.nn.Module):
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return _avgpool_transpose(t, x.shape, kernel_size=(k, k), stride=(stride, stride), padding=(pad, pad))

        eager = Probe()(t)
        exported = torch.export.export(Probe(), (t,)).module()(t)
        assert torch.allclose(eager, expected, atol=1e-12) and torch.allclose(exported, expected, atol=1e-12)
