"""The models, layouts and inputs the benchmarks run on, and the minimum work (FLOPs, bytes) of each case.

Everything is DeiT-S shaped (D=384, H=6, Dh=64, F=1536, N=197, 12 blocks) with random weights: timing does not
depend on trained values, and no download is needed. The "HiAP-like" pruning layout keeps 2-4 heads per layer with
q/k and v widths drawn from 16..64, and FFN widths chosen so the extracted network lands at about 3.1 GMACs, roughly
the two thirds of DeiT-S's 4.60 G that the paper's DeiT-S result keeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import timm
import torch

import hiap
from hiap.method.cost import UnitCosts

from _settings import DEVICE
from _timing import Work

EMBED_DIM = 384
NUM_HEADS = 6
HEAD_DIM = 64
FFN_DIM = 1536
TOKENS = 197
DEPTH = 12
NUM_CLASSES = 1000
IMAGE_SIZE = 224
EXTRACTED_TARGET_MACS = 3.1e9
LAYOUT_SEED = 2603

PATCH_SIZE = 16
# Patch embedding (a 16x16 stride-16 convolution) and classifier head: the MACs no gate touches.
STATIC_MACS = (IMAGE_SIZE // PATCH_SIZE) ** 2 * EMBED_DIM * 3 * PATCH_SIZE**2 + EMBED_DIM * NUM_CLASSES

DEIT_S_SHAPES = {"embed_dim": EMBED_DIM, "heads": NUM_HEADS, "head_dim": HEAD_DIM, "ffn_dim": FFN_DIM,
                 "tokens": TOKENS, "depth": DEPTH}
# Gates of a gated DeiT-S at dim_group 1: per layer head [H], q/k and v dims [H, Dh] each, FFN block [1], neurons [F].
GATES_PER_LAYER = NUM_HEADS + 2 * NUM_HEADS * HEAD_DIM + 1 + FFN_DIM
DEIT_S_GATES = DEPTH * GATES_PER_LAYER


def dense_deit_s(depth: int = DEPTH) -> torch.nn.Module:
    """timm's DeiT-S (``depth`` blocks) with random weights, eval mode, fp32, on the CPU."""
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=NUM_CLASSES, depth=depth).eval()


@dataclass(frozen=True)
class LayerLayout:
    """What one pruned layer keeps: heads (indices into the dense heads) with their widths, and the FFN width."""

    heads: tuple[int, ...]
    qk_widths: tuple[int, ...]
    v_widths: tuple[int, ...]
    ffn_width: int


def _ffn_widths(rng: random.Random, neurons_needed: float) -> list[int]:
    """Per-layer FFN widths summing to about ``neurons_needed``, uneven across layers like a trained HiAP model."""
    spread = [rng.uniform(0.5, 1.5) for _ in range(DEPTH)]
    minimum = max(1, round(0.05 * FFN_DIM))

    def widths(cut: float) -> list[int]:
        return [min(FFN_DIM, max(minimum, round(FFN_DIM * (1.0 - cut * s)))) for s in spread]

    low, high = 0.0, 2.0  # bisection on how much is cut: more cut, fewer neurons
    for _ in range(60):
        middle = (low + high) / 2
        if sum(widths(middle)) > neurons_needed:
            low = middle
        else:
            high = middle
    return widths(high)


@lru_cache(maxsize=None)
def hiap_like_layout(seed: int = LAYOUT_SEED) -> tuple[LayerLayout, ...]:
    """The pruning layout used by every inference benchmark (deterministic for a seed)."""
    rng = random.Random(seed)
    units = UnitCosts.at(TOKENS, EMBED_DIM)
    attention = []
    attention_macs = 0
    head_counts = [2, 3, 4] * (DEPTH // 3) + [3] * (DEPTH % 3)
    rng.shuffle(head_counts)
    for count in head_counts:
        heads = tuple(sorted(rng.sample(range(NUM_HEADS), count)))
        qk = tuple(rng.randint(16, HEAD_DIM) for _ in heads)
        v = tuple(rng.randint(16, HEAD_DIM) for _ in heads)
        attention.append((heads, qk, v))
        attention_macs += sum(qk) * units.qk_dim + sum(v) * units.v_dim
    ffn = _ffn_widths(rng, (EXTRACTED_TARGET_MACS - STATIC_MACS - attention_macs) / units.neuron)
    return tuple(LayerLayout(h, q, v, f) for (h, q, v), f in zip(attention, ffn))


def _subset(size: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[size]`` with ``keep`` entries True at random places."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=generator)[:keep]] = True
    return mask


def gated_deit_s(depth: int = DEPTH, layout: tuple[LayerLayout, ...] | None = None) -> hiap.HiAPViT:
    """Gated DeiT-S whose gates encode ``layout`` (the HiAP-like one by default); fp32, on DEVICE.

    Kept gates are fixed open and the others closed (``gates.assign``: logits +-8, far from the decision boundary, so
    eval decisions and training samples agree almost always). Kept columns are scattered at random inside each head
    and FFN, as a trained model's are. With ``depth`` < 12 the first layers of the layout are used (the single-module
    cases take block 0).
    """
    layout = layout or hiap_like_layout()
    gated = hiap.gate_vit(dense_deit_s(depth), hiap.HiAPConfig())
    generator = torch.Generator().manual_seed(LAYOUT_SEED)
    for block, layer in zip(gated.vit.blocks, layout):
        keep_head = torch.zeros(NUM_HEADS, dtype=torch.bool)
        keep_qk = torch.zeros(NUM_HEADS, HEAD_DIM, dtype=torch.bool)
        keep_v = torch.zeros(NUM_HEADS, HEAD_DIM, dtype=torch.bool)
        for head, qk_width, v_width in zip(layer.heads, layer.qk_widths, layer.v_widths):
            keep_head[head] = True
            keep_qk[head] = _subset(HEAD_DIM, qk_width, generator)
            keep_v[head] = _subset(HEAD_DIM, v_width, generator)
        block.attn.gates.assign(head=keep_head, qk=keep_qk, v=keep_v)
        block.mlp.gates.assign(block=True, neuron=_subset(FFN_DIM, layer.ffn_width, generator))
    return gated.to(DEVICE)


def extracted_deit_s() -> torch.nn.Module:
    """The physical pruned DeiT-S of the HiAP-like layout (eval mode, fp32, on DEVICE)."""
    return hiap.extract(gated_deit_s().eval())


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
