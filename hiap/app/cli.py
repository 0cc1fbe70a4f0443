"""``hiap`` command line: prune, compare, extract, eval, export.

Every HiAPConfig field is a flag of ``prune`` and ``compare`` (generated from the dataclass, help text from its
docstring). Problems with the input (paths, model names, budgets, checkpoints, resume) end the command with one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
import warnings
from pathlib import Path

from hiap.app.runtime import InputError
from hiap.config import HiAPConfig

# --------------------------------------------------------------------------------------------------------------------
# HiAPConfig <-> flags
# --------------------------------------------------------------------------------------------------------------------

def _field_help() -> dict[str, str]:
    """Per-field help from HiAPConfig's docstring lines ``name, other: text`` (continuation lines appended)."""
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in (HiAPConfig.__doc__ or "").splitlines():
        match = re.match(r"^\s{8}([a-z_0-9]+(?:, [a-z_0-9]+)*): (.*)$", line)
        if match:
            current = match.group(1).split(", ")
            # "lr: text; gate_lr: other text" documents two fields on one line.
            first, *rest = re.split(r";\s+(?=[a-z_0-9]+: )", match.group(2).strip())
            for name in current:
                helps[name] = first
            for part in rest:
                name, _, text = part.partition(": ")
                helps[name] = text
                current = [name]
        elif current and line.startswith(" " * 12) and line.strip():
            for name in current:
                helps[name] += " " + line.strip()
        else:
            current = []
    return helps


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_hiap_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per HiAPConfig field with the dataclass default (the DESIGN.md / paper values)."""
    group = parser.add_argument_group("HiAP hyperparameters (HiAPConfig; defaults from DESIGN.md)")
    hints = typing.get_type_hints(HiAPConfig)
    helps = _field_help()
    defaults = HiAPConfig()
    for field in dataclasses.fields(HiAPConfig):
        kind = hints[field.name]
        default = getattr(defaults, field.name)
        help_text = f"{helps.get(field.name, field.name)} (default: {default:.6g})" if isinstance(default, float) \
            else f"{helps.get(field.name, field.name)} (default: {default})"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            group.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(_flag(field.name), dest=field.name, choices=typing.get_args(kind), default=default,
                               help=help_text)
        else:
            group.add_argument(_flag(field.name), dest=field.name, type=kind, default=default, help=help_text,
                               metavar=field.name.upper())


def hiap_config_from_args(args: argparse.Namespace) -> HiAPConfig:
    """The HiAPConfig the flags describe; InputError naming the flag when a value is out of range."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(HiAPConfig)}
    try:
        return HiAPConfig(**values)
    except ValueError as error:
        message = str(error).removeprefix("HiAPConfig: ")
        name = re.match(r"[a-z_0-9]+", message)
        if name and name.group(0) in values:
            message = _flag(name.group(0)) + message[len(name.group(0)):]
        raise InputError(message) from error


# --------------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------------

def _add_model_flags(parser: argparse.ArgumentParser, defaults, *, weights: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=defaults.model,
                       help="timm ViT name, or digits_vit: the small default for the digits (default: %(default)s)")
    group.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                       help="keyword arguments for timm.create_model, e.g. depth=2 embed_dim=32 img_size=32")
    if weights:
        group.add_argument("--checkpoint", default=None, help="local dense weights (torch or safetensors state dict)")
        group.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")


def _add_data_flags(parser: argparse.ArgumentParser, defaults) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="ImageFolder root with train/ and val/ (ImageNet layout); default: scikit-learn digits")
    group.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       help="digits only: validation share of the stratified split (default: %(default)s)")
    group.add_argument("--split-seed", type=int, default=defaults.split_seed,
                       help="digits only: seed of the train/val split (default: %(default)s)")
    group.add_argument("--workers", type=int, default=defaults.workers, help="data loader workers (default: %(default)s)")
    group.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size,
                       help="batch size of evaluation (default: %(default)s)")


def _add_runtime_flags(parser: argparse.ArgumentParser, defaults) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=defaults.device, help="auto, cpu or cuda (default: %(default)s)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=defaults.amp,
                       help="mixed precision on GPU: bf16 where supported, else fp16 (default: on; ignored on CPU)")
    group.add_argument("--threads", type=int, default=defaults.threads,
                       help="torch CPU threads; 0 = 1 for small models (under 50 M MACs/image), torch's default "
                            "otherwise (default: %(default)s)")
    group.add_argument("--latency-batch", type=int, default=defaults.latency_batch,
                       help="batch size of the latency measurement (default: %(default)s)")
    group.add_argument("--latency-repeats", type=int, default=defaults.latency_repeats,
                       help="timed rounds of the latency measurement, after 5 warm-up rounds; the median and the "
                            "quartiles are reported (default: %(default)s)")
    group.add_argument("--compile", action="store_true",
                       help="measure latency on torch.compile'd models (hiap.optimize(model, compile=True))")
    group.add_argument("--no-progress", dest="show_progress", action="store_false", help="hide progress bars")


