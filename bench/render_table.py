"""Render the latest benchmark record of each device as markdown, optionally into a marked section of a file.

    python bench/render_table.py                            # print the tables of bench/results/*.json
    python bench/render_table.py --results DIR              # records from another folder
    python bench/render_table.py --write bench/README.md    # replace what lies between the two markers below

Markers (each on a line of its own):
    <!-- bench-table:start -->
    <!-- bench-table:end -->

The latest record per device (by its "created" time) is shown; GPU devices first. Only the standard library is
used, so this runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START_MARKER = "<!-- bench-table:start -->"
END_MARKER = "<!-- bench-table:end -->"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
SUPPORTED_SCHEMA = 1


PROVIDER_ORDER = (
    "reference", "compiled", "triton", "per_head_loop",
    "dense/reference", "dense/compiled", "dense/cudagraph",
    "extracted/reference", "extracted/compiled", "extracted/triton",
    "extracted/reference+cudagraph", "extracted/triton+cudagraph",
)


# gated_ffn_fwd_bwd: the module-level FFN case of records made before gated_fc1_fwd_bwd replaced it.
CASE_ORDER = (
    "sample_gates", "gated_qkv_weight", "gated_fc2_weight", "gather_weight_rows", "gather_weight_cols", "gate_objective",
    "gated_qkv_fwd_bwd", "gated_fc1_fwd_bwd", "gated_ffn_fwd_bwd", "gated_attention_fwd_bwd", "gated_mlp_fwd_bwd",
    "gated_block_fwd_bwd", "training_step",
    "ragged_attention", "fused_linear_gelu_f1024", "fused_linear_gelu_f1536", "deit_s_inference",
)


def ordered_rows(rows: list[dict]) -> list[dict]:
    """Rows grouped by case (training side first, then inference) and batch, providers in a fixed order.

    Runs put compiled providers last to protect the eager figures from a deadline; tables read better grouped.
    """
    case_rank = {case: rank for rank, case in enumerate(CASE_ORDER)}
    for row in rows:
        case_rank.setdefault(row["case"], len(case_rank))

    def key(row: dict):
        provider = row["provider"]
        rank = PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)
        return (case_rank[row["case"]], row["batch"], rank, provider)

    return sorted(rows, key=key)


def load_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"render_table: skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(record, dict) or record.get("schema") != SUPPORTED_SCHEMA or not record.get("results"):
            continue
        record["_file"] = path.name
        records.append(record)
    return records


def latest_per_device(records: list[dict]) -> list[dict]:
    latest: dict[tuple[str, str], dict] = {}
    for record in records:
        key = (record["device"]["kind"], record["device"]["name"])
        if key not in latest or record["created"] > latest[key]["created"]:
            latest[key] = record
    return sorted(latest.values(), key=lambda r: (r["device"]["kind"] != "cuda", r["device"]["name"]))


def _ms(value) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _floor(row: dict) -> str:
    if row.get("floor_ms") is None:
        return "-"
    bound = "compute" if row["compute_floor_ms"] >= row["memory_floor_ms"] else "memory"
    reached = f", {100 * row['floor_fraction']:.0f}%" if row.get("floor_fraction") else ""
    return f"{_ms(row['floor_ms'])} ({bound}{reached})"


def _device_heading(record: dict) -> str:
    device, versions = record["device"], record["versions"]
    parts = [f"torch {versions.get('torch')}"]
    if versions.get("triton"):
        parts.append(f"triton {versions['triton']}")
    if device["kind"] == "cpu":
        parts.append(f"{device.get('torch_threads')} thread(s)")
    parts.append(record["precision"])
    parts.append(record["created"][:10])
    if record.get("git_commit"):
        parts.append(f"commit {record['git_commit']}")
    peaks = record.get("peaks")
    if peaks:
        if peaks["matmul_tflops"] >= 1:
            matmul = f"{peaks['matmul_tflops']:.0f} TFLOP/s"
        else:
            matmul = f"{peaks['matmul_tflops'] * 1e3:.0f} GFLOP/s"
        parts.append(f"measured peaks {matmul} {peaks['matmul_dtype']} matmul, {peaks['copy_gb_per_s']:.0f} GB/s copy")
    return f"**{device['name']}** ({device['kind']}; {'; '.join(parts)}; `{record['_file']}`)"


def render_record(record: dict) -> str:
    lines = [_device_heading(record), ""]
    if record.get("gpu_tests"):
        lines += [f"GPU tests before the run: {record['gpu_tests']}", ""]
    lines += [
        "| case | batch | provider | median ms | speedup vs baseline | peak MB | floor ms (bound, % reached) |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for row in ordered_rows(record["results"]):
        speedup = row.get("speedup_vs_baseline")
        baseline = "" if row["provider"] == row["baseline"] else f" vs {row['baseline']}"
        speedup_text = f"{speedup:.2f}x{baseline}" if speedup is not None else "-"
        peak = f"{row['peak_mb']:.0f}" if row.get("peak_mb") else "-"
        lines.append(f"| {row['case']} | {row['batch']} | {row['provider']} | {_ms(row.get('median_ms'))} | "
                     f"{speedup_text} | {peak} | {_floor(row)} |")
    reasons: dict[str, int] = {}
    for skip in record.get("skipped", []):
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    if reasons:
        lines += ["", "Not measured in this run:"]
        lines += [f"- {count} cell(s): {reason}" for reason, count in reasons.items()]
    # A GPU record lists every GPU target, measured or not; a CPU record its CPU targets.
    judged = [t for t in record.get("targets", []) if not t["status"].startswith("not applicable")]
    if judged:
        lines += ["", "| target | batch | measured | needed | status |", "|---|---:|---:|---:|---|"]
        for target in judged:
            measured = f"{target['speedup']:.2f}x" if "speedup" in target else "-"
            if "judged_on" in target:
                measured += f" ({target['judged_on']}; cell medians {target['speedup_of_cell_medians']:.2f}x)"
            needed = f">= {target['minimum_speedup']}x"
            if target.get("maximum_memory_ratio") is not None:
                if "memory_ratio" in target:
                    measured += f", memory {target['memory_ratio']:.2f}x"
                needed += f", memory <= {target['maximum_memory_ratio']}x"
            batch = target["batch"] if target["batch"] is not None else "-"
            lines.append(f"| {target['target']} | {batch} | {measured} | {needed} | {target['status']} |")
    notes = record.get("notes") or {}
    if notes:
        known = [case for case in CASE_ORDER if case in notes] + [case for case in notes if case not in CASE_ORDER]
        lines += [""] + [f"- {case}: {notes[case]}" for case in known]
    return "\n".join(lines)


def render(records: list[dict]) -> str:
    if not records:
        return "_No benchmark records yet: run `python -m pytest bench/ --benchmark-only`._"
    return "\n\n".join(render_record(record) for record in latest_per_device(records))


def replace_section(text: str, table: str) -> str:
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the file needs {START_MARKER} followed by {END_MARKER}")
    return text[: start + len(START_MARKER)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of JSON records")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="rewrite the marked section of FILE (e.g. bench/README.md) instead of printing")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"no such folder: {args.results}")
    table = render(load_records(args.results))
    if args.write is None:
        print(table)
        return 0
    try:
        updated = replace_section(args.write.read_text(), table)
    except (OSError, ValueError) as error:
        print(f"render_table: {args.write}: {error}", file=sys.stderr)
        return 1
    args.write.write_text(updated)
    print(f"render_table: updated {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
