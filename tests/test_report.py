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


def test_accuracy_vs_macs_figure_draws_the_front_the_targets_and_an_axis_around_the_points():
    points = [{"method": "dense", "target": 1.0, "macs": 3e6, "accuracy": 0.978, "images": 360}]
    points += [{"method": m, "target": t, "macs": t * 3e6 * (1 + 0.01 * s), "accuracy": a + 0.003 * s, "images": 360}
               for m, a in (("hiap", 0.975), ("uniform", 0.972)) for t in (0.667, 0.5) for s in range(3)]
    figure = accuracy_vs_macs_figure(points, "test")
    axis = figure.axes[0]
    labels = [line.get_label() for line in axis.get_lines()]
    assert "Pareto front (means)" in labels and "MAC target" in labels
    target_lines = [line for line in axis.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in target_lines) == pytest.approx([1.5, 2.001])
    left, right = axis.get_xlim()
    assert 1.2 < left < 1.5 and 3.0 < right < 3.3  # the points' span, not from zero
    bottom, top = axis.get_ylim()
    assert top - bottom >= 5.0
    assert any("360 validation images" in text.get_text() for text in axis.texts)
    # Two points (dense and one pruned model) make no front.
    two = accuracy_vs_macs_figure(points[:2], "test").axes[0]
    assert "Pareto front (means)" not in [line.get_label() for line in two.get_lines()]


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


def test_the_structure_plot_has_one_titled_colorbar_and_no_empty_panels(monkeypatch):
    from hiap.app import plots

    structure = [{"layer": i, "num_heads": 2, "head_dim": 16, "qk_widths": [16, 8], "v_widths": [16, 0],
                  "ffn_dense": 64, "ffn_width": 32 * i, "heads_kept": 1} for i in range(2)]
    captured = _captured_figures(monkeypatch)
    plots.plot_structure(structure, Path(tempfile.mkdtemp()) / "structure.png")
    colorbars = [axis for axis in captured[0].axes if axis.get_label() == "<colorbar>"]
    # One bar for both maps, titled above it (a side label read as the next panel's axis label).
    assert len(colorbars) == 1 and colorbars[0].get_title() == "dims" and colorbars[0].get_ylabel() == ""
    whole = [{**layer, "qk_widths": [16, 16], "v_widths": [16, 16], "heads_kept": 2} for layer in structure]
    plots.plot_structure(whole, Path(tempfile.mkdtemp()) / "structure.png")
    axes = captured[1].axes
    assert len(axes) == 1 and "every head kept whole" in axes[0].get_title()


def test_the_gate_plot_shows_the_decision_line_the_fix_and_every_gate(monkeypatch):
    from hiap.app import plots

    captured = _captured_figures(monkeypatch)
    keep = {kind: [0.9, 0.4] for kind in ("head", "qk", "v", "ffn_block", "neuron")}
    records = [{"event": "step", "step": step, "keep_probability": keep} for step in (10, 20, 30)]
    records.append({"event": "fix_structure", "step": 20})
    gates = [{"head": [0.9, 0.2], "qk": [[0.9, 0.1], [0.6, 0.7]], "v": [[0.9, 0.9], [0.2, 0.3]], "block": [0.8],
              "neuron": [0.1, 0.9, 0.8]} for _ in range(2)]
    plots.plot_gate_probabilities(records, Path(tempfile.mkdtemp()) / "gates.png", gates)
    figure = captured[0]
    top = figure.axes[0]
    labels = top.get_legend_handles_labels()[1]
    assert "decision: kept above 0.5" in labels and "structure fixed" in labels
    assert len(figure.legends) == 1  # one legend for the figure, not one per panel
    titles = [axis.get_title() for axis in figure.axes]
    assert "each gate at the end: neurons" in titles and "each gate at the end: q/k dims" in titles


def test_training_curves_and_latency_with_its_spread_are_plotted(monkeypatch):
    from hiap.app import plots
    from hiap.app.report import speedup_sentence

    captured = _captured_figures(monkeypatch)
    records = [{"phase": "hiap", "event": "step", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    records += [{"phase": "hiap", "event": "epoch", "step": 3, "epoch": 1, "val_accuracy": 0.9}]
    assert plots.plot_training(records, Path(tempfile.mkdtemp()) / "training.png").is_file()
    assert captured[0].axes[1].get_ylabel() == "validation accuracy (%)"
    dense = {"ms_per_batch": 10.0, "q1_ms": 9.5, "q3_ms": 10.5, "min_ms": 9.0, "max_ms": 12.0, "batch": 8, "rounds": 5}
    close = {**dense, "ms_per_batch": 9.2, "q1_ms": 9.0, "q3_ms": 9.6}
    far = {**dense, "ms_per_batch": 5.0, "q1_ms": 4.9, "q3_ms": 5.1, "min_ms": 4.8, "max_ms": 5.5}
    assert plots.plot_latency({"dense": {"latency": dense}, "pruned": {"latency": far}},
                              Path(tempfile.mkdtemp()) / "latency.png").is_file()
    assert "within noise" in speedup_sentence(dense, close) and "1.09x" in speedup_sentence(dense, close)
    assert "within noise" not in speedup_sentence(dense, far) and "2.00x" in speedup_sentence(dense, far)


def test_the_macs_plot_marks_the_tolerance_and_the_step_where_the_structure_was_fixed(monkeypatch):
    from hiap.app import plots

    captured = _captured_figures(monkeypatch)
    records = [{"event": "step", "step": step, "expected_fraction": 1 - step / 100, "decided_fraction": 1.0}
               for step in (10, 20, 30, 40)]
    records.insert(3, {"event": "fix_structure", "step": 30, "before": 0.7, "after": 0.67})
    plots.plot_macs(records, Path(tempfile.mkdtemp()) / "budget.png", target=2 / 3)
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
