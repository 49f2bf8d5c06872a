"""Issue #18: tie-robust insertion/deletion, Quantus agreement, the pointing game at tolerance 0,
the C3 rank presets and the table's controls. External oracles: Quantus 0.6 (a dev dependency)
and closed forms; the tie-robust variant against the ECCV protocol on noise-broken maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lrpfx.eval.metrics import (
    eccv_masks,
    insertion_deletion,
    pointing_game,
    random_tie_masks,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)

from test_metrics import MEAN, STD, tiny_net  # the same normalization and network as the protocol tests

torch.set_num_threads(1)


class CountsPixels(nn.Module):
    """Class 1's logit is 5 x the fraction of pixels that are not black: it sees how many pixels
    were inserted, not which, so any order over tied pixels gives the same curve."""

    def __init__(self, black: torch.Tensor) -> None:
        super().__init__()
        self.black = black.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frac = ((x - self.black).abs().sum(1) > 1e-9).double().flatten(1).mean(1)
        return torch.stack([torch.zeros_like(frac), 5 * frac], 1)


# ---------------------------------------------------------------- tie-robust insertion/deletion
def test_random_tie_masks_equal_eccv_masks_without_ties() -> None:
    p = torch.randn(9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for step in (1, 4, 10, 63):
        assert torch.equal(random_tie_masks(p, step, torch.Generator().manual_seed(3)), eccv_masks(p, step))


def test_tie_robust_equals_the_protocol_on_maps_without_ties() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64)
    maps = torch.randn(3, 12, 12, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    kw = dict(step=5, mean=MEAN, std=STD)
    a = insertion_deletion(tiny_net(), images, maps, y, **kw)
    b = insertion_deletion(tiny_net(), images, maps, y, ties="random", seeds=range(4), **kw)
    torch.testing.assert_close(b.insertion, a.insertion, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.deletion, a.deletion, rtol=0, atol=1e-12)
    assert b.insertion_per_seed.shape == (4, 3)


def test_constant_map_except_on_the_object_scores_like_a_random_order() -> None:
    """Issue #18's test: a map constant except on the object. The published protocol inserts
    every tied pixel at once when the object is used up; the headline variant inserts them
    s at a time, which for a model that counts inserted pixels is the closed form below."""
    h = w = 12
    m = torch.as_tensor(MEAN, dtype=torch.float64).view(-1, 1, 1)
    s = torch.as_tensor(STD, dtype=torch.float64).view(-1, 1, 1)
    black = (-m / s).flatten()
    image = ((torch.full((3, h, w), 0.8, dtype=torch.float64) - m) / s)[None]
    cmap = torch.full((1, h, w), 0.2, dtype=torch.float64)
    cmap[0, 3:6, 4:8] = torch.arange(12, dtype=torch.float64).view(3, 4) + 1.0  # the "object": 12 pixels
    model, step, n = CountsPixels(black), 5, h * w
    robust = insertion_deletion(model, image, cmap, [1], ties="random", seeds=range(5), step=step, mean=MEAN, std=STD)
    counts = torch.clamp(step * torch.arange(1, math.ceil(n / step) + 1) + 1, max=n).double()
    ins = torch.sigmoid(5 * counts / n)
    dele = torch.sigmoid(5 * (1 - counts / n))
    torch.testing.assert_close(robust.insertion_curve[0], ins, rtol=0, atol=1e-12)
    torch.testing.assert_close(robust.deletion_curve[0], dele, rtol=0, atol=1e-12)
    eccv = insertion_deletion(model, image, cmap, [1], step=step, mean=MEAN, std=STD)
    assert eccv.insertion_curve[0, 3:].eq(torch.sigmoid(torch.tensor(5.0, dtype=torch.float64))).all()  # all at once
    assert eccv.insertion[0] > robust.insertion[0] + 0.05


def test_tie_robust_is_the_expectation_over_tiny_noise() -> None:
    """The headline variant equals, in expectation, the published protocol on the map plus
    noise of 1e-9 x its maximum (the audit's procedure), for a model that sees which pixels."""
    g = torch.Generator().manual_seed(7)
    image = torch.randn(1, 3, 10, 10, generator=g, dtype=torch.float64)
    cmap = torch.zeros(1, 10, 10, dtype=torch.float64)
    cmap[0, 2:5, 2:6] = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    model, y, kw, k = tiny_net(2), [2], dict(step=4, mean=MEAN, std=STD), 60
    robust = insertion_deletion(model, image, cmap, y, ties="random", seeds=range(k), **kw)
    noisy = torch.stack([insertion_deletion(model, image, cmap + 1e-9 * cmap.max() * torch.rand(
        cmap.shape, generator=g, dtype=torch.float64), y, **kw).id_score[0] for _ in range(k)])
    ids = robust.insertion_per_seed[:, 0] - robust.deletion_per_seed[:, 0]
    se = math.sqrt(ids.var() / k + noisy.var() / k)
    assert abs(ids.mean() - noisy.mean()) < 4 * se + 1e-12
    published = insertion_deletion(model, image, cmap, y, **kw).id_score[0]
    assert abs(published - noisy.mean()) > abs(ids.mean() - noisy.mean())


def test_tie_robust_options_are_checked() -> None:
    x, m = torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="ties='sometimes'"):
        insertion_deletion(tiny_net().float(), x, m, [0], ties="sometimes", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="applies to protocol='eccv_patch'"):
        insertion_deletion(tiny_net().float(), x, m, [0], ties="random", protocol="rise", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="at least one seed"):
        insertion_deletion(tiny_net().float(), x, m, [0], ties="random", seeds=[], mean=MEAN, std=STD)


