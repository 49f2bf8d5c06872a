"""Evaluation metrics against the oracles of METHOD_SPEC §7.14-7.16."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lrpfx.eval.metrics import (
    attended_iou,
    attention_stats,
    auc,
    classify_error,
    default_step,
    eccv_masks,
    error_type,
    insertion_deletion,
    pointing_game,
    pool_channels,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)

torch.set_num_threads(1)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 5)).eval().double()


class Constant(nn.Module):
    """Ignores its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 2.0, 0.5]], dtype=x.dtype).expand(len(x), 3)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64)
    maps = torch.randn(3, 12, 12, generator=g, dtype=torch.float64)
    maps[0, :4] = 0.0  # ties: they must enter together
    return images, maps, torch.tensor([0, 3, 1])


@pytest.mark.parametrize("protocol", ["eccv_patch", "rise"])
@pytest.mark.parametrize("patch", [1, 3])
def test_invariant_to_strictly_increasing_transforms(data, protocol: str, patch: int) -> None:
    images, maps, y = data
    model = tiny_net()
    kw = dict(protocol=protocol, patch=patch, step=5, mean=MEAN, std=STD)
    a = insertion_deletion(model, images, maps, y, **kw)
    b = insertion_deletion(model, images, torch.exp(3 * maps) + 7, y, **kw)
    assert torch.allclose(a.insertion, b.insertion) and torch.allclose(a.deletion, b.deletion)


@pytest.mark.parametrize("protocol", ["eccv_patch", "rise"])
def test_auc_in_unit_interval(data, protocol: str) -> None:
    images, maps, y = data
    r = insertion_deletion(tiny_net(2), images, maps, y, protocol=protocol, step=7, mean=MEAN, std=STD)
    for v in (r.insertion, r.deletion):
        assert ((v >= 0) & (v <= 1)).all()


@pytest.mark.parametrize("step,patch", [(5, 1), (7, 1), (1, 4), (100, 1), (144, 1)])
def test_number_of_points(data, step: int, patch: int) -> None:
    images, maps, y = data
    n = math.ceil(12 / patch) ** 2
    r = insertion_deletion(tiny_net(), images, maps, y, step=step, patch=patch, mean=MEAN, std=STD)
    assert r.insertion_curve.shape == (3, math.ceil(n / step))
    rr = insertion_deletion(tiny_net(), images, maps, y, protocol="rise", step=step, patch=patch, mean=MEAN, std=STD)
    assert rr.insertion_curve.shape == (3, math.ceil(n / step) + 1)


def test_end_points_are_full_and_black_images(data) -> None:
    images, maps, y = data
    model = tiny_net()
    r = insertion_deletion(model, images, maps, y, step=9, mean=MEAN, std=STD)
    black = (-torch.tensor(MEAN, dtype=torch.float64) / torch.tensor(STD, dtype=torch.float64)).view(1, 3, 1, 1)
    p_full = model(images).softmax(1)[torch.arange(3), y]
    p_black = model(black.expand_as(images)).softmax(1)[torch.arange(3), y]
    assert torch.allclose(r.insertion_curve[:, -1], p_full) and torch.allclose(r.deletion_curve[:, -1], p_black)
    # RISE: a 0-step point, full image at both ends of the deletion curve's path.
    rr = insertion_deletion(model, images, maps, y, protocol="rise", step=9, mean=MEAN, std=STD)
    assert torch.allclose(rr.deletion_curve[:, 0], p_full) and torch.allclose(rr.insertion_curve[:, -1], p_full)
    p_zero = model(torch.zeros_like(images)).softmax(1)[torch.arange(3), y]
    assert torch.allclose(rr.deletion_curve[:, -1], p_zero)


