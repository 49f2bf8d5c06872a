"""The synthetic shapes dataset: determinism, labels, and exact ground-truth masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lrpfx.eval.datasets import CLASSES, MEAN, STD, ShapesDataset, generate_batch, make_sample, normalize, render, render_object_mask

torch.set_num_threads(1)


def test_same_seed_and_index_give_identical_samples() -> None:
    a, b = make_sample(3, "train", 17), make_sample(3, "train", 17)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.label == b.label


def test_indices_seeds_and_splits_differ() -> None:
    base = make_sample(0, "train", 0).image
    for other in (make_sample(0, "train", 1), make_sample(1, "train", 0), make_sample(0, "test", 0)):
        assert not torch.equal(base, other.image)


def test_generation_does_not_touch_global_rngs() -> None:
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    make_sample(0, "train", 5)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_sample_types_and_ranges() -> None:
    s = make_sample(0, "train", 2, size=48)
    assert s.image.shape == (3, 48, 48) and s.image.dtype == torch.float32
    assert 0 <= s.image.min() and s.image.max() <= 1
    assert s.mask.shape == (48, 48) and s.mask.dtype == torch.bool and s.mask.any()
    assert 0 <= s.label < len(CLASSES)


@pytest.mark.parametrize("index", range(12))
def test_mask_is_exactly_the_object(index: int) -> None:
    s = make_sample(0, "train", index)
    alone = render_object_mask(s.scene.obj, 64)  # the object re-rendered on a blank canvas
    assert np.array_equal(alone, s.mask.numpy())
    with_obj, _, visible = render(s.scene)
    without, _, _ = render(s.scene, with_object=False)
    changed = np.abs(with_obj - without).max(-1) > 0
    # The object changes no pixel outside its mask, and (bar colour coincidences) every visible one.
    assert not (changed & ~s.mask.numpy()).any()
    assert (changed & visible).sum() >= 0.99 * visible.sum()
    assert not (visible & ~s.mask.numpy()).any()


def test_object_inside_frame_and_not_tiny() -> None:
    for i in range(40):
        m = make_sample(0, "test", i).mask
        assert m.sum() >= 60  # the smallest shapes at the smallest scale still span ~60 pixels
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_every_class_appears_and_labels_in_range() -> None:
    _, labels, _ = generate_batch(0, 200, split="test", normalized=False)
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert set(labels.tolist()) == set(range(len(CLASSES)))


def test_dataset_interface_and_normalisation() -> None:
    ds = ShapesDataset("test", n=4, seed=0, normalize=True, return_mask=True)
    x, y, m = ds[1]
    raw = make_sample(0, "test", 1)
    assert torch.allclose(x, normalize(raw.image)) and y == raw.label and torch.equal(m, raw.mask)
    assert len(ds) == 4 and ds.mean == MEAN and ds.std == STD
    x2, _ = ShapesDataset("test", n=4, transform=lambda t: t * 2)[1]
    assert torch.equal(x2, raw.image * 2)


def test_normalisation_constants_fit_the_data() -> None:
    x, _, _ = generate_batch(0, 300, normalized=False)
    flat = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.tensor(MEAN), atol=0.03)
    assert torch.allclose(flat.std(1), torch.tensor(STD), atol=0.03)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'.*Hint"):
        ShapesDataset("dev")  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="out of range.*Hint"):
        ShapesDataset("test", n=2).sample(2)
