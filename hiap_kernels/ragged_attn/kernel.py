"""Ragged multi-head attention for extracted (pruned) ViT layers: one Triton launch for the whole layer.

Every kept head of a pruned layer has its own q/k width (0..Dh) and v width (1..Dh). The kernel reads q, k and v
straight from the packed output of the layer's single qkv GEMM and writes the packed input of the proj Linear; the
per-head offsets and widths come from a small int32 table (see ``reference.build_head_table`` for the layout, and
the docstring of ``reference.py`` for the packing).

Grid: query blocks x (B * Hk), flattened into one axis. Each program owns BLOCK_M queries of one (batch, head),
streams the keys in blocks of BLOCK_N with an online softmax (fp32 statistics and accumulator) and stores its
head's slice of the output.

Every head is padded, inside registers only, to the layer's widest head (BLOCK_QK / BLOCK_V, powers of two >= 16 as
``tl.dot`` requires). Grouping heads into width buckets with one launch per bucket would save the padded FLOPs of
narrow heads in very uneven layers; it is left out until a GPU profile shows that the padding matters.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import (
    check_tensor,
    dot_precision,
    next_power_of_2_at_least_16,
    pick_configs,
    unit_last_stride,
)
from hiap_kernels.common.tiles import autotune
from hiap_kernels.ragged_attn.reference import HEAD_TABLE_COLUMNS, build_head_table

__all__ = ["check_head_table", "ragged_attention", "validate_head_table"]

_LOG2E = 1.4426950408889634

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
# The interpreter pays per program and per block op, not per element: small tiles keep tiny test shapes cheap.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


@autotune(pick_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), ["num_tokens", "BLOCK_QK", "BLOCK_V"])
@triton.jit
def _ragged_attention_kernel(
    qkv_ptr,
    table_ptr,
    out_ptr,
    key_bias_ptr,
    num_tokens,
    num_heads,
    qkv_stride_b,
    qkv_stride_n,
    out_stride_b,
    out_stride_n,
    scale_log2e,
    HAS_KEY_BIAS: tl.constexpr,
    BLOCK_QK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One flat grid axis, query blocks fastest: programs that run together share their head's k/v in L2, and B * Hk
    # is not bound by CUDA's 65535 limit on the second grid axis.
    query_blocks = tl.cdiv(num_tokens, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % query_blocks
    pid_bh = pid // query_blocks
    batch = pid_bh // num_heads
    head = pid_bh % num_heads

    row = table_ptr + head * 6
    q_off = tl.load(row + 0)
    k_off = tl.load(row + 1)
    v_off = tl.load(row + 2)
    out_off = tl.load(row + 3)
    qk_width = tl.load(row + 4)
    v_width = tl.load(row + 5)

    # int64: batch * stride_b passes 2**31 for large batches of long sequences.
    qkv_base = qkv_ptr + batch.to(tl.int64) * qkv_stride_b
    out_base = out_ptr + batch.to(tl.int64) * out_stride_b

    # [BLOCK_M]
    queries = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    query_valid = queries < num_tokens
    # [BLOCK_QK], [BLOCK_V]
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = tl.arange(0, BLOCK_V)
    qk_col_valid = qk_cols < qk_width
    v_col_valid = v_cols < v_width

    # [BLOCK_M, BLOCK_QK]; columns past the head's width load as 0 and so add nothing to the scores. A head of
    # width 0 gets all-zero scores: uniform attention, exactly what the pruned model means by it.
    q = tl.load(
        qkv_base + queries.to(tl.int64)[:, None] * qkv_stride_n + (q_off + qk_cols)[None, :],
        mask=query_valid[:, None] & qk_col_valid[None, :],
        other=0.0,
    )

    # [BLOCK_M]
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BLOCK_M, BLOCK_V]
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)

    for key_start in range(0, num_tokens, BLOCK_N):
        # [BLOCK_N]
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < num_tokens
        key_rows = keys.to(tl.int64) * qkv_stride_n
        # [BLOCK_QK, BLOCK_N]: k loaded already transposed for the score product.
        k_t = tl.load(
            qkv_base + key_rows[None, :] + (k_off + qk_cols)[:, None],
            mask=key_valid[None, :] & qk_col_valid[:, None],
            other=0.0,
        )
        # [BLOCK_N, BLOCK_V]
        v = tl.load(
            qkv_base + key_rows[:, None] + (v_off + v_cols)[None, :],
            mask=key_valid[:, None] & v_col_valid[None, :],
            other=0.0,
        )

        # [BLOCK_M, BLOCK_N], in log2 units so the exponentials are exp2.
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2e
        if HAS_KEY_BIAS:
            # [BLOCK_N]: an additive bias per key (token reduction's log(size)), natural-log units -> log2.
            key_bias = tl.load(key_bias_ptr + batch.to(tl.int64) * num_tokens + keys, mask=key_valid, other=0.0)
            scores += key_bias.to(tl.float32)[None, :] * 1.4426950408889634
        scores = tl.where(key_valid[None, :], scores, float("-inf"))

        # Every key block holds at least one valid key, so the new maximum is finite and no row turns into NaN.
        # [BLOCK_M]
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        # [BLOCK_M, BLOCK_N]
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    # [BLOCK_M, BLOCK_V]
    out = acc / running_sum[:, None]
    tl.store(
        out_base + queries.to(tl.int64)[:, None] * out_stride_n + (out_off + v_cols)[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=query_valid[:, None] & v_col_valid[None, :],
    )


def validate_head_table(head_table: torch.Tensor, qkv_width: int, max_qk_width: int, max_v_width: int) -> int:
    """Check that a head table describes a packed layout of width ``qkv_width``; return the output width ``sum(v_w)``.

    Reads the table on the host (one small device-to-host copy); ``ragged_attention`` remembers the result per table
    object and version, so a table kept as a module buffer is read once, not on every forward.

    Args:
        head_table: int32 ``[Hk, 6]`` rows ``(q_off, k_off, v_off, out_off, qk_w, v_w)``.
        qkv_width: ``T``, the last dimension of qkv.
        max_qk_width, max_v_width: the widths the launch is sized for; every head must fit in them.
    """
    rows = head_table.detach().cpu().tolist()
    qk_widths = [row[4] for row in rows]
    v_widths = [row[5] for row in rows]
    try:
        expected = build_head_table(qk_widths, v_widths).tolist()
    except ValueError as error:
        raise ValueError(f"head_table has invalid widths: {error}") from None
    if rows != expected:
        raise ValueError(
            f"head_table offsets do not match the packing [Q_0|Q_1|...|K_0|...|V_0|...] of its widths "
            f"(columns {HEAD_TABLE_COLUMNS}); build it with build_head_table"
        )
    total = 2 * sum(qk_widths) + sum(v_widths)
    if total != qkv_width:
        raise ValueError(f"qkv has {qkv_width} columns but the head table needs T = 2*sum(qk_w) + sum(v_w) = {total}")
    if max(qk_widths, default=0) > max_qk_width:
        raise ValueError(f"max_qk_width={max_qk_width} is smaller than the widest q/k head ({max(qk_widths)})")
    if max(v_widths, default=0) > max_v_width:
        raise ValueError(f"max_v_width={max_v_width} is smaller than the widest v head ({max(v_widths)})")
    return sum(v_widths)


def _launch(qkv: torch.Tensor, table: torch.Tensor, out: torch.Tensor, scale: float, max_qk_width: int,
            max_v_width: int, key_bias: torch.Tensor | None = None) -> None:
    batch, tokens, _ = qkv.shape
    num_heads = table.shape[0]
    if batch == 0 or tokens == 0 or num_heads == 0:
        return

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]) * batch * num_heads,)

    _ragged_attention_kernel[grid](
        qkv,
        table,
        out,
        key_bias if key_bias is not None else table,
        tokens,
        num_heads,
        qkv.stride(0),
        qkv.stride(1),
        out.stride(0),
        out.stride(1),
        float(scale) * _LOG2E,
        HAS_KEY_BIAS=key_bias is not None,
        BLOCK_QK=next_power_of_2_at_least_16(max_qk_width),
        BLOCK_V=next_power_of_2_at_least_16(max_v_width),
        DOT_PRECISION=dot_precision(qkv.dtype),
    )


@torch.library.custom_op(
    "hiap_kernels::ragged_attention", mutates_args=(),
    schema="(Tensor qkv, Tensor head_table, float scale, int max_qk_width, int max_v_width, int out_width, "
           "Tensor? key_bias=None) -> Tensor",
)
def packed_ragged_attention(
    qkv: torch.Tensor, head_table: torch.Tensor, scale: float, max_qk_width: int, max_v_width: int, out_width: int,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ragged attention op on a validated layout (no checks, no host synchronisation); see :func:`ragged_attention`.

    A ``torch.library`` custom op, so ``torch.compile`` keeps it in its graph (no break) and CUDA graphs capture it.

    Returns:
        ``[B, N, out_width]``, contiguous, in qkv's dtype.
    """
    batch, tokens, _ = qkv.shape
    out = runtime.empty((batch, tokens, out_width), qkv.dtype, qkv.device)
    qkv = unit_last_stride(qkv)
    _launch(qkv, head_table.contiguous(), out, scale, max_qk_width, max_v_width,
            None if key_bias is None else key_bias.contiguous())
    return out


