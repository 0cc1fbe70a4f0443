"""The ``hiap`` command line's flags: every HiAPConfig field generated as a flag (help text from its docstring), the
other groups of each command, and the checks of numeric values that run before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing

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
    """One flag per HiAPConfig field with the dataclass default."""
    group = parser.add_argument_group("HiAP hyperparameters (hiap.HiAPConfig; defaults are its own)")
    hints = typing.get_type_hints(HiAPConfig)
    helps = _field_help()
    defaults = HiAPConfig()
    for field in dataclasses.fields(HiAPConfig):
        kind = hints[field.name]
        optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if type(None) in typing.get_args(kind) and len(optional) == 1:  # "X | None": a flag of type X, unset by default
            kind = optional[0]
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
                       help="timm ViT name, or a preset: digits_vit (the default, for the digits), mnist1d_vit (for "
                            "--data mnist1d), paper_table3_vit (the paper's Table 3 ViT-Tiny, for 32 px CIFAR-10) "
                            "(default: %(default)s)")
    group.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                       help="keyword arguments for timm.create_model, e.g. depth=2 embed_dim=32 img_size=32")
    if weights:
        group.add_argument("--checkpoint", default=None, help="local dense weights (torch or safetensors state dict)")
        group.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")


def _add_data_flags(parser: argparse.ArgumentParser, defaults) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="ImageFolder root with train/ and val/ (ImageNet layout), or mnist1d (generated by the "
                            "mnist1d package, no download; use --model mnist1d_vit); default: scikit-learn digits")
    group.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       help="digits and mnist1d: validation share of the stratified split (default: %(default)s)")
    group.add_argument("--split-seed", type=int, default=defaults.split_seed,
                       help="digits and mnist1d: seed of the train/val split (default: %(default)s)")
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


TOKENS_HELP = ("also evaluate with token reduction: rapid:r=N or rapid:keep=F (prune shallow, merge deep; options "
               "switch=, weight=, pool=), tome:r=N or tome:keep=F (ToMe), or one entry per block (p<N>, m<N>, t<N>, "
               "-); keep=0.6 removes about 40%% of the token-layer work")


def build_parser() -> argparse.ArgumentParser:
    from hiap import __version__
    from hiap.app.session import PipelineSettings

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
    prune.add_argument("--tokens", default=None, metavar="SCHEDULE", help=TOKENS_HELP)

    compare = commands.add_parser(
        "compare", help="HiAP against uniform-ratio, l1-structured and Torch-Pruning baselines at the same MACs",
        description="Train the dense teacher once, then at every --targets budget and every --seeds seed run HiAP and "
                    "each of --methods on it: a baseline picks its units (uniform ratio, l1-structured FFN, "
                    "Torch-Pruning's ViT recipe), is extracted and gets the same KD training steps as the HiAP run. "
                    "Writes compare.md / compare.json (mean and spread per method and budget, HiAP against each "
                    "baseline paired by seed with wins, ties and losses) and an accuracy-vs-MACs plot.")
    for add in (_add_training_flags, _add_model_flags, _add_data_flags, _add_runtime_flags):
        add(compare, defaults)
    compare.set_defaults(output="hiap-runs/compare")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every method (default: 0)")
    compare.add_argument("--targets", type=float, nargs="+", default=None,
                         help="MAC fractions to compare at (default: --target)")
    compare.add_argument("--methods", nargs="+", default=["hiap", "uniform", "l1"],
                         choices=["hiap", "uniform", "l1", "torch-pruning"],
                         help="methods to run (default: hiap uniform l1; torch-pruning needs the [peers] extra)")
    add_hiap_config_flags(compare)

    extract = commands.add_parser(
        "extract", help="HiAP training checkpoint -> pruned model (safetensors)",
        description="Rebuild the gated model of a hiap prune checkpoint (finished or not), decide its gates as "
                    "hiap prune does and write the physical pruned network (weights and JSON layout) to one "
                    ".safetensors file; prints its MACs and the kept widths per layer.")
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
    evaluate.add_argument("--tokens", default=None, metavar="SCHEDULE", help=TOKENS_HELP)
    evaluate.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    profile = commands.add_parser(
        "profile", help="latency table of a model's parts on this device, for --budget latency",
        description="Time, on this device, one attention layer for every number of heads and every pair of q/k and "
                    "v head widths (on the layout's alignment steps), one FFN per width, the fixed parts (patch "
                    "embedding, norms, residual adds, head) and the dense model, at the given batch size, dtype and "
                    "threads, and write the table as JSON: hiap prune --budget latency --latency-table TABLE "
                    "--target 0.7 then searches for 70%% of the dense latency. A table that exists with the same "
                    "settings on the same device is reused.")
    profile.add_argument("-o", "--output", required=True, help="the table (JSON) to write")
    _add_model_flags(profile, defaults, weights=False)
    profile.add_argument("--data", default=None,
                         help="the dataset hiap prune will use, for the number of classes (default: digits)")
    profile.add_argument("--batch-size", type=int, default=1, help="images per forward (default: %(default)s)")
    profile.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                         help="the dtype the model will run in (default: %(default)s)")
    profile.add_argument("--device", default=defaults.device, help="auto, cpu or cuda (default: %(default)s)")
    profile.add_argument("--threads", type=int, default=defaults.threads,
                         help="torch CPU threads; 0 = as hiap prune chooses them (default: %(default)s)")
    profile.add_argument("--compile", action="store_true",
                         help="time every part torch.compile'd (minutes on a CPU: one compilation per part)")
    profile.add_argument("--rounds", type=int, default=7,
                         help="timed rounds; each times every part once, in a rotating order (default: %(default)s)")
    profile.add_argument("--overwrite", action="store_true", help="profile again even if the table exists")
    profile.add_argument("--no-progress", dest="show_progress", action="store_false", help="hide the progress bar")

    export = commands.add_parser(
        "export", help="pruned model -> ONNX, one batched attention per run of equal-width heads",
        description="Export a pruned model (.safetensors from hiap) to ONNX (input images [B, C, H, W], output "
                    "logits, dynamic B). A layer's heads are grouped by width and each group is one batched "
                    "attention (MatMul, Softmax, MatMul), the form ONNX Runtime, TensorRT and OpenVINO run fast; "
                    "every shape but the batch is a constant. Unless --no-check, ONNX Runtime's output is then "
                    "compared with PyTorch's on a batch of random images, the largest difference reported and the "
                    "export refused (nothing written) above --atol. Needs the onnx extra: pip install \".[onnx]\".")
    export.add_argument("path", help="pruned model (.safetensors from hiap)")
    export.add_argument("--onnx", required=True, help="ONNX file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    export.add_argument("--pad-heads", type=int, default=1, metavar="M",
                        help="round every head's q/k and v width up to a multiple of M with zero columns, which "
                             "leave the output as it is: 8 or 16 where a runtime wants aligned head sizes; 1 pads "
                             "nothing (default: %(default)s)")
    export.add_argument("--equal-head-widths", action="store_true",
                        help="also pad each head's q/k and v to one width, the single head size fused attention "
                             "kernels take (TensorRT, FlashAttention); costs MACs on a CPU")
    export.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare ONNX Runtime's output with PyTorch's and report the max |diff|; --no-check "
                             "writes the file unchecked and needs no onnxruntime (default: on)")
    export.add_argument("--atol", type=float, default=1e-4,
                        help="largest |onnxruntime - PyTorch| the check accepts (default: %(default)s)")
    for command in commands.choices.values():
        chatter = command.add_mutually_exclusive_group()
        chatter.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                             help="only warnings and errors on stderr")
        chatter.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                             help="debug messages too")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------

def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"{_flag(name)} must be > 0, got {getattr(args, name)}")


# Numeric flags outside the HiAPConfig (which validates its own): (lowest, highest, lowest excluded, highest
# excluded). Every value must also be finite. Checked before any work starts.
NUMBER_BOUNDS = {
    "val_fraction": (0.0, 1.0, True, True), "split_seed": (0, 2**31 - 1, False, False),
    "workers": (0, 256, False, False), "threads": (0, 4096, False, False), "weight_decay": (0.0, 10.0, False, False),
    "teacher_lr": (0.0, 10.0, True, False), "teacher_seed": (0, 2**31 - 1, False, False),
    "checkpoint_every": (0, 10**9, False, False), "log_every": (1, 10**9, False, False),
    "seeds": (0, 2**31 - 1, False, False), "opset": (9, 20, False, False), "atol": (0.0, 1e6, True, False),
}


def check_numbers(args: argparse.Namespace) -> None:
    """InputError naming the first numeric flag that is not finite or lies outside its range."""
    for name, (low, high, low_excluded, high_excluded) in NUMBER_BOUNDS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            bad = (not math.isfinite(value) or value > high or value < low or (low_excluded and value == low)
                   or (high_excluded and value == high))
            if bad:
                interval = f"{'(' if low_excluded else '['}{low}, {high}{')' if high_excluded else ']'}"
                raise InputError(f"{_flag(name)} must lie in {interval}, got {value}")
