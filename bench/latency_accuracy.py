"""A latency budget against a MAC budget at equal latency, paired over seeds, on MNIST-1D (or the digits).

    python bench/latency_accuracy.py [--target 0.6] [--seeds 0 1 2] [--batch 64] [--out FILE.json]

The table is this machine's (``hiap profile`` of the model at ``--batch`` images, one thread, as ``hiap prune``
measures latency). Per seed, one MAC-budget run at the MAC fraction whose uniform layout the table predicts at ``T`` of
the dense latency (what a user would ask for to get that latency without a table), then one ``hiap prune --budget
latency`` run whose target is the latency the table predicts for that MAC-searched model: the two at equal predicted
latency. Both report accuracy, validation loss, the table's prediction and the latency measured against the dense
teacher in interleaved rounds. The teacher is trained (or taken from the cache) as ``hiap prune``
trains it; every run of a seed uses it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from hiap.method.latency import LatencyTable
from hiap.method.profile import device_name


def prune(args: argparse.Namespace, output: Path, seed: int, extra: list[str]) -> dict:
    done_before = output / "report.json"
    if args.reuse and done_before.exists():
        report = json.loads(done_before.read_text())
        if f"{report['target']:.4f}" == extra[extra.index("--target") + 1]:
            return report
    command = [sys.executable, "-m", "hiap.app.cli", "prune", "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--seed", str(seed), "--cache-dir", str(args.cache_dir),
               "--latency-batch", str(args.batch), "--latency-repeats", str(args.rounds), "--threads", "1",
               "--no-progress", "--overwrite", "-o", str(output), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads((output / "report.json").read_text())


def row(report: dict, table: LatencyTable) -> dict:
    from hiap.method.extract import load_pruned

    pruned, dense = report["pruned"], report["dense"]
    model = load_pruned(Path(report["output"]) / "pruned.safetensors")
    return {"accuracy": pruned["accuracy"], "loss": pruned["loss"], "macs_fraction": report["fraction"],
            "predicted_fraction": table.predict(model) / table.dense_predicted_ms,
            "measured_ms": pruned["latency"]["ms_per_batch"], "dense_ms": dense["latency"]["ms_per_batch"],
            "measured_fraction": pruned["latency"]["ms_per_batch"] / dense["latency"]["ms_per_batch"],
            "quartiles_ms": [pruned["latency"]["q1_ms"], pruned["latency"]["q3_ms"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--model", default="mnist1d_vit")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/hiap").expanduser())
    parser.add_argument("--work", type=Path, default=Path("hiap-runs/latency-accuracy"))
    parser.add_argument("--reuse", action="store_true",
                        help="take a run's report from --work where one exists with the same target")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    table_path = args.work / f"{args.model}_b{args.batch}.json"
    profiled = subprocess.run([sys.executable, "-m", "hiap.app.cli", "profile", "--model", args.model, "--data",
                               args.data, "--batch-size", str(args.batch), "--threads", "1", "--no-progress", "-o",
                               str(table_path)], capture_output=True, text=True)
    if profiled.returncode:
        raise SystemExit(profiled.stderr)
    table = LatencyTable.load(table_path)
    mac_target = table.uniform_width(args.target)  # a uniform cut's width fraction: about its MAC fraction
    rows = []
    for seed in args.seeds:
        # The MAC-budget run first; the latency-budget run of the same seed then aims at the latency the table
        # predicts for the MAC-searched model, so the two are compared at equal latency.
        runs = {}
        report = prune(args, args.work / f"mac-s{seed}", seed, ["--target", f"{mac_target:.4f}"])
        report["output"] = str(args.work / f"mac-s{seed}")
        runs["MAC budget"] = row(report, table)
        latency_target = runs["MAC budget"]["predicted_fraction"]
        report = prune(args, args.work / f"latency-s{seed}", seed,
                       ["--budget", "latency", "--latency-table", str(table_path), "--target", f"{latency_target:.4f}"])
        report["output"] = str(args.work / f"latency-s{seed}")
        runs["latency budget"] = row(report, table)
        rows.append({"seed": seed, "latency_target": latency_target, **runs})
    difference = [r["latency budget"]["accuracy"] - r["MAC budget"]["accuracy"] for r in rows]
    summary = {name: {key: statistics.mean(r[name][key] for r in rows)
                      for key in ("accuracy", "loss", "macs_fraction", "predicted_fraction", "measured_fraction")}
               for name in ("latency budget", "MAC budget")}
    record = {"device": device_name("cpu"), "torch": torch.__version__, "data": args.data, "model": args.model,
              "target": args.target, "mac_target": mac_target, "table": str(table_path), "batch": args.batch,
              "epochs": args.epochs, "seeds": args.seeds, "rows": rows, "summary": summary,
              "accuracy_differences": difference,
              "latency_budget_at_or_above": sum(d >= 0 for d in difference)}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out = args.out or Path("bench/results/latency") / f"{args.model}_latency_vs_macs_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print("accuracy differences (latency - MAC budget):", [round(100 * d, 2) for d in difference])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
