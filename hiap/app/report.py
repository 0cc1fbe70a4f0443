"""What a run leaves for people: report.md / report.json, the console summary table, and the plots (pruned structure
per layer, gate keep-probabilities and MACs over training, accuracy vs MACs)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from hiap.app.runtime import atomic_write_json, atomic_write_text

TOLERANCE = 0.02  # the issue's +-2% on the extracted MACs


# --------------------------------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def layer_structure(gated) -> list[dict]:
    """Per layer, what the hard decision keeps, indexed by the ORIGINAL head (0 = removed).

    Each entry: ``qk_widths [H]``, ``v_widths [H]``, ``heads_kept``, ``num_heads``, ``head_dim``, ``ffn_width``,
    ``ffn_dense``; a head with no v dims is removed with its q/k dims, as in ``hiap.extract``.
    """
    layers = []
    for index, (attn, mlp) in enumerate(zip(gated.attention_layers(), gated.ffn_layers())):
        qk_widths, v_widths = attn.gates.kept_widths()
        ffn_width = int(mlp.gates.kept_neurons().sum())
        heads_kept = sum(width > 0 for width in v_widths)
        layers.append({"layer": index, "qk_widths": qk_widths, "v_widths": v_widths, "heads_kept": heads_kept,
                       "num_heads": attn.num_heads, "head_dim": attn.head_dim, "ffn_width": ffn_width,
                       "ffn_dense": mlp.hidden_features})
    return layers


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
    """Expected and decided MACs (fractions of dense) over training, with the target and its +-2% band."""
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
        axis.axhspan(target * (1 - TOLERANCE), target * (1 + TOLERANCE), color="black", alpha=0.08, label="+-2%")
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


# --------------------------------------------------------------------------------------------------------------------
# Tables and reports
# --------------------------------------------------------------------------------------------------------------------

def _latency_ms(summary: dict) -> str:
    """Median ms per batch with the quartiles of the timed rounds, e.g. ``10.83 (10.61-11.05)``."""
    latency = summary.get("latency")
    if not latency:
        return "-"
    if "q1_ms" not in latency:  # reports written before the spread was measured
        return f"{latency['ms_per_batch']:.2f}"
    return f"{latency['ms_per_batch']:.2f} ({latency['q1_ms']:.2f}-{latency['q3_ms']:.2f})"


def latency_sentence(dense: dict, pruned: dict) -> str:
    """How latency was measured, and the pruned model's speedup over dense (ratio of medians)."""
    latency, base = pruned.get("latency"), dense.get("latency")
    if not latency or not base or "rounds" not in latency:
        return "Latency was not measured on this process."
    threads = latency["threads"]
    return (f"Latency: median (quartiles) of {latency['rounds']} timed forwards of a batch of {latency['batch']} per "
            f"model after {latency['warmup']} warm-up rounds, dense and pruned interleaved, on {latency['device']} "
            f"({threads} thread{'s' if threads != 1 else ''}{', torch.compile' if latency['compiled'] else ''}"
            f"{', synchronised around every forward' if latency['device'].startswith('cuda') else ''}); "
            f"pruned paths: {latency['paths']}. Pruned vs dense: "
            f"{base['ms_per_batch'] / latency['ms_per_batch']:.2f}x.")


