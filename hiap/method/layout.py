"""The pruned-model layout (the JSON in a pruned file's header), checked against a schema with bounds before anything
is allocated from it: a file is data from somewhere else, and a huge depth or width, a NaN scale or an unknown
activation must be a one-line error, not a 3 GB allocation or a silently different model. The ``pretrained_cfg``
stored beside it (what data the model reads) is checked against the same architecture.
"""

from __future__ import annotations

import math
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh")
GLOBAL_POOLS = ("token", "avg", "")
POS_EMBEDS = ("learn", "none")
# Far above any ViT in use (ViT-22B: depth 48, width 6144, 48 heads), far below what would exhaust a machine.
LIMITS = {"depth": 256, "embed_dim": 16384, "num_heads": 512, "head_dim": 1024, "in_chans": 64,
          "num_classes": 1_000_000, "reg_tokens": 256, "image_side": 8192, "mlp_ratio": 64.0}
MAX_PARAMETERS = 25_000_000_000  # 100 GB of fp32 weights


class LayoutError(ValueError):
    """The layout breaks the schema; the message names the field."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise LayoutError(f"pruned-model layout: {message}")


def _integer(value: Any, name: str, low: int, high: int) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
          f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and low <= value <= high, f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    _need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    return value


def _pair(value: Any, name: str, high: int) -> list[int]:
    _need(isinstance(value, list) and len(value) == 2, f"{name} must be a list of two integers, got {value!r}")
    return [_integer(v, f"{name}[{i}]", 1, high) for i, v in enumerate(value)]


def validate_architecture(architecture: Any) -> dict:
    """Check the skeleton description ``describe_vit`` writes; returns it."""
    _need(isinstance(architecture, dict), f"architecture must be an object, got {type(architecture).__name__}")
    a = architecture
    image = _pair(a.get("img_size"), "architecture.img_size", LIMITS["image_side"])
    patch = _pair(a.get("patch_size"), "architecture.patch_size", LIMITS["image_side"])
    _need(image[0] % patch[0] == 0 and image[1] % patch[1] == 0,
          f"architecture.img_size {image} is not a multiple of patch_size {patch}")
    _integer(a.get("in_chans"), "architecture.in_chans", 1, LIMITS["in_chans"])
    _integer(a.get("num_classes"), "architecture.num_classes", 0, LIMITS["num_classes"])
    _need(a.get("global_pool") in GLOBAL_POOLS, f"architecture.global_pool must be one of {GLOBAL_POOLS}")
    embed = _integer(a.get("embed_dim"), "architecture.embed_dim", 1, LIMITS["embed_dim"])
    depth = _integer(a.get("depth"), "architecture.depth", 1, LIMITS["depth"])
    heads = _integer(a.get("num_heads"), "architecture.num_heads", 1, LIMITS["num_heads"])
    head_dim = _integer(a.get("head_dim"), "architecture.head_dim", 1, LIMITS["head_dim"])
    _need(heads * head_dim == embed, f"architecture: num_heads * head_dim = {heads * head_dim} != embed_dim {embed}")
    ratio = _number(a.get("mlp_ratio"), "architecture.mlp_ratio", 1.0 / embed, LIMITS["mlp_ratio"])
    for name in ("qkv_bias", "proj_bias", "class_token", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
                 "dynamic_img_size"):
        _flag(a.get(name), f"architecture.{name}")
    _need(a.get("init_values") is None or (isinstance(a["init_values"], (int, float)) and math.isfinite(a["init_values"])),
          f"architecture.init_values must be null or a finite number, got {a.get('init_values')!r}")
    _need(a.get("pos_embed") in POS_EMBEDS, f"architecture.pos_embed must be one of {POS_EMBEDS}")
    _integer(a.get("reg_tokens"), "architecture.reg_tokens", 0, LIMITS["reg_tokens"])
    _number(a.get("norm_eps"), "architecture.norm_eps", 0.0, 1.0)
    _need(a.get("act") in ACTIVATIONS, f"architecture.act must be one of {ACTIVATIONS}, got {a.get('act')!r}")
    hidden = int(embed * ratio)
    parameters = depth * (4 * embed * embed + 2 * embed * hidden) + a["num_classes"] * embed
    _need(parameters <= MAX_PARAMETERS, f"the architecture describes {parameters:,} parameters, more than "
                                        f"{MAX_PARAMETERS:,}")
    return architecture


def validate_layout(layout: Any) -> dict:
    """Check a pruned-model layout against the schema and its architecture's bounds; returns it.

    Raises:
        LayoutError (a ValueError): the first field that is missing, of the wrong type or out of range.
    """
    _need(isinstance(layout, dict), f"the layout must be an object, got {type(layout).__name__}")
    architecture = validate_architecture(layout.get("architecture"))
    layers = layout.get("layers")
    _need(isinstance(layers, list), f"layers must be a list, got {type(layers).__name__}")
    _need(len(layers) == architecture["depth"],
          f"{len(layers)} layers but the architecture has {architecture['depth']} blocks")
    heads, head_dim = architecture["num_heads"], architecture["head_dim"]
    ffn_dense = int(architecture["embed_dim"] * architecture["mlp_ratio"])
    for index, layer in enumerate(layers):
        where = f"layers[{index}]"
        _need(isinstance(layer, dict), f"{where} must be an object")
        qk, v = layer.get("qk_widths"), layer.get("v_widths")
        for name, widths, low in (("qk_widths", qk, 0), ("v_widths", v, 1)):
            _need(isinstance(widths, list) and len(widths) <= heads,
                  f"{where}.{name} must be a list of at most {heads} widths")
            for position, width in enumerate(widths):
                _integer(width, f"{where}.{name}[{position}]", low, head_dim)
        _need(len(qk) == len(v), f"{where}: {len(qk)} q/k widths but {len(v)} v widths")
        _number(layer.get("scale"), f"{where}.scale", 1e-12, 1e12)
        _integer(layer.get("ffn_width"), f"{where}.ffn_width", 0, ffn_dense)
    alignment = layout.get("alignment")
    if alignment is not None:
        _need(isinstance(alignment, dict), "alignment must be an object")
        head = _integer(alignment.get("head"), "alignment.head", 1, head_dim)
        ffn = _integer(alignment.get("ffn"), "alignment.ffn", 1, max(1, ffn_dense))
        for index, layer in enumerate(layers):
            for kind in ("qk_widths", "v_widths"):
                odd = [w for w in layer[kind] if w % head]
                _need(not odd, f"layers[{index}].{kind} {odd} are not multiples of the declared head alignment {head}")
            _need(layer["ffn_width"] % ffn == 0, f"layers[{index}].ffn_width {layer['ffn_width']} is not a multiple "
                                                 f"of the declared FFN alignment {ffn}")
    return layout


# The fields of timm's pretrained_cfg that describe the data a model reads and its first and last layers. The others
# (url, hf_hub_id, file, tag, test sizes, ...) say where the dense weights came from and at what other size they were
# tested; they do not hold for weights that were pruned or trained further.
DATA_CFG_FIELDS = ("architecture", "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean",
                   "std", "num_classes", "first_conv", "classifier", "license")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
CROP_MODES = ("center", "squash", "border")
CFG_TEXT_FIELDS = ("architecture", "first_conv", "classifier", "license")
MAX_TEXT = 256


def validate_pretrained_cfg(cfg: Any, architecture: dict) -> dict:
    """Check a stored ``pretrained_cfg`` (JSON: lists for tuples) against the ``architecture`` it belongs to (already
    validated); returns it with ``input_size``, ``mean`` and ``std`` as tuples, as timm holds them.

    Raises:
        LayoutError (a ValueError): an unknown field, or a field of the wrong type, out of range or at odds with the
            architecture (input size, channels of mean / std, classes).
    """
    _need(isinstance(cfg, dict), f"pretrained_cfg must be an object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DATA_CFG_FIELDS))
    _need(not unknown, f"pretrained_cfg has unknown fields {unknown[:4]}")
    channels = architecture["in_chans"]
    expected_size = [channels, *architecture["img_size"]]
    restored = dict(cfg)
    if "input_size" in cfg:
        _need(cfg["input_size"] == expected_size,
              f"pretrained_cfg.input_size must be the architecture's {expected_size}, got {cfg['input_size']!r}")
        restored["input_size"] = tuple(expected_size)
    for name, low in (("mean", -1e6), ("std", 1e-12)):
        if name in cfg:
            values = cfg[name]
            _need(isinstance(values, list) and len(values) == channels,
                  f"pretrained_cfg.{name} must be a list of {channels} numbers (one per input channel), got {values!r}")
            restored[name] = tuple(_number(v, f"pretrained_cfg.{name}[{i}]", low, 1e6) for i, v in enumerate(values))
    if "num_classes" in cfg:
        _need(cfg["num_classes"] == architecture["num_classes"] and not isinstance(cfg["num_classes"], bool),
              f"pretrained_cfg.num_classes must be the architecture's {architecture['num_classes']}, got "
              f"{cfg['num_classes']!r}")
    if "fixed_input_size" in cfg:
        _flag(cfg["fixed_input_size"], "pretrained_cfg.fixed_input_size")
    if "interpolation" in cfg:
        _need(cfg["interpolation"] in INTERPOLATIONS,
              f"pretrained_cfg.interpolation must be one of {INTERPOLATIONS}, got {cfg['interpolation']!r}")
    if "crop_pct" in cfg:
        _number(cfg["crop_pct"], "pretrained_cfg.crop_pct", 0.01, 10.0)
    if "crop_mode" in cfg:
        _need(cfg["crop_mode"] in CROP_MODES, f"pretrained_cfg.crop_mode must be one of {CROP_MODES}, got "
                                              f"{cfg['crop_mode']!r}")
    for name in CFG_TEXT_FIELDS:
        if name in cfg:
            _need(isinstance(cfg[name], str) and len(cfg[name]) <= MAX_TEXT,
                  f"pretrained_cfg.{name} must be a text of at most {MAX_TEXT} characters")
    return restored
