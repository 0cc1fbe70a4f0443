"""Which timm Vision Transformers HiAP accepts, how to rebuild one's skeleton from a JSON description, and the
timm ``pretrained_cfg`` that says what data a model reads.

``describe_vit`` is the single place that inspects a timm ``VisionTransformer``: ``gate_vit`` calls it to reject
unsupported models up front with a clear message, and ``save_pruned`` stores its result so ``load_pruned`` can rebuild
the same skeleton with ``build_vit`` (no pickle, no model registry lookup). ``data_pretrained_cfg`` keeps the part of a
model's ``pretrained_cfg`` that timm's data helpers read, made true to the model's own input size and classes.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import LayerScale, VisionTransformer

from hiap.method.gated import GatedAttention, GatedMlp
from hiap.method.layout import DATA_CFG_FIELDS


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer that HiAP can gate, extract and rebuild."""


def _unsupported(message: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{message}. HiAP supports timm VisionTransformer models (ViT, DeiT and relatives) built from the standard "
        "Attention and Mlp layers."
    )


def _activation_name(act: nn.Module) -> str:
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise _unsupported(f"activation {type(act).__name__} is not supported (nn.GELU only)")


def _check_attention(attn: nn.Module, index: int) -> None:
    if isinstance(attn, GatedAttention):
        return
    if type(attn) is not Attention:
        raise _unsupported(f"blocks.{index}.attn is {type(attn).__name__}, not timm's Attention")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise _unsupported(f"blocks.{index}.attn uses qk_norm, which mixes head dims and cannot be pruned exactly")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise _unsupported(f"blocks.{index}.attn uses scale_norm, which mixes head dims and cannot be pruned exactly")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(f"blocks.{index}.attn uses an output gate (gated=True)")
    if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise _unsupported(f"blocks.{index}.attn has an unexpected qkv width {attn.qkv.out_features}")


def _check_mlp(mlp: nn.Module, index: int) -> None:
    if isinstance(mlp, GatedMlp):
        return
    if type(mlp) is not Mlp:
        raise _unsupported(f"blocks.{index}.mlp is {type(mlp).__name__}, not timm's Mlp")
    if not isinstance(mlp.fc1, nn.Linear):
        raise _unsupported(f"blocks.{index}.mlp uses convolutions")
    if not isinstance(mlp.norm, nn.Identity):
        raise _unsupported(f"blocks.{index}.mlp uses scale_mlp_norm, which mixes neurons and cannot be pruned exactly")
    _activation_name(mlp.act)


