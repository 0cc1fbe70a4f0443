"""The contract of ``merge_tokens``, in PyTorch.

A merge step keeps ``D`` of a block's ``P`` tokens (``keep``) and folds ``R`` others (``source``) into them, source
``r`` into kept token ``target[r]``; every token carries a size (how many original patches it stands for). The result
is the size-weighted mean of each kept token and the sources folded into it, with the sizes summed:

    out[d]      = (x[keep[d]] * size[keep[d]] + sum_{r: target[r] = d} x[source[r]] * size[source[r]]) / out_size[d]
    out_size[d] = size[keep[d]] + sum_{r: target[r] = d} size[source[r]]

ToMe's bipartite step and RAPID's importance merge are both this with their own index choices.
"""

from __future__ import annotations

import torch


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [B, P, X]`` at ``index [B, K]`` along the token axis: ``[B, K, X]``.

    Advanced indexing copies whole rows; ``torch.gather`` with the index expanded over X reads an index per element
    and ran 4x slower on a CPU (DeiT-S patch tokens at batch 16: 3.3 ms against 0.8)."""
    rows = torch.arange(tensor.shape[0], device=tensor.device)[:, None]
    return tensor[rows, index]


def check_merge_indices(tokens: int, keep: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> None:
    """ValueError naming the first of ``keep``, ``source`` (in ``[0, P)``) and ``target`` (in ``[0, D)``) that holds
    an index out of range. Reads them on the host: for tensors that are there already."""
    kept = keep.shape[-1]
    for name, index, extent, what in (("keep", keep, tokens, "the tokens"), ("source", source, tokens, "the tokens"),
                                      ("target", target, kept, "the kept tokens")):
        if index.numel():
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= extent:
                raise ValueError(f"{name} holds {low if low < 0 else high}, outside [0, {extent}) ({what})")


def _merge(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
           target: torch.Tensor, flagged: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge on indices in range; the rows of bool ``flagged [B, D]`` come out NaN."""
    size = size.float()[..., None]
    keep_size, source_size = gather_rows(size, keep), gather_rows(size, source)  # [B, D, 1], [B, R, 1]
    # The gathers are fresh tensors, so the arithmetic on [B, D, C] runs in place: one pass each, no new buffer.
    weighted = gather_rows(x, keep).float().mul_(keep_size)
    weighted.scatter_add_(1, target[..., None].expand(-1, -1, x.shape[-1]),
                          gather_rows(x, source).float().mul_(source_size))
    out_size = keep_size.scatter_add(1, target[..., None], source_size)
    if flagged is not None:  # a NaN size makes the division write the whole row NaN: no extra pass over [B, D, C]
        out_size = out_size.masked_fill(flagged[..., None], float("nan"))
    return weighted.div_(out_size).to(x.dtype), out_size.squeeze(-1)


def merge_tokens_flagged(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge with no host read of the indices, as the kernel does it on a GPU: an index out of range is never
    read, and the rows it touches come out NaN (``out`` and ``out_size``): the row of a ``keep`` outside ``[0, P)``,
    every row of an image with a ``source`` outside ``[0, P)`` or a ``target`` outside ``[0, D)``."""
    batch, tokens, channels = x.shape
    kept = keep.shape[1]
    if kept == 0 or tokens == 0:
        return x.new_empty((batch, kept, channels)), torch.empty((batch, kept), dtype=torch.float32, device=x.device)
    keep_inside = (keep >= 0) & (keep < tokens)  # [B, D]
    sources_inside = ((source >= 0) & (source < tokens) & (target >= 0) & (target < kept)).all(dim=1)  # [B]
    flagged = ~keep_inside | ~sources_inside[:, None]
    return _merge(x, size, keep.clamp(0, tokens - 1), source.clamp(0, tokens - 1), target.clamp(0, kept - 1), flagged)


def merge_tokens_reference(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, source: torch.Tensor,
                           target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (module docstring), accumulated in float32.

    Args:
        x: ``[B, P, C]`` tokens (any float dtype).
        size: ``[B, P]`` float32 sizes (> 0).
        keep: int64 ``[B, D]`` tokens that stay, in output order.
        source: int64 ``[B, R]`` tokens folded away.
        target: int64 ``[B, R]`` for each source, the output row (index into ``keep``) it joins.

    Returns:
        ``out [B, D, C]`` in x's dtype and ``out_size [B, D]`` float32.

    Raises:
        ValueError: on the CPU, an index out of range (:func:`check_merge_indices`). On a GPU, and under
            ``torch.compile``, the indices are not read on the host (a synchronisation, a graph break): the rows an
            index out of range touches come out NaN, as from the kernel (:func:`merge_tokens_flagged`).
    """
    if all(index.device.type == "cpu" for index in (keep, source, target)) and not torch.compiler.is_compiling():
        check_merge_indices(x.shape[1], keep, source, target)
        return _merge(x, size, keep, source, target)
    return merge_tokens_flagged(x, size, keep, source, target)
