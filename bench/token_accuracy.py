"""Accuracy of token reduction at equal token counts: RAPID-style against ToMe on the default digits teacher.

    python bench/token_accuracy.py [--out bench/results/compare/tokens_digits_<date>.json] [--removals 1 2 3]
    python bench/token_accuracy.py --data mnist1d --model mnist1d_vit [--cache-dir DIR] [--out ...]

Training-free, so one teacher (the one ``hiap prune`` trains and caches for that data and model with its defaults)
and no seeds: every schedule is evaluated on the same validation split (digits: 360 images, one is 0.28 points;
MNIST-1D: 2,400 signals, one is 0.04 points); the validation cross-entropy tells apart what accuracy ties. Per ``r`` (tokens removed per block): RAPID (prune in the first half,
merge in the second), RAPID without the importance term in its prune score, merging only, and ToMe. Each row states
its MAC fraction (``count_macs``, reduction included) so equal token counts can be checked.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from pathlib import Path

import torch

import hiap
from hiap.app.data import eval_loader
from hiap.app.evaluation import evaluate_classifier
from hiap.app.session import PipelineSettings, prepare_session
from hiap.tokens import reduce_tokens, token_schedule

VARIANTS = {"rapid": "rapid:r={r}", "rapid (no importance)": "rapid:r={r},weight=0",
            "merge only": "rapid:r={r},switch=0", "tome": "tome:r={r}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON record (a Markdown table is written beside it)")
    parser.add_argument("--removals", type=int, nargs="+", default=[1, 2, 3], help="tokens removed per block")
    parser.add_argument("--data", default=None, help="as hiap prune's --data (default: the digits)")
    parser.add_argument("--model", default="digits_vit", help="as hiap prune's --model (default: %(default)s)")
    parser.add_argument("--cache-dir", default="~/.cache/hiap", help="where the teacher is cached")
    args = parser.parse_args()
    session = prepare_session(PipelineSettings(show_progress=False, data=args.data, model=args.model,
                                               cache_dir=args.cache_dir), None)
    teacher = session.teacher.eval()
    loader = eval_loader(session.data.val, 512)
    device = torch.device("cpu")
    dense_macs = hiap.count_macs(teacher)
    rows = [{"method": "dense", "r": 0, "schedule": "-", "mac_fraction": 1.0,
             **evaluate_classifier(teacher, loader, device, show_progress=False)}]
    for r in args.removals:
        for method, spec in VARIANTS.items():
            model = reduce_tokens(copy.deepcopy(teacher), spec.format(r=r))
            rows.append({"method": method, "r": r, "schedule": token_schedule(model).describe(),
                         "mac_fraction": hiap.count_macs(model) / dense_macs,
                         **evaluate_classifier(model, loader, device, show_progress=False)})
    table = ["| method | r | schedule | MACs of dense | accuracy | val CE |", "|---|---:|---|---:|---:|---:|"]
    table += [f"| {row['method']} | {row['r']} | {row['schedule']} | {row['mac_fraction']:.3f} | "
              f"{100 * row['accuracy']:.2f}% | {row['loss']:.4f} |" for row in rows]
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "data": session.data.description,
                  "teacher": session.teacher_key, "images": rows[0]["images"], "rows": rows}
        out.write_text(json.dumps(record, indent=1) + "\n")
        out.with_suffix(".md").write_text(f"Token reduction on {session.data.description}, teacher "
                                          f"{session.teacher_key}\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
