"""ONNX export of a pruned model: one batched attention per run of equal-width heads, head widths padded to a multiple
a runtime wants where asked, checked against PyTorch with onnxruntime.

A pruned layer's heads have widths of their own. ONNX Runtime, TensorRT, OpenVINO and FlashAttention take one head
width per attention call, so the export groups a layer's heads by width (extraction already orders them so) and writes
one batched attention per group, as the PyTorch path runs one SDPA call per run (``hiap_kernels.ragged_attn.sdpa``):
``Split`` of the packed qkv, then per run ``Reshape``/``Transpose`` to ``[B, h, N, w]``, ``MatMul``, ``Softmax``,
``MatMul``, and one ``Concat`` before ``proj``. Shapes other than the batch are constants of the graph (the token
count of a ViT is fixed by its image size), so the runtime computes no shapes; the softmax scale is folded into the q
rows of the qkv weights. With ``pad_heads=m`` every q/k and v width is rounded up to a multiple of ``m`` with zero
columns (zero q/k columns add nothing to a score; a zero v column gives zero outputs that meet zero columns of
``proj``), so the output is the same up to float rounding; ``equal_widths`` also pads each head's q/k and v to one
width, the single head size that fused attention kernels take.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hiap.app.evaluation import model_input_shape
from hiap.app.runtime import InputError
from hiap.files import atomic_path
from hiap.method.pruned import PrunedAttention
from hiap_kernels.ragged_attn.sdpa import head_runs

# Opsets the TorchScript exporter writes for these models (below 9 it cannot express them; above 20 it does not go).
OPSETS = (9, 20)
MAX_PAD = 256


def require_onnx(runtime: bool = True) -> None:
    """InputError with the install line when the ``onnx`` extra is missing: onnx, and onnxruntime when ``runtime``."""
    import importlib

    for name in ("onnx", "onnxruntime") if runtime else ("onnx",):
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f'ONNX export needs the {name} package, which is not installed: pip install ".[onnx]" '
                             '(the onnx extra)') from None


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


class GroupedAttention(nn.Module):
    """A ``PrunedAttention`` as ONNX takes it: one batched attention per run of equal-width heads, static shapes.

    Built from the pruned layer (its weights copied, heads sorted by width, widths padded as asked, the softmax scale
    folded into the q rows); computes what it computes. ``x [B, N, D] -> [B, N, D_out]`` with ``N`` fixed.
    """

    def __init__(self, attn: PrunedAttention, tokens: int, pad_heads: int = 1, equal_widths: bool = False):
        super().__init__()
        qk, v = list(attn.qk_widths), list(attn.v_widths)
        if equal_widths:  # one head size per head; a uniform-attention head (q/k width 0) stays one
            qk = [max(q, w) if q else 0 for q, w in zip(qk, v)]
            v = [max(q, w) for q, w in zip(qk, v)]
        qk = [_round_up(w, pad_heads) for w in qk]
        v = [_round_up(w, pad_heads) for w in v]
        # Heads of equal widths side by side: each group of them is one run, one batched attention.
        order = sorted(range(len(v)), key=lambda h: (-qk[h], -v[h]))
        self.qk_widths = [qk[h] for h in order]
        self.v_widths = [v[h] for h in order]
        self.tokens = int(tokens)
        self.runs = head_runs(self.qk_widths, self.v_widths)
        self.padded_columns = 2 * sum(qk) + sum(v) - attn.qkv.out_features
        weight, bias = attn.qkv.weight.detach(), None if attn.qkv.bias is None else attn.qkv.bias.detach()
        rows, proj_columns = self._rows(attn, order)
        source = torch.tensor([r if r >= 0 else 0 for r in rows], dtype=torch.long)
        present = torch.tensor([r >= 0 for r in rows], dtype=weight.dtype)[:, None]
        scale = torch.ones(len(rows), 1, dtype=weight.dtype)
        scale[: sum(self.qk_widths)] = attn.scale  # q rows: the scale, folded
        self.qkv = nn.Linear(weight.shape[1], len(rows), bias=bias is not None).to(weight.device, weight.dtype)
        self.proj = nn.Linear(len(proj_columns), attn.proj.out_features,
                              bias=attn.proj.bias is not None).to(weight.device, weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(weight[source] * present * scale)
            if bias is not None:
                self.qkv.bias.copy_(bias[source] * present[:, 0] * scale[:, 0])
            columns = torch.tensor([c if c >= 0 else 0 for c in proj_columns], dtype=torch.long)
            kept = torch.tensor([c >= 0 for c in proj_columns], dtype=weight.dtype)
            self.proj.weight.copy_(attn.proj.weight.detach()[:, columns] * kept)
            if attn.proj.bias is not None:
                self.proj.bias.copy_(attn.proj.bias.detach())

    def _rows(self, attn: PrunedAttention, order: list[int]) -> tuple[list[int], list[int]]:
        """The pruned layer's qkv row (and proj column) behind each row of this layer's qkv (and column of its proj),
        -1 for a padding one."""
        old_qk, old_v = attn.qk_widths, attn.v_widths
        qk_total = sum(old_qk)
        q_start = [sum(old_qk[:h]) for h in range(len(old_qk))]
        v_start = [sum(old_v[:h]) for h in range(len(old_v))]

        def head_rows(start: int, width: int, padded: int) -> list[int]:
            return list(range(start, start + width)) + [-1] * (padded - width)

        q_rows, k_rows, v_rows, proj_columns = [], [], [], []
        for new, old in enumerate(order):
            q_rows += head_rows(q_start[old], old_qk[old], self.qk_widths[new])
            k_rows += head_rows(qk_total + q_start[old], old_qk[old], self.qk_widths[new])
            v_rows += head_rows(2 * qk_total + v_start[old], old_v[old], self.v_widths[new])
            proj_columns += head_rows(v_start[old], old_v[old], self.v_widths[new])
        return q_rows + k_rows + v_rows, proj_columns

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the ONNX export of a pruned attention layer takes no attention mask")
        tokens = self.tokens
        sizes = [run.heads * run.qk_width for run in self.runs] * 2 + [run.heads * run.v_width for run in self.runs]
        parts = self.qkv(x).split(sizes, dim=-1)
        count = len(self.runs)
        outputs = []
        for index, run in enumerate(self.runs):
            q, k, v = parts[index], parts[count + index], parts[2 * count + index]
            # [B, N, h * w] -> [B, h, N, w]; -1 for the batch and constants elsewhere, so no shape is computed. A run
            # of one head stays [B, N, w]: no reshape and no transpose but k's, which the runtime folds into the
            # matmul.
            if run.heads > 1:
                v = v.reshape(-1, tokens, run.heads, run.v_width).transpose(1, 2)
            if run.qk_width == 0:  # all scores zero: the mean of v over the tokens, for every query
                out = v.mean(dim=-2, keepdim=True)
                out = out.expand(-1, tokens, -1) if run.heads == 1 else out.expand(-1, -1, tokens, -1)
            else:
                if run.heads > 1:
                    q = q.reshape(-1, tokens, run.heads, run.qk_width).transpose(1, 2)
                    k = k.reshape(-1, tokens, run.heads, run.qk_width).transpose(1, 2)
                out = torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1), v)
            if run.heads > 1:
                out = out.transpose(1, 2).reshape(-1, tokens, run.heads * run.v_width)
            outputs.append(out)
        return self.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1))


def grouped_for_export(model: nn.Module, pad_heads: int = 1, equal_widths: bool = False) -> nn.Module:
    """A copy of ``model`` whose pruned attention layers are ``GroupedAttention`` (layers with no head left, and any
    other module, as they are); ``model`` itself is not changed. Input ``[B, C, H, W]`` at the model's image size."""
    export = copy.deepcopy(model).eval().cpu()
    vit = getattr(export, "vit", export)
    tokens = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 0)
    for block in getattr(vit, "blocks", []):
        if isinstance(block.attn, PrunedAttention) and block.attn.num_heads:
            block.attn = GroupedAttention(block.attn, tokens, pad_heads, equal_widths)
    return export


