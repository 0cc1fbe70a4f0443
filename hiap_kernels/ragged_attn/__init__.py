"""Ragged multi-head attention for extracted (pruned) layers: heads of different q/k and v widths, one launch.

    reference.py   the packed layout (``build_head_table``, ``packed_widths``, ``padded_gather_indices``) and two
                   references: ``ragged_attention_padded`` (zero-pad to the widest head, one SDPA call; the pruned
                   model's reference path) and ``ragged_attention_naive`` (per-head loop, exact in float64)
    kernel.py      the Triton kernel, its launcher ``ragged_attention`` and ``validate_head_table``

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

__all__ = [
    "HEAD_TABLE_COLUMNS",
    "build_head_table",
    "packed_widths",
    "padded_gather_indices",
    "ragged_attention_naive",
    "ragged_attention_padded",
]
