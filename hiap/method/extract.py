"""Exact extraction of the physical pruned network, and its safetensors + JSON-layout file format."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from hiap.files import save_safetensors, verify_safetensors
from hiap.method.architecture import build_vit, data_pretrained_cfg, set_pretrained_cfg
from hiap.method.convert import HiAPViT
from hiap.method.gated import GatedAttention, GatedMlp
from hiap.method.layout import LayoutError, validate_layout, validate_pretrained_cfg
from hiap.method.pruned import PrunedAttention, PrunedMlp

FORMAT_NAME = "hiap-pruned"
FORMAT_VERSION = 1
LAYOUT_KEY = "hiap_layout"
# The model's timm pretrained_cfg (input size, mean, std, interpolation, crop, classes): JSON, sealed by the digest
# with the layout. Files written before it existed load with the part the layout implies (no mean / std).
PRETRAINED_CFG_KEY = "hiap_pretrained_cfg"


def _rows(linear: nn.Linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = linear.weight.detach()[index].clone()
    bias = None if linear.bias is None else linear.bias.detach()[index].clone()
    return weight, bias


def _copy_into(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)


@torch.no_grad()
def _extract_attention(attn: GatedAttention) -> PrunedAttention:
    head_dim, heads = attn.head_dim, attn.num_heads
    m_q, m_v = attn.gates.kept_columns()  # [H, Dh] each; a removed head has neither
    qk_widths, v_widths = m_q.sum(dim=1).tolist(), m_v.sum(dim=1).tolist()
    # Heads of equal widths next to each other: each run of them is one SDPA call in the pruned model.
    kept_heads = sorted((h for h in range(heads) if v_widths[h] > 0), key=lambda h: (-qk_widths[h], -v_widths[h]))
    q_cols = [h * head_dim + torch.nonzero(m_q[h]).flatten() for h in kept_heads]
    v_cols = [h * head_dim + torch.nonzero(m_v[h]).flatten() for h in kept_heads]
    width = heads * head_dim
    device = attn.qkv.weight.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    q_index = torch.cat(q_cols) if q_cols else empty
    v_index = torch.cat(v_cols) if v_cols else empty
    qkv_index = torch.cat([q_index, q_index + width, v_index + 2 * width])
    pruned = PrunedAttention(
        attn.qkv.in_features, attn.proj.out_features,
        qk_widths=[len(c) for c in q_cols], v_widths=[len(c) for c in v_cols], scale=attn.scale,
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
    ).to(device=device, dtype=attn.qkv.weight.dtype)
    _copy_into(pruned.qkv, *_rows(attn.qkv, qkv_index))
    proj_weight = attn.proj.weight.detach()[:, v_index].clone()
    proj_bias = None if attn.proj.bias is None else attn.proj.bias.detach().clone()
    _copy_into(pruned.proj, proj_weight, proj_bias)
    return pruned


@torch.no_grad()
def _extract_mlp(mlp: GatedMlp) -> PrunedMlp:
    index = torch.nonzero(mlp.gates.kept_neurons()).flatten()
    pruned = PrunedMlp(
        mlp.fc1.in_features, len(index), mlp.fc2.out_features, copy.deepcopy(mlp.act),
        fc1_bias=mlp.fc1.bias is not None, fc2_bias=mlp.fc2.bias is not None,
    ).to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
    _copy_into(pruned.fc1, *_rows(mlp.fc1, index))
    fc2_bias = None if mlp.fc2.bias is None else mlp.fc2.bias.detach().clone()
    _copy_into(pruned.fc2, mlp.fc2.weight.detach()[:, index].clone(), fc2_bias)
    return pruned


def extract(model: HiAPViT) -> nn.Module:
    """The physical pruned network: a timm ``VisionTransformer`` with ragged ``PrunedAttention`` / ``PrunedMlp``.

    Gates are decided by the same deterministic function as eval mode (``a > 0`` plus the hard minimums), so the
    pruned model's output equals ``model.eval()``'s to float rounding. No fine-tuning. The result is in eval mode and
    carries ``hiap_architecture`` (the skeleton description used by ``save_pruned``) and the timm ``pretrained_cfg``
    of the model that was gated, with its input size and classes (``timm.data.resolve_data_config({}, model=pruned)``
    gives the data config it was trained with).

    Raises:
        TypeError: ``model`` is not a gated model from ``hiap.gate_vit`` (its gates were never created).
        ValueError: a gate logit is NaN or infinite (a diverged run).
    """
    if not isinstance(model, HiAPViT):
        raise TypeError(
            f"extract needs a gated model from hiap.gate_vit(...); got {type(model).__name__}, which has no gates"
        )
    broken = [name for name, logit in model.gate_logits().items() if not torch.isfinite(logit).all()]
    if broken:
        raise ValueError(f"extract: gate logits contain NaN or inf in {broken[:4]}{' ...' if len(broken) > 4 else ''}")
    gated_blocks = list(model.vit.blocks)
    if not all(isinstance(b.attn, GatedAttention) and isinstance(b.mlp, GatedMlp) for b in gated_blocks):
        raise TypeError("extract: some blocks of this model have no gates")
    pruned = copy.deepcopy(model.vit)
    for block, gated_block in zip(pruned.blocks, gated_blocks):
        block.attn = _extract_attention(gated_block.attn)
        block.mlp = _extract_mlp(gated_block.mlp)
    pruned.hiap_architecture = copy.deepcopy(model.architecture)
    pruned.hiap_alignment = {"head": gated_blocks[0].attn.gates.group, "ffn": gated_blocks[0].mlp.gates.group}
    set_pretrained_cfg(pruned, data_pretrained_cfg(pruned, getattr(model.vit, "pretrained_cfg", None)))
    return pruned.eval()


def pruned_layout(pruned: nn.Module) -> dict:
    """JSON-serialisable description of a pruned model: skeleton arguments and per-layer widths."""
    architecture = getattr(pruned, "hiap_architecture", None)
    if architecture is None:
        raise TypeError("not a pruned model from hiap.extract / hiap.load_pruned (no hiap_architecture)")
    layers = []
    for block in pruned.blocks:
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, PrunedAttention) or not isinstance(mlp, PrunedMlp):
            raise TypeError("not a pruned model: its blocks hold no PrunedAttention / PrunedMlp")
        layers.append({"qk_widths": attn.qk_widths, "v_widths": attn.v_widths, "scale": attn.scale,
                       "ffn_width": mlp.hidden_features})
    layout = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": architecture, "layers": layers}
    alignment = getattr(pruned, "hiap_alignment", None)
    if alignment is not None:
        layout["alignment"] = dict(alignment)
    return layout


def _path_argument(path, who: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def save_pruned(pruned: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``pruned`` to one ``.safetensors`` file: the weights, with the JSON layout and the model's timm
    ``pretrained_cfg`` (the data it reads) in the header, and a digest over all of it.

    The file is written to a temporary name, flushed and renamed, so an interrupted save never leaves a half-written
    file; ``load_pruned`` checks the digest, so a damaged or edited file (weights, layout or data config) is refused
    instead of evaluating wrongly.
    """
    path = _path_argument(path, "save_pruned")
    layout = pruned_layout(pruned)
    metadata = {LAYOUT_KEY: json.dumps(layout), PRETRAINED_CFG_KEY: json.dumps(data_pretrained_cfg(pruned))}
    return save_safetensors(pruned.state_dict(), path, metadata)