def _add_training_flags(parser: argparse.ArgumentParser, defaults) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("-o", "--output", default=defaults.output, help="output folder (default: %(default)s)")
    group.add_argument("--epochs", type=int, default=defaults.epochs,
                       help="epochs of the HiAP run, and of the baselines' KD training (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global batch size, split over the processes (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help="AdamW weight decay of the network weights (default: %(default)s)")
    group.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs,
                       help="epochs of dense teacher training; 0 uses the given weights as they are (default: %(default)s)")
    group.add_argument("--teacher-lr", type=float, default=defaults.teacher_lr,
                       help="peak learning rate of teacher training (default: %(default)s)")
    group.add_argument("--teacher-seed", type=int, default=defaults.teacher_seed,
                       help="seed of the teacher's initialisation and batch order (default: %(default)s)")
    group.add_argument("--cache-dir", default=defaults.cache_dir,
                       help="where trained teachers are cached (default: %(default)s)")
    group.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                       help="also checkpoint every K steps (always at epoch ends; 0 = epochs only) (default: %(default)s)")
    group.add_argument("--log-every", type=int, default=defaults.log_every,
                       help="steps between JSONL log records (default: %(default)s)")
    group.add_argument("--resume", action="store_true",
                       help="continue from the output folder's last checkpoint (same settings required)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of an earlier run in the output folder (refused without it)")


def build_parser() -> argparse.ArgumentParser:
    from hiap import __version__
    from hiap.app.pipeline import PipelineSettings

    defaults = PipelineSettings()
    parser = argparse.ArgumentParser(prog="hiap", description="HiAP: hierarchical auto-pruning of timm Vision Transformers")
    parser.add_argument("--version", action="version", version=f"hiap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser(
        "prune", help="teacher -> HiAP training at a MAC target -> extract -> evaluate -> report",
        description="With no arguments: train the 4-block digits_vit teacher on scikit-learn's digits (cached under "
                    "--cache-dir), gate it, run one single-stage HiAP training with KD, temperature annealing and a "
                    "MAC target of 2/3 of dense, extract the pruned network, evaluate both and write the report to "
                    "--output. Under torchrun the same command trains with DistributedDataParallel.")
    for add in (_add_training_flags, _add_model_flags, _add_data_flags, _add_runtime_flags):
        add(prune, defaults)
    add_hiap_config_flags(prune)

    compare = commands.add_parser("compare", help="HiAP vs uniform-ratio and l1-structured baselines at one budget")
    for add in (_add_training_flags, _add_model_flags, _add_data_flags, _add_runtime_flags):
        add(compare, defaults)
    compare.set_defaults(output="hiap-runs/compare")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every method (default: 0)")
    compare.add_argument("--targets", type=float, nargs="+", default=None,
                         help="MAC fractions to compare at (default: --target)")
    compare.add_argument("--methods", nargs="+", default=["hiap", "uniform", "l1"],
                         choices=["hiap", "uniform", "l1"], help="methods to run (default: all three)")
    add_hiap_config_flags(compare)

    extract = commands.add_parser("extract", help="HiAP training checkpoint -> pruned model (safetensors)")
    extract.add_argument("checkpoint", help="checkpoint.pt written by hiap prune")
    extract.add_argument("-o", "--output", default=None, help="pruned model path (default: next to the checkpoint)")

    evaluate = commands.add_parser(
        "eval", help="accuracy, MACs, params and latency of a dense or pruned model",
        description="Accuracy, MACs, parameters and latency of a model file on the validation split. --model names "
                    "the architecture of dense weights, and whose input normalisation a pruned model gets.")
    evaluate.add_argument("path", help="pruned model (.safetensors from hiap), training checkpoint, or dense weights")
    _add_model_flags(evaluate, defaults, weights=False)
    _add_data_flags(evaluate, defaults)
    _add_runtime_flags(evaluate, defaults)
    evaluate.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    export = commands.add_parser("export", help="pruned model -> ONNX, verified with onnxruntime")
    export.add_argument("path", help="pruned model (.safetensors from hiap)")
    export.add_argument("--onnx", required=True, help="ONNX file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    export.add_argument("--atol", type=float, default=1e-4,
                        help="largest |onnxruntime - PyTorch| accepted (default: %(default)s)")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------

def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"{_flag(name)} must be > 0, got {getattr(args, name)}")


