"""The evaluation harness on a few generated images of the bundled model (quick)."""
from __future__ import annotations

import math

import pytest

from lrpfx import evaluate


@pytest.fixture(scope="module")
def result() -> dict:
    return evaluate.evaluate(n_images=6, seed=1, batch_size=6, rise_masks=200, progress=False,
                             only=["C3-LRP", "LRP (epsilon", "ECCV 2024 + HQ", "Grad-CAM", "Input x", "RISE",
                                   "Ground-truth", "Random"])


def test_every_requested_method_ran(result: dict) -> None:
    rows = result["methods"]
    assert len(rows) == 8
    assert not [name for name, row in rows.items() if "failed" in row]
    assert 0.0 <= result["model_accuracy_on_these"] <= 1.0


def test_ground_truth_map_is_the_upper_bound_of_mass_and_rank(result: dict) -> None:  # METHOD_SPEC §7.15
    gt = result["methods"]["Ground-truth mask (upper bound)"]
    assert gt["RMA"][0] == pytest.approx(1.0) and gt["RRA"][0] == pytest.approx(1.0)
    assert gt["Pointing"][0] == pytest.approx(1.0) and gt["IoU"][0] == pytest.approx(1.0)
    random = result["methods"]["Random map (chance)"]
    assert random["RMA"][0] < 0.6


def test_lrp_rows_report_conservation_and_error_types(result: dict) -> None:
    c3 = result["methods"]["C3-LRP (c3_lrp + C3)"]
    assert "sum R / top" in c3 and not math.isnan(c3["sum R / top"][0])
    eccv = result["methods"]["ECCV 2024 + HQ (eccv2024)"]
    assert eccv["sum R / top"][0] == pytest.approx(1.0, abs=1e-2)  # sums to p(y) (paper Fig. 5)
    for row in result["methods"].values():
        assert sum(row["errors"].values()) == 6 and set(row["errors"]) <= {"OK", "IA", "OA", "WA"}
        assert all(0.0 <= row[k][0] <= 1.0 for k in ("Ins", "Del", "RMA", "RRA", "IoU"))


def test_markdown_table_has_a_row_per_method(result: dict) -> None:
    table = evaluate.markdown(result)
    assert table.count("\n") == len(result["methods"]) + 1
    assert "| C3-LRP (c3_lrp + C3) |" in table
