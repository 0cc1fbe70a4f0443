"""ONNX Runtime on this CPU: the extracted DeiT-S against dense timm DeiT-S and a regular timm ViT of the same MACs.

    python bench/onnx_speed.py [--batches 1 16] [--rounds 40 12] [--threads 1] [--note TEXT] [--out FILE.json]

Models (random weights: time depends on shapes, not values): dense timm DeiT-S; the extracted DeiT-S of the default
layout at 2/3 of the MACs (``_workloads.extracted_deit_s``) written by ``hiap export``'s ``export_onnx`` (one batched
attention per run of equal-width heads), also as ``torch.onnx.export`` traces it straight from PyTorch (one SDPA per
run, the CPU padding and the dynamic-shape arithmetic included), and padded to one head width in multiples of 16
(``--pad-heads 16 --equal-head-widths``); a regular timm DeiT-S with narrower FFNs at the same MACs
(``_workloads.regular_deit_s_at``). Every file has opset 17 and a dynamic batch.

Per batch size, one InferenceSession per model (``--threads`` intra-op threads, one inter-op thread, all graph
optimisations), warmed up, then timed in paired rounds: each round runs every model once, the order rotating from
round to round, so a slow stretch of a shared machine hits all of them alike. Reported: each model's median and
interquartile range (ms), and per round the ratios dense / model and regular / extracted, as medians with their
interquartile ranges (a ratio whose range holds 1 is within noise). Then ONNX Runtime's profiler (per op type) on the
extracted and the regular model, and PyTorch eager at batch 1 (``hiap.optimize`` on the CPU: SDPA per run) in the same
kind of rounds. The record (JSON, and a Markdown twin) names the CPU, the versions, the date and ``--note``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import IMAGE_SIZE, dense_deit_s, extracted_deit_s, regular_deit_s_at  # noqa: E402

import hiap  # noqa: E402
from hiap.app.export import export_onnx  # noqa: E402
from hiap.method.profile import device_name  # noqa: E402

OPSET = 17
DENSE, EXTRACTED, TRACED, PADDED, REGULAR = ("dense", "extracted", "extracted, traced as PyTorch runs it",
                                             "extracted, padded to one width in 16s", "regular")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summary(values: list[float]) -> dict:
    q1, median, q3 = quartiles(values)
    return {"median": median, "q1": q1, "q3": q3}


def traced_export(model: torch.nn.Module, path: Path) -> None:
    """``torch.onnx.export`` of the model as PyTorch runs it (no grouping): what a user gets without ``hiap export``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def build_files(folder: Path) -> tuple[dict[str, Path], dict[str, torch.nn.Module], dict]:
    """The ONNX file of every model, the PyTorch models, and per model its nodes, MACs and export check."""
    dense, extracted = dense_deit_s(), extracted_deit_s()
    regular = regular_deit_s_at(hiap.count_macs(extracted))
    models = {DENSE: dense, EXTRACTED: extracted, TRACED: extracted, PADDED: extracted, REGULAR: regular}
    files, facts = {}, {}
    for name, model in models.items():
        path = folder / f"{len(files)}.onnx"
        check = None
        if name == TRACED:
            traced_export(model, path)
        else:
            padding = dict(pad_heads=16, equal_widths=True) if name == PADDED else {}
            check = export_onnx(model, path, opset=OPSET, **padding)
        files[name] = path
        if name in (DENSE, REGULAR):  # timm's Attention: one batched attention per layer
            calls = len(model.blocks)
        elif name == TRACED:  # one SDPA per run, as PyTorch runs it
            calls = sum(len(block.attn.runs) for block in model.blocks)
        else:
            calls = check.attention_calls
        facts[name] = {"nodes": len(onnx.load(str(path)).graph.node), "macs": hiap.count_macs(model),
                       "attention_calls": calls,
                       "max_abs_error_vs_pytorch": None if check is None else check.max_abs_error,
                       "padded_columns": None if check is None else check.padded_columns}
    return files, {DENSE: dense, EXTRACTED: extracted, REGULAR: regular}, facts


