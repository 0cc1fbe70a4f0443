"""The contract of ``nearest_tokens``, in PyTorch.

ToMe's bipartite matching and RAPID's importance merge both ask, for each of ``M`` query tokens, which of ``P``
candidate tokens of the same image is most similar by the cosine of their keys, some candidates being ruled out:

    score[b, m] = max_{p not excluded[b, p]} cos(queries[b, m], candidates[b, p])
    index[b, m] = the p where that maximum is reached

with ``cos(q, c) = q / max(||q||, eps) . c / max(||c||, eps)`` and ``eps = 1e-12`` (``F.normalize``), in float32.

Ties, exclusions and NaN follow ``torch.max`` over the similarity row (the reference is exactly that):

* ties: the lowest candidate index;
* every candidate excluded (or none given, P = 0): score ``-inf``, index 0;
* NaN: a NaN in a query's key, or in a candidate's key that is not excluded, makes the row's similarities NaN there;
  NaN wins the max, so the score is NaN and the index is the first candidate whose similarity is NaN (for a NaN
  query, the first candidate not excluded). An excluded candidate's NaN is masked away like the rest of it.
"""

from __future__ import annotations

import torch

_EPS = 1e-12  # F.normalize's default


def nearest_tokens_reference(queries: torch.Tensor, candidates: torch.Tensor,
                             excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's most cosine-similar candidate (module docstring), through the full similarity matrix.

    Args:
        queries: ``[B, M, W]`` keys of the tokens looking for a partner (any float dtype, any strides).
        candidates: ``[B, P, W]`` keys of the tokens they may join.
        excluded: bool ``[B, P]``, True where a candidate may not be chosen; None allows all.

    Returns:
        ``score [B, M]`` float32 (the best cosine similarity) and ``index [B, M]`` int64 (its candidate).
    """
    batch, rows = queries.shape[:2]
    if candidates.shape[1] == 0:  # nothing to choose from: the all-excluded answer (torch.max refuses an empty row)
        return (queries.new_full((batch, rows), float("-inf"), dtype=torch.float32),
                queries.new_zeros((batch, rows), dtype=torch.int64))
    queries, candidates = queries.float(), candidates.float()
    # The dot products of the keys as they lie, then both norms divided out: no normalised copy of the candidates
    # (on a CPU that copy cost more than the product), and the kernel's order of operations.
    similarity = torch.bmm(queries, candidates.transpose(1, 2))  # [B, M, P]
    similarity = (similarity / _norm(queries)[:, :, None]) / _norm(candidates)[:, None, :]
    if excluded is not None:
        similarity = similarity.masked_fill(excluded[:, None, :], float("-inf"))
    score, index = similarity.max(dim=-1)
    return score, index


def _norm(keys: torch.Tensor) -> torch.Tensor:
    """``max(||k||, eps)`` per token of ``keys [B, T, W]``: ``[B, T]``, F.normalize's denominator."""
    return torch.linalg.vector_norm(keys, dim=-1).clamp_min(_EPS)
