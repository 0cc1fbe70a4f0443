"""What a run leaves for people: report.md / report.json, compare.md / compare.json and the console summary tables;
the plots they embed are drawn by ``plots.py``."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from hiap.method.pruner import LAND_EVENT, RETIRE_EVENT
from hiap.app.plots import (
    plot_accuracy_vs_macs,
    plot_gate_probabilities,
    plot_latency,
    plot_macs,
    plot_structure,
    plot_training,
)
from hiap.app.run_folder import RunFolder
from hiap.app.runtime import atomic_write_json, atomic_write_text

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


def gate_probabilities(gated) -> list[dict]:
    """Per layer, every gate's keep probability sigmoid(a): ``{"head" [H], "qk" [H, G], "v" [H, G], "block" [1],
    "neuron" [F / G']}`` as lists (one device read per tensor; for the report)."""
    import torch

    layers = []
    with torch.no_grad():
        for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
            layer = {kind: torch.sigmoid(logit.float()).cpu().tolist() for kind, logit in attn.gates.logits().items()}
            layer.update({kind: torch.sigmoid(logit.float()).cpu().tolist()
                          for kind, logit in mlp.gates.logits().items()})
            layers.append(layer)
    return layers


def speedup_sentence(dense: dict, other: dict, name: str = "pruned") -> str:
    """``other``'s speed-up over ``dense`` by their medians, or "within noise" when their interquartile ranges
    overlap (the rounds cannot tell the two apart)."""
    ratio = dense["ms_per_batch"] / other["ms_per_batch"]
    overlap = other["q1_ms"] <= dense["q3_ms"] and dense["q1_ms"] <= other["q3_ms"]
    if overlap:
        return (f"{name.capitalize()} vs dense: {ratio:.2f}x by the medians, within noise (the interquartile ranges "
                "overlap).")
    return f"{name.capitalize()} vs dense: {ratio:.2f}x (interquartile ranges apart)."


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
            f"pruned paths: {latency['paths']}. " + speedup_sentence(base, latency))


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
    latency = outcome.get("latency")
    if latency:
        error = latency["predicted_ms"] / latency["target_ms"] - 1
        lines.append(f"target {target:.4f} of the dense latency in {latency['table']} ({latency['target_ms']:.3f} ms at "
                     f"batch {latency['batch']}); the table predicts {latency['predicted_ms']:.3f} ms for the "
                     f"extracted model ({100 * error:+.2f}%), measured {latency['measured_ms']:.3f} ms (quartiles "
                     f"{latency['measured_quartiles_ms'][0]:.3f}-{latency['measured_quartiles_ms'][1]:.3f}) against "
                     f"{latency['dense_ms']:.3f} ms dense")
    elif target is not None:
        error = outcome["fraction"] / target - 1
        lines.append(f"target {target:.4f} of dense MACs; extracted {outcome['fraction']:.4f} ({100 * error:+.2f}%)")
    lines.append(f"accuracy change {100 * (pruned['accuracy'] - dense['accuracy']):+.2f} points")
    lines.append(latency_sentence(dense, pruned))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_prune_report(folder: RunFolder, outcome: dict, records: list[dict]) -> dict[str, Path]:
    """report.json, report.md and the plots of one HiAP run in ``folder``."""
    output, plots_dir = folder.root, folder.plots
    plots_dir.mkdir(parents=True, exist_ok=True)
    dense, pruned = outcome["dense"], outcome["pruned"]
    unit = "latency" if outcome.get("latency") else "MACs"
    timed = {"dense": dense, "pruned": pruned, **{f"{name} + tokens": summary
                                                  for name, summary in (outcome.get("tokens") or {}).items()
                                                  if isinstance(summary, dict) and "latency" in summary}}
    plots = {"structure": plot_structure(outcome["structure"], plots_dir / "structure.png",
                                         f"pruned structure: {outcome['fraction']:.3f} of dense MACs"),
             "gates": plot_gate_probabilities(records, plots_dir / "gate_probabilities.png", outcome.get("gates")),
             "budget": plot_macs(records, plots_dir / "budget.png", outcome.get("target"), unit),
             "training": plot_training(records, plots_dir / "training.png"),
             "latency": plot_latency(timed, plots_dir / "latency.png"),
             "accuracy_vs_macs": plot_accuracy_vs_macs(
                 [{"method": "dense", "target": 1.0, **dense}, {"method": "hiap", "target": outcome.get("target"), **pruned}],
                 plots_dir / "accuracy_vs_macs.png")}
    plots = {k: v for k, v in plots.items() if v is not None}
    atomic_write_json({**outcome, "plots": {k: str(v.relative_to(output)) for k, v in plots.items()}},
                      folder.report_json)
    structure_rows = [[str(layer["layer"]), f"{layer['heads_kept']}/{layer['num_heads']}",
                       " ".join(str(w) for w in layer["qk_widths"]), " ".join(str(w) for w in layer["v_widths"]),
                       f"{layer['ffn_width']}/{layer['ffn_dense']}" + (" (removed)" if layer["ffn_width"] == 0 else "")]
                      for layer in outcome["structure"]]
    settings = outcome.get("settings", {})
    epochs = [record for record in outcome.get("history") or [] if record.get("event", "epoch") == "epoch"]
    last = epochs[-1] if epochs else {}
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
        _final_epoch_line(last, outcome.get("fixed_structure")),
    ]
    if settings:
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings["hiap"].items())
        lines.append(f"HiAP config: `{config}`; {settings['epochs']} epochs of batch {settings['batch_size']}.")
    lines += _landing_lines(outcome.get("history") or [])
    lines += _fixed_structure_lines(outcome.get("fixed_structure"))
    lines += _retirement_lines(outcome.get("history") or [])
    settling = outcome.get("settling")
    if settling and settling["steps"]:
        lines.append(f"Budget settling moved the decided MACs from {settling['before']:.4f} to {settling['after']:.4f} "
                     f"of dense in {settling['steps']} logit-only steps (weights untouched).")
    if outcome.get("resumed_from") is not None:
        lines.append(f"Resumed from step {outcome['resumed_from']}.")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path.relative_to(output)})" for name, path in plots.items()]
    atomic_write_text("\n".join(lines) + "\n", folder.report_md)
    return plots


