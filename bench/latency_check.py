"""The latency table on DeiT-S, checked on this machine: how well it predicts random pruned layouts, and where a
latency-budget search lands against dense timm.

    python bench/latency_check.py [--batches 1 16] [--layouts 20] [--target 0.6] [--steps 60] [--out FILE.json]
    python bench/latency_check.py --device cuda --dtype bfloat16 --batches 256 --layouts 10   # on a GPU

Per batch size: ``hiap profile``'s table of DeiT-S (random weights; time depends on shapes, not values), then
``--layouts`` random layouts on the alignment steps (per layer 1-6 heads, q/k and v widths in 16s, FFN widths in
128s, some FFN blocks removed) extracted as ``hiap.extract`` builds them, all timed with dense timm in the same
interleaved rounds: the table's prediction against the measured median of each, as a median and a worst error.
Then two short searches on synthetic images (random weights and data give the gates no task to learn, only the
budget to meet): one with ``budget="latency"`` at ``--target`` of the dense latency, one with the MAC budget at the
same fraction, each extracted and timed against dense timm in paired rounds. The record (JSON, and a Markdown twin)
names the machine, the versions and every figure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
from pathlib import Path

import timm
import torch

import hiap
from hiap.app.evaluation import measure_latencies
from hiap.method.latency import LatencyTable
from hiap.method.profile import device_name, profile_latency

MODEL = "deit_small_patch16_224"


def random_layout(dense: torch.nn.Module, generator: torch.Generator) -> hiap.HiAPViT:
    """A gated DeiT-S whose decision is a random aligned layout (the hard minimums respected)."""
    gated = hiap.gate_vit(dense, hiap.HiAPConfig()).eval()

    def draw(count: int, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (count,), generator=generator)

    for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
        gates = attn.gates
        heads, groups = gates.head.numel(), gates.qk.shape[1]
        kept_heads = int(draw(1, 1, heads))
        head = torch.zeros(heads, dtype=torch.bool)
        head[torch.randperm(heads, generator=generator)[:kept_heads]] = True
        qk = torch.arange(groups)[None, :] < draw(heads, 1, groups)[:, None]
        v = torch.arange(groups)[None, :] < draw(heads, 1, groups)[:, None]
        gates.assign(head=head, qk=qk, v=v)
        ffn_groups = mlp.gates.neuron.numel()
        kept = int(draw(1, 0, ffn_groups))
        mlp.gates.assign(block=kept > 0, neuron=torch.arange(ffn_groups) < max(kept, 1))
    return gated


def prediction_check(dense: torch.nn.Module, table: LatencyTable, layouts: int, rounds: int, seed: int,
                     device: torch.device, dtype: torch.dtype) -> dict:
    """The table's prediction of ``layouts`` random pruned models against their measured latency."""
    generator = torch.Generator().manual_seed(seed)
    models = {"dense": dense}
    for index in range(layouts):
        models[f"layout {index}"] = hiap.extract(random_layout(dense, generator))
    shape = (3, 224, 224)
    measured = measure_latencies(models, shape, device, batch=table.batch, rounds=rounds, warmup=2, dtype=dtype)
    rows = []
    for name, model in models.items():
        predicted = table.predict(model)
        latency = measured[name]
        rows.append({"model": name, "macs_fraction": hiap.count_macs(model) / hiap.count_macs(dense),
                     "predicted_ms": predicted, "measured_ms": latency.ms_per_batch,
                     "measured_quartiles_ms": [latency.q1_ms, latency.q3_ms],
                     "error": predicted / latency.ms_per_batch - 1})
    errors = [abs(row["error"]) for row in rows if row["model"] != "dense"]
    return {"rows": rows, "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors)}


def search(dense: torch.nn.Module, cfg: hiap.HiAPConfig, steps: int, seed: int,
           device: torch.device) -> torch.nn.Module:
    """A short HiAP run on synthetic images (batch 2), returning the extracted model."""
    generator = torch.Generator().manual_seed(seed)
    pruner = hiap.Pruner(copy.deepcopy(dense).to(device), cfg, total_steps=steps)
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=1e-4), fused=True)
    for _ in range(steps):
        images = torch.randn(2, 3, 224, 224, generator=generator).to(device)
        labels = torch.randint(0, 1000, (2,), generator=generator).to(device)
        loss = pruner.loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pruner.step()
    return pruner.extract().cpu()


