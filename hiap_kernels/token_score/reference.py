"""The contract of ``token_redundancy``, in PyTorch: the score RAPID's prune step ranks a block's patch tokens by.

For each image's ``P`` patch tokens with keys ``k_i`` (every kept head's key columns side by side) and, optionally,
the class token's attention ``cls_i`` to them:

    m_i          = k_i / max(||k_i||, eps)                       unit keys (``F.normalize``'s, eps = 1e-12)
    redundancy_i = (m_i . sum_j m_j - 1) / max(P - 1, 1)         mean cosine similarity to the other tokens
    importance_i = cls_i / max(sum_j cls_j, 1e-12) * P           attention share, mean 1
    score_i      = redundancy_i - importance_weight * importance_i

in float32. The prune step drops the ``r`` highest scores: over-represented patterns first, unless the class token
attends to them. The sum over j makes the redundancy ``O(P W)`` instead of the ``O(P^2 W)`` of a similarity matrix,
with the same value. NaN in a key makes its image's scores NaN (the sum reaches every token).
"""

from __future__ import annotations

import torch

_EPS = 1e-12  # F.normalize's default, and the floor of the attention sum


def token_redundancy_reference(keys: torch.Tensor, cls: torch.Tensor | None = None,
                               importance_weight: float = 1.0) -> torch.Tensor:
    """Every patch token's prune score (module docstring).

    Args:
        keys: ``[B, P, W]`` keys of the patch tokens (any float dtype, any strides).
        cls: ``[B, P]`` the class token's attention to them, or None (no importance term).
        importance_weight: the importance term's weight (0 leaves the redundancy alone).

    Returns:
        ``score [B, P]`` float32.
    """
    patches = keys.shape[1]
    keys = keys.float()
    # Two products on the keys where they lie (a strided view of the qkv projection) through the inverse norms,
    # rather than a normalised copy of them.
    inverse_norm = torch.linalg.vector_norm(keys, dim=-1).clamp_min(_EPS).reciprocal()  # [B, P]
    total = torch.bmm(inverse_norm[:, None, :], keys)  # sum_j m_j, [B, 1, W]
    similarity = torch.bmm(keys, total.transpose(1, 2)).squeeze(-1) * inverse_norm  # m_i . sum_j m_j, [B, P]
    score = (similarity - 1.0) / max(patches - 1, 1)
    if cls is not None and importance_weight:
        cls = cls.float()
        importance = cls / cls.sum(dim=-1, keepdim=True).clamp_min(_EPS) * patches
        score = score - importance_weight * importance
    return score
