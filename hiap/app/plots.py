"""The plots a run leaves: pruned structure per layer, gate keep-probabilities and MACs over training, accuracy vs
MACs (with the Pareto front, the targets and an axis that does not turn one image into a cliff)."""

from __future__ import annotations

import statistics
from pathlib import Path

from hiap.method.budget import TOLERANCE
from hiap.method.pruner import FIX_EVENT


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, axes


def plot_structure(structure: list[dict], path: Path, title: str = "") -> Path:
    """Heat maps of the kept q/k and v width of every head (layers x heads) and bars of the FFN width per layer."""
    import numpy as np

    layers = len(structure)
    heads = max(layer["num_heads"] for layer in structure)
    head_dim = structure[0]["head_dim"]
    figure, axes = _figure(13, 1.2 + 0.45 * layers, 3)
    for axis, key, name in ((axes[0], "qk_widths", "q/k width per head"), (axes[1], "v_widths", "v width per head")):
        grid = np.full((layers, heads), np.nan)
        for row, layer in enumerate(structure):
            grid[row, : len(layer[key])] = layer[key]
        image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=head_dim, aspect="auto")
        for row in range(layers):
            for column in range(heads):
                value = grid[row, column]
                removed = structure[row]["v_widths"][column] == 0
                axis.text(column, row, "x" if removed else f"{int(value)}", ha="center", va="center",
                          color="red" if removed else ("white" if value < head_dim * 0.6 else "black"), fontsize=8)
        axis.set_title(f"{name} (of {head_dim}; x = head removed)")
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(heads))
        axis.set_yticks(range(layers))
        figure.colorbar(image, ax=axis, shrink=0.8, label=f"kept dims per head (of {head_dim})")
    axis = axes[2]
    rows = list(range(layers))
    axis.barh(rows, [layer["ffn_dense"] for layer in structure], color="#dddddd", label="dense")
    axis.barh(rows, [layer["ffn_width"] for layer in structure], color="#2a9d8f", label="kept")
    for row, layer in enumerate(structure):
        label = "FFN removed" if layer["ffn_width"] == 0 else f"{layer['ffn_width']}"
        axis.text(layer["ffn_dense"] * 0.02, row, label, va="center", color="red" if layer["ffn_width"] == 0 else "black",
                  fontsize=8)
        if layer["heads_kept"] == 0:
            axis.text(layer["ffn_dense"] * 0.98, row, "attention removed", va="center", ha="right", color="red",
                      fontsize=8)
    axis.invert_yaxis()
    axis.set_yticks(rows)
    axis.set_title("FFN width per layer")
    axis.set_xlabel("neurons")
    axis.legend(loc="lower right", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path


def plot_gate_probabilities(records: list[dict], path: Path) -> Path | None:
    """Mean keep probability sigmoid(a) of each gate kind, one line per layer, over the training steps."""
    from matplotlib import colormaps

    steps = [r for r in records if r.get("event") == "step" and "keep_probability" in r]
    if not steps:
        return None
    kinds = [("head", "heads"), ("qk", "q/k dims"), ("v", "v dims"), ("ffn_block", "FFN blocks"), ("neuron", "neurons")]
    figure, axes = _figure(16, 3.4, len(kinds))
    layers = len(steps[0]["keep_probability"]["head"])
    colours = colormaps["viridis"]
    x = [r["step"] for r in steps]
    for axis, (key, name) in zip(axes, kinds):
        for layer in range(layers):
            axis.plot(x, [r["keep_probability"][key][layer] for r in steps], color=colours(layer / max(1, layers - 1)),
                      label=f"layer {layer}")
        axis.set_title(f"P(keep): {name}")
        axis.set_xlabel("step")
        axis.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("mean sigmoid(logit)")
    axes[0].legend(fontsize=7, ncol=2 if layers > 6 else 1)
    figure.savefig(path, dpi=120)
    return path


def plot_macs(records: list[dict], path: Path, target: float | None) -> Path | None:
    """Expected and decided MACs (fractions of dense) over training, with the target, its tolerance band and the step
    where the structure was fixed."""
    steps = [r for r in records if r.get("event") == "step" and "decided_fraction" in r]
    if not steps:
        return None
    figure, axes = _figure(7, 4)
    axis = axes[0]
    x = [r["step"] for r in steps]
    axis.plot(x, [r["expected_fraction"] for r in steps], label="expected (sigmoid of logits)", color="#457b9d")
    axis.plot(x, [r["decided_fraction"] for r in steps], label="decided (what extraction keeps)", color="#e76f51")
    if target is not None:
        axis.axhline(target, color="black", linestyle="--", label=f"target {target:.3f}")
        axis.axhspan(target * (1 - TOLERANCE), target * (1 + TOLERANCE), color="black", alpha=0.08,
                     label=f"+-{100 * TOLERANCE:g}%")
    for event in records:
        if event.get("event") == FIX_EVENT:
            axis.axvline(event["step"], color="#2a9d8f", linestyle=":", label="structure fixed")
    axis.set_xlabel("step")
    axis.set_ylabel("MACs / dense MACs")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8)
    axis.set_title("MAC budget over training")
    figure.savefig(path, dpi=120)
    return path


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


def accuracy_vs_macs_figure(points: list[dict], title: str = "Accuracy vs MACs"):
    """The figure ``plot_accuracy_vs_macs`` saves (returned for inspection); see there."""
    figure, axes = _figure(7, 4.5)
    axis = axes[0]
    styles = {"dense": ("*", "black"), "hiap": ("o", "#e76f51"), "uniform": ("s", "#457b9d"), "l1": ("^", "#2a9d8f"),
              "torch-pruning": ("D", "#6d597a")}
    means = []
    dense_macs = max((p["macs"] for p in points if p["method"] == "dense"), default=max(p["macs"] for p in points))
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
    # The front holds from its last point to the right edge: nothing there does better.
    front = pareto_front(means)
    front.append((dense_macs / 1e6 * 1.08, front[-1][1]))
    axis.plot([f[0] for f in front], [f[1] for f in front], linestyle=":", color="gray", linewidth=2,
              drawstyle="steps-post", label="Pareto front (means)", zorder=1)
    targets = sorted({p["target"] for p in points if p["method"] != "dense" and p.get("target") is not None})
    for index, target in enumerate(targets):
        axis.axvline(target * dense_macs / 1e6, color="black", linestyle="--", linewidth=1, alpha=0.6,
                     label="MAC target" if index == 0 else None, zorder=0)
    images = max((p.get("images") or 0 for p in points), default=0) or None
    axis.set_ylim(*accuracy_axis_limits([100 * p["accuracy"] for p in points], images))
    axis.set_xlim(0, dense_macs / 1e6 * 1.08)
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
    joined across targets per method. The dotted steps are the Pareto front of those means (dense included), each
    dashed vertical line a MAC target. The x-axis starts at zero MACs; the y-axis spans at least 5 points and 20
    validation images, so one image's difference does not look like a cliff.
    """
    accuracy_vs_macs_figure(points, title).savefig(path, dpi=120)
    return path