# ---------------------------------------------------------------- Quantus agreement
@pytest.fixture
def fixed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed maps without ties, maps with ties (at the maximum and at 0), and masks."""
    rng = np.random.default_rng(11)
    signed = rng.normal(size=(6, 16, 16))
    tied = np.maximum(np.round(rng.normal(size=(6, 16, 16)), 0), 0.0)
    tied[0] = 0.0
    tied[0, 2, 2] = tied[0, 9, 9] = 1.0  # two tied maxima, one inside the mask
    masks = np.zeros((6, 16, 16), bool)
    for i in range(6):
        r, c = rng.integers(0, 10, size=2)
        masks[i, r:r + 6, c:c + 5] = True
    masks[0] = False
    masks[0, 8:12, 8:12] = True
    return signed, tied, masks


def _quantus(name: str, a: np.ndarray, s: np.ndarray) -> np.ndarray:
    quantus = pytest.importorskip("quantus")
    metric = getattr(quantus, name)(disable_warnings=True)
    return np.asarray(metric.evaluate_batch(a_batch=a[:, None], s_batch=s[:, None]), dtype=np.float64)


def test_rma_equals_quantus_on_r_plus_and_on_signed_maps(fixed) -> None:
    signed, _, masks = fixed
    t, s = torch.from_numpy(signed), torch.from_numpy(masks)
    np.testing.assert_allclose(relevance_mass_accuracy(t, s, "sum").numpy(),
                               _quantus("RelevanceMassAccuracy", signed, masks), rtol=1e-12)
    np.testing.assert_allclose(relevance_mass_accuracy(t, s).numpy(),
                               _quantus("RelevanceMassAccuracy", np.maximum(signed, 0), masks), rtol=1e-12)


def test_rra_equals_quantus_on_maps_without_ties(fixed) -> None:
    signed, _, masks = fixed
    t, s = torch.from_numpy(signed), torch.from_numpy(masks)
    np.testing.assert_allclose(relevance_rank_accuracy(t, s, "sum").numpy(),
                               _quantus("RelevanceRankAccuracy", signed, masks), rtol=1e-12)
    positive = np.where(signed > 0, signed, -1e-3 * np.abs(signed))  # R+ order without ties at 0
    np.testing.assert_allclose(relevance_rank_accuracy(torch.from_numpy(np.maximum(positive, 0) + 1e-6 *
                                                                        (positive < 0) * (1 + positive)), s).numpy(),
                               _quantus("RelevanceRankAccuracy", np.maximum(positive, 0) + 1e-6 * (positive < 0) *
                                        (1 + positive), masks), rtol=1e-12)


def test_pointing_at_tolerance_zero_equals_quantus_with_ties(fixed) -> None:
    signed, tied, masks = fixed
    for maps in (signed, tied):
        ours = pointing_game(torch.from_numpy(maps), torch.from_numpy(masks), tolerance=0, ties="any")
        np.testing.assert_array_equal(ours.numpy().astype(float), _quantus("PointingGame", maps, masks))
    first = pointing_game(torch.from_numpy(tied[:1]), torch.from_numpy(masks[:1]), tolerance=0)
    assert not first[0]  # the first maximum in raster order (2, 2) is outside; Quantus counts (9, 9)


def test_pointing_tolerance_counts_any_tied_maximum() -> None:
    m = torch.zeros(1, 9, 9)
    m[0, 0, 0] = m[0, 8, 8] = 1.0
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 6, 6] = True
    assert not pointing_game(m, mask, tolerance=2, ties="first")[0]
    assert pointing_game(m, mask, tolerance=3, ties="any")[0]
    assert not pointing_game(m, mask, tolerance=2.8, ties="any")[0]
    with pytest.raises(ValueError, match="ties='all'"):
        pointing_game(m, mask, ties="all")


# ---------------------------------------------------------------- C3 rank presets
def test_rank_presets_set_both_rankings() -> None:
    from lrpfx.postprocess import C3Config
    assert C3Config(rank="opencv_order").contour_rank == "opencv_index"
    assert C3Config(rank="opencv_order").component_rank == "label_order"
    assert (C3Config(rank="mass").contour_rank, C3Config(rank="mass").component_rank) == ("mass", "peak")
    assert C3Config(rank="mass").replace(rank=None).contour_rank == "mass"
    with pytest.raises(ValueError, match="rank='first' is not one of 'mass', 'opencv_order'"):
        C3Config(rank="first")


@pytest.mark.parametrize("rank", ["mass", "opencv_order"])
def test_rank_presets_agree_in_both_backends(rank: str) -> None:
    """The poster's literal reading (contours[0] and label 1 in OpenCV order) and the default,
    in the OpenCV backend and the tensor backend, on multi-blob maps."""
    from lrpfx.postprocess import c3_opencv
    from lrpfx.postprocess.tensor_backend import c3_tensor
    g = torch.Generator().manual_seed(4)
    maps = torch.nn.functional.avg_pool2d(torch.rand(24, 1, 64, 64, generator=g, dtype=torch.float64) ** 6,
                                          5, 1, 2)[:, 0]
    t_map, t_mask = c3_tensor(maps, rank=rank)
    o = c3_opencv(maps, rank=rank)
    np.testing.assert_array_equal(t_mask.numpy(), o.mask_full)
    np.testing.assert_array_equal(t_map.numpy(), o.map)


def test_the_two_readings_differ_somewhere() -> None:
    from lrpfx.postprocess import c3_opencv
    g = torch.Generator().manual_seed(4)
    maps = torch.nn.functional.avg_pool2d(torch.rand(24, 1, 64, 64, generator=g, dtype=torch.float64) ** 6,
                                          5, 1, 2)[:, 0]
    a, b = c3_opencv(maps, rank="mass").mask, c3_opencv(maps, rank="opencv_order").mask
    assert (a != b).reshape(24, -1).any(1).sum() > 0


# ---------------------------------------------------------------- the table's controls and marks
def test_gaussian_blob_is_centred_and_content_free() -> None:
    from lrpfx.eval.evaluate import gaussian_blob
    b = gaussian_blob(2, (64, 64))
    assert b.shape == (2, 64, 64) and torch.equal(b[0], b[1])
    assert torch.equal(b[0], b[0].flip(0)) and torch.equal(b[0], b[0].flip(1)) and torch.equal(b[0], b[0].T)
    assert b[0, 31:33, 31:33].min() == b.max()


def test_markdown_marks_what_does_not_beat_the_blob() -> None:
    from lrpfx.eval import evaluate as ev
    def row(idv: float, dele: float) -> dict:
        r = {c: (0.5, 0.01) for c in ev.COLUMNS if c != "sum R / top"}
        r.update({"ID": (idv, 0.01), "Del": (dele, 0.01), "errors": {"OK": 1}, "ID per tie seed": [idv, idv],
                  "error sweep": {t: {"OK": 1} for t in ev.THRESHOLDS}})
        return r
    result = {"methods": {"good": row(0.6, 0.1), "bad": row(0.2, 0.4), ev.BLOB: row(0.3, 0.2)},
              "pointing_tolerance_px": 4.29, "abn": None}
    lines = ev.markdown(result).splitlines()
    good = next(x for x in lines if x.startswith("| good |")).split(" | ")
    bad = next(x for x in lines if x.startswith("| bad |")).split(" | ")
    assert good[1] == "60.0 ± 1.0" and good[3] == "10.0 ± 1.0"
    assert bad[1] == "20.0 ± 1.0 †" and bad[3] == "40.0 ± 1.0 †"  # Del: lower is better
    assert "| t = 0.3 | t = 0.5 | t = 0.7 |" in ev.markdown(result)
