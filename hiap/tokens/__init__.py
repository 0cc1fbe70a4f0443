"""Fewer tokens as well as fewer channels: RAPID-style token reduction and the ToMe baseline for timm ViTs.

    schedule.py   TokenSchedule / LayerStep, RAPID and ToMe schedules, the text form (``rapid:r=16``)
    reduce.py     the steps in plain PyTorch: redundancy pruning, importance merging, bipartite soft matching
    attention.py  attention of every supported module, also returning its keys and the class token's attention
    patch.py      reduce_tokens / restore_tokens: patch a model's blocks in place, and undo it

Works on a timm ViT, a gated HiAP model and an extracted pruned model; ``count_macs`` counts each block at the tokens
it sees, plus what the reduction itself computes.
"""

from hiap.tokens.patch import reduce_tokens, restore_tokens, schedule_for, token_counts, token_schedule
from hiap.tokens.schedule import LayerStep, TokenSchedule, parse_schedule, rapid_schedule, tome_schedule

__all__ = [
    "LayerStep",
    "TokenSchedule",
    "parse_schedule",
    "rapid_schedule",
    "reduce_tokens",
    "restore_tokens",
    "schedule_for",
    "token_counts",
    "token_schedule",
    "tome_schedule",
]