def _final_epoch_line(last: dict, fixed: dict | None) -> str:
    """The last epoch's figures; once the structure is fixed the expected MACs (of logits that no longer learn) and
    the temperature (of gates no longer sampled) mean nothing, so they are left out."""
    line = (f"Final epoch: val accuracy {100 * last.get('val_accuracy', float('nan')):.2f}%, decided MACs "
            f"{last.get('decided_fraction', float('nan')):.4f}")
    if fixed:
        return line + f" (fixed since step {fixed['search_steps']})."
    return (line + f", expected {last.get('expected_fraction', float('nan')):.4f}, "
            f"tau {last.get('tau', float('nan')):.3f}.")


def _fixed_structure_lines(fixed: dict | None) -> list[str]:
    """What training reached on its own by the time the structure was fixed, and what settling added."""
    if not fixed:
        return []
    search, total = fixed["search_steps"], fixed["total_steps"]
    line = (f"The structure was fixed after {search} of {total} steps: the search had brought the decided MACs from "
            f"1.0000 to {fixed['before']:.4f} of dense")
    if fixed["steps"]:
        reduced = 1.0 - fixed["after"]
        share = abs(fixed["after"] - fixed["before"]) / reduced if reduced > 0 else 0.0
        line += (f", and budget settling moved them to {fixed['after']:.4f} in {fixed['steps']} logit-only steps "
                 f"({100 * share:.1f}% of the whole reduction; weights untouched)")
    elif fixed.get("target") is not None:
        line += f" ({100 * (fixed['after'] / fixed['target'] - 1):+.2f}% from the target; no settling needed)"
    return [line + f". The last {total - search} steps trained the weights of the decided network."]


def _landing_lines(history: list[dict]) -> list[str]:
    """What the landing did: where the search stood when it began, and how many gates its checks moved."""
    events = [record for record in history if record.get("event") == LAND_EVENT]
    if not events:
        return []
    first, closed, opened = events[0], sum(e["closed"] for e in events), sum(e["opened"] for e in events)
    return [f"Landing: at its first move (step {first['step']}) the decided MACs were {first['before']:.4f} of dense; "
            f"its checks closed {closed} and opened {opened} gates in logit order, the last move at step "
            f"{events[-1]['step']} (to {events[-1]['after']:.4f})."]


def _retirement_lines(history: list[dict]) -> list[str]:
    """When the search retired gates closed for good (``retire_below``): from which step, and how many at most."""
    events = [record for record in history if record.get("event") == RETIRE_EVENT]
    if not events:
        return []
    first = next((record for record in events if record["heads"] or record["neuron_groups"]), None)
    if first is None:
        return []
    heads = max(record["heads"] for record in events)
    groups = max(record["neuron_groups"] for record in events)
    return [f"Gates closed for good were left out of the search's steps from step {first['step']} on: at most "
            f"{heads} of {first['heads_total']} heads and {groups} of {first['neuron_groups_total']} neuron groups."]


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


# Accuracy gaps of at most this many validation images are level: neither a win nor a loss.
LEVEL_IMAGES = 2