def describe_vit(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ``timm.models.vision_transformer.VisionTransformer`` that rebuild ``model``'s skeleton.

    Works on a dense or a gated model (a pruned model carries the description of the model it came from in its
    ``hiap_architecture`` attribute). Raises UnsupportedModelError naming the first unsupported feature.
    """
    if type(model) is not VisionTransformer:
        raise _unsupported(f"expected timm's VisionTransformer, got {type(model).__module__}.{type(model).__name__}")
    if model.global_pool not in ("token", "avg", ""):
        raise _unsupported(f"global_pool={model.global_pool!r} (attention pooling) is not supported")
    if type(model.patch_embed) is not PatchEmbed or not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        raise _unsupported("only timm's PatchEmbed without a norm layer is supported")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise _unsupported("patch dropout is not supported")
    blocks = list(model.blocks)
    if not blocks:
        raise _unsupported("the model has no transformer blocks")
    for index, block in enumerate(blocks):
        if not hasattr(block, "attn") or not hasattr(block, "mlp"):
            raise _unsupported(f"blocks.{index} ({type(block).__name__}) has no attn/mlp pair")
        _check_attention(block.attn, index)
        _check_mlp(block.mlp, index)
    first = blocks[0]
    norm1 = first.norm1
    if type(norm1) is not nn.LayerNorm and not isinstance(norm1, nn.LayerNorm):
        raise _unsupported(f"norm layer {type(norm1).__name__} is not supported (LayerNorm only)")
    attn = first.attn
    num_heads = attn.num_heads
    qkv = attn.qkv
    mlp = first.mlp
    patch = model.patch_embed
    return {
        "img_size": list(patch.img_size),
        "patch_size": list(patch.patch_size),
        "in_chans": patch.proj.in_channels,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": len(blocks),
        "num_heads": num_heads,
        "mlp_ratio": mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": qkv.bias is not None,
        "proj_bias": attn.proj.bias is not None,
        "init_values": 1.0 if isinstance(first.ls1, LayerScale) else None,
        "class_token": model.cls_token is not None,
        "pos_embed": "learn" if model.pos_embed is not None else "none",
        "no_embed_class": bool(model.no_embed_class),
        "reg_tokens": int(model.num_reg_tokens),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "final_norm": not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "dynamic_img_size": bool(model.dynamic_img_size),
        "norm_eps": float(norm1.eps),
        "act": _activation_name(mlp.act),
        "head_dim": attn.head_dim,
    }


def build_vit(description: dict[str, Any]) -> VisionTransformer:
    """An uninitialised dense ``VisionTransformer`` with the skeleton ``description`` (from describe_vit) names.

    Raises:
        TypeError: ``description`` is not a dict.
        ValueError: it lacks a field ``describe_vit`` writes, or describes what this build cannot make.
    """
    if not isinstance(description, dict):
        raise TypeError(f"build_vit: description must be the dict describe_vit returns, got "
                        f"{type(description).__name__}")
    missing = [key for key in ("norm_eps", "act", "head_dim", "num_heads", "embed_dim", "img_size", "patch_size",
                               "depth") if key not in description]
    if missing:
        raise ValueError(f"build_vit: the description has no {', '.join(missing)} (use describe_vit's output)")
    args = dict(description)
    norm_eps = args.pop("norm_eps")
    act = args.pop("act")
    head_dim = args.pop("head_dim")
    if head_dim * args["num_heads"] != args["embed_dim"]:
        raise ValueError("head_dim * num_heads != embed_dim is not supported by this timm VisionTransformer build")
    args["img_size"] = tuple(args["img_size"])
    args["patch_size"] = tuple(args["patch_size"])
    args["norm_layer"] = partial(nn.LayerNorm, eps=norm_eps)
    approximations = {"gelu": "none", "gelu_tanh": "tanh"}
    if act not in approximations:
        raise ValueError(f"activation {act!r} is not one of {sorted(approximations)}")
    args["act_layer"] = partial(nn.GELU, approximate=approximations[act])
    accepted = inspect.signature(VisionTransformer.__init__).parameters
    unknown = [k for k in args if k not in accepted]
    if unknown:
        raise ValueError(f"this timm version's VisionTransformer does not accept {unknown}")
    if "weight_init" in accepted:
        args["weight_init"] = "skip"
    return VisionTransformer(**args)



def fit_to_channels(values, channels: int) -> tuple[float, ...]:
    """Per-channel ``mean`` or ``std`` for a model of ``channels`` inputs: as given when the counts match, else their
    average repeated (an RGB normalisation on a one-channel model: the gray image it reads is the mean of the three)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def data_pretrained_cfg(model: nn.Module, source=None) -> dict[str, Any]:
    """The timm ``pretrained_cfg`` of a dense or pruned ``VisionTransformer`` as the data it reads: ``source``'s (by
    default the model's own ``pretrained_cfg``) normalisation, interpolation and crop (``DATA_CFG_FIELDS``), with the
    input size ``(C, H, W)``, the classes and the layer names taken from the model itself, and mean / std fitted to
    its channels (:func:`fit_to_channels`). A model without a source gets no mean / std (timm's helpers then use
    their defaults).

    This is what makes ``timm.data.resolve_data_config({}, model=model)`` right for a model whose skeleton differs
    from the timm model it was created as (``in_chans=1``, another ``img_size``, another class count).
    """
    if source is None:
        source = getattr(model, "pretrained_cfg", None)
    if source is not None and not isinstance(source, dict):
        source = source.to_dict() if hasattr(source, "to_dict") else dict(source)
    source = source or {}
    patch = model.patch_embed
    channels = patch.proj.in_channels
    cfg = {name: source[name] for name in DATA_CFG_FIELDS if source.get(name) is not None}
    cfg["input_size"] = (channels, *(int(side) for side in patch.img_size))
    cfg["fixed_input_size"] = not bool(getattr(model, "dynamic_img_size", False))
    cfg["num_classes"] = int(model.num_classes)
    cfg["first_conv"] = "patch_embed.proj"
    cfg["classifier"] = "head"
    for name in ("mean", "std"):
        if name in cfg:
            cfg[name] = fit_to_channels(cfg[name], channels)
    return cfg


def set_pretrained_cfg(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Give ``model`` the ``pretrained_cfg`` (and its older alias ``default_cfg``) that timm's helpers read."""
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