def session(path: Path, threads: int, profile_prefix: str | None = None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_rounds(calls: dict[str, callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call per round; each round runs every call once, starting one further along each time."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times = {name: [] for name in names}
    for index in range(rounds):
        for offset in range(len(names)):
            name = names[(index + offset) % len(names)]
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """Per round ``numerator`` time / ``denominator`` time: median and interquartile range."""
    return summary([a / b for a, b in zip(times[numerator], times[denominator])])


def timing_rows(times: dict[str, list[float]], against_regular: str) -> dict:
    rows = {name: {"ms": summary([1e3 * t for t in values]), "dense_over_model": ratios(times, DENSE, name)}
            for name, values in times.items()}
    rows[against_regular]["regular_over_model"] = ratios(times, REGULAR, against_regular)
    return rows


def ort_timings(files: dict[str, Path], batch: int, threads: int, rounds: int) -> dict:
    images = np.random.default_rng(batch).standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    sessions = {name: session(path, threads) for name, path in files.items()}
    calls = {name: (lambda s=s: s.run(None, {"images": images})) for name, s in sessions.items()}
    times = paired_rounds(calls, rounds, warmup=3 if batch == 1 else 1)
    return timing_rows(times, EXTRACTED)


def op_profile(path: Path, batch: int, threads: int, runs: int, folder: Path) -> dict[str, dict]:
    """ONNX Runtime's profiler: per op type, ms per run and nodes per run."""
    images = np.random.default_rng(0).standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    profiled = session(path, threads, str(folder / f"profile_{path.stem}_b{batch}"))
    for _ in range(2 + runs):
        profiled.run(None, {"images": images})
    events = json.loads(Path(profiled.end_profiling()).read_text())
    model_runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_op: dict[str, dict] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = per_op.setdefault(event["args"]["op_name"], {"ms": 0.0, "nodes": 0.0})
            entry["ms"] += event["dur"] / 1e3 / model_runs
            entry["nodes"] += 1 / model_runs
    return dict(sorted(per_op.items(), key=lambda item: -item[1]["ms"]))


def eager_timings(models: dict[str, torch.nn.Module], threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    prepared = {name: hiap.optimize(model, batch_size=1) if name == EXTRACTED else model.eval()
                for name, model in models.items()}

    def forward(model):
        with torch.inference_mode():
            model(images)

    calls = {name: (lambda m=m: forward(m)) for name, m in prepared.items()}
    times = paired_rounds(calls, rounds, warmup=3)
    return timing_rows(times, EXTRACTED)


def _span(entry: dict, digits: int = 1) -> str:
    return f"{entry['median']:.{digits}f} [{entry['q1']:.{digits}f}-{entry['q3']:.{digits}f}]"


def verdict(entry: dict) -> str:
    if entry["q1"] > 1:
        return "faster"
    if entry["q3"] < 1:
        return "slower"
    return "within noise"


def markdown(record: dict) -> str:
    facts = record["models"]
    lines = ["# ONNX Runtime on a CPU: extracted DeiT-S, dense DeiT-S and a regular ViT of the same MACs", "",
             f"{record['cpu']}, {record['threads']} thread; onnxruntime {record['versions']['onnxruntime']}, "
             f"onnx {record['versions']['onnx']}, torch {record['versions']['torch']}, timm "
             f"{record['versions']['timm']}; {record['date']}.", "", record["conditions"], ""]
    if record["note"]:
        lines += [record["note"], ""]
    lines += ["| model | ONNX nodes | GMACs | dense MACs / MACs | attention calls |", "|---|---:|---:|---:|---:|"]
    dense_macs = facts[DENSE]["macs"]
    for name, fact in facts.items():
        lines.append(f"| {name} | {fact['nodes']} | {fact['macs'] / 1e9:.3f} | {dense_macs / fact['macs']:.3f} | "
                     f"{fact['attention_calls']} |")
    for batch in record["onnxruntime"]:
        rows = batch["rows"]
        lines += ["", f"## ONNX Runtime, batch {batch['batch']} ({batch['rounds']} paired rounds)", "",
                  "| model | ms, median [IQR] | dense / model per round, median [IQR] |", "|---|---:|---:|"]
        lines += [f"| {name} | {_span(row['ms'])} | {_span(row['dense_over_model'], 3)} |"
                  for name, row in rows.items()]
        against = rows[EXTRACTED]["regular_over_model"]
        lines += ["", f"Regular / extracted per round: {_span(against, 3)}: the extracted model is "
                      f"{verdict(against)} against the regular model of the same MACs."]
    for batch in record["profiles"]:
        lines += ["", f"## Where the time goes: ONNX Runtime's profiler, batch {batch['batch']} (ms per run; nodes)",
                  "", "| op | extracted | regular |", "|---|---:|---:|"]
        ops = list(dict.fromkeys([*batch[EXTRACTED], *batch[REGULAR]]))
        for op in ops:
            cells = []
            for name in (EXTRACTED, REGULAR):
                entry = batch[name].get(op)
                cells.append("" if entry is None else f"{entry['ms']:.2f} ({entry['nodes']:.0f})")
            lines.append(f"| {op} | {cells[0]} | {cells[1]} |")
        totals = [sum(entry["ms"] for entry in batch[name].values()) for name in (EXTRACTED, REGULAR)]
        lines.append(f"| all | {totals[0]:.2f} | {totals[1]:.2f} |")
    eager = record["pytorch_eager"]
    if eager:
        rows = eager["rows"]
        lines += ["", f"## PyTorch eager, batch 1 ({eager['rounds']} paired rounds; extracted through hiap.optimize)",
                  "", "| model | ms, median [IQR] | dense / model per round, median [IQR] |", "|---|---:|---:|"]
        lines += [f"| {name} | {_span(row['ms'])} | {_span(row['dense_over_model'], 3)} |"
                  for name, row in rows.items()]
        against = rows[EXTRACTED]["regular_over_model"]
        lines += ["", f"Regular / extracted per round: {_span(against, 3)}: {verdict(against)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, nargs="+", default=[40, 12],
                        help="paired rounds per batch size (one number: the same for all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile-runs", type=int, default=10, help="runs under the profiler (a tenth at batch > 1)")
    parser.add_argument("--eager-rounds", type=int, default=30, help="PyTorch eager rounds at batch 1 (0: none)")
    parser.add_argument("--note", default="", help="conditions to state in the record (e.g. a shared machine)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds * len(args.batches) if len(args.rounds) == 1 else args.rounds
    if len(rounds) != len(args.batches):
        parser.error("--rounds takes one number or one per batch size")
    if min(rounds) < 2 or args.eager_rounds == 1:
        parser.error("a median and quartiles need at least 2 rounds")
    torch.set_num_threads(args.threads)
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files, models, facts = build_files(folder)
        timed = [{"batch": batch, "rounds": count, "rows": ort_timings(files, batch, args.threads, count)}
                 for batch, count in zip(args.batches, rounds)]
        profiles = [{"batch": batch,
                     **{name: op_profile(files[name], batch, args.threads,
                                         max(1, args.profile_runs // (1 if batch == 1 else 10)), folder)
                        for name in (EXTRACTED, REGULAR)}}
                    for batch in args.batches]
    eager = ({"batch": 1, "rounds": args.eager_rounds, "rows": eager_timings(models, args.threads, args.eager_rounds)}
             if args.eager_rounds else None)
    load_after = os.getloadavg()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    record = {
        "cpu": device_name("cpu"), "logical_cpus": os.cpu_count(), "threads": args.threads, "date": stamp,
        "platform": platform.platform(),
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "conditions": (f"Load average (1, 5, 15 min) {', '.join(f'{v:.2f}' for v in load_before)} before and "
                       f"{', '.join(f'{v:.2f}' for v in load_after)} after; {time.time() - started:.0f} s in all."),
        "note": args.note, "opset": OPSET, "models": facts, "onnxruntime": timed, "profiles": profiles,
        "pytorch_eager": eager,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / "export" / f"onnx_speed_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
