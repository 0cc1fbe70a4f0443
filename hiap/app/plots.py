"""The plots a run leaves, each showing a decision: the pruned structure, every gate's keep probability against the
0.5 decision line, the budget over training, the training curves, the latency with its spread, and accuracy against
MACs (a front only where several points make one)."""

from __future__ import annotations

import statistics
from pathlib import Path

from hiap.files import atomic_path
from hiap.method.budget import TOLERANCE
from hiap.method.pruner import FIX_EVENT, LAND_EVENT

# Colours kept across the plots: decided / kept, expected, dense, removed.
KEPT, EXPECTED, DENSE, REMOVED, FIXED = "#2a9d8f", "#457b9d", "#bbbbbb", "#e63946", "#6d597a"


def _figure(width: float, height: float, rows: int = 1, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _save(figure, path: Path) -> Path:
    """Write the PNG atomically: a reader (or a full disk) never leaves half a file under ``path``."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    return path


def _fix_step(records: list[dict]) -> int | None:
    return next((r["step"] for r in records if r.get("event") == FIX_EVENT), None)


def _mark_fix(axis, step: int | None, label: bool = True) -> None:
    if step is not None:
        axis.axvline(step, color=FIXED, linestyle=":", linewidth=1.5, label="structure fixed" if label else None)


def plot_structure(structure: list[dict], path: Path, title: str = "") -> Path:
    """What extraction keeps: the q/k and v width of every head (layers x heads, x = head removed) when attention was
    pruned at all, and the FFN width per layer."""
    import numpy as np

    layers = len(structure)
    heads = max(layer["num_heads"] for layer in structure)
    head_dim = structure[0]["head_dim"]
    attention_pruned = any(w < head_dim for layer in structure for w in (*layer["qk_widths"], *layer["v_widths"]))
    figure, axes = _figure(13 if attention_pruned else 6, 1.4 + 0.45 * layers, 1, 3 if attention_pruned else 1)
    axes = axes[0]
    if attention_pruned:
        image = None
        for axis, key, name in ((axes[0], "qk_widths", "q/k width"), (axes[1], "v_widths", "v width")):
            grid = np.full((layers, heads), np.nan)
            for row, layer in enumerate(structure):
                grid[row, : len(layer[key])] = layer[key]
            image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=head_dim, aspect="auto")
            for row in range(layers):
                for column in range(heads):
                    removed = structure[row]["v_widths"][column] == 0
                    value = grid[row, column]
                    axis.text(column, row, "x" if removed else f"{int(value)}", ha="center", va="center",
                              color=REMOVED if removed else ("white" if value < head_dim * 0.6 else "black"),
                              fontsize=8)
            axis.set_title(f"{name} per head (of {head_dim}; x = removed)")
            axis.set_xlabel("head")
            axis.set_ylabel("layer")
            axis.set_xticks(range(heads))
            axis.set_yticks(range(layers))
        colourbar = figure.colorbar(image, ax=axes[:2], shrink=0.8, location="right")
        colourbar.ax.set_title("dims", fontsize=8)
    axis = axes[-1]
    rows = list(range(layers))
    axis.barh(rows, [layer["ffn_dense"] for layer in structure], color=DENSE, label="dense")
    axis.barh(rows, [layer["ffn_width"] for layer in structure], color=KEPT, label="kept")
    for row, layer in enumerate(structure):
        label = "FFN removed" if layer["ffn_width"] == 0 else f"{layer['ffn_width']}"
        axis.text(layer["ffn_dense"] * 0.02, row, label, va="center",
                  color=REMOVED if layer["ffn_width"] == 0 else "black", fontsize=8)
        if layer["heads_kept"] == 0:
            axis.text(layer["ffn_dense"] * 0.98, row, "attention removed", va="center", ha="right", color=REMOVED,
                      fontsize=8)
    axis.invert_yaxis()
    axis.set_yticks(rows)
    axis.set_ylabel("layer")
    axis.set_title("FFN width per layer" + ("" if attention_pruned else " (attention: every head kept whole)"))
    axis.set_xlabel("neurons")
    axis.legend(loc="lower right", fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_gate_probabilities(records: list[dict], path: Path, gates: list[dict] | None = None) -> Path | None:
    """Top: the mean keep probability sigmoid(a) of each gate kind per layer over the steps, against the 0.5 line
    above which the decision keeps a gate, with the step the structure was fixed. Bottom (``gates``: per layer the
    final probabilities of every gate, ``{"head", "qk", "v", "block", "neuron"}``): each gate's own probability at
    the end, so one sees which units were kept, not only their mean."""
    from matplotlib import colormaps

    steps = [r for r in records if r.get("event") == "step" and "keep_probability" in r]
    if not steps:
        return None
    kinds = [("head", "heads"), ("qk", "q/k dims"), ("v", "v dims"), ("ffn_block", "FFN blocks"), ("neuron", "neurons")]
    figure, axes = _figure(16, 6.8 if gates else 3.6, 2 if gates else 1, len(kinds))
    layers = len(steps[0]["keep_probability"]["head"])
    colours = colormaps["viridis"]
    x = [r["step"] for r in steps]
    fixed = _fix_step(records)
    for column, (axis, (key, name)) in enumerate(zip(axes[0], kinds)):
        for layer in range(layers):
            axis.plot(x, [r["keep_probability"][key][layer] for r in steps], color=colours(layer / max(1, layers - 1)),
                      label=f"layer {layer}")
        axis.axhline(0.5, color="black", linestyle="--", linewidth=1, label="decision: kept above 0.5")
        _mark_fix(axis, fixed)
        axis.set_title(f"mean P(keep): {name}")
        axis.set_xlabel("step")
        axis.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("mean sigmoid(logit)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=7)
    if gates:
        import numpy as np

        for axis, (key, name) in zip(axes[1], kinds):
            source = {"ffn_block": "block"}.get(key, key)
            rows = [np.ravel(np.asarray(layer[source], dtype=float)) for layer in gates]
            width = max(len(row) for row in rows)
            grid = np.full((len(rows), width), np.nan)
            for index, row in enumerate(rows):
                grid[index, : len(row)] = row
            image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            axis.set_title(f"each gate at the end: {name}")
            axis.set_xlabel("gate (head-major)" if key in ("qk", "v") else "gate")
            axis.set_yticks(range(len(rows)))
        axes[1][0].set_ylabel("layer")
        colourbar = figure.colorbar(image, ax=axes[1].tolist(), shrink=0.8)
        colourbar.ax.set_title("P(keep)", fontsize=8)
        colourbar.ax.axhline(0.5, color="black", linewidth=1)
    return _save(figure, path)


def plot_macs(records: list[dict], path: Path, target: float | None, unit: str = "MACs") -> Path | None:
    """Expected and decided cost (fractions of dense: MACs, or latency for a latency budget) over training, with the
    target, its tolerance band, the landing's moves and the step where the structure was fixed."""
    steps = [r for r in records if r.get("event") == "step" and "decided_fraction" in r]
    if not steps:
        return None
    figure, axes = _figure(7, 4)
    axis = axes[0][0]
    x = [r["step"] for r in steps]
    axis.plot(x, [r["expected_fraction"] for r in steps], label="expected (sigmoid of logits)", color=EXPECTED)
    axis.plot(x, [r["decided_fraction"] for r in steps], label="decided (what extraction keeps)", color="#e76f51")
    if target is not None:
        axis.axhline(target, color="black", linestyle="--", label=f"target {target:.3f}")
        axis.axhspan(target * (1 - TOLERANCE), target * (1 + TOLERANCE), color="black", alpha=0.08,
                     label=f"+-{100 * TOLERANCE:g}%")
    landings = [r for r in records if r.get("event") == LAND_EVENT]
    if landings:
        axis.scatter([r["step"] for r in landings], [r["after"] for r in landings], marker="v", color="black", s=18,
                     zorder=3, label="landing moves")
    _mark_fix(axis, _fix_step(records))
    axis.set_xlabel("step")
    axis.set_ylabel(f"{unit} / dense")
    low = min(min(r["decided_fraction"] for r in steps), min(r["expected_fraction"] for r in steps), target or 1.0)
    axis.set_ylim(max(0.0, low - 0.1), 1.05)
    axis.legend(fontsize=8)
    axis.set_title(f"{unit} budget over training")
    return _save(figure, path)


def plot_training(records: list[dict], path: Path) -> Path | None:
    """The training loss of the logged steps and the validation accuracy of every epoch, per phase of the run."""
    steps = [r for r in records if r.get("event") == "step" and "loss" in r]
    epochs = [r for r in records if r.get("event") == "epoch" and "val_accuracy" in r]
    if not steps and not epochs:
        return None
    figure, axes = _figure(11, 3.6, 1, 2)
    loss_axis, accuracy_axis = axes[0]
    for phase in dict.fromkeys(r.get("phase") for r in steps + epochs):
        mine = [r for r in steps if r.get("phase") == phase]
        if mine:
            loss_axis.plot([r["step"] for r in mine], [r["loss"] for r in mine], label=phase, linewidth=1)
        mine = [r for r in epochs if r.get("phase") == phase]
        if mine:
            accuracy_axis.plot([r["epoch"] for r in mine], [100 * r["val_accuracy"] for r in mine], marker="o",
                               label=phase)
    _mark_fix(loss_axis, _fix_step(records))
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss (logged steps)")
    loss_axis.legend(fontsize=8)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("validation accuracy (%)")
    accuracy_axis.legend(fontsize=8)
    accuracy_axis.grid(alpha=0.3)
    figure.suptitle("Training")
    return _save(figure, path)


def plot_latency(summaries: dict[str, dict], path: Path) -> Path | None:
    """Every model's latency: the median of its timed rounds with the interquartile range as the box and the fastest
    and slowest round as whiskers; ranges that overlap mean the difference is within noise."""
    rows = [(name, s["latency"]) for name, s in summaries.items() if s and s.get("latency")]
    if not rows:
        return None
    figure, axes = _figure(7, 1.2 + 0.5 * len(rows))
    axis = axes[0][0]
    for index, (name, latency) in enumerate(rows):
        colour = DENSE if name.startswith("dense") else KEPT
        axis.plot([latency["min_ms"], latency["max_ms"]], [index, index], color="black", linewidth=1)
        axis.barh(index, latency["q3_ms"] - latency["q1_ms"], left=latency["q1_ms"], height=0.5, color=colour,
                  edgecolor="black")
        axis.plot([latency["ms_per_batch"]] * 2, [index - 0.25, index + 0.25], color="black", linewidth=2)
        axis.text(latency["max_ms"], index, f"  {latency['ms_per_batch']:.2f} ms", va="center", fontsize=8)
    batch, rounds = rows[0][1]["batch"], rows[0][1]["rounds"]
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([name for name, _ in rows])
    axis.invert_yaxis()
    axis.set_xlabel(f"ms per batch of {batch} (median, quartiles, extremes of {rounds} interleaved rounds)")
    axis.set_title("Latency")
    axis.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (macs, accuracy) points no other point beats on both (fewer or equal MACs and higher accuracy), by MACs."""
    front = []
    for macs, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((macs, accuracy))
    return front


def accuracy_axis_limits(accuracies: list[float], images: int | None, min_span: float = 5.0) -> tuple[float, float]:
    """An honest y-range (percentage points) for ``accuracies`` in %: at least ``min_span`` points and at least 20
    validation images wide, so that a difference of one image never fills the axis; clipped to [0, 100]."""
    low, high = min(accuracies), max(accuracies)
    image_points = 100.0 / images if images else 0.0
    span = max(min_span, 20 * image_points, (high - low) * 1.25)
    centre = (low + high) / 2
    bottom, top = centre - span / 2, centre + span / 2
    if top > 100.0:
        bottom, top = bottom - (top - 100.0), 100.0
    if bottom < 0.0:
        bottom, top = 0.0, min(100.0, top - bottom)
    return bottom, top


# Fewer mean points than this (dense included) make no front worth drawing.
MIN_FRONT_POINTS = 4


def accuracy_vs_macs_figure(points: list[dict], title: str = "Accuracy vs MACs"):
    """The figure ``plot_accuracy_vs_macs`` saves (returned for inspection); see there."""
    figure, axes = _figure(7, 4.5)
    axis = axes[0][0]
    styles = {"dense": ("*", "black"), "hiap": ("o", "#e76f51"), "uniform": ("s", EXPECTED), "l1": ("^", KEPT),
              "torch-pruning": ("D", FIXED)}
    means = []
    for method in dict.fromkeys(p["method"] for p in points):
        marker, colour = styles.get(method, ("D", "gray"))
        mine = [p for p in points if p["method"] == method]
        axis.scatter([p["macs"] / 1e6 for p in mine], [100 * p["accuracy"] for p in mine], marker=marker,
                     color=colour, s=25, alpha=0.35, zorder=2)
        by_target: dict = {}
        for p in mine:
            by_target.setdefault(p.get("target"), []).append(p)
        rows = []
        for members in by_target.values():
            accuracy = [100 * p["accuracy"] for p in members]
            rows.append((statistics.mean(p["macs"] / 1e6 for p in members), statistics.mean(accuracy),
                         statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0, len(members)))
        rows.sort()
        label = method if rows[0][3] == 1 else f"{method} (mean +- std of {rows[0][3]})"
        axis.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], marker=marker,
                      color=colour, markersize=12 if method == "dense" else 8, capsize=4,
                      linestyle="-" if len(rows) > 1 else "none", label=label, zorder=3)
        means += [(r[0], r[1]) for r in rows]
    macs = [p["macs"] / 1e6 for p in points]
    if len(means) >= MIN_FRONT_POINTS:
        front = pareto_front(means)
        axis.plot([f[0] for f in front], [f[1] for f in front], linestyle=":", color="gray", linewidth=2,
                  drawstyle="steps-post", label="Pareto front (means)", zorder=1)
    dense_macs = max((p["macs"] for p in points if p["method"] == "dense"), default=max(p["macs"] for p in points))
    targets = sorted({p["target"] for p in points if p["method"] != "dense" and p.get("target") is not None})
    for index, target in enumerate(targets):
        axis.axvline(target * dense_macs / 1e6, color="black", linestyle="--", linewidth=1, alpha=0.6,
                     label="MAC target" if index == 0 else None, zorder=0)
    images = max((p.get("images") or 0 for p in points), default=0) or None
    axis.set_ylim(*accuracy_axis_limits([100 * p["accuracy"] for p in points], images))
    span = max(macs) - min(macs) or max(macs)
    axis.set_xlim(min(macs) - 0.08 * span, max(macs) + 0.08 * span)
    axis.set_xlabel("MACs per image (M)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(title)
    if images:
        axis.annotate(f"1 image = {100 / images:.2f} points ({images} validation images)", xy=(0.01, 0.01),
                      xycoords="axes fraction", fontsize=8, color="dimgray")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return figure


def plot_accuracy_vs_macs(points: list[dict], path: Path, title: str = "Accuracy vs MACs") -> Path:
    """Accuracy against MACs of ``{"method", "target", "macs", "accuracy"[, "images"]}`` points.

    Every run is a faint dot; the mean over the runs of one (method, target) is a large marker with a +-1 std bar,
    joined across targets per method. The dotted steps are the Pareto front of those means (dense included), drawn
    only from ``MIN_FRONT_POINTS`` means on; each dashed vertical line is a MAC target. The x-axis spans the points;
    the y-axis at least 5 points and 20 validation images, so one image's difference does not look like a cliff.
    """
    return _save(accuracy_vs_macs_figure(points, title), path)
