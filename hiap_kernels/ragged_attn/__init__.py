"""Ragged multi-head attention for extracted (pruned) layers: heads of different q/k and v widths, one launch.

    reference.py   the packed layout (``build_head_table``, ``packed_widths``, ``padded_gather_indices``) and two
                   references: ``ragged_attention_padded`` (zero-pad to the widest head, one SDPA call; the pruned
                   model's reference path) and ``ragged_attention_naive`` (per-head loop, exact in float64)
    sdpa.py        ``ragged_attention_sdpa``: one SDPA call per run of equal-width heads (``head_runs``), the
                   pruned model's PyTorch path (no gather, no padding; compile and CUDA-graph friendly)
    kernel.py      the Triton kernel, its launcher ``ragged_attention`` (a custom op under torch.compile) and
                   ``validate_head_table``

The Triton op is importable as ``hiap_kernels.ragged_attention``; this package's own import pulls in only the
references, so it works where Triton does not.
"""

from hiap_kernels.ragged_attn.reference import (
    HEAD_TABLE_COLUMNS,
    build_head_table,
    packed_widths,
    padded_gather_indices,
    ragged_attention_naive,
    ragged_attention_padded,
)
from hiap_kernels.ragged_attn.sdpa import HeadRun, head_runs, ragged_attention_sdpa

__all__ = [
    "HEAD_TABLE_COLUMNS",
    "HeadRun",
    "head_runs",
    "ragged_attention_sdpa",
    "build_head_table",
    "packed_widths",
    "padded_gather_indices",
    "ragged_attention_naive",
    "ragged_attention_padded",
]
