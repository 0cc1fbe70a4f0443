import pytest

from hiap.app.report import aggregate_runs, paired_differences


def _run(method, seed, accuracy, loss, target=0.5):
    return {"method": method, "target": target, "seed": seed, "fraction": target,
            "pruned": {"accuracy": accuracy, "loss": loss, "params": 1000}}


def test_baselines_are_paired_with_hiap_by_seed_and_target():
    runs = [_run("hiap", 0, 0.90, 0.30), _run("uniform", 0, 0.88, 0.35), _run("l1", 0, 0.91, 0.31),
            _run("hiap", 1, 0.92, 0.28), _run("uniform", 1, 0.92, 0.29),  # l1 has no seed 1
            _run("uniform", 2, 0.99, 0.01),  # no HiAP run to pair with
            _run("hiap", 0, 0.80, 0.50, target=0.3)]  # another target, no baseline there
    rows = {row["baseline"]: row for row in paired_differences(runs)}
    assert set(rows) == {"uniform", "l1"}
    assert rows["uniform"]["seeds"] == [0, 1] and rows["uniform"]["hiap_at_or_above"] == 2
    assert rows["uniform"]["accuracy_difference"] == pytest.approx((0.02 + 0.0) / 2)
    assert rows["uniform"]["loss_difference"] == pytest.approx((-0.05 - 0.01) / 2)
    assert rows["l1"]["seeds"] == [0] and rows["l1"]["hiap_at_or_above"] == 0
    assert paired_differences([_run("hiap", 0, 0.9, 0.3)]) == []


def test_aggregates_give_mean_and_spread_of_accuracy_and_loss_per_method():
    rows = aggregate_runs([_run("hiap", 0, 0.90, 0.30), _run("hiap", 1, 0.92, 0.20)])
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.91) and rows[0]["loss_mean"] == pytest.approx(0.25)
    assert rows[0]["loss_std"] == pytest.approx(0.0707107, rel=1e-5)
