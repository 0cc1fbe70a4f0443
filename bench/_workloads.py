"""The models, layouts and inputs the benchmarks run on, and the minimum work (FLOPs, bytes) of each case.

Everything is DeiT-S shaped (D=384, H=6, Dh=64, F=1536, N=197, 12 blocks) with random weights: timing does not
depend on trained values, and no download is needed. The pruned layout is what the default configuration produces:
``hiap.gate_vit`` with ``HiAPConfig()`` (hardware-aligned gate groups), gate logits drawn the way a trained model's
spread (per-layer offsets, heads more often kept than dims, FFN blocks open), shifted until the decided network sits
at two thirds of DeiT-S's 4.60 GMACs, then ``hiap.extract``. ``dim_group=1`` gives the paper's per-dim layout at the
same budget, for the side-by-side that justifies the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import timm
import torch
from _settings import DEVICE
from _timing import Work

import hiap
from hiap.method.cost import UnitCosts

EMBED_DIM = 384
NUM_HEADS = 6
HEAD_DIM = 64
FFN_DIM = 1536
TOKENS = 197
DEPTH = 12
NUM_CLASSES = 1000
IMAGE_SIZE = 224
MAC_FRACTION = 2 / 3
LAYOUT_SEED = 2603

PATCH_SIZE = 16
# Patch embedding (a 16x16 stride-16 convolution) and classifier head: the MACs no gate touches.
STATIC_MACS = (IMAGE_SIZE // PATCH_SIZE) ** 2 * EMBED_DIM * 3 * PATCH_SIZE**2 + EMBED_DIM * NUM_CLASSES

DEIT_S_SHAPES = {"embed_dim": EMBED_DIM, "heads": NUM_HEADS, "head_dim": HEAD_DIM, "ffn_dim": FFN_DIM,
                 "tokens": TOKENS, "depth": DEPTH}
# Gates of a gated DeiT-S at dim_group 1: per layer head [H], q/k and v dims [H, Dh] each, FFN block [1], neurons [F].
GATES_PER_LAYER = NUM_HEADS + 2 * NUM_HEADS * HEAD_DIM + 1 + FFN_DIM
DEIT_S_GATES = DEPTH * GATES_PER_LAYER


def dense_deit_s(depth: int = DEPTH, mlp_ratio: float = 4.0) -> torch.nn.Module:
    """timm's DeiT-S (``depth`` blocks, FFN ``mlp_ratio`` x 384) with random weights, eval mode, fp32, on the CPU."""
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=NUM_CLASSES, depth=depth,
                             mlp_ratio=mlp_ratio).eval()


@dataclass(frozen=True)
class LayerLayout:
    """What one pruned layer keeps: its heads' q/k and v widths (in extraction order) and the FFN width."""

    qk_widths: tuple[int, ...]
    v_widths: tuple[int, ...]
    ffn_width: int