def test_ties_enter_together_and_first_point_has_more_than_s_patches() -> None:
    p = torch.tensor([[3.0, 2.0, 2.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    m = eccv_masks(p, step=1)
    assert m.shape[0] == 8
    assert m[0].sum() == 4  # rank 1 is a tied 2.0: the three 2.0s enter with the 3.0
    assert m[-1].all()


def test_model_that_ignores_input_gives_zero_id(data) -> None:
    images, maps, y = data
    r = insertion_deletion(Constant(), images, maps, torch.tensor([0, 1, 2]), step=11, mean=MEAN, std=STD)
    assert torch.allclose(r.id_score, torch.zeros(3, dtype=torch.float64))


def test_auc_formula_and_default_step() -> None:
    assert auc(torch.tensor([0.0, 1.0, 1.0])).item() == pytest.approx(0.75)
    assert default_step(224 * 224, "eccv_patch", 224) == 502 and default_step(64 * 64, "eccv_patch", 64) == 41
    assert default_step(224 * 224, "rise", 224) == 224


def test_insertion_rewards_the_right_map() -> None:
    # A model that reads the top-left quadrant: inserting it first scores higher than inserting it last.
    class Quadrant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, :, :6, :6].mean((1, 2, 3))
            return torch.stack([4 * s, torch.zeros_like(s)], 1)

    images = torch.ones(1, 3, 12, 12, dtype=torch.float64)
    good = torch.zeros(1, 12, 12, dtype=torch.float64)
    good[:, :6, :6] = 1
    kw = dict(step=12, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    r_good = insertion_deletion(Quadrant(), images, good, [0], **kw)
    r_bad = insertion_deletion(Quadrant(), images, 1 - good, [0], **kw)
    assert r_good.id_score.item() > r_bad.id_score.item()


def test_map_shape_mismatch_names_the_shapes(data) -> None:
    images, maps, y = data
    with pytest.raises(ValueError, match=r"maps of shape \(3, 6, 6\).*Hint"):
        insertion_deletion(tiny_net(), images, maps[:, :6, :6], y, mean=MEAN, std=STD)


# ------------------------------------------------------------------ RMA / RRA / pointing
@pytest.fixture
def masks() -> torch.Tensor:
    m = torch.zeros(4, 20, 20, dtype=torch.bool)
    m[0, 2:8, 3:9] = True
    m[1, 10:18, 10:13] = True
    m[2, 5:6, 5:6] = True
    m[3] = True
    return m


def test_ground_truth_map_scores_one(masks: torch.Tensor) -> None:
    gt = masks.double()
    assert torch.allclose(relevance_mass_accuracy(gt, masks), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(relevance_rank_accuracy(gt, masks), torch.ones(4, dtype=torch.float64))
    assert pointing_game(gt, masks).all()
    noise = torch.rand(4, 20, 20, generator=torch.Generator().manual_seed(0))  # whole-image GT: any map
    assert relevance_mass_accuracy(noise, masks)[3] == 1 and relevance_rank_accuracy(noise, masks)[3] == 1


def test_rma_scale_invariant_and_nan_on_zero(masks: torch.Tensor) -> None:
    r = torch.randn(4, 20, 20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(relevance_mass_accuracy(r, masks), relevance_mass_accuracy(7.5 * r, masks))
    assert relevance_mass_accuracy(-r.abs() - 1, masks).isnan().all()  # no positive relevance
    assert relevance_rank_accuracy(r, torch.zeros_like(masks)).isnan().all()


def test_rank_and_pointing_invariant_to_monotone_transforms(masks: torch.Tensor) -> None:
    r = torch.rand(4, 20, 20, generator=torch.Generator().manual_seed(2)).double()
    r[:, :3] = 0.5  # ties
    t = torch.exp(5 * r) - 1
    assert torch.equal(relevance_rank_accuracy(r, masks), relevance_rank_accuracy(t, masks))
    assert torch.equal(pointing_game(r, masks), pointing_game(t, masks))


def test_stable_tie_break_in_rank_accuracy() -> None:
    m = torch.zeros(1, 1, 4, dtype=torch.bool)
    m[0, 0, 0] = True
    assert relevance_rank_accuracy(torch.ones(1, 1, 4), m).item() == 1.0  # the first tie is index 0
    m2 = torch.zeros_like(m)
    m2[0, 0, 3] = True
    assert relevance_rank_accuracy(torch.ones(1, 1, 4), m2).item() == 0.0


def test_mask_plus_noise_beats_random(masks: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    informed = masks[:3].double() + 0.3 * torch.rand(3, 20, 20, generator=g)
    random = torch.rand(3, 20, 20, generator=g).double()
    for metric in (relevance_mass_accuracy, relevance_rank_accuracy):
        assert (metric(informed, masks[:3]) > metric(random, masks[:3])).all()
    assert pointing_game(informed, masks[:3]).float().mean() >= pointing_game(random, masks[:3]).float().mean()


def test_pointing_tolerance_and_raster_order() -> None:
    m = torch.zeros(1, 40, 40, dtype=torch.bool)
    m[0, 20, 20] = True
    r = torch.zeros(1, 40, 40)
    r[0, 20, 35] = 1.0  # 15 px away: a hit at tolerance 15, a miss at 14
    assert pointing_game(r, m, tolerance=15).item() and not pointing_game(r, m, tolerance=14).item()
    r[0, 0, 0] = 1.0  # a tie earlier in raster order wins
    assert not pointing_game(r, m).item()
    assert not pointing_game(r, torch.zeros_like(m)).item()


def test_poolings() -> None:
    r = torch.tensor([[[[1.0]], [[-3.0]], [[4.0]]]])  # (1, 3, 1, 1)
    expected = {"sum,pos": 2.0, "sum,abs": 2.0, "max-norm": 4.0, "l1-norm": 8.0, "l2-norm": 26 ** 0.5, "l2-norm,sq": 26.0}
    for name, value in expected.items():
        assert pool_channels(r, name).item() == pytest.approx(value)
    assert pool_channels(-r, "sum,pos").item() == 0
    with pytest.raises(ValueError, match="unknown pooling 'mean'.*Hint"):
        pool_channels(r, "mean")  # type: ignore[arg-type]


def test_attended_iou() -> None:
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, :5] = True
    r = m.double() * 2 + 0.1
    assert attended_iou(r, m).item() == 1.0
    half = torch.zeros_like(m)
    half[0, :5, :5] = True
    assert attended_iou(r, m, attended=half).item() == 0.5


# ------------------------------------------------------------------ error types
def _case(attended_rows: slice, attended_cols: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = torch.zeros(1, 20, 20, dtype=torch.bool)
    m[0, 5:15, 5:15] = True  # 100 object pixels
    a = torch.zeros_like(m)
    a[0, attended_rows, attended_cols] = True
    return a.double(), m, a


@pytest.mark.parametrize("rows,cols,label", [
    (slice(5, 15), slice(5, 15), "OK"),    # exactly the object
    (slice(6, 9), slice(6, 9), "IA"),      # on the object, 9 % of it
    (slice(0, 20), slice(0, 20), "OA"),    # all of it and the whole image
    (slice(0, 4), slice(0, 20), "WA"),     # off the object
    (slice(3, 15), slice(3, 15), "OK"),    # spills a little: P = 100/144
])
def test_hand_made_error_types(rows: slice, cols: slice, label: str) -> None:
    maps, m, a = _case(rows, cols)
    assert error_type(maps, m, attended=a) == [label]
    if not a.all():  # the map is the indicator, so A = R+ > mean(R+) is the same set unless it is constant
        assert error_type(maps, m) == [label]


def test_empty_attended_set_rule() -> None:
    m = torch.zeros(2, 10, 10, dtype=torch.bool)
    m[:, :5] = True
    maps = torch.zeros(2, 10, 10)
    maps[0, :5] = 1.0  # all mass on the object
    maps[1, 5:] = 1.0
    empty = torch.zeros_like(m)
    assert error_type(maps, m, attended=empty) == ["IA", "WA"]
    assert error_type(torch.zeros(1, 10, 10), m[:1]) == ["WA"]  # zero map: no mass at all
    with pytest.raises(ValueError, match="mask is empty.*Hint"):
        error_type(maps, torch.zeros_like(m))


def test_labels_exhaustive_and_mutually_exclusive() -> None:
    grid = [i / 20 for i in range(21)]
    for p0, c0 in [(0.5, 0.5), (0.3, 0.7)]:
        for p in grid:
            for c in grid:
                truth = {"OK": c >= c0 and p >= p0, "IA": p >= p0 and c < c0,
                         "OA": c >= c0 and p < p0, "WA": c < c0 and p < p0}
                assert sum(truth.values()) == 1
                assert truth[classify_error(p, c, p0=p0, c0=c0)]


def test_mass_variant_and_stats() -> None:
    maps, m, a = _case(slice(0, 20), slice(0, 20))
    maps = maps * 0 + 0.01
    maps[m] = 1.0  # attended everywhere but the mass sits on the object
    s = attention_stats(maps, m, attended=a)
    assert s.precision.item() == pytest.approx(0.25) and s.coverage.item() == 1.0 and s.area_ratio.item() == 4.0
    assert error_type(maps, m, attended=a) == ["OA"]
    assert error_type(maps, m, attended=a, use_mass=True) == ["OK"]


def _literal_eccv_insdel(model: nn.Module, image: torch.Tensor, amap: torch.Tensor, y: int, step: int,
                         patch: int) -> tuple[float, float]:
    """METHOD_SPEC §5.1 written out point by point: one forward per point, argsort, no batching."""
    import numpy as np
    a = amap.numpy()
    h, w = a.shape
    ph, pw = -(-h // patch), -(-w // patch)
    p = np.full((ph, pw), -np.inf)
    for i in range(ph):
        for j in range(pw):
            p[i, j] = a[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].max()
    flat = p.flatten()
    order = np.argsort(-flat, kind="stable")
    n = flat.size
    k = -(-n // step)
    m_t = torch.as_tensor(MEAN, dtype=image.dtype).view(3, 1, 1)
    s_t = torch.as_tensor(STD, dtype=image.dtype).view(3, 1, 1)
    raw = image * s_t + m_t
    ins, dele = [], []
    for i in range(k):
        t = flat[order[min(step * (i + 1), n - 1)]]
        mp = (p >= t).astype(np.float64)
        mask = torch.as_tensor(np.kron(mp, np.ones((patch, patch)))[:h, :w], dtype=image.dtype)
        for m, out in ((mask, ins), (1 - mask, dele)):
            x = (raw * m - m_t) / s_t
            with torch.no_grad():
                out.append(float(model(x[None]).softmax(1)[0, y]))
    def area(c: list[float]) -> float:
        return c[0] if len(c) == 1 else (sum(c) - c[0] / 2 - c[-1] / 2) / (len(c) - 1)
    return area(ins), area(dele)


@pytest.mark.parametrize("patch", [1, 2])
def test_eccv_protocol_matches_the_literal_procedure(patch: int) -> None:
    """Batched, deduplicated evaluation == one forward per point (ties, binary and coarse maps)."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64)
    maps = torch.randn(4, 12, 12, generator=g, dtype=torch.float64)
    maps[0, :5] = 0.0                                  # a block of ties
    maps[1] = (maps[1] > 0.3).double()                 # a binary map: two distinct masks
    maps[2] = maps[2].round()                          # a few levels, as after heat quantization
    y = torch.tensor([0, 4, 2, 1])
    model = tiny_net(3)
    r = insertion_deletion(model, images, maps, y, step=5, patch=patch, batch_size=7, mean=MEAN, std=STD)
    for i in range(4):
        ins, dele = _literal_eccv_insdel(model, images[i], maps[i], int(y[i]), 5, patch)
        assert r.insertion[i].item() == pytest.approx(ins, rel=1e-9, abs=1e-12)
        assert r.deletion[i].item() == pytest.approx(dele, rel=1e-9, abs=1e-12)
