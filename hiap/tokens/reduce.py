"""The token-reduction steps, in plain PyTorch: RAPID's redundancy pruning and importance merging, and ToMe.

Every step works on the tokens of one block after its attention, on:

    x     [B, N, C]  the residual stream: ``prefix`` class and register tokens, then P = N - prefix patch tokens
    size  [B, N, 1]  how many original patches each token stands for (float32; ones before any merge)
    keys  [B, N, W]  the block's attention keys, every head's kept columns side by side (the similarity metric)
    cls   [B, N]     the class token's attention to each token, mean over heads (RAPID only)

and returns ``(x [B, N - r, C], size [B, N - r, 1])``: the prefix tokens first and untouched (never scored, merged or
dropped), then the patch tokens that remain. The prefix rides along in the step's one gather (or merge launch): no
split and concatenation of the whole residual stream around it. Merged tokens are size-weighted means, and their size
is the sum of what they absorbed, so attention can weight them by it (``log(size)`` added to the scores: ToMe's
proportional attention). Static shapes: r is fixed per block, so a reduced model compiles and replays from a CUDA graph.

This package's reading of RAPID (arXiv 2606.08156, of which only the abstract is public), configurable:

* prune (shallow to middle blocks): a token's redundancy is its mean cosine similarity to the other patch tokens
  (computed as its similarity to the sum of all, ``O(P W)`` instead of ``O(P^2 W)``: the same number), and the r most
  redundant tokens are dropped: over-represented patterns go first. With ``importance_weight`` > 0 the score is
  ``redundancy - importance_weight * importance``, the importance being the class token's attention to the token,
  normalised to mean 1, so tokens the class token attends to are spared. The default is 0, the abstract's
  "redundancy-similarity aware" metric: on paired teacher seeds (``bench/token_accuracy.py``) every weight above 0
  scored lower than 0, the more so the larger it was.
* merge (deep blocks): the ``merge_pool * r`` tokens the class token attends to least are the candidates (at most
  half the patch tokens, never fewer than r); each finds its most similar token outside them, and the r candidates
  closest to their partner are merged into it. The tokens the class token relies on stay intact, and of the less
  important ones those with a near twin go first ("fusing less important but similar neighbours"). ``merge_pool``
  = 1 merges the r least attended whatever their similarity; the default 1.5 measured better on paired teacher
  seeds (``bench/token_accuracy.py``).
* Token order is kept by both (the kept tokens stay in their original order).

ToMe (Bolya et al. 2023), as published: tokens alternate into sets A and B; every A token's most similar B token is its
edge; the r A tokens with the strongest edges merge into their B partners; the output is the unmerged A tokens (in
order) followed by B. ToMe averages the keys over heads; pruned heads have no common width, so here both methods
compare the concatenated keys.

The steps take their kernels as arguments, the PyTorch references by default: the prune step its ``score`` (the
score above, ``token_redundancy``), the merge steps ``merge`` (the size-weighted fold, ``merge_tokens``) and
``nearest`` (each token's most cosine-similar partner, ``nearest_tokens``: normalised keys, similarities, excluded
partners at -inf, max and argmax with ties to the lowest index); ``hiap.tokens.patch`` hands them the Triton ops on
the Triton backend.
"""

from __future__ import annotations

import torch

from hiap.method.token_overhead import merge_candidates
from hiap.tokens.schedule import DEFAULT_MERGE_POOL
from hiap_kernels.token_merge.reference import gather_rows, merge_tokens_reference
from hiap_kernels.token_score.reference import token_redundancy_reference
from hiap_kernels.token_similarity.reference import nearest_tokens_reference


