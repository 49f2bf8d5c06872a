"""RISE (Petsiuk et al. 2018): mask construction, determinism, and a toy model with a known region."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lrpfx.eval.rise import generate_masks, rise

torch.set_num_threads(1)


class RegionMean(nn.Module):
    """Class 0's logit is the mean of a known region; class 1's is a constant."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, self.rows, self.cols].mean((1, 2, 3))
        return torch.stack([6 * s, torch.full_like(s, 3.0)], 1)


def test_masks_shape_range_and_keep_rate() -> None:
    m = generate_masks(400, (40, 48), cell_size=8, p=0.3, seed=1)
    assert m.shape == (400, 40, 48) and m.min() >= 0 and m.max() <= 1
    assert m.mean().item() == pytest.approx(0.3, abs=0.03)
    assert 0.05 < ((m > 0.01) & (m < 0.99)).float().mean() < 0.9  # smooth: bilinear transitions, not a hard lattice


def test_masks_deterministic_per_seed_and_private_rng() -> None:
    state = torch.get_rng_state().clone()
    a, b = generate_masks(10, (16, 16), seed=3), generate_masks(10, (16, 16), seed=3)
    assert torch.equal(a, b) and not torch.equal(a, generate_masks(10, (16, 16), seed=4))
    assert torch.equal(torch.get_rng_state(), state)


def test_peak_lies_in_the_known_region() -> None:
    rows, cols = slice(4, 12), slice(20, 28)
    model = RegionMean(rows, cols)
    images = torch.ones(2, 3, 32, 32)
    sal = rise(model, images, targets=[0, 0], n_masks=500, cell_size=8, p=0.5, batch_size=250, seed=0)
    assert sal.shape == (2, 32, 32)
    for s in sal:
        peak = int(s.flatten().argmax())
        assert rows.start <= peak // 32 < rows.stop and cols.start <= peak % 32 < cols.stop
        assert s[rows, cols].mean() > s.mean()


def test_deterministic_and_predicted_target_by_default() -> None:
    model = RegionMean(slice(0, 8), slice(0, 8))
    images = torch.ones(1, 3, 16, 16)
    a = rise(model, images, n_masks=50, seed=5)
    assert torch.equal(a, rise(model, images, [0], n_masks=50, seed=5))  # the prediction is class 0
    assert not torch.equal(a, rise(model, images, [1], n_masks=50, seed=5))


def test_saliency_is_the_weighted_mask_average() -> None:
    # A model whose probabilities ignore the input: S = p_c * mean_i(M_i) / p.
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 4, dtype=x.dtype)

    sal = rise(Flat(), torch.ones(1, 3, 16, 16), [2], n_masks=64, p=0.5, seed=2, batch_size=16)
    expected = 0.25 * generate_masks(64, (16, 16), 8, 0.5, seed=2).mean(0) / 0.5
    assert torch.allclose(sal[0], expected, atol=1e-6)


def test_invalid_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"p=1.5.*Hint"):
        generate_masks(4, (8, 8), p=1.5)