@dataclass
class ExportCheck:
    """What ``export_onnx`` wrote: the file, its opset and node count, the attention layout, and the check (None
    where it was skipped)."""

    path: Path
    opset: int
    nodes: int
    attention_calls: int
    attention_layers: int
    padded_columns: int
    max_abs_error: float | None
    batch_checked: int | None


def _attention_layout(export: nn.Module) -> tuple[int, int, int]:
    """(batched attention calls, attention layers, padding columns added to qkv) of an export copy."""
    layers = [m for m in export.modules() if isinstance(m, GroupedAttention)]
    return sum(len(m.runs) for m in layers), len(layers), sum(m.padded_columns for m in layers)


def _check_arguments(opset, atol, pad_heads, equal_widths, check, check_batch) -> None:
    for name, value in (("opset", opset), ("pad_heads", pad_heads), ("check_batch", check_batch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"export_onnx: {name} must be an integer, got {type(value).__name__}")
    for name, value in (("equal_widths", equal_widths), ("check", check)):
        if not isinstance(value, bool):
            raise TypeError(f"export_onnx: {name} must be True or False, got {type(value).__name__}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"export_onnx: opset must lie in [{OPSETS[0]}, {OPSETS[1]}], got {opset}")
    if not 1 <= pad_heads <= MAX_PAD:
        raise ValueError(f"export_onnx: pad_heads must lie in [1, {MAX_PAD}] (8 or 16 for most runtimes), got "
                         f"{pad_heads}")
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol > 0 or atol != atol:
        raise ValueError(f"export_onnx: atol must be a number > 0, got {atol!r}")
    if check_batch < 1:
        raise ValueError(f"export_onnx: check_batch must be >= 1, got {check_batch}")


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17, pad_heads: int = 1, equal_widths: bool = False,
                check: bool = True, atol: float = 1e-4, check_batch: int = 3) -> ExportCheck:
    """Write ``model`` to ONNX: input ``images [B, C, H, W]``, output ``logits [B, classes]``, dynamic ``B``.

    ``model``: a pruned model (``hiap.extract`` / ``hiap.load_pruned``), whose attention layers are written as one
    batched attention per run of equal-width heads (:class:`GroupedAttention`), or any timm ViT (written as it is).
    ``pad_heads``: round every head's q/k and v width up to a multiple of this (1: none; 8 or 16 where a runtime
    wants aligned head sizes); ``equal_widths``: also pad each head's q/k and v to one width. Padding adds zero
    columns, so the output is unchanged up to float rounding. With ``check``, onnxruntime's output is compared with
    the PyTorch model's on a random batch of ``check_batch`` images (another batch size than the export trace) and
    the export refused when they differ by more than ``atol``; nothing is written then.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no network, and it traces the ragged per-head
    layout (heads of different widths, zero-width FFNs and attention layers) as plain splits and matmuls.

    Raises:
        RuntimeError: onnxruntime's output differs from PyTorch's by more than ``atol``.
        ValueError / TypeError: an argument out of range or of another type (the message names it).
        InputError: the ``onnx`` extra is not installed (the message says how to install it).
    """
    _check_arguments(opset, atol, pad_heads, equal_widths, check, check_batch)
    require_onnx(runtime=check)
    import onnx

    path = Path(path)
    model = model.eval()
    shape = model_input_shape(model)
    export = grouped_for_export(model, pad_heads, equal_widths)
    example = torch.randn(2, *shape)
    # The file appears under its name only once it passed the check: a refused export leaves nothing behind.
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # The tracer warns about timm's Python-side shape checks; they are constant for a fixed model.
            warnings.simplefilter("ignore")
            torch.onnx.export(export, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        error = None
        if check:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            images = torch.randn(check_batch, *shape, generator=torch.Generator().manual_seed(0))
            device = next(model.parameters()).device
            with torch.no_grad():
                expected = model(images.to(device)).cpu().numpy()
            got = session.run(["logits"], {"images": images.numpy()})[0]
            error = float(abs(got - expected).max())
            if not error <= atol:
                raise RuntimeError(f"ONNX output differs from PyTorch by {error:.3g} (> {atol:g}) for {path}")
    calls, layers, padded = _attention_layout(export)
    return ExportCheck(path=path, opset=opset, nodes=len(graph.graph.node), attention_calls=calls,
                       attention_layers=layers, padded_columns=padded, max_abs_error=error,
                       batch_checked=check_batch if check else None)