@packed_ragged_attention.register_fake
def _packed_ragged_attention_fake(qkv, head_table, scale, max_qk_width, max_v_width, out_width, key_bias=None):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], out_width))


def ragged_attention(
    qkv: torch.Tensor,
    head_table: torch.Tensor,
    scale: float,
    max_qk_width: int,
    max_v_width: int,
    *,
    out: torch.Tensor | None = None,
    out_width: int | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over heads of different q/k and v widths, read from and written to packed layouts, one launch.

    Without ``out_width``, the table's contents are checked against ``T`` on the first call with a given table (one
    device-to-host copy, remembered per table object and version). With ``out_width = sum(v_w)`` the caller vouches
    for a table it validated once (``validate_head_table``, as ``hiap.PrunedAttention`` does when it is built): the
    call then never synchronises, so it traces into one ``torch.compile`` graph and is captured by CUDA graphs.

    Args:
        qkv: ``[B, N, T]`` fp32/fp16/bf16, packed ``[Q_0|Q_1|...|K_0|K_1|...|V_0|V_1|...]`` (output of the layer's
            single qkv GEMM). Any strides whose last one is 1 are read in place; otherwise a contiguous copy is made.
        head_table: int32 ``[Hk, 6]`` on qkv's device, rows ``(q_off, k_off, v_off, out_off, qk_w, v_w)`` from
            ``build_head_table``. ``qk_w`` may be 0 (uniform attention: the mean of v over keys).
        scale: softmax scale, the dense model's ``1/sqrt(Dh)`` (not that of the kept width).
        max_qk_width: ``max(qk_w)`` (an upper bound works; it sizes the q/k tiles).
        max_v_width: ``max(v_w)`` (an upper bound works; it sizes the v tiles).
        out: optional ``[B, N, sum(v_w)]`` buffer, same dtype and device as qkv, last stride 1; written in full
            (eager use only: the op that ``torch.compile`` sees allocates its output).
        out_width: ``sum(v_w)`` of a table validated beforehand; skips the host-side table check.
        key_bias: optional ``[B, N]`` float32 added to every head's scores of each key (natural-log units, after
            the scale): token reduction's ``log(size)``, ToMe's proportional attention.

    Returns:
        ``[B, N, sum(v_w)]`` in qkv's dtype, head ``h`` at columns ``out_off[h] : out_off[h] + v_w[h]``.
    """
    check_tensor("qkv", qkv, ndim=3)
    check_head_table(head_table, qkv.device)
    runtime.require_triton_device("ragged_attention", qkv, "hiap_kernels.ragged_attention_padded")
    max_qk_width, max_v_width = int(max_qk_width), int(max_v_width)
    if max_qk_width < 0 or max_v_width < 1:
        raise ValueError(f"need max_qk_width >= 0 and max_v_width >= 1, got {max_qk_width} and {max_v_width}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")

    batch, tokens, qkv_width = qkv.shape
    if key_bias is not None:
        check_tensor("key_bias", key_bias, ndim=2, dtypes=(torch.float32,), device=qkv.device)
        if tuple(key_bias.shape) != (batch, tokens):
            raise ValueError(f"key_bias must have shape {(batch, tokens)} ([B, N]), got {tuple(key_bias.shape)}")
    if out_width is None:
        out_width = _validated_out_width(head_table, qkv_width, max_qk_width, max_v_width)
    if out is None:
        return packed_ragged_attention(qkv, head_table, float(scale), max_qk_width, max_v_width, out_width, key_bias)
    check_tensor("out", out, ndim=3, dtypes=(qkv.dtype,), device=qkv.device)
    if tuple(out.shape) != (batch, tokens, out_width):
        raise ValueError(f"out must have shape {(batch, tokens, out_width)}, got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dimension")
    _launch(qkv if qkv.stride(-1) == 1 else qkv.contiguous(), head_table.contiguous(), out, scale, max_qk_width,
            max_v_width, None if key_bias is None else key_bias.contiguous())
    return out


def check_head_table(head_table: torch.Tensor, device: torch.device) -> None:
    """TypeError / ValueError unless ``head_table`` is an int32 ``[Hk, 6]`` tensor on ``device`` (no host sync)."""
    if not isinstance(head_table, torch.Tensor):
        raise TypeError(f"head_table must be a torch.Tensor, got {type(head_table).__name__}")
    if head_table.dtype != torch.int32:
        raise TypeError(f"head_table must be int32 (from build_head_table), got {head_table.dtype}")
    if head_table.dim() != 2 or head_table.shape[1] != len(HEAD_TABLE_COLUMNS):
        raise ValueError(f"head_table must have shape [Hk, {len(HEAD_TABLE_COLUMNS)}], got {tuple(head_table.shape)}")
    if head_table.device != device:
        raise ValueError(f"head_table is on {head_table.device} but qkv is on {device}")


# table -> ((version, T, max_qk_width, max_v_width), sum(v_w)). Keyed by the tensor object (weakly), with its version
# counter, so an in-place edit of the table or a new table at a recycled address is validated afresh.
_VALIDATED_TABLES = WeakTensorKeyDictionary()


def _validated_out_width(head_table: torch.Tensor, qkv_width: int, max_qk_width: int, max_v_width: int) -> int:
    signature = (head_table._version, qkv_width, max_qk_width, max_v_width)
    cached = _VALIDATED_TABLES.get(head_table)
    if cached is not None and cached[0] == signature:
        return cached[1]
    out_width = validate_head_table(head_table, qkv_width, max_qk_width, max_v_width)
    _VALIDATED_TABLES[head_table] = (signature, out_width)
    return out_width
