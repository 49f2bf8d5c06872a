"""The evaluation harness on a few generated images of the bundled model (quick)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lrpfx.eval import evaluate


@pytest.fixture(scope="module")
def run() -> evaluate.Evaluation:
    return evaluate.evaluate(n_images=6, seed=1, batch_size=6, rise_masks=200, progress=False,
                             only=["C3-LRP", "LRP (epsilon", "ECCV 2024 + HQ", "Grad-CAM", "Input x", "RISE",
                                   "Ground-truth", "Random"])


@pytest.fixture(scope="module")
def result(run: evaluate.Evaluation) -> dict:
    return run.result


def test_every_requested_method_ran(result: dict) -> None:
    rows = result["methods"]
    assert set(rows) == {evaluate.C3_DEFAULT, evaluate.C3_LITERAL, "LRP (epsilon_plus_flat)",
                         "LRP (epsilon_plus_flat) + C3", "ECCV 2024 + HQ (eccv2024)", "Grad-CAM", "Grad-CAM + C3",
                         "Input x Gradient", "Input x Gradient + C3", "RISE (200 masks)", "Ground-truth mask",
                         "Random map"}
    assert not [name for name, row in rows.items() if "failed" in row]
    assert 0.0 <= result["model_accuracy_on_these"] <= 1.0 and result["target"] == "predicted"
    assert set(result["abn"]["methods"]) == {"Ground-truth mask [ABN model]"}


def test_the_headline_equals_the_protocol_without_ties_and_not_with_them(result: dict) -> None:
    """Input x Gradient has no tied values: both insertion/deletion columns agree; the C3 rows
    (mostly zeros) and the ground-truth mask (binary) differ, and report one ID per tie seed."""
    rows = result["methods"]
    ixg = rows["Input x Gradient"]
    assert ixg["tied"][0] == 0.0 and ixg["ID"][0] == pytest.approx(ixg["ID (ECCV)"][0], abs=1e-12)
    for name in (evaluate.C3_DEFAULT, "Ground-truth mask"):
        assert rows[name]["tied"][0] == 1.0 and len(rows[name]["ID per tie seed"]) == 5
        assert rows[name]["ID"][0] != pytest.approx(rows[name]["ID (ECCV)"][0], abs=1e-6)


def test_ground_truth_map_is_the_upper_bound_of_mass_and_rank(result: dict) -> None:  # METHOD_SPEC §7.15
    gt = result["methods"]["Ground-truth mask"]
    assert gt["RMA"][0] == pytest.approx(1.0) and gt["RRA"][0] == pytest.approx(1.0)
    assert gt["Pointing"][0] == pytest.approx(1.0) and gt["IoU"][0] == pytest.approx(1.0)
    random = result["methods"]["Random map"]
    assert random["RMA"][0] < 0.6


def test_lrp_rows_report_conservation_and_error_types(result: dict) -> None:
    c3 = result["methods"][evaluate.C3_DEFAULT]
    assert "sum R / top" in c3 and not math.isnan(c3["sum R / top"][0])
    eccv = result["methods"]["ECCV 2024 + HQ (eccv2024)"]
    assert eccv["sum R / top"][0] == pytest.approx(1.0, abs=1e-2)  # sums to p(y) (paper Fig. 5)
    for row in result["methods"].values():
        assert all(sum(e.values()) == 6 for e in row["error sweep"].values())
        assert sum(row["errors"].values()) == 6 and set(row["errors"]) <= {"OK", "IA", "OA", "WA"}
        assert all(0.0 <= row[k][0] <= 1.0 for k in ("Ins", "Del", "RMA", "RRA", "IoU"))


def test_markdown_table_has_a_row_per_method(result: dict) -> None:
    table = evaluate.markdown(result)
    for name in result["methods"]:
        assert table.count(f"| {name} |") == 2  # the main table and the IA/OA/WA sweep
    assert "ABN block" in table and "| Ground-truth mask [ABN model] |" in table


def test_best_worst_figure_picks_c3_lrp_extremes(run: evaluate.Evaluation, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = evaluate.best_worst_figure(run, tmp_path / "bw.png", k=2)
    assert path is not None and path.stat().st_size > 0
    ids = run.result["methods"][evaluate.C3_DEFAULT]["per_image_ID"]
    assert len(ids) == 6 and run.maps[evaluate.C3_DEFAULT].shape == (6, 64, 64)
    partial = evaluate.Evaluation({"methods": {}}, run.images, run.masks, {})
    assert evaluate.best_worst_figure(partial, tmp_path / "none.png") is None


@pytest.fixture(scope="module")
def bundled():
    from lrpfx.eval.datasets import ShapesDataset
    from lrpfx.cli.loading import load_model
    data = ShapesDataset("test", n=3, seed=2, normalize=True)
    x = torch.stack([data[i][0] for i in range(3)])
    return load_model("bundled").model, x, torch.tensor([int(data[i][1]) for i in range(3)])


def test_inference_model_reproduces_the_model(bundled) -> None:
    model, x, _ = bundled
    fast = evaluate.inference_model(model, x)
    assert fast is not model
    with torch.no_grad():
        other = x.flip(-1) * 0.7
        torch.testing.assert_close(fast(other), model(other), rtol=1e-4, atol=1e-4)


def test_inference_model_falls_back_with_a_warning() -> None:
    class Unscriptable(nn.Module):
        def forward(self, x, *args):  # noqa: ANN001 - varargs are what TorchScript refuses
            return x.flatten(1)
    model = Unscriptable()
    with pytest.warns(UserWarning, match="scripting the model failed"):
        assert evaluate.inference_model(model, torch.zeros(1, 3, 2, 2)) is model


def test_score_cam_with_the_frozen_copy_equals_score_cam(bundled) -> None:
    """Score-CAM's masked forwards on the frozen copy give pytorch-grad-cam's own maps."""
    pytest.importorskip("pytorch_grad_cam")
    model, x, y = bundled
    run = evaluate._cam("scorecam")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = run(evaluate.Models(model, model), x[:2], y[:2]).maps
        fast = run(evaluate.Models(model, evaluate.inference_model(model, x)), x[:2], y[:2]).maps
    torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-3)


def test_quick_command_writes_table_json_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lrpfx eval --quick`` (the CI smoke run) over every method."""
    assert evaluate.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    import json
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["n_images"] == 8 and not [k for k, r in result["methods"].items() if "failed" in r]
    assert result["insertion_deletion_points"] == 10 and len(result["tie_seeds"]) == 2 and "partial" not in result
    assert not [k for k, r in result["abn"]["methods"].items() if "failed" in r]
    assert len(result["methods"]) == 18 and len(result["abn"]["methods"]) == 3
    assert 0.9 <= result["abn"]["accuracy_on_these"] <= 1.0
    assert (tmp_path / "results.md").read_text().count("| ") > 2 * 21
    assert "best_worst.png" in capsys.readouterr().out


