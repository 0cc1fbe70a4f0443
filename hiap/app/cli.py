"""``hiap`` command line: prune, compare, extract, eval, export.

The flags live in ``flags.py`` (every HiAPConfig field is one, generated from the dataclass). Problems with the input
(paths, model names, budgets, checkpoints, resume) end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Iterator

from hiap.app.flags import build_parser, check_numbers, check_positive, hiap_config_from_args
from hiap.app.run_folder import RunFolder
from hiap.app.runtime import InputError, is_rank0

__all__ = ["build_parser", "hiap_config_from_args", "main"]


def settings_from_args(args: argparse.Namespace):
    from hiap.app.models import parse_model_args
    from hiap.app.session import PipelineSettings

    check_positive(args, "epochs", "batch_size", "eval_batch_size", "latency_batch", "latency_repeats")
    if args.teacher_epochs < 0:
        raise InputError(f"--teacher-epochs must be >= 0, got {args.teacher_epochs}")
    if args.data is not None:
        from hiap.app.data import BUILTIN_DATA, check_imagefolder

        if args.data not in BUILTIN_DATA:
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
        overwrite=args.overwrite, tokens=getattr(args, "tokens", None),
    )


def check_input_file(path, what: str) -> Path:
    """``path`` expanded; InputError saying what is wrong when it names no file (nothing there, or a folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    return path


def _check_dense_checkpoint(settings) -> None:
    if settings.checkpoint is not None:
        check_input_file(settings.checkpoint, "--checkpoint")


def check_output_file(path: Path, flag: str) -> None:
    """InputError when ``path`` cannot name a file to write: it is a folder, or a file stands where a folder of its
    path must be (checked before any work)."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; name a file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a folder")


@contextlib.contextmanager
def writing_into(path: Path, flag: str) -> Iterator[None]:
    """Hold the run lock of the folder that ``path`` goes into while the block writes it: a file is not written into
    a run folder that a running ``hiap prune`` / ``compare`` holds. InputError when it is held, when ``path`` is a
    folder, or when a file stands where a folder of its path must be."""
    from hiap.files import RunFolderBusy, RunFolderLock

    check_output_file(path, flag)
    try:
        lock = RunFolderLock(path.parent, existing_only=True).__enter__()
    except RunFolderBusy as error:
        raise InputError(f"{error}; wait for it to finish or write elsewhere") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def command_prune(args: argparse.Namespace) -> int:
    from hiap.app.pipeline import prune
    from hiap.app.report import summary_table

    settings = settings_from_args(args)
    _check_dense_checkpoint(settings)
    outcome = prune(settings)
    if is_rank0():
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
    if "torch-pruning" in args.methods:
        from hiap.app.peers import require_torch_pruning

        require_torch_pruning()  # before any teacher is trained
    report = compare(settings, seeds=args.seeds, targets=targets, methods=list(dict.fromkeys(args.methods)))
    if is_rank0():
        print(compare_table(report))
        print(f"wrote {settings.output}/compare.md, compare.json, plots/accuracy_vs_macs.png")
    return 0


def command_extract(args: argparse.Namespace) -> int:
    from hiap.app.checkpoint import read_checkpoint
    from hiap.app.models import count_parameters
    from hiap.app.pipeline import rebuild_gated
    from hiap.method.cost import count_macs, dense_macs
    from hiap.method.extract import extract, pruned_layout, save_pruned

    checkpoint = check_input_file(args.checkpoint, "checkpoint")
    output = Path(args.output).expanduser() if args.output else RunFolder(checkpoint.parent).pruned
    with writing_into(output, "-o"):
        payload = read_checkpoint(checkpoint, phase="hiap")
        gated = rebuild_gated(payload)
        pruned = extract(gated)
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

    path = check_input_file(args.path, "model file")
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
    from hiap.app.evaluation import check_latency_batch, summarize
    from hiap.app.models import PRESETS
    from hiap.app.runtime import configure_threads, resolve_device
    from hiap.method.cost import count_macs

    check_positive(args, "latency_batch", "latency_repeats", "eval_batch_size")
    if args.json is not None:
        check_output_file(Path(args.json).expanduser(), "--json")
    device = resolve_device(args.device)
    num_classes = num_classes_of(args.data)
    model, kind = _load_for_eval(args, num_classes)
    check_latency_batch(model, args.latency_batch, device)
    if model.num_classes != num_classes:
        raise InputError(f"the model predicts {model.num_classes} classes but the dataset has {num_classes}")
    if kind == "pruned" and args.model not in PRESETS:
        # A pruned file stores no input normalisation: take the named timm model's.
        import timm

        pretrained_cfg = timm.models.get_pretrained_cfg(args.model)
        if pretrained_cfg is None:
            raise InputError(f"unknown model {args.model!r}: not a timm model name")
        model.pretrained_cfg = {"mean": pretrained_cfg.mean, "std": pretrained_cfg.std}
    if args.tokens is not None:
        from hiap.app.session import check_token_schedule

        check_token_schedule(model, args.tokens)
    configure_threads(args.threads, device, count_macs(model))
    data = build_datasets(args.data, model, args.val_fraction, args.split_seed)
    loader = eval_loader(data.val, args.eval_batch_size, workers=args.workers)
    from hiap.app.session import with_tokens

    summaries = summarize(with_tokens({kind: model.to(device)}, args.tokens), loader, device, amp=args.amp,
                          latency_batch=args.latency_batch, latency_rounds=args.latency_repeats, compile=args.compile,
                          show_progress=args.show_progress)
    print(f"{kind} model {args.path} on {data.description}")
    for name, summary in summaries.items():
        latency = summary["latency"]
        if name.endswith("+tokens"):
            from hiap.tokens import schedule_for

            print(f"with token reduction {args.tokens!r} ({schedule_for(model, args.tokens).describe()}):")
        print(f"  accuracy {100 * summary['accuracy']:.2f}% (val loss {summary['loss']:.4f}), "
              f"{summary['macs'] / 1e6:.3f} M MACs, {summary['params'] / 1e3:.1f} K params")
        print(f"  latency {latency['ms_per_batch']:.2f} ms per batch of {latency['batch']} (quartiles "
              f"{latency['q1_ms']:.2f}-{latency['q3_ms']:.2f} ms over {latency['rounds']} rounds; "
              f"{latency['images_per_second']:.0f} images/s; {latency['threads']} thread"
              f"{'s' if latency['threads'] != 1 else ''}, {latency['device']}"
              f"{', compiled' if latency['compiled'] else ''}; {latency['paths']})")
    if args.json:
        from hiap.app.runtime import atomic_write_json

        record = {"kind": kind, "path": str(args.path), "data": data.description, **summaries[kind]}
        if args.tokens is not None:
            record["tokens"] = {"spec": args.tokens, **summaries[f"{kind}+tokens"]}
        with writing_into(Path(args.json).expanduser(), "--json"):
            atomic_write_json(record, args.json)
    return 0


def command_export(args: argparse.Namespace) -> int:
    from hiap.app.export import MAX_PAD, export_onnx, require_onnx
    from hiap.method.extract import load_pruned

    if not 1 <= args.pad_heads <= MAX_PAD:
        raise InputError(f"--pad-heads must lie in [1, {MAX_PAD}], got {args.pad_heads}")
    require_onnx(runtime=args.check)
    path = check_input_file(args.path, "pruned model")
    onnx_path = Path(args.onnx).expanduser()
    check_output_file(onnx_path, "--onnx")
    try:
        pruned = load_pruned(path)
    except ValueError as error:
        raise InputError(str(error)) from error
    with writing_into(onnx_path, "--onnx"):
        try:
            check = export_onnx(pruned, onnx_path, opset=args.opset, pad_heads=args.pad_heads,
                                equal_widths=args.equal_head_widths, check=args.check, atol=args.atol)
        except RuntimeError as error:
            raise InputError(str(error)) from error
    padding = f", {check.padded_columns} zero columns of padding" if check.padded_columns else ""
    print(f"wrote {check.path} (opset {check.opset}, {check.nodes} nodes; {check.attention_calls} batched attention "
          f"calls in {check.attention_layers} layers{padding})")
    if check.max_abs_error is None:
        print("not checked against PyTorch (--no-check)")
    else:
        print(f"onnxruntime vs PyTorch on a batch of {check.batch_checked}: max |diff| = {check.max_abs_error:.2e} "
              f"(accepted up to --atol {args.atol:g})")
    return 0


def command_profile(args: argparse.Namespace) -> int:
    import torch

    from hiap.app.data import num_classes_of
    from hiap.app.models import create_dense_model, parse_model_args
    from hiap.app.runtime import configure_threads, resolve_device
    from hiap.method.architecture import describe_vit
    from hiap.method.cost import count_macs
    from hiap.method.latency import LatencyTable
    from hiap.method.profile import device_name, profile_latency

    output = Path(args.output).expanduser()
    check_output_file(output, "-o")
    check_positive(args, "batch_size", "rounds")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = create_dense_model(args.model, num_classes_of(args.data), model_args=parse_model_args(args.model_args))
    threads = configure_threads(args.threads, device, count_macs(model))
    settings = {"architecture": describe_vit(model), "batch": args.batch_size, "dtype": args.dtype,
                "device": device.type, "device_name": device_name(device), "threads": threads,
                "compiled": args.compile, "torch_version": torch.__version__}
    if output.exists() and not args.overwrite:
        try:
            cached = LatencyTable.load(output)
        except ValueError as error:
            raise InputError(f"-o {output} exists and is not a latency table ({error}); choose another file") from None
        differing = [key for key, value in settings.items() if getattr(cached, key) != value]
        if differing:
            raise InputError(f"-o {output} holds a table measured with other settings ({', '.join(differing)}); pass "
                             "--overwrite to profile again or choose another file")
        print(f"{output}: reusing the table measured with these settings ({cached.seconds:.0f} s to measure)")
        return 0
    table = profile_latency(model, name=args.model, batch_size=args.batch_size, device=device, dtype=dtype,
                            compile=args.compile, rounds=args.rounds, show_progress=args.show_progress)
    with writing_into(output, "-o"):
        table.save(output)
    error = table.dense_predicted_ms / table.dense_ms - 1
    print(f"wrote {output}: {args.model} at batch {table.batch}, {table.dtype}, {table.threads} thread"
          f"{'s' if table.threads != 1 else ''} on {table.device_name}, in {table.seconds:.0f} s. Dense: measured "
          f"{table.dense_ms:.3f} ms, the table predicts {table.dense_predicted_ms:.3f} ms ({100 * error:+.1f}%); fixed "
          f"parts {table.fixed_ms:.3f} ms")
    return 0


COMMANDS = {"prune": command_prune, "compare": command_compare, "extract": command_extract, "eval": command_eval,
            "export": command_export, "profile": command_profile}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hiap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from hiap.app.runtime import configure_logging

    configure_logging(args.verbosity, 0 if is_rank0() else 1)
    try:
        check_numbers(args)
        return COMMANDS[args.command](args)
    except InputError as error:
        if is_rank0():
            print(f"hiap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be written or read (a file named as a folder, /proc, ...)
        if is_rank0():
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