# Numeric flags outside the HiAPConfig (which validates its own): (lowest, highest, lowest excluded). Every value must
# also be finite. Checked before any work starts.
NUMBER_BOUNDS = {
    "val_fraction": (0.0, 1.0, True), "split_seed": (0, 2**31 - 1, False), "workers": (0, 256, False),
    "threads": (0, 4096, False), "weight_decay": (0.0, 10.0, False), "teacher_lr": (0.0, 10.0, True),
    "teacher_seed": (0, 2**31 - 1, False), "checkpoint_every": (0, 10**9, False), "log_every": (1, 10**9, False),
    "seeds": (0, 2**31 - 1, False), "opset": (9, 20, False), "atol": (0.0, 1e6, True),
}


def check_numbers(args: argparse.Namespace) -> None:
    """InputError naming the first numeric flag that is not finite or lies outside its range."""
    import math

    for name, (low, high, exclusive) in NUMBER_BOUNDS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            bad = not math.isfinite(value) or value > high or value < low or (exclusive and value == low)
            if bad:
                low_text = f"({low}" if exclusive else f"[{low}"
                raise InputError(f"{_flag(name)} must lie in {low_text}, {high}], got {value}")


def settings_from_args(args: argparse.Namespace):
    from hiap.app.models import parse_model_args
    from hiap.app.pipeline import PipelineSettings

    _check_positive(args, "epochs", "batch_size", "eval_batch_size", "latency_batch", "latency_repeats")
    if args.teacher_epochs < 0:
        raise InputError(f"--teacher-epochs must be >= 0, got {args.teacher_epochs}")
    if args.data is not None:
        from hiap.app.data import check_imagefolder

        check_imagefolder(args.data)
    return PipelineSettings(
        output=args.output, model=args.model, model_args=parse_model_args(args.model_args),
        checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data, val_fraction=args.val_fraction,
        split_seed=args.split_seed, workers=args.workers, hiap=hiap_config_from_args(args), epochs=args.epochs,
        batch_size=args.batch_size, weight_decay=args.weight_decay, teacher_epochs=args.teacher_epochs,
        teacher_lr=args.teacher_lr, teacher_seed=args.teacher_seed, checkpoint_every=args.checkpoint_every,
        log_every=max(1, args.log_every), eval_batch_size=args.eval_batch_size, device=args.device, amp=args.amp,
        threads=args.threads, cache_dir=args.cache_dir, show_progress=args.show_progress, resume=args.resume,
        latency_batch=args.latency_batch, latency_repeats=args.latency_repeats, compile=args.compile,
        overwrite=args.overwrite,
    )


def _check_dense_checkpoint(settings) -> None:
    if settings.checkpoint is not None and not Path(settings.checkpoint).expanduser().is_file():
        raise InputError(f"checkpoint {settings.checkpoint} does not exist")


def command_prune(args: argparse.Namespace) -> int:
    from hiap.app.pipeline import prune
    from hiap.app.report import summary_table

    settings = settings_from_args(args)
    _check_dense_checkpoint(settings)
    outcome = prune(settings)
    if _is_main():
        print(summary_table(outcome))
        print(f"wrote {settings.output}/pruned.safetensors, report.md, report.json, plots/")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from hiap.app.pipeline import compare
    from hiap.app.report import compare_table

    settings = settings_from_args(args)
    _check_dense_checkpoint(settings)
    targets = args.targets or [settings.hiap.target]
    for target in targets:
        if not 0.0 < target <= 1.0:
            raise InputError(f"--targets: every budget must lie in (0, 1], got {target}")
    report = compare(settings, seeds=args.seeds, targets=targets, methods=list(dict.fromkeys(args.methods)))
    if _is_main():
        print(compare_table(report))
        print(f"wrote {settings.output}/compare.md, compare.json, plots/accuracy_vs_macs.png")
    return 0


def command_extract(args: argparse.Namespace) -> int:
    from hiap.app.checkpoint import read_checkpoint
    from hiap.app.models import count_parameters
    from hiap.app.pipeline import rebuild_gated
    from hiap.method.cost import count_macs, dense_macs
    from hiap.method.extract import extract, pruned_layout, save_pruned

    payload = read_checkpoint(args.checkpoint, phase="hiap")
    gated = rebuild_gated(payload)
    pruned = extract(gated)
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name("pruned.safetensors")
    save_pruned(pruned, output)
    macs = count_macs(pruned)
    print(f"{output}: {macs / 1e6:.3f} M MACs ({macs / dense_macs(gated):.4f} of dense), "
          f"{count_parameters(pruned) / 1e3:.1f} K params, from step {payload['step']}/{payload['total_steps']}")
    for index, layer in enumerate(pruned_layout(pruned)["layers"]):
        print(f"  layer {index}: q/k {layer['qk_widths']}, v {layer['v_widths']}, FFN {layer['ffn_width']}")
    return 0


