"""Issue #18 on the bundled model: the "+ C3" rows use the same C3 stage as ``lrpfx.compile(...,
c3=True)``, both C3 readings agree in both backends on real LRP maps, and the class explained
is selectable."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpfx
from lrpfx.eval import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lrp_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lrpfx.cli.loading import load_model
    from lrpfx.eval.datasets import ShapesDataset
    model = load_model("bundled").model
    data = ShapesDataset("test", n=8, seed=3, normalize=True)
    x = torch.stack([data[i][0] for i in range(8)])
    y = torch.tensor([int(data[i][1]) for i in range(8)])
    with torch.inference_mode():
        compiled = lrpfx.compile(model, "c3_lrp", c3=True)(x, y)
        relevance = lrpfx.compile(model, "c3_lrp")(x, y)[0]
    return relevance, compiled[2], compiled[3]


def test_the_c3_rows_use_the_compiled_c3_stage(lrp_maps) -> None:
    relevance, c3_map, c3_mask = lrp_maps
    ours_map, ours_mask = evaluate.apply_c3(relevance, "mass")
    assert torch.equal(ours_mask, c3_mask)
    torch.testing.assert_close(ours_map.float(), c3_map.float(), rtol=0, atol=0)


@pytest.mark.parametrize("rank", ["mass", "opencv_order"])
def test_both_c3_readings_agree_in_both_backends_on_lrp_maps(lrp_maps, rank: str) -> None:
    from lrpfx.postprocess import c3_opencv
    relevance = lrp_maps[0]
    mask = evaluate.apply_c3(relevance, rank)[1]
    np.testing.assert_array_equal(mask.numpy(), c3_opencv(relevance.double(), **evaluate.c3_options(rank)).mask_full)


def test_the_explained_class_is_selectable() -> None:
    kw = dict(n_images=4, batch_size=4, progress=False, points=10, tie_seeds=2, only=["Ground-truth mask"])
    a = evaluate.evaluate(target="ground_truth", **kw).result
    b = evaluate.evaluate(**kw).result
    assert a["target"] == "ground_truth" and b["target"] == "predicted"
    with pytest.raises(ValueError, match="target='label'"):
        evaluate.evaluate(target="label", **kw)
