"""The work a token-reduction step adds besides its block: how many tokens a merge step compares, and the MACs a step
computes (class-token scores, similarities).

A leaf both sides read: ``hiap.tokens.reduce`` picks its merge candidates with :func:`merge_candidates`, and the cost
model (``cost.count_macs``) counts each step with :func:`step_overhead_macs`, so the method never imports
``hiap.tokens`` (which imports the method).
"""

from __future__ import annotations

import math


def merge_candidates(patches: int, r: int, pool: float) -> int:
    """How many of the least attended patch tokens compete in a RAPID merge step that removes ``r`` of ``patches``:
    ``pool * r`` rounded half up, at most half the patches (so that every candidate keeps partners outside the
    candidates to choose from), never fewer than ``r``."""
    return max(r, min(math.floor(pool * r + 0.5), patches // 2))


def step_overhead_macs(kind: str, patches: int, r: int, key_width: int, tokens: int, class_attention: bool,
                       merge_pool: float) -> int:
    """MACs one step adds per image (what a FLOP counter sees): the class-attention scores (when the step uses them)
    and the similarity; ``patches`` and ``tokens`` are the block's input counts without and with the prefix,
    ``key_width`` the width of the keys it compares, ``merge_pool`` the schedule's (``merge_candidates``)."""
    if kind == "keep" or r == 0:
        return 0
    if kind == "tome":
        return ((patches + 1) // 2) * (patches // 2) * key_width
    class_attention = tokens * key_width if class_attention else 0
    if kind == "prune":
        return class_attention + 2 * patches * key_width  # the sum of the unit keys, then each key against it
    return class_attention + merge_candidates(patches, r, merge_pool) * patches * key_width
