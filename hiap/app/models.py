"""Dense models for the pipeline: any timm Vision Transformer by name, the presets (the small default for the digits
and two others, timm models that ``hiap.presets`` registers), and loading local dense weights (a state dict in a torch
or safetensors file)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hiap.app.runtime import InputError
from hiap.files import DIGEST_KEY, IntegrityError, verify_safetensors
from hiap.method.architecture import UnsupportedModelError, describe_vit
from hiap.presets import PRESET_ARGS

# The default model: a 4-block, 64-wide ViT on 16 px inputs (the 8x8 digits upsampled), 4 heads of 16 dims, patch 4
# (16 patches + class token). It trains to ~98% on the digits in under a minute on one CPU core.
DIGITS_VIT = "digits_vit"

# The command line's preset names and the timm models they name (registered by hiap/presets.py, where they are
# described). None has pretrained weights.
PRESETS = {
    DIGITS_VIT: "hiap_digits_vit",
    # MNIST-1D (``--data mnist1d``): a 40-sample signal read as a 1 x 40 image, patches of 4 (10 tokens + class).
    "mnist1d_vit": "hiap_mnist1d_vit",
    # The paper's Table 3 setting: a 6-block ViT-Tiny (embed 192, 3 heads) on 32 px CIFAR-10 with 4 px patches.
    # 173 M MACs counting the linear layers as the paper does; count_macs adds the attention matrices (182 M).
    "paper_table3_vit": "hiap_paper_table3_vit",
}


def parse_model_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["depth=2", "embed_dim=32", "qkv_bias=false"]`` -> keyword arguments for ``timm.create_model``."""
    import json

    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--model-args takes key=value pairs, got {pair!r}")
        lowered = text.lower()
        if lowered in ("true", "false"):
            args[key] = lowered == "true"
            continue
        try:
            args[key] = json.loads(text)
        except json.JSONDecodeError:
            args[key] = text
    return args


def create_dense_model(name: str, num_classes: int, *, model_args: dict[str, Any] | None = None,
                       pretrained: bool = False) -> nn.Module:
    """A dense timm VisionTransformer: a preset (``PRESETS``, or its timm name ``hiap_...``) or any timm model name,
    with ``num_classes`` outputs.

    Raises InputError for an unknown name, a model HiAP cannot prune, bad keyword arguments or pretrained weights that
    cannot be fetched.
    """
    import timm

    args = dict(model_args or {})
    timm_name = PRESETS.get(name, name)
    if timm_name in PRESET_ARGS:
        if pretrained:
            raise InputError(f"{name} has no pretrained weights; train it (the default) or pass --checkpoint")
    elif not timm.is_model(name):
        raise InputError(f"unknown model {name!r}: not a timm model name (list them with timm.list_models('*vit*'))")
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **args)
    except TypeError as error:
        raise InputError(f"model {name!r} does not accept --model-args {args}: {error}") from error
    except Exception as error:  # hub, network and shape errors alike become one line for the user
        if pretrained:
            raise InputError(
                f"could not load timm's pretrained weights for {name!r} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); pass local weights with --checkpoint"
            ) from error
        raise InputError(f"could not build model {name!r}: {error}") from error
    try:
        describe_vit(model)
    except UnsupportedModelError as error:
        raise InputError(f"model {name!r} cannot be pruned by HiAP: {error}") from error
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file holding a state dict (possibly under ``state_dict``,
    ``model`` or ``model_state``). Raises InputError when the file is missing, unreadable or holds no tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file, safe_open

            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if DIGEST_KEY in metadata:  # written by hiap (a cached teacher): check it; foreign files have none
                verify_safetensors(state, metadata, path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a foreign pickle's protocol warning would split the one-line error
                state = torch.load(path, map_location="cpu", weights_only=True)
    except IntegrityError as error:
        raise InputError(str(error)) from error
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        raise InputError(f"checkpoint {path} is corrupt or not a weights file ({type(error).__name__})") from error
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_dense_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load dense weights into ``model``; returns notes about what was adapted.

    A classifier head of another class count is left at its fresh initialisation (the teacher phase trains it); a
    position embedding of another grid size is resampled with timm's helper. Anything else that does not fit is an
    InputError.
    """
    from timm.layers import resample_abs_pos_embed

    state = read_state_dict(path)
    own = model.state_dict()
    notes = []
    head_keys = [k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape]
    for key in head_keys:
        del state[key]
    if head_keys:
        notes.append(f"classifier head of {path} has another class count; it starts fresh")
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
        notes.append("position embedding resampled to the model's patch grid")
    missing, unexpected = [], []
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            raise InputError(f"checkpoint {path} does not fit the model: {key} is {tuple(value.shape)}, "
                             f"the model needs {tuple(own[key].shape)}")
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    if missing or unexpected:
        raise InputError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
    return notes


def count_parameters(model: nn.Module) -> int:
    """Parameters of a dense or pruned model (gate logits excluded for a gated one)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.rsplit(".", 1)[-1].startswith("gate_"))