def _read_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The metadata and each tensor's shape of a safetensors file, from its header (no tensor data read)."""
    if not path.is_file():
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a pruned-model file")
        raise FileNotFoundError(f"no pruned model at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    return metadata, shapes


def _layout_of(metadata: dict, path: Path) -> dict:
    if LAYOUT_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a HiAP pruned model (no layout metadata)")
    try:
        layout = json.loads(metadata[LAYOUT_KEY])
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: the layout metadata is not valid JSON ({type(error).__name__})") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT_NAME or layout.get("version") != FORMAT_VERSION:
        found = (layout.get("format"), layout.get("version")) if isinstance(layout, dict) else type(layout).__name__
        raise ValueError(f"{path}: unsupported layout format {found!r}")
    try:
        return validate_layout(layout)
    except LayoutError as error:
        raise ValueError(f"{path}: {error}") from None


def _pretrained_cfg_of(metadata: dict, layout: dict, path: Path) -> dict | None:
    """The stored pretrained_cfg, checked against the layout's architecture; None for a file written without one."""
    if PRETRAINED_CFG_KEY not in metadata:
        return None
    try:
        cfg = json.loads(metadata[PRETRAINED_CFG_KEY])
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: the pretrained_cfg metadata is not valid JSON ({type(error).__name__})") from None
    try:
        return validate_pretrained_cfg(cfg, layout["architecture"])
    except LayoutError as error:
        raise ValueError(f"{path}: {error}") from None


def read_layout(path: str | os.PathLike) -> dict:
    """The JSON layout stored in a pruned-model file (no weights read)."""
    path = _path_argument(path, "read_layout")
    metadata, _ = _read_header(path)
    return _layout_of(metadata, path)


def build_pruned_skeleton(layout: dict) -> nn.Module:
    """An uninitialised pruned model with the structure ``layout`` describes (validated first: see ``layout.py``)."""
    validate_layout(layout)
    architecture, layers = layout["architecture"], layout["layers"]
    vit = build_vit(architecture)
    for block, layer in zip(vit.blocks, layers):
        dense_attn, dense_mlp = block.attn, block.mlp
        block.attn = PrunedAttention(
            dense_attn.qkv.in_features, dense_attn.proj.out_features, layer["qk_widths"], layer["v_widths"],
            layer["scale"], qkv_bias=dense_attn.qkv.bias is not None, proj_bias=dense_attn.proj.bias is not None,
        )
        block.mlp = PrunedMlp(
            dense_mlp.fc1.in_features, layer["ffn_width"], dense_mlp.fc2.out_features, dense_mlp.act,
            fc1_bias=dense_mlp.fc1.bias is not None, fc2_bias=dense_mlp.fc2.bias is not None,
        )
    vit.hiap_architecture = architecture
    alignment = layout.get("alignment")
    if alignment is not None:
        vit.hiap_alignment = {"head": alignment["head"], "ffn": alignment["ffn"]}
    return vit


def _check_shapes(layout: dict, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """ValueError unless the tensors in the file's header are exactly those the layout's model has, shape for shape.

    The model is built on the meta device (shapes only, no memory), so a small file whose layout describes a huge
    model is refused before anything of that size is allocated.
    """
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_pruned_skeleton(layout).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match the stored layout: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{path}: the weights do not match the stored layout: {name} is {list(shapes[name])}, "
                             f"the layout needs {list(shape)}")


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by ``save_pruned`` (eval mode, on ``device``): a timm ``VisionTransformer`` with
    ``PrunedAttention`` / ``PrunedMlp`` blocks, ``images [B, C, H, W] -> logits [B, classes]``, whose
    ``pretrained_cfg`` is the one stored with it (a file written before it was stored gets the input size and classes
    its layout implies, and no mean / std).

    Before anything is allocated from it, the layout is validated and compared with the tensor shapes in the file's
    header; the weights, the layout and the pretrained_cfg are then checked against the digest stored with them.

    The file needs no hiap to load: it is a safetensors file whose header metadata holds the layout (``hiap_layout``:
    the timm ``VisionTransformer`` arguments, and per block the heads' q/k and v widths, the softmax scale and the FFN
    width) and the ``pretrained_cfg`` (``hiap_pretrained_cfg``), both JSON. With timm, torch and safetensors alone
    (the same outputs, one small matmul pair per head, no digest check)::

        import json
        from functools import partial

        import timm
        import torch
        import torch.nn as nn
        from safetensors import safe_open
        from safetensors.torch import load_file


        class RaggedAttention(nn.Module):  # heads of their own widths; qkv packed [Q_0 Q_1 .. | K_0 K_1 .. | V_0 ..]
            def __init__(self, dim, qk_widths, v_widths, scale, qkv_bias, proj_bias):
                super().__init__()
                self.qk_widths, self.v_widths, self.scale = qk_widths, v_widths, scale
                self.qkv = nn.Linear(dim, 2 * sum(qk_widths) + sum(v_widths), bias=qkv_bias)
                self.proj = nn.Linear(sum(v_widths), dim, bias=proj_bias)

            def forward(self, x, attn_mask=None, is_causal=False):
                qk = sum(self.qk_widths)
                q, k, v = self.qkv(x).split([qk, qk, sum(self.v_widths)], dim=-1)
                heads = zip(q.split(self.qk_widths, -1), k.split(self.qk_widths, -1), v.split(self.v_widths, -1))
                out = [(q_h @ k_h.transpose(-2, -1) * self.scale).softmax(-1) @ v_h for q_h, k_h, v_h in heads]
                return self.proj(torch.cat(out, -1) if out else v)


        class Ffn(nn.Module):
            def __init__(self, dim, width, act_layer, bias):
                super().__init__()
                self.fc1, self.act, self.fc2 = nn.Linear(dim, width, bias), act_layer(), nn.Linear(width, dim, bias)

            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))


        def load_pruned_with_timm(path):
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata()
            layout = json.loads(metadata["hiap_layout"])
            args = dict(layout["architecture"])
            eps, act, _ = args.pop("norm_eps"), args.pop("act"), args.pop("head_dim")
            act_layer = partial(nn.GELU, approximate="tanh" if act == "gelu_tanh" else "none")
            norm_layer = partial(nn.LayerNorm, eps=eps)
            model = timm.models.VisionTransformer(**args, norm_layer=norm_layer, act_layer=act_layer)
            for block, layer in zip(model.blocks, layout["layers"]):
                block.attn = RaggedAttention(model.embed_dim, layer["qk_widths"], layer["v_widths"], layer["scale"],
                                             args["qkv_bias"], args["proj_bias"])
                block.mlp = Ffn(model.embed_dim, layer["ffn_width"], act_layer, args["proj_bias"])
            model.load_state_dict(load_file(path))
            cfg = json.loads(metadata.get("hiap_pretrained_cfg", "{}"))
            model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
            return model.eval()

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupt, edited, not a HiAP pruned model, or its weights do not match its layout;
            ``device`` is not a device this machine has.
        TypeError: ``path`` or ``device`` is of another type.
    """
    from hiap.method.inference import device_argument

    path = _path_argument(path, "load_pruned")
    device = device_argument(device, "load_pruned")
    metadata, shapes = _read_header(path)
    layout = _layout_of(metadata, path)
    stored_cfg = _pretrained_cfg_of(metadata, layout, path)
    _check_shapes(layout, shapes, path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: cannot read the weights: {error}") from error
    verify_safetensors(state, metadata, path,
                       unsealed="its layout" + (" and pretrained_cfg" if stored_cfg is not None else ""),
                       hint="hiap.save_pruned(hiap.load_pruned(path), path) seals it whole")
    try:
        model = build_pruned_skeleton(layout)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "allocate" not in str(error) and "out of memory" not in str(error):
            raise
        parameters = sum(t.numel() for t in state.values())
        raise ValueError(f"{path}: not enough memory to build its model ({parameters:,} parameters)") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not match the stored layout: {error}") from error
    set_pretrained_cfg(model, stored_cfg if stored_cfg is not None else data_pretrained_cfg(model))
    return model.to(device).eval()