def search_check(dense: torch.nn.Module, table_path: Path, table: LatencyTable, target: float, steps: int,
                 rounds: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A latency-budget and a MAC-budget search at ``target``, both timed against dense in the same rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the searches train; the timing below runs at the table's threads
    latency_model = search(dense, hiap.HiAPConfig(budget="latency", latency_table=str(table_path), target=target,
                                                  seed=seed), steps, seed, device)
    mac_model = search(dense, hiap.HiAPConfig(target=target, seed=seed), steps, seed, device)
    torch.set_num_threads(threads)
    models = {"dense": dense, "latency-searched": latency_model, "MAC-searched": mac_model}
    measured = measure_latencies(models, (3, 224, 224), device, batch=table.batch, rounds=rounds, warmup=2,
                                 dtype=dtype)
    dense_ms = measured["dense"].ms_per_batch
    rows = {}
    for name, model in models.items():
        latency = measured[name]
        rows[name] = {"macs_fraction": hiap.count_macs(model) / hiap.count_macs(dense),
                      "predicted_ms": table.predict(model), "measured_ms": latency.ms_per_batch,
                      "measured_quartiles_ms": [latency.q1_ms, latency.q3_ms],
                      "measured_fraction": latency.ms_per_batch / dense_ms,
                      "layout": hiap.pruned_layout(model)["layers"] if name != "dense" else None}
    measured_fraction = rows["latency-searched"]["measured_fraction"]
    return {"target": target, "steps": steps, "rows": rows,
            "latency_target_error": measured_fraction / target - 1,
            "latency_vs_mac_speedup": rows["MAC-searched"]["measured_ms"] / rows["latency-searched"]["measured_ms"]}


def markdown(record: dict) -> str:
    lines = [f"# The latency table on DeiT-S ({record['device']}, {record['threads']} thread, torch {record['torch']})",
             "", record["note"], ""]
    for batch in record["batches"]:
        table, check, found = batch["table"], batch["prediction"], batch["search"]
        lines += [f"## Batch {table['batch']}", "",
                  f"Table: {table['seconds']:.0f} s to profile; dense measured {table['dense_ms']:.1f} ms, predicted "
                  f"{table['dense_predicted_ms']:.1f} ms; fixed parts {table['fixed_ms']:.1f} ms.", "",
                  f"Prediction on {len(check['rows']) - 1} random layouts: median |error| "
                  f"{100 * check['median_abs_error']:.1f} %, worst {100 * check['worst_abs_error']:.1f} %.", "",
                  "| model | MACs / dense | predicted ms | measured ms (quartiles) | error |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {row['model']} | {row['macs_fraction']:.3f} | {row['predicted_ms']:.1f} | {row['measured_ms']:.1f} "
                  f"({row['measured_quartiles_ms'][0]:.1f}-{row['measured_quartiles_ms'][1]:.1f}) | "
                  f"{100 * row['error']:+.1f} % |" for row in check["rows"]]
        lines += ["", f"Searches at {found['target']} of dense ({found['steps']} steps on synthetic images):", "",
                  "| model | MACs / dense | predicted ms | measured ms (quartiles) | measured / dense |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {row['macs_fraction']:.3f} | {row['predicted_ms']:.1f} | {row['measured_ms']:.1f} "
                  f"({row['measured_quartiles_ms'][0]:.1f}-{row['measured_quartiles_ms'][1]:.1f}) | "
                  f"{row['measured_fraction']:.3f} |" for name, row in found["rows"].items()]
        lines += ["", f"Latency-searched model against its target: {100 * found['latency_target_error']:+.1f} %; "
                      f"MAC-searched at the same fraction / latency-searched: {found['latency_vs_mac_speedup']:.2f}x.",
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layouts", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--tables", type=Path, default=Path("hiap-runs/latency"), help="where the tables go")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense = timm.create_model(MODEL, pretrained=False).eval()
    batches = []
    for batch in args.batches:
        torch.set_num_threads(args.threads)
        path = args.tables / f"deit_s_b{batch}_t{args.threads}_{device.type}_{args.dtype}.json"
        if path.exists():
            table = LatencyTable.load(path)
        else:
            table = profile_latency(dense, name=MODEL, batch_size=batch, threads=args.threads, device=device,
                                    dtype=dtype)
            table.save(path)
        prediction = prediction_check(dense, table, args.layouts, args.rounds, args.seed, device, dtype)
        found = search_check(dense, path, table, args.target, args.steps, args.rounds, args.seed, device, dtype)
        batches.append({"table": {"path": str(path), "batch": batch, "seconds": table.seconds,
                                  "dense_ms": table.dense_ms, "dense_predicted_ms": table.dense_predicted_ms,
                                  "fixed_ms": table.fixed_ms},
                        "prediction": prediction, "search": found})
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    record = {"device": device_name(device), "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
              "date": stamp, "model": MODEL, "batches": batches,
              "note": ("DeiT-S with random weights (latency depends on shapes only). Each model is timed in interleaved "
                       "rounds with the dense timm model; medians and quartiles in ms.")}
    out = args.out or Path("bench/results/latency") / f"deit_s_{device.type}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
