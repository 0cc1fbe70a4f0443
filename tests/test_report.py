import tempfile
from pathlib import Path

import pytest

from hiap.app.plots import accuracy_axis_limits, accuracy_vs_macs_figure
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
    # Wins, ties and losses: only equal accuracies tie when the validation size is unknown; with 100 images a gap of
    # up to two images (0.02) is level.
    assert (rows["uniform"]["wins"], rows["uniform"]["ties"], rows["uniform"]["losses"]) == (1, 1, 0)
    assert rows["uniform"]["lower_loss"] == 2
    graded = {row["baseline"]: row for row in paired_differences(runs, val_size=100)}
    assert (graded["uniform"]["wins"], graded["uniform"]["ties"], graded["uniform"]["losses"]) == (0, 2, 0)
    graded = {row["baseline"]: row for row in paired_differences(runs, val_size=1000)}
    assert (graded["uniform"]["wins"], graded["uniform"]["ties"], graded["uniform"]["losses"]) == (1, 1, 0)
    assert (graded["l1"]["wins"], graded["l1"]["ties"], graded["l1"]["losses"]) == (0, 0, 1)
    assert graded["uniform"]["accuracy_differences"] == pytest.approx([0.02, 0.0])


def test_aggregates_give_mean_and_spread_of_accuracy_and_loss_per_method():
    rows = aggregate_runs([_run("hiap", 0, 0.90, 0.30), _run("hiap", 1, 0.92, 0.20)])
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.91) and rows[0]["loss_mean"] == pytest.approx(0.25)
    assert rows[0]["loss_std"] == pytest.approx(0.0707107, rel=1e-5)


def test_accuracy_axis_never_lets_one_image_fill_the_plot():
    # 360 images: one image is 0.28 points; two methods one image apart must not span the axis.
    bottom, top = accuracy_axis_limits([97.78, 97.50], images=360)
    assert top - bottom >= 5.0 and top <= 100.0 and bottom <= 97.50 and top >= 97.78
    # 40 images: 20 images are 50 points.
    bottom, top = accuracy_axis_limits([90.0, 92.5], images=40)
    assert top - bottom >= 50.0 and 0.0 <= bottom and top <= 100.0
    # A wide spread keeps every point inside.
    bottom, top = accuracy_axis_limits([20.0, 99.0], images=None)
    assert bottom <= 20.0 and top >= 99.0


def test_accuracy_vs_macs_figure_draws_the_front_the_targets_and_an_axis_from_zero():
    points = [{"method": "dense", "target": 1.0, "macs": 3e6, "accuracy": 0.978, "images": 360}]
    points += [{"method": m, "target": t, "macs": t * 3e6 * (1 + 0.01 * s), "accuracy": a + 0.003 * s, "images": 360}
               for m, a in (("hiap", 0.975), ("uniform", 0.972)) for t in (0.667, 0.5) for s in range(3)]
    figure = accuracy_vs_macs_figure(points, "test")
    axis = figure.axes[0]
    labels = [line.get_label() for line in axis.get_lines()]
    assert "Pareto front (means)" in labels and "MAC target" in labels
    target_lines = [line for line in axis.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in target_lines) == pytest.approx([1.5, 2.001])
    assert axis.get_xlim()[0] == 0.0
    bottom, top = axis.get_ylim()
    assert top - bottom >= 5.0
    assert any("360 validation images" in text.get_text() for text in axis.texts)


def _captured_figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions make from now on (their files are written as usual)."""
    import matplotlib

    matplotlib.use("Agg")
    from hiap.app import plots

    captured = []
    original = plots._figure

    def spy(*args, **kwargs):
        figure, axes = original(*args, **kwargs)
        captured.append(figure)
        return figure, axes

    monkeypatch.setattr(plots, "_figure", spy)
    return captured


def test_structure_colorbars_are_labelled(monkeypatch):
    from hiap.app import plots

    structure = [{"layer": i, "num_heads": 2, "head_dim": 16, "qk_widths": [16, 8], "v_widths": [16, 0],
                  "ffn_dense": 64, "ffn_width": 32 * i, "heads_kept": 1} for i in range(2)]
    captured = _captured_figures(monkeypatch)
    plots.plot_structure(structure, Path(tempfile.mkdtemp()) / "structure.png")
    colorbar_labels = [axis.get_ylabel() for axis in captured[0].axes if axis.get_label() == "<colorbar>"]
    assert colorbar_labels == ["kept dims per head (of 16)"] * 2


def test_the_macs_plot_marks_the_tolerance_and_the_step_where_the_structure_was_fixed(monkeypatch):
    from hiap.app import plots

    captured = _captured_figures(monkeypatch)
    records = [{"event": "step", "step": step, "expected_fraction": 1 - step / 100, "decided_fraction": 1.0}
               for step in (10, 20, 30, 40)]
    records.insert(3, {"event": "fix_structure", "step": 30, "before": 0.7, "after": 0.67})
    plots.plot_macs(records, Path(tempfile.mkdtemp()) / "macs.png", target=2 / 3)
    labels = captured[0].axes[0].get_legend_handles_labels()[1]
    assert "structure fixed" in labels and "+-1%" in labels
    fixed = [line for line in captured[0].axes[0].get_lines() if line.get_label() == "structure fixed"]
    assert list(fixed[0].get_xdata()) == [30, 30]


def test_the_report_says_from_when_and_how_many_gates_were_retired():
    from hiap.app.report import _retirement_lines

    totals = {"heads_total": 16, "neuron_groups_total": 64}
    history = [{"event": "epoch", "step": 22},
               {"event": "retire", "step": 150, "heads": 0, "neuron_groups": 32, **totals},
               {"event": "retire", "step": 200, "heads": 1, "neuron_groups": 48, **totals},
               {"event": "retire", "step": 250, "heads": 0, "neuron_groups": 40, **totals}]
    assert _retirement_lines(history) == [
        "Gates closed for good were left out of the search's steps from step 150 on: at most 1 of 16 heads and 48 of "
        "64 neuron groups."]
    assert _retirement_lines(history[:1]) == []
