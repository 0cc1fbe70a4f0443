"""``bench/token_accuracy.py``: the paired comparison against ToMe over teacher seeds (summary and table)."""

from __future__ import annotations

import math

import pytest

from bench.token_accuracy import render, summarize


def _row(seed, method, r, accuracy, loss, speedup=None):
    row = {"seed": seed, "method": method, "r": r, "schedule": f"{method[0]}{r}", "mac_fraction": 1 - 0.1 * r,
           "accuracy": accuracy, "loss": loss, "images": 360}
    if speedup is not None:
        row["speedup"] = speedup
    return row


def test_paired_outcomes_break_accuracy_ties_by_loss():
    rows = [
        _row(0, "dense", 0, 0.97, 0.08), _row(1, "dense", 0, 0.96, 0.09), _row(2, "dense", 0, 0.98, 0.07),
        # seed 0: RAPID higher accuracy (win); seed 1: equal accuracy, lower loss (win); seed 2: lower accuracy (loss)
        _row(0, "rapid", 1, 0.975, 0.10), _row(1, "rapid", 1, 0.95, 0.11), _row(2, "rapid", 1, 0.96, 0.05),
        _row(0, "tome", 1, 0.970, 0.09), _row(1, "tome", 1, 0.95, 0.12), _row(2, "tome", 1, 0.97, 0.04),
    ]
    summary = {(entry["method"], entry["r"]): entry for entry in summarize(rows)}
    rapid = summary[("rapid", 1)]
    assert (rapid["wins"], rapid["ties"], rapid["losses"]) == (2, 0, 1)
    assert rapid["accuracy_vs_tome"] == pytest.approx([0.005, 0.0, -0.01])
    assert rapid["loss_vs_tome"] == pytest.approx([0.01, -0.01, 0.01])
    assert rapid["accuracy"] == pytest.approx((0.975 + 0.95 + 0.96) / 3)
    assert rapid["accuracy_sd"] > 0
    assert "wins" not in summary[("tome", 1)] and "wins" not in summary[("dense", 0)]
    assert "speedup" not in rapid


def test_exact_tie_and_unpaired_seed():
    rows = [_row(0, "rapid", 2, 0.9, 0.3, speedup=1.2), _row(0, "tome", 2, 0.9, 0.3, speedup=1.1),
            _row(1, "rapid", 2, 0.8, 0.4, speedup=1.3)]  # seed 1 has no ToMe row: left out of the pairing
    (rapid,) = [entry for entry in summarize(rows) if entry["method"] == "rapid"]
    assert (rapid["wins"], rapid["ties"], rapid["losses"]) == (0, 1, 0)
    assert rapid["seeds"] == [0, 1] and rapid["accuracy_vs_tome"] == [0.0]
    assert rapid["speedup"] == pytest.approx(1.25)


def test_table_shows_spread_speed_and_record():
    rows = [_row(seed, method, r, 0.9 + 0.01 * seed, 0.3, speedup=1.0 + 0.1 * r)
            for seed in (0, 1) for method, r in (("dense", 0), ("rapid", 1), ("tome", 1))]
    teachers = [{"seed": 0, "teacher": "aaaa", "data": "toy"}, {"seed": 1, "teacher": "bbbb", "data": "toy"}]
    table = render(teachers, rows, summarize(rows))
    assert "0: aaaa, 1: bbbb" in table
    line = next(line for line in table.splitlines() if line.startswith("| rapid |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[4] == "90.50 ± 0.71%" and cells[6] == "1.10x" and cells[7] == "+0.00, +0.00"
    assert cells[8] == "0 / 2 / 0"
    assert math.isclose(float(cells[3]), 0.9)