def summary_table(outcome: dict) -> str:
    """Dense vs pruned: accuracy, MACs, params, latency, as a fixed-width text table."""
    dense, pruned = outcome["dense"], outcome["pruned"]
    batch = (dense.get("latency") or {}).get("batch", "?")
    rows = [("", "accuracy", "val loss", "MACs (M)", "of dense", "params (K)", f"latency ms/{batch} img (quartiles)")]
    for name, summary in (("dense", dense), ("pruned", pruned)):
        rows.append((name, f"{100 * summary['accuracy']:.2f}%", f"{summary['loss']:.4f}", f"{summary['macs'] / 1e6:.3f}",
                     f"{summary['macs'] / dense['macs']:.4f}", f"{summary['params'] / 1e3:.1f}", _latency_ms(summary)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    target = outcome.get("target")
    if target is not None:
        error = outcome["fraction"] / target - 1
        lines.append(f"target {target:.4f} of dense MACs; extracted {outcome['fraction']:.4f} ({100 * error:+.2f}%)")
    lines.append(f"accuracy change {100 * (pruned['accuracy'] - dense['accuracy']):+.2f} points")
    lines.append(latency_sentence(dense, pruned))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_prune_report(output: Path, outcome: dict, records: list[dict]) -> dict[str, Path]:
    """report.json, report.md and the plots of one HiAP run under ``output`` (plots in ``output/plots``)."""
    output = Path(output)
    plots_dir = output / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    dense, pruned = outcome["dense"], outcome["pruned"]
    plots = {"structure": plot_structure(outcome["structure"], plots_dir / "structure.png",
                                         f"pruned structure: {outcome['fraction']:.3f} of dense MACs"),
             "gates": plot_gate_probabilities(records, plots_dir / "gate_probabilities.png"),
             "macs": plot_macs(records, plots_dir / "macs.png", outcome.get("target")),
             "accuracy_vs_macs": plot_accuracy_vs_macs(
                 [{"method": "dense", "target": 1.0, **dense}, {"method": "hiap", "target": outcome.get("target"), **pruned}],
                 plots_dir / "accuracy_vs_macs.png")}
    plots = {k: v for k, v in plots.items() if v is not None}
    atomic_write_json({**outcome, "plots": {k: str(v.relative_to(output)) for k, v in plots.items()}},
                      output / "report.json")
    structure_rows = [[str(layer["layer"]), f"{layer['heads_kept']}/{layer['num_heads']}",
                       " ".join(str(w) for w in layer["qk_widths"]), " ".join(str(w) for w in layer["v_widths"]),
                       f"{layer['ffn_width']}/{layer['ffn_dense']}" + (" (removed)" if layer["ffn_width"] == 0 else "")]
                      for layer in outcome["structure"]]
    settings = outcome.get("settings", {})
    last = outcome["history"][-1] if outcome.get("history") else {}
    lines = [
        "# HiAP pruning report", "",
        f"Model `{outcome.get('model')}` on {outcome.get('data')}; {outcome['steps']} training steps, "
        f"{outcome.get('world_size', 1)} process(es), kernels: {outcome.get('kernels')}, threads: {outcome.get('threads')}.",
        "", "## Dense vs pruned", "", "```", summary_table(outcome), "```", "",
        _markdown_table(["model", "accuracy", "MACs", "params", "latency (ms/batch, quartiles)"],
                        [[name, f"{100 * s['accuracy']:.2f}%", f"{s['macs']:,}", f"{s['params']:,}", _latency_ms(s)]
                         for name, s in (("dense", dense), ("pruned", pruned))]),
        *_token_section(outcome),
        "", "## Pruned structure (per original head; 0 = removed)", "",
        _markdown_table(["layer", "heads kept", "q/k widths", "v widths", "FFN width"], structure_rows),
        "", "## Training", "",
        f"Final epoch: val accuracy {100 * last.get('val_accuracy', float('nan')):.2f}%, decided MACs "
        f"{last.get('decided_fraction', float('nan')):.4f}, expected {last.get('expected_fraction', float('nan')):.4f}, "
        f"tau {last.get('tau', float('nan')):.3f}.",
    ]
    if settings:
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings["hiap"].items())
        lines.append(f"HiAP config: `{config}`; {settings['epochs']} epochs of batch {settings['batch_size']}.")
    settling = outcome.get("settling")
    if settling and settling["steps"]:
        lines.append(f"Budget settling moved the decided MACs from {settling['before']:.4f} to {settling['after']:.4f} "
                     f"of dense in {settling['steps']} logit-only steps (weights untouched).")
    if outcome.get("resumed_from") is not None:
        lines.append(f"Resumed from step {outcome['resumed_from']}.")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path.relative_to(output)})" for name, path in plots.items()]
    atomic_write_text("\n".join(lines) + "\n", output / "report.md")
    return plots


