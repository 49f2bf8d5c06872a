"""The evaluation protocol around the metrics: calibrated IA/OA/WA thresholds, several
training seeds combined, the 224-px model. Oracles: chance levels computed from the masks
alone, Python's ``statistics`` module, the shapes of torchvision's own ResNet stages."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from lrpfx.eval import evaluate as ev
from lrpfx.eval.datasets import ShapesDataset
from lrpfx.eval.models import build


# ---------------------------------------------------------------- calibrated thresholds
def test_calibration_lets_the_content_free_blob_pass_on_at_most_the_rate() -> None:
    """Recomputed from the blob's precision and coverage on the same validation masks: at t the
    blob is OK on at most 5% of the images, and just below t on more (t is the smallest)."""
    from lrpfx.eval import metrics
    cal = ev.calibrate_thresholds(64, seed=3, n=120, rate=0.05)
    data = ShapesDataset("val", n=120, size=64, seed=3, return_mask=True)
    masks = torch.stack([torch.as_tensor(data[i][2]) for i in range(120)]).bool()
    labels = lambda t: metrics.error_type(ev.gaussian_blob(120, (64, 64)), masks, p0=t, c0=t)  # noqa: E731
    assert cal["p0"] == cal["c0"] and cal["split"] == "val" and cal["images"] == 120
    assert labels(cal["p0"]).count("OK") <= 6 == int(0.05 * 120)
    assert labels(cal["p0"] - 0.002).count("OK") > 6 or labels(cal["p0"]).count("OK") == 6
    assert cal["blob_ok"] == pytest.approx(labels(cal["p0"]).count("OK") / 120)
    assert cal["random_ok"] <= cal["blob_ok"] + 0.05


def test_a_stricter_rate_raises_the_threshold() -> None:
    lo = ev.calibrate_thresholds(64, seed=0, n=80, rate=0.25)
    hi = ev.calibrate_thresholds(64, seed=0, n=80, rate=0.0)
    assert hi["p0"] > lo["p0"] and "validation" in hi["rule"]


def test_markdown_states_the_calibrated_thresholds() -> None:
    r = {c: (0.5, 0.01) for c in ev.COLUMNS if c != "sum R / top"}
    r.update({"errors": {"IA": 2}, "ID per tie seed": [0.5], "error sweep": {t: {"OK": 1} for t in ev.THRESHOLDS}})
    cal = {"p0": 0.2, "c0": 0.53, "rule": "the rule"}
    text = ev.markdown({"methods": {"m": r}, "n_images": 2, "abn": None, "error_thresholds_calibrated": cal})
    assert "p0 = 0.2, c0 = 0.53 (the rule)" in text
    assert "| 0 / 2 / 0 / 0 |" in text


# ---------------------------------------------------------------- seeds combined
def _run(idv: list[float], se: float, errors: dict[str, int], **header) -> dict:
    rows = {}
    for name, value in zip(("a", ev.BLOB), idv):
        r = {c: (value, se) for c in ev.COLUMNS if c != "sum R / top"}
        r.update({"errors": errors, "ID per tie seed": [value, value + 0.01],
                  "error sweep": {str(t): errors for t in ev.THRESHOLDS}})
        rows[name] = r
    base = {"n_images": 10, "seed": 0, "target": "predicted", "insertion_deletion_points": 20, "tie_seeds": [0, 1],
            "image_size": 64, "rise_masks": 300, "model": "m", "model_accuracy_on_these": 0.9, "abn": None}
    return {**base, **header, "methods": rows}


def test_combine_gives_mean_and_std_over_seeds_and_sums_counts() -> None:
    runs = [_run([0.2, 0.1], 0.01, {"OK": 1, "WA": 2}), _run([0.5, 0.1], 0.03, {"OK": 3}),
            _run([0.35, 0.1], 0.02, {"IA": 1})]
    out = ev.combine(runs)
    mean, sd = out["methods"]["a"]["ID"]
    assert mean == pytest.approx(statistics.mean([0.2, 0.5, 0.35]))
    assert sd == pytest.approx(statistics.stdev([0.2, 0.5, 0.35]))
    assert out["methods"]["a"]["se_images"]["ID"] == pytest.approx(0.02)
    assert out["methods"]["a"]["errors"] == {"OK": 4, "WA": 2, "IA": 1}
    text = ev.markdown(out)
    assert "std over 3 training seeds" in text
    assert next(x for x in text.splitlines() if x.startswith("| a |")).split(" | ")[1] == "35.0 ± 15.0 (2.0)"
    json.dumps(out)  # JSON-ready


def test_combine_refuses_runs_of_different_protocols() -> None:
    with pytest.raises(ValueError, match="insertion_deletion_points"):
        ev.combine([_run([0.2, 0.1], 0.01, {}), _run([0.2, 0.1], 0.01, {}, insertion_deletion_points=100)])
    with pytest.raises(ValueError, match="at least 2"):
        ev.combine([_run([0.2, 0.1], 0.01, {})])


def test_combine_command_writes_the_table(tmp_path) -> None:
    dirs = []
    for k, v in enumerate((0.2, 0.4)):
        d = tmp_path / f"seed{k}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_run([v, 0.1], 0.01, {"OK": 1})))
        dirs.append(str(d))
    assert ev.main(["--combine", *dirs, "--out", str(tmp_path / "all")]) == 0
    assert "30.0 ± 14.1 (1.0)" in (tmp_path / "all" / "results.md").read_text()


# ---------------------------------------------------------------- models by seed and size
def test_seed_names_build_the_same_architecture() -> None:
    a, b = build("resnet50_w8"), build("resnet50_w8_seed2")
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    with pytest.raises(ValueError, match="seed"):
        build("resnet50_w8_seedx")


def test_the_224_model_runs_its_stages_at_resnet50s_resolutions() -> None:
    """torchvision's ResNet-50 runs layer1..4 at 56, 28, 14, 7 px on 224-px inputs; so does
    the 224 layout, and layer2's 28 x 28 is C3's default grid (224 / 8)."""
    from torchvision.models import resnet50
    ours, ref = build("resnet50_224_w8").eval(), resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    sizes = []
    for model in (ours, ref):
        seen = []
        hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
                 for i in range(1, 5)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        sizes.append(seen)
    assert sizes[0] == sizes[1] == [56, 28, 14, 7]
    assert ev.c3_options()["resize_to"] == (28, 28)


@pytest.mark.parametrize("name, size", [("resnet50_w8_seed0", 64), ("resnet50_w8_seed1", 64),
                                        ("resnet50_w8_seed2", 64), ("resnet50_224_w8_seed0", 224),
                                        ("resnet50_224_w8_seed1", 224), ("resnet50_224_w8_seed2", 224)])
def test_the_shipped_seed_models_load_at_their_size_and_classify(name: str, size: int) -> None:
    """The shipped weights load by name through the CLI's loader, at the size in their metadata,
    and classify fresh validation images far above chance (1/8)."""
    from lrpfx.cli.loading import load_model
    from lrpfx.eval.datasets import generate_batch
    loaded = load_model(f"bundled:{name}")
    assert loaded.size == size
    x, y, _ = generate_batch(5000, 48, split="val", size=size, seed=7)
    with torch.no_grad():
        accuracy = float((loaded.model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.4, accuracy