def _load_for_eval(args: argparse.Namespace, num_classes: int):
    """The model ``args.path`` names: a pruned file, a HiAP training checkpoint, or dense weights for ``--model``."""
    import torch

    from hiap.app.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
    from hiap.app.models import create_dense_model, load_dense_weights, parse_model_args
    from hiap.app.pipeline import rebuild_gated
    from hiap.method.extract import extract, load_pruned

    path = Path(args.path).expanduser()
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_pruned(path), "pruned"
        except ValueError as error:
            if "not a HiAP pruned model" not in str(error):
                raise InputError(f"{path} is corrupt or unreadable: {error}") from error
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a foreign pickle's protocol warning would split the one-line error
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise InputError(f"checkpoint {path} is corrupt or not a weights file ({type(error).__name__})") from error
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            return extract(rebuild_gated(read_checkpoint(path, phase="hiap"))), "pruned"
    model = create_dense_model(args.model, num_classes, model_args=parse_model_args(args.model_args))
    load_dense_weights(model, path)
    return model.eval(), "dense"


def command_eval(args: argparse.Namespace) -> int:
    from hiap.app.data import build_datasets, eval_loader, num_classes_of
    from hiap.app.evaluation import summarize
    from hiap.app.models import DIGITS_VIT
    from hiap.app.runtime import configure_threads, resolve_device
    from hiap.method.cost import count_macs

    device = resolve_device(args.device)
    num_classes = num_classes_of(args.data)
    model, kind = _load_for_eval(args, num_classes)
    if model.num_classes != num_classes:
        raise InputError(f"the model predicts {model.num_classes} classes but the dataset has {num_classes}")
    if kind == "pruned" and args.model != DIGITS_VIT:
        # A pruned file stores no input normalisation: take the named timm model's.
        import timm

        pretrained_cfg = timm.models.get_pretrained_cfg(args.model)
        if pretrained_cfg is None:
            raise InputError(f"unknown model {args.model!r}: not a timm model name")
        model.pretrained_cfg = {"mean": pretrained_cfg.mean, "std": pretrained_cfg.std}
    configure_threads(args.threads, device, count_macs(model))
    data = build_datasets(args.data, model, args.val_fraction, args.split_seed)
    loader = eval_loader(data.val, args.eval_batch_size, workers=args.workers)
    _check_positive(args, "latency_batch", "latency_repeats", "eval_batch_size")
    if args.json is not None and Path(args.json).expanduser().parent.exists() \
            and not Path(args.json).expanduser().parent.is_dir():
        raise InputError(f"--json {args.json}: {Path(args.json).parent} is a file, not a folder")
    summary = summarize({kind: model.to(device)}, loader, device, amp=args.amp, latency_batch=args.latency_batch,
                        latency_rounds=args.latency_repeats, compile=args.compile,
                        show_progress=args.show_progress)[kind]
    latency = summary["latency"]
    print(f"{kind} model {args.path} on {data.description}")
    print(f"  accuracy {100 * summary['accuracy']:.2f}% (val loss {summary['loss']:.4f}), "
          f"{summary['macs'] / 1e6:.3f} M MACs, {summary['params'] / 1e3:.1f} K params")
    print(f"  latency {latency['ms_per_batch']:.2f} ms per batch of {latency['batch']} (quartiles "
          f"{latency['q1_ms']:.2f}-{latency['q3_ms']:.2f} ms over {latency['rounds']} rounds; "
          f"{latency['images_per_second']:.0f} images/s; {latency['threads']} thread"
          f"{'s' if latency['threads'] != 1 else ''}, {latency['device']}{', compiled' if latency['compiled'] else ''}; "
          f"{latency['paths']})")
    if args.json:
        from hiap.app.runtime import atomic_write_json

        atomic_write_json({"kind": kind, "path": str(args.path), "data": data.description, **summary}, args.json)
    return 0


def command_export(args: argparse.Namespace) -> int:
    from hiap.app.export import export_onnx
    from hiap.method.extract import load_pruned

    path = Path(args.path).expanduser()
    try:
        pruned = load_pruned(path)
    except FileNotFoundError as error:
        raise InputError(f"pruned model {path} does not exist") from error
    except ValueError as error:
        raise InputError(str(error)) from error
    try:
        check = export_onnx(pruned, args.onnx, opset=args.opset, atol=args.atol)
    except RuntimeError as error:
        raise InputError(str(error)) from error
    print(f"wrote {check.path} (opset {check.opset}, {check.nodes} nodes); onnxruntime vs PyTorch on a batch of "
          f"{check.batch_checked}: max |diff| = {check.max_abs_error:.2e}")
    return 0


COMMANDS = {"prune": command_prune, "compare": command_compare, "extract": command_extract, "eval": command_eval,
            "export": command_export}


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hiap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_numbers(args)
        return COMMANDS[args.command](args)
    except InputError as error:
        if _is_main():
            print(f"hiap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be written or read (a file named as a folder, /proc, ...)
        if _is_main():
            print(f"hiap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiap {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from hiap.app.runtime import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