def _token_section(outcome: dict) -> list[str]:
    """Report lines for ``--tokens``: fewer channels, fewer tokens and both, each against dense."""
    tokens = outcome.get("tokens")
    if not tokens:
        return []
    dense = outcome["dense"]
    rows = []
    for name, label in (("dense", "dense"), ("dense+tokens", "dense + tokens"), ("pruned", "pruned (channels)"),
                        ("pruned+tokens", "pruned + tokens (both)")):
        summary = outcome["dense"] if name == "dense" else outcome["pruned"] if name == "pruned" else \
            tokens.get(name.removesuffix("+tokens"))
        if summary is None:
            continue
        speedup = ""
        if summary.get("latency") and dense.get("latency"):
            speedup = f"{dense['latency']['ms_per_batch'] / summary['latency']['ms_per_batch']:.2f}x"
        rows.append([label, f"{100 * summary['accuracy']:.2f}%", f"{summary['macs']:,}",
                     f"{summary['macs'] / dense['macs']:.3f}", _latency_ms(summary), speedup])
    return ["", f"## Token reduction `{tokens['spec']}` (per block: {tokens['schedule']})", "",
            _markdown_table(["model", "accuracy", "MACs", "of dense", "latency (ms/batch, quartiles)",
                             "speedup vs dense"], rows)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate_runs(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation of accuracy, validation loss and MAC fraction per (method, target) over seeds."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["target"]), []).append(run)
    rows = []
    for (method, target), members in groups.items():
        accuracy, accuracy_std = _mean_std([m["pruned"]["accuracy"] for m in members])
        loss, loss_std = _mean_std([m["pruned"]["loss"] for m in members])
        fraction, _ = _mean_std([m["fraction"] for m in members])
        rows.append({"method": method, "target": target, "seeds": [m["seed"] for m in members],
                     "accuracy_mean": accuracy, "accuracy_std": accuracy_std, "loss_mean": loss, "loss_std": loss_std,
                     "fraction_mean": fraction,
                     "params_mean": statistics.mean(m["pruned"]["params"] for m in members)})
    return rows


def paired_differences(runs: list[dict]) -> list[dict]:
    """HiAP minus each baseline per target, paired by seed: mean accuracy and loss differences, seeds HiAP is at or
    above the baseline on. Empty when HiAP or every baseline is missing."""
    by_key = {(r["method"], r["target"], r["seed"]): r["pruned"] for r in runs}
    rows = []
    for method, target in dict.fromkeys((r["method"], r["target"]) for r in runs):
        if method == "hiap":
            continue
        seeds = [seed for (m, t, seed) in by_key if m == method and t == target and ("hiap", t, seed) in by_key]
        if not seeds:
            continue
        pairs = [(by_key[("hiap", target, seed)], by_key[(method, target, seed)]) for seed in seeds]
        rows.append({"baseline": method, "target": target, "seeds": seeds,
                     "accuracy_difference": statistics.mean(h["accuracy"] - b["accuracy"] for h, b in pairs),
                     "loss_difference": statistics.mean(h["loss"] - b["loss"] for h, b in pairs),
                     "hiap_at_or_above": sum(h["accuracy"] >= b["accuracy"] for h, b in pairs)})
    return rows


def _machine_sentence(machine: dict | None) -> str:
    if not machine:
        return ""
    threads = machine["threads"]
    return (f" Measured on {machine['name']} ({machine['device']}, {threads} thread{'s' if threads != 1 else ''}, "
            f"torch {machine['torch']}).")


def write_compare_report(output: Path, report: dict) -> Path:
    """compare.json, compare.md and plots/accuracy_vs_macs.png for ``hiap compare``."""
    output = Path(output)
    (output / "plots").mkdir(parents=True, exist_ok=True)
    aggregates = aggregate_runs(report["runs"])
    dense = report["dense"]
    points = [{"method": "dense", "target": 1.0, **dense}]
    points += [{"method": r["method"], "target": r["target"], **r["pruned"]} for r in report["runs"]]
    plot = plot_accuracy_vs_macs(points, output / "plots" / "accuracy_vs_macs.png",
                                 f"Accuracy vs MACs (seeds {report['seeds']})")
    paired = paired_differences(report["runs"])
    atomic_write_json({**report, "aggregates": aggregates, "paired": paired, "plot": str(plot.relative_to(output))},
                      output / "compare.json")
    rows = [[r["method"], f"{r['target']:.3f}", " ".join(map(str, r["seeds"])),
             f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f}",
             f"{r['loss_mean']:.4f} +- {r['loss_std']:.4f}", f"{r['fraction_mean']:.4f}",
             f"{r['params_mean'] / 1e3:.1f}"] for r in aggregates]
    runs = [[r["method"], f"{r['target']:.3f}", str(r["seed"]), f"{100 * r['pruned']['accuracy']:.2f}",
             f"{r['pruned']['loss']:.4f}", f"{r['fraction']:.4f}", _latency_ms(r["pruned"])] for r in report["runs"]]
    val_size = report.get("val_size")
    resolution = (f" One validation image is {100 / val_size:.2f} accuracy points; the validation loss (mean "
                  "cross-entropy) separates methods whose accuracies tie." if val_size else "")
    lines = ["# HiAP vs baselines at the same MAC budget", "",
             f"Model `{report['model']}` on {report['data']}; dense accuracy {100 * dense['accuracy']:.2f}% at "
             f"{dense['macs'] / 1e6:.3f} M MACs. Seeds: {report['seeds']}. Each baseline gets the same number of KD "
             f"training steps as the HiAP run.{resolution}{_machine_sentence(report.get('machine'))}", "",
             _markdown_table(["method", "target", "seeds", "accuracy % (mean +- std)", "val loss (mean +- std)",
                              "MACs / dense", "params (K)"], rows),
             "", "## HiAP against each baseline (paired by seed)", "",
             _markdown_table(["target", "baseline", "seeds", "accuracy difference (points, mean)",
                              "HiAP at or above on", "val loss difference (mean)"],
                             [[f"{r['target']:.3f}", r["baseline"], " ".join(map(str, r["seeds"])),
                               f"{100 * r['accuracy_difference']:+.2f}",
                               f"{r['hiap_at_or_above']} of {len(r['seeds'])} seeds", f"{r['loss_difference']:+.4f}"]
                              for r in paired]) if paired else "(HiAP or the baselines were not run.)",
             "", "## Every run", "",
             _markdown_table(["method", "target", "seed", "accuracy %", "val loss", "MACs / dense", "latency ms/batch"],
                             runs),
             "", f"![accuracy vs MACs]({plot.relative_to(output)})"]
    atomic_write_text("\n".join(lines) + "\n", output / "compare.md")
    return output / "compare.md"


def compare_table(report: dict) -> str:
    """Console table of ``hiap compare``: one line per (method, target), means over seeds."""
    rows = [("method", "target", "accuracy", "val loss", "MACs/dense", "seeds")]
    dense = report["dense"]
    rows.append(("dense", "-", f"{100 * dense['accuracy']:.2f}%", f"{dense['loss']:.4f}", "1.0000", "-"))
    for r in aggregate_runs(report["runs"]):
        rows.append((r["method"], f"{r['target']:.3f}", f"{100 * r['accuracy_mean']:.2f}% +- {100 * r['accuracy_std']:.2f}",
                     f"{r['loss_mean']:.4f} +- {r['loss_std']:.4f}", f"{r['fraction_mean']:.4f}",
                     ",".join(map(str, r["seeds"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)