def test_the_basic_block_model_can_be_evaluated(tmp_path: Path) -> None:
    ev = evaluate.evaluate(n_images=3, batch_size=3, progress=False, points=10, model="bundled:resnet18_w16",
                           only=["C3-LRP", "Grad-CAM", "Ground-truth"])
    assert ev.result["model"] == "bundled:resnet18_w16"
    assert not [k for k, r in ev.result["methods"].items() if "failed" in r] and len(ev.result["methods"]) == 5


def test_a_model_not_trained_on_the_benchmark_is_refused() -> None:
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "torchvision:resnet18", "--quick", "--no-progress"])


def test_partial_results_are_reported_after_every_method() -> None:
    """``lrpfx eval`` rewrites results.json/.md after each method: an interrupted run keeps its rows."""
    seen: list[tuple[bool, list[str], list[str]]] = []
    ev = evaluate.evaluate(n_images=2, batch_size=2, progress=False, points=5, tie_seeds=1,
                           only=["Grad-CAM", "Random", "ABN attention"],
                           on_partial=lambda r: seen.append((r["partial"], list(r["methods"]),
                                                             list((r["abn"] or {}).get("methods") or []))))
    main_rows = list(ev.result["methods"])
    assert len(main_rows) == 3 and all(p for p, _, _ in seen)
    assert [m for _, m, _ in seen[:3]] == [main_rows[:1], main_rows[:2], main_rows]
    assert seen[-1][2] == ["ABN attention [ABN model]"] and len(seen) == 4
    assert "Partial" in evaluate.markdown({**ev.result, "partial": True})
    assert "Partial" not in evaluate.markdown(ev.result)