def _with_prefix(index: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch-token positions ``index [B, K]`` as token positions, after the ``prefix`` tokens: ``[B, prefix + K]``."""
    if prefix == 0:
        return index
    head = torch.arange(prefix, device=index.device).expand(index.shape[0], prefix)
    return torch.cat([head, index + prefix], dim=1)


def _merge(merge, x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
           target: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge`` (``merge_tokens_reference`` or the Triton ``merge_tokens``) of patch positions ``keep``, ``source``
    and ``target`` (an index into ``keep``), the prefix tokens kept in front (their size is 1, so the size-weighted
    mean of a token with nothing folded into it is the token itself, exactly); sizes as ``[B, N, 1]``."""
    out, out_size = merge(x, size.squeeze(-1).float(), _with_prefix(keep, prefix), source + prefix, target + prefix)
    return out, out_size[..., None]


def redundancy_prune(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, cls: torch.Tensor | None, r: int,
                     importance_weight: float = 0.0, prefix: int = 0, score=token_redundancy_reference
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """RAPID's shallow step: drop the ``r`` patch tokens of highest ``score`` (``token_redundancy``: the most
    redundant, and with an importance weight the least attended; module docstring). ``size`` may be ``[1, 1, 1]``
    (every token one patch), and is then returned as it is."""
    if r == 0:
        return x, size
    patches = x.shape[1] - prefix
    scores = score(keys[:, prefix:], None if cls is None else cls[:, prefix:], importance_weight)  # [B, P]
    keep = torch.topk(scores, patches - r, dim=1, largest=False, sorted=False).indices.sort(dim=1).values  # [B, P-r]
    keep = _with_prefix(keep, prefix)
    if size.shape[1] == 1:  # a broadcast size (every token 1) stays one
        return gather_rows(x, keep), size
    return gather_rows(x, keep), gather_rows(size, keep)


def importance_merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, cls: torch.Tensor, r: int,
                     merge=merge_tokens_reference, nearest=nearest_tokens_reference, prefix: int = 0,
                     pool: float = DEFAULT_MERGE_POOL) -> tuple[torch.Tensor, torch.Tensor]:
    """RAPID's deep step: of the ``merge_candidates(P, r, pool)`` least attended patch tokens, merge the ``r``
    most similar to their nearest token outside the candidates into it (module docstring)."""
    if r == 0:
        return x, size
    keys, cls = keys[:, prefix:], cls[:, prefix:]
    patches = cls.shape[1]
    candidates = merge_candidates(patches, r, pool)
    candidate = torch.argsort(cls.float(), dim=1, stable=True)[:, :candidates]  # least attended first, [B, K]
    is_candidate = torch.zeros_like(cls, dtype=torch.bool).scatter_(1, candidate, True)  # [B, P]
    # Candidates against every token, the candidates excluded: no gather of the other tokens' keys.
    similarity, partner = nearest(gather_rows(keys, candidate), keys, is_candidate)  # [B, K], partner a token index
    if candidates > r:
        closest = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :r]  # [B, r]
        source, partner = torch.gather(candidate, 1, closest), torch.gather(partner, 1, closest)
        is_source = torch.zeros_like(is_candidate).scatter_(1, source, True)
    else:
        source, is_source = candidate, is_candidate
    # The tokens that stay, in their original order: a stable sort puts the non-sources (0) first. [B, P - r]
    destination = torch.argsort(is_source.to(torch.uint8), dim=1, stable=True)[:, : patches - r]
    # A kept token's place among the destinations: how many kept tokens come before it.
    place = torch.cumsum((~is_source).to(torch.int64), dim=1) - 1  # [B, P]
    target = torch.gather(place, 1, partner)
    return _merge(merge, x, size, destination, source, target, prefix)


def bipartite_soft_matching(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int,
                            merge=merge_tokens_reference, nearest=nearest_tokens_reference, prefix: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's step: merge ``r`` patch tokens of set A (even patch positions) into their most similar token of set B
    (odd)."""
    if r == 0:
        return x, size
    keys = keys[:, prefix:]
    edge, partner = nearest(keys[:, ::2], keys[:, 1::2])  # [B, |A|]: views of the keys, no copy
    ranked = torch.argsort(edge, dim=-1, descending=True, stable=True)
    source = ranked[:, :r]
    unmerged = ranked[:, r:].sort(dim=1).values
    # In patch positions: A is 0, 2, 4, ... and B is 1, 3, 5, ...; the output is [unmerged A | all of B].
    b_tokens = torch.arange(1, keys.shape[1], 2, device=x.device).expand(x.shape[0], -1)
    keep = torch.cat([2 * unmerged, b_tokens], dim=1)
    target = torch.gather(partner, 1, source) + unmerged.shape[1]
    return _merge(merge, x, size, keep, 2 * source, target, prefix)
