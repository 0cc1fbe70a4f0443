"""Accuracy of token reduction at equal token counts: RAPID-style against ToMe, paired over teacher seeds.

    python bench/token_accuracy.py [--seeds 0 1 2] [--removals 1 2 3] [--out bench/results/compare/tokens_<date>.json]
    python bench/token_accuracy.py --data mnist1d --model mnist1d_vit [--seeds 0 1 2] [--cache-dir DIR] [--out ...]

Token reduction is training-free, so the seeds are those of the teacher: one dense model per seed, trained (and cached)
as ``hiap prune`` trains it with ``--teacher-seed``; every method is evaluated on each teacher and the same validation
split (digits: 360 images, one is 0.28 points; MNIST-1D: 2,400 signals, one is 0.04 points), so the comparison is
paired: the summary gives each method's difference to ToMe per seed and how many seeds it wins, ties and loses. The
validation cross-entropy tells apart what accuracy ties.

Per ``r`` (tokens removed per block): RAPID (prune in the first half by redundancy, merge in the second), RAPID
with the class token's attention in its prune score (``weight=1``; ``--importance-weights`` sets the weights of these
rows), RAPID merging the r least attended tokens (``pool=1``; ``--merge-pools``), merging only (with those pools
too), and ToMe. Each row
states its MAC fraction (``count_macs``, reduction included) so equal token counts can be checked, and its
throughput against the dense teacher: every model of one teacher is timed in the same interleaved rounds
(``measure_latencies``, this machine's CPU), so equal token counts can be checked for equal throughput as well.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
from pathlib import Path

import torch

import hiap
from hiap.app.data import eval_loader
from hiap.app.evaluation import evaluate_classifier, measure_latencies, model_input_shape
from hiap.app.session import PipelineSettings, prepare_session
from hiap.tokens import reduce_tokens, token_schedule

BASELINE = "tome"


def variants(importance_weights: list[float], merge_pools: list[float]) -> dict[str, str]:
    """Method name -> schedule text with ``{r}`` open: RAPID, RAPID with each importance weight and each merge pool,
    merging only (with each merge pool too), ToMe."""
    weighted = {f"rapid + importance {weight:g}": f"rapid:r={{r}},weight={weight:g}" for weight in importance_weights}
    pooled = {f"rapid, merge pool {pool:g}": f"rapid:r={{r}},pool={pool:g}" for pool in merge_pools}
    merging = {"merge only": "rapid:r={r},switch=0",
               **{f"merge only, pool {pool:g}": f"rapid:r={{r}},switch=0,pool={pool:g}" for pool in merge_pools}}
    return {"rapid": "rapid:r={r}", **weighted, **pooled, **merging, "tome": "tome:r={r}"}


def evaluate_teacher(args: argparse.Namespace, seed: int) -> tuple[dict, list[dict]]:
    """The rows of one teacher: dense, then every variant at every ``r``, each with accuracy, loss, MACs, speed."""
    session = prepare_session(PipelineSettings(show_progress=False, data=args.data, model=args.model,
                                               cache_dir=args.cache_dir, teacher_seed=seed), None)
    torch.set_num_threads(args.threads)  # after the session, which sets its own count for training the teacher
    teacher = session.teacher.eval()
    loader = eval_loader(session.data.val, 512)
    device = torch.device("cpu")
    dense_macs = hiap.count_macs(teacher)
    models = {"dense": teacher}
    rows = [{"seed": seed, "method": "dense", "r": 0, "schedule": "-", "mac_fraction": 1.0,
             **evaluate_classifier(teacher, loader, device, show_progress=False)}]
    for r in args.removals:
        for method, spec in variants(args.importance_weights, args.merge_pools).items():
            model = reduce_tokens(copy.deepcopy(teacher), spec.format(r=r))
            models[f"{method} r={r}"] = model
            rows.append({"seed": seed, "method": method, "r": r, "schedule": token_schedule(model).describe(),
                         "mac_fraction": hiap.count_macs(model) / dense_macs,
                         **evaluate_classifier(model, loader, device, show_progress=False)})
    if args.latency_rounds > 0:
        latencies = measure_latencies(models, model_input_shape(teacher), device, batch=args.latency_batch,
                                      rounds=args.latency_rounds)
        dense_ms = latencies["dense"].ms_per_batch
        for row, name in zip(rows, models):
            row["ms_per_batch"] = latencies[name].ms_per_batch
            row["speedup"] = dense_ms / latencies[name].ms_per_batch
    teacher_info = {"seed": seed, "teacher": session.teacher_key, "data": session.data.description,
                    "images": rows[0]["images"]}
    return teacher_info, rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Per method and ``r``: means and spreads over seeds, and the paired difference to ToMe on each seed.

    A win (tie, loss) on a seed is a higher (equal, lower) accuracy than ToMe's on that teacher, the lower
    cross-entropy breaking an accuracy tie.
    """
    by_key: dict[tuple[str, int], dict[int, dict]] = {}
    for row in rows:
        by_key.setdefault((row["method"], row["r"]), {})[row["seed"]] = row
    summary = []
    for (method, r), per_seed in by_key.items():
        seeds = sorted(per_seed)
        entry = {"method": method, "r": r, "seeds": seeds}
        for field in ("accuracy", "loss", "mac_fraction", "speedup"):
            if all(field in per_seed[s] for s in seeds):
                entry[field], entry[f"{field}_sd"] = _mean_sd([per_seed[s][field] for s in seeds])
        baseline = by_key.get((BASELINE, r))
        if method not in (BASELINE, "dense") and baseline is not None:
            paired = [s for s in seeds if s in baseline]
            accuracy_gaps = [per_seed[s]["accuracy"] - baseline[s]["accuracy"] for s in paired]
            loss_gaps = [per_seed[s]["loss"] - baseline[s]["loss"] for s in paired]
            outcomes = [(gap > 0) - (gap < 0) if gap != 0 else (loss < 0) - (loss > 0)
                        for gap, loss in zip(accuracy_gaps, loss_gaps)]
            entry.update(accuracy_vs_tome=accuracy_gaps, loss_vs_tome=loss_gaps,
                         wins=outcomes.count(1), ties=outcomes.count(0), losses=outcomes.count(-1))
        summary.append(entry)
    return summary


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def render(teachers: list[dict], rows: list[dict], summary: list[dict]) -> str:
    timed = all("speedup" in row for row in rows)
    lines = [f"Token reduction on {teachers[0]['data']}; teachers (seed: key) "
             + ", ".join(f"{t['seed']}: {t['teacher']}" for t in teachers), ""]
    speed_head = " | speed vs dense" if timed else ""
    lines += [f"| method | r | schedule | MACs of dense | accuracy | val CE{speed_head} | vs ToMe (points, per seed) "
              "| wins / ties / losses |",
              "|---|---:|---|---:|---:|---:|" + ("---:|" if timed else "") + "---|---|"]
    for entry in summary:
        schedule = next(row["schedule"] for row in rows if row["method"] == entry["method"] and row["r"] == entry["r"])
        spread = len(entry["seeds"]) > 1
        accuracy = f"{100 * entry['accuracy']:.2f}" + (f" ± {100 * entry['accuracy_sd']:.2f}" if spread else "") + "%"
        loss = f"{entry['loss']:.4f}" + (f" ± {entry['loss_sd']:.4f}" if spread else "")
        speed = f" | {entry['speedup']:.2f}x" if timed else ""
        versus = ", ".join(_points(gap) for gap in entry.get("accuracy_vs_tome", [])) or "-"
        record = f"{entry['wins']} / {entry['ties']} / {entry['losses']}" if "wins" in entry else "-"
        lines.append(f"| {entry['method']} | {entry['r']} | {schedule} | {entry['mac_fraction']:.3f} | {accuracy} | "
                     f"{loss}{speed} | {versus} | {record} |")
    if timed:
        lines += ["", "Speed: the dense teacher's latency over the model's, at the same batch, the median of "
                  "interleaved rounds on this CPU, averaged over the teachers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON record (a Markdown table is written beside it)")
    parser.add_argument("--removals", type=int, nargs="+", default=[1, 2, 3], help="tokens removed per block")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="teacher seeds: one teacher per seed, every method evaluated on each (default: 0)")
    parser.add_argument("--importance-weights", type=float, nargs="*", default=[1.0],
                        help="RAPID rows with the class token's attention in the prune score at these weights")
    parser.add_argument("--merge-pools", type=float, nargs="*", default=[1.0],
                        help="RAPID rows whose merge steps choose among this many times r of the least attended tokens")
    parser.add_argument("--data", default=None, help="as hiap prune's --data (default: the digits)")
    parser.add_argument("--model", default="digits_vit", help="as hiap prune's --model (default: %(default)s)")
    parser.add_argument("--cache-dir", default="~/.cache/hiap", help="where the teachers are cached")
    parser.add_argument("--latency-batch", type=int, default=256, help="images per timed forward")
    parser.add_argument("--latency-rounds", type=int, default=20, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error("--seeds must be distinct non-negative integers")
    if any(not 0 < weight < float("inf") for weight in args.importance_weights):
        parser.error("--importance-weights must be positive and finite (0 is the default RAPID row)")
    if any(not 1 <= pool < float("inf") for pool in args.merge_pools):
        parser.error("--merge-pools must be finite and >= 1")
    if min(args.removals) < 1 or args.latency_batch < 1 or args.threads < 1 or args.latency_rounds < 0:
        parser.error("--removals, --latency-batch and --threads must be positive, --latency-rounds non-negative")
    teachers, rows = [], []
    for seed in args.seeds:
        teacher, teacher_rows = evaluate_teacher(args, seed)
        teachers.append(teacher)
        rows += teacher_rows
    summary = summarize(rows)
    table = render(teachers, rows, summary)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "teachers": teachers,
                  "threads": torch.get_num_threads(), "latency_batch": args.latency_batch,
                  "latency_rounds": args.latency_rounds, "rows": rows, "summary": summary}
        out.write_text(json.dumps(record, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