def paired_differences(runs: list[dict], val_size: int | None = None) -> list[dict]:
    """HiAP minus each baseline per target, paired by seed: the per-seed and mean accuracy and loss differences, and
    HiAP's wins / ties / losses on accuracy, where a gap of at most ``LEVEL_IMAGES`` validation images (of
    ``val_size``; any gap when it is unknown) is level. Empty when HiAP or every baseline is missing."""
    by_key = {(r["method"], r["target"], r["seed"]): r["pruned"] for r in runs}
    level = LEVEL_IMAGES / val_size if val_size else 0.0
    rows = []
    for method, target in dict.fromkeys((r["method"], r["target"]) for r in runs):
        if method == "hiap":
            continue
        seeds = [seed for (m, t, seed) in by_key if m == method and t == target and ("hiap", t, seed) in by_key]
        if not seeds:
            continue
        pairs = [(by_key[("hiap", target, seed)], by_key[(method, target, seed)]) for seed in seeds]
        differences = [h["accuracy"] - b["accuracy"] for h, b in pairs]
        rows.append({"baseline": method, "target": target, "seeds": seeds,
                     "accuracy_differences": differences,
                     "accuracy_difference": statistics.mean(differences),
                     "loss_difference": statistics.mean(h["loss"] - b["loss"] for h, b in pairs),
                     "hiap_at_or_above": sum(d >= 0 for d in differences),
                     "wins": sum(d > level + 1e-12 for d in differences),
                     "ties": sum(abs(d) <= level + 1e-12 for d in differences),
                     "losses": sum(d < -level - 1e-12 for d in differences),
                     "lower_loss": sum(h["loss"] < b["loss"] for h, b in pairs)})
    return rows


def _at_fix(run: dict) -> str:
    """Where a HiAP run's search left the decided MACs at the structure fix, and how far settling moved them."""
    fixed = run.get("fixed_structure")
    if not fixed:
        return "-"
    return f"{fixed['before']:.4f} (settling {abs(fixed['after'] - fixed['before']):.4f})"


def _machine_sentence(machine: dict | None) -> str:
    if not machine:
        return ""
    threads = machine["threads"]
    return (f" Measured on {machine['name']} ({machine['device']}, {threads} thread{'s' if threads != 1 else ''}, "
            f"torch {machine['torch']}).")


def write_compare_report(folder: RunFolder, report: dict) -> Path:
    """compare.json, compare.md and plots/accuracy_vs_macs.png for ``hiap compare``."""
    output = folder.root
    folder.plots.mkdir(parents=True, exist_ok=True)
    aggregates = aggregate_runs(report["runs"])
    dense = report["dense"]
    points = [{"method": "dense", "target": 1.0, **dense}]
    points += [{"method": r["method"], "target": r["target"], **r["pruned"]} for r in report["runs"]]
    plot = plot_accuracy_vs_macs(points, folder.plots / "accuracy_vs_macs.png",
                                 f"Accuracy vs MACs (seeds {report['seeds']})")
    paired = paired_differences(report["runs"], report.get("val_size"))
    atomic_write_json({**report, "aggregates": aggregates, "paired": paired, "plot": str(plot.relative_to(output))},
                      folder.compare_json)
    rows = [[r["method"], f"{r['target']:.3f}", " ".join(map(str, r["seeds"])),
             f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f}",
             f"{r['loss_mean']:.4f} +- {r['loss_std']:.4f}", f"{r['fraction_mean']:.4f}",
             f"{r['params_mean'] / 1e3:.1f}"] for r in aggregates]
    runs = [[r["method"], f"{r['target']:.3f}", str(r["seed"]), f"{100 * r['pruned']['accuracy']:.2f}",
             f"{r['pruned']['loss']:.4f}", f"{r['fraction']:.4f}", _at_fix(r), _latency_ms(r["pruned"])]
            for r in report["runs"]]
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
             f"Wins / ties / losses on accuracy; a gap of at most {LEVEL_IMAGES} validation images is a tie. "
             "Lower loss: on how many seeds HiAP's validation loss is the lower one.", "",
             _markdown_table(["target", "baseline", "seeds", "HiAP - baseline per seed (points)", "mean",
                              "wins / ties / losses", "val loss difference (mean)", "lower loss"],
                             [[f"{r['target']:.3f}", r["baseline"], " ".join(map(str, r["seeds"])),
                               " ".join(f"{100 * d:+.2f}" for d in r["accuracy_differences"]),
                               f"{100 * r['accuracy_difference']:+.2f}", f"{r['wins']} / {r['ties']} / {r['losses']}",
                               f"{r['loss_difference']:+.4f}", f"{r['lower_loss']} of {len(r['seeds'])}"]
                              for r in paired]) if paired else "(HiAP or the baselines were not run.)",
             "", "## Every run", "",
             "For HiAP, *at the fix*: the decided MACs where the search left them when the structure was fixed, and how "
             "far (as a fraction of the dense MACs) settling moved them.", "",
             _markdown_table(["method", "target", "seed", "accuracy %", "val loss", "MACs / dense", "at the fix",
                              "latency ms/batch"], runs),
             "", f"![accuracy vs MACs]({plot.relative_to(output)})"]
    atomic_write_text("\n".join(lines) + "\n", folder.compare_md)
    return folder.compare_md


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