def _draw_logits(gated: hiap.HiAPViT, shift: float, seed: int) -> None:
    """Logits spread like a trained model's: a random offset per layer, heads 1.5 above dims, FFN blocks open."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
            layer = shift + float(torch.empty(()).uniform_(-1.0, 1.0, generator=generator))
            for logit, centre in ((attn.gates.head, layer + 1.5), (attn.gates.qk, layer), (attn.gates.v, layer),
                                  (mlp.gates.neuron, layer)):
                logit.copy_(centre + 1.5 * torch.randn(logit.shape, generator=generator))
            mlp.gates.block.fill_(3.0)


@lru_cache(maxsize=None)
def _default_logits(depth: int, dim_group: int, neuron_group: int) -> dict[str, torch.Tensor]:
    """Gate logits of a DeiT-S whose decision keeps MAC_FRACTION of the dense MACs (bisection on the shift)."""
    gated = hiap.gate_vit(dense_deit_s(depth), hiap.HiAPConfig(dim_group=dim_group, neuron_group=neuron_group))
    goal = MAC_FRACTION * hiap.dense_macs(gated)

    def miss(shift: float) -> float:
        _draw_logits(gated, shift, LAYOUT_SEED)
        return hiap.count_macs(gated) - goal

    low, high = -4.0, 4.0  # the decided MACs grow with the shift
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if miss(middle) > 0 else (middle, high)
    miss(min((low, high), key=lambda shift: abs(miss(shift))))
    return {name: logit.detach().clone() for name, logit in gated.gate_logits().items()}


def gated_deit_s(depth: int = DEPTH, dim_group: int = 0, neuron_group: int = 0) -> hiap.HiAPViT:
    """Gated DeiT-S (``HiAPConfig(dim_group, neuron_group)``) with the default layout's logits; fp32, on DEVICE.

    With ``depth`` < 12 the layout is drawn for that depth (the single-module cases take block 0).
    """
    gated = hiap.gate_vit(dense_deit_s(depth), hiap.HiAPConfig(dim_group=dim_group, neuron_group=neuron_group))
    logits = _default_logits(depth, dim_group, neuron_group)
    with torch.no_grad():
        for name, logit in gated.gate_logits().items():
            logit.copy_(logits[name])
    return gated.to(DEVICE)


def extracted_deit_s(dim_group: int = 0, neuron_group: int = 0) -> torch.nn.Module:
    """The physical pruned DeiT-S of the default layout (eval mode, fp32, on DEVICE)."""
    return hiap.extract(gated_deit_s(dim_group=dim_group, neuron_group=neuron_group).eval())


@lru_cache(maxsize=None)
def default_layout(dim_group: int = 0, neuron_group: int = 0) -> tuple[LayerLayout, ...]:
    """Per layer, the widths ``extracted_deit_s`` keeps."""
    pruned = extracted_deit_s(dim_group, neuron_group)
    return tuple(LayerLayout(tuple(b.attn.qk_widths), tuple(b.attn.v_widths), b.mlp.hidden_features)
                 for b in pruned.blocks)


def regular_deit_s_at(macs: int) -> torch.nn.Module:
    """A regular timm DeiT-S (6 full heads everywhere) whose one FFN width, a multiple of 64, comes closest to
    ``macs``: what a user could train instead of pruning, at the same MACs."""
    units = UnitCosts.at(TOKENS, EMBED_DIM)
    attention = DEPTH * EMBED_DIM * (units.qk_dim + units.v_dim)
    width = round((macs - STATIC_MACS - attention) / (DEPTH * units.neuron) / 64) * 64
    return dense_deit_s(mlp_ratio=max(64, min(FFN_DIM, width)) / EMBED_DIM)


def images(batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(DEVICE, dtype)


def activations(shape, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal activations of ``shape`` on DEVICE, the same for every provider of a cell."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def output_gradient(shape, seed: int) -> torch.Tensor:
    """The upstream gradient of a training op's output, in the dtype autocast gives that output."""
    return activations(shape, seed, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Minimum work per case. FLOPs count a multiply-accumulate as 2; training FLOPs are 3x the forward (forward, input
# gradient, weight gradient). Bytes count each named tensor once at its storage size: a lower bound on traffic that
# no fusion can avoid, not a model of any one implementation.
# ---------------------------------------------------------------------------------------------------------------------

PARAM_BYTES = 4  # fp32 master weights, their gradients and Adam states


def activation_bytes() -> int:
    return 2 if DEVICE.type == "cuda" else 4  # bf16 under autocast on a GPU, fp32 on a CPU


def linear_training_work(rows: int, in_features: int, out_features: int) -> Work:
    """y = x W^T + b, forward and backward: reads x, W, dY; writes y, dx, dW."""
    act = activation_bytes()
    flops = 3 * 2 * rows * in_features * out_features
    bytes_ = act * (2 * rows * in_features + 2 * rows * out_features) + PARAM_BYTES * 2 * in_features * out_features
    return Work(flops, bytes_)


def linear_gelu_inference_work(rows: int, in_features: int, out_features: int) -> Work:
    """y = GELU(x W^T + b), forward only, weights in the activation dtype: reads x, W, b; writes y."""
    act = activation_bytes()
    flops = 2 * rows * in_features * out_features
    bytes_ = act * (rows * in_features + out_features * in_features + out_features + rows * out_features)
    return Work(flops, bytes_)


def gate_sampling_work(gates: int) -> Work:
    """Values and straight-through slopes of ``gates`` gates: reads fp32 logits, writes fp32 values and slopes.

    No FLOPs are counted: the Philox rounds are integer arithmetic with no matmul to bound them, so the floor is the
    memory traffic (which at this size mostly shows how far launch latency sits above it).
    """
    return Work(0.0, 4 * 3 * gates)


def ffn_training_work(rows: int) -> Work:
    """fc1 -> GELU * mask -> fc2, forward and backward; the [rows, F] hidden activation is written and read back."""
    act = activation_bytes()
    flops = 3 * 2 * 2 * rows * EMBED_DIM * FFN_DIM
    bytes_ = act * (4 * rows * EMBED_DIM + 3 * rows * FFN_DIM) + PARAM_BYTES * 2 * 2 * EMBED_DIM * FFN_DIM
    return Work(flops, bytes_)


def attention_training_work(batch: int) -> Work:
    """qkv projection, softmax(QK^T)V, proj, forward and backward (dense shapes: gates mask, they do not shrink)."""
    act = activation_bytes()
    rows = batch * TOKENS
    gemm = 2 * rows * EMBED_DIM * (3 * EMBED_DIM + EMBED_DIM)
    core = 2 * 2 * batch * TOKENS * TOKENS * EMBED_DIM
    flops = 3 * (gemm + core)
    bytes_ = act * rows * (2 * EMBED_DIM + 2 * 3 * EMBED_DIM + 2 * EMBED_DIM + 2 * EMBED_DIM) \
        + PARAM_BYTES * 2 * 4 * EMBED_DIM * EMBED_DIM
    return Work(flops, bytes_)


def mlp_training_work(batch: int) -> Work:
    """fc1, GELU, fc2, forward and backward, at the dense width (gates mask, they do not shrink)."""
    return ffn_training_work(batch * TOKENS)


def block_training_work(batch: int) -> Work:
    attention = attention_training_work(batch)
    ffn = ffn_training_work(batch * TOKENS)
    return Work(attention.flops + ffn.flops, attention.bytes + ffn.bytes)


def training_step_work(batch: int, parameters: int) -> Work:
    """Whole gated DeiT-S forward + backward + AdamW (reads and writes weight, gradient and two moments)."""
    blocks = block_training_work(batch)
    flops = DEPTH * blocks.flops + 3 * 2 * batch * STATIC_MACS
    bytes_ = DEPTH * blocks.bytes + PARAM_BYTES * parameters * 7
    return Work(flops, bytes_)


def ragged_attention_work(batch: int, layout: tuple[LayerLayout, ...]) -> Work:
    """softmax(QK^T)V over every kept head of every layer: reads packed qkv, writes the packed output."""
    act = activation_bytes()
    flops = 0
    bytes_ = 0
    for layer in layout:
        flops += 2 * batch * TOKENS * TOKENS * (sum(layer.qk_widths) + sum(layer.v_widths))
        bytes_ += act * batch * TOKENS * (2 * sum(layer.qk_widths) + 2 * sum(layer.v_widths))
    return Work(flops, bytes_)


def inference_work(model: torch.nn.Module, batch: int, weight_bytes: int) -> Work:
    """Forward of a (dense or pruned) ViT: 2 x MACs, weights read once, each block's input and output once."""
    flops = 2 * batch * hiap.count_macs(model)
    parameters = sum(p.numel() for p in model.parameters())
    bytes_ = weight_bytes * parameters + weight_bytes * batch * TOKENS * EMBED_DIM * 2 * DEPTH
    return Work(flops, bytes_)


def merge_tokens_work(batch: int, tokens: int, kept: int, sources: int, channels: int) -> Work:
    """One size-weighted merge: reads the kept and merged rows and their sizes, writes the merged rows and sizes.
    The FLOPs are the weighted sum (2 per merged element); the kernel's D x R product is overhead, not work."""
    act = activation_bytes()
    flops = 2 * batch * (kept + sources) * channels
    bytes_ = batch * (act * (kept + sources + kept) * channels + 4 * (tokens + kept) + 8 * (kept + 2 * sources))
    return Work(flops, bytes_)


def nearest_tokens_work(batch: int, queries: int, candidates: int, width: int, key_rows: int, masked: bool) -> Work:
    """Each query's most cosine-similar candidate: reads ``key_rows`` rows of keys (ToMe's queries and candidates are
    the two halves of one key tensor, read once) and the mask; writes a float32 score and an int64 index per query.
    The FLOPs are the similarity products (2 per query, candidate and key column); the norms are overhead."""
    act = activation_bytes()
    flops = 2 * batch * queries * candidates * width
    bytes_ = batch * (act * key_rows * width + (candidates if masked else 0) + 12 * queries)
    return Work(flops, bytes_)


def token_redundancy_work(batch: int, patches: int, width: int) -> Work:
    """RAPID's prune score: reads the keys once and the class token's attention (float32); writes a float32 score per
    token. The FLOPs are the sum of the unit keys and each key's product with it (2 each per token and key column);
    the norms are overhead."""
    act = activation_bytes()
    flops = 4 * batch * patches * width
    bytes_ = batch * patches * (act * width + 4 + 4)
    return Work(flops, bytes_)


def linear_residual_inference_work(rows: int, in_features: int, out_features: int) -> Work:
    """y = r + gamma * (x W^T + b), forward only: reads x, W, b, gamma, r; writes y."""
    act = activation_bytes()
    flops = 2 * rows * in_features * out_features
    bytes_ = act * (rows * in_features + out_features * in_features + 2 * out_features + 2 * rows * out_features)
    return Work(flops, bytes_)


def layernorm_linear_inference_work(rows: int, in_features: int, out_features: int) -> Work:
    """y = act(LN(x) W^T + b), forward only: reads x, gamma, beta, W, b; writes y (LN's own FLOPs not counted)."""
    act = activation_bytes()
    flops = 2 * rows * in_features * out_features
    bytes_ = act * (rows * in_features + 2 * in_features + out_features * in_features + out_features
                    + rows * out_features)
    return Work(flops, bytes_)


def gated_weight_training_work(rows: int, cols: int, bias: bool) -> Work:
    """A gated weight forward and backward (fp32 master weight): reads W (and b); writes W'; reads dW' and W again;
    writes dW. No FLOPs are counted: a multiply per element and a dot per row, the floor is the memory traffic."""
    elements = rows * cols + (rows if bias else 0)
    return Work(0.0, PARAM_BYTES * 5 * elements)


def lazy_inference_call(make_forward: Callable[[], Callable], inputs: torch.Tensor) -> Callable[[], None]:
    """A no-grad forward on ``inputs`` of the model ``make_forward`` builds at the first call, so that only a cell that
    runs it pays for building it (the dense side of the CPU targets' alternating rounds)."""
    forward = None

    def call() -> None:
        nonlocal forward
        if forward is None:
            forward = make_forward()
        with torch.no_grad():
            forward(inputs)

    return call
