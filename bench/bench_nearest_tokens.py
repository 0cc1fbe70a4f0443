"""The similarity step of token reduction (each token's most cosine-similar partner), inference, DeiT-S shapes.

    nearest_tokens_tome        keys [B, 196, 384]: the 98 even patch tokens against the 98 odd ones (ToMe's matching)
    nearest_tokens_rapid_r16   RAPID's importance merge at r = 16: its 24 candidates (the default merge pool, 1.5 r)
                               against all 196 tokens, the candidates excluded

Providers: ``nearest_tokens_reference`` (F.normalize, a similarity matmul, the mask and a max in PyTorch, eager) /
torch.compile of it / ``hiap_kernels.nearest_tokens`` (one launch, no similarity matrix). bf16 keys on a GPU, fp32 on
a CPU.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import DEVICE, ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, nearest_tokens_work

from hiap.method.token_overhead import merge_candidates
from hiap.tokens.schedule import DEFAULT_MERGE_POOL
from hiap_kernels import nearest_tokens_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(4,))
PATCHES = 196
MERGED = 16
CANDIDATES = merge_candidates(PATCHES, MERGED, DEFAULT_MERGE_POOL)
CASES = ("tome", f"rapid_r{MERGED}")


def _inputs(case: str, batch: int, dtype: torch.dtype):
    """(queries, candidates, excluded) as token reduction passes them: views of one key tensor for ToMe; the gathered
    merge candidates, every key and the candidates' mask for RAPID."""
    generator = torch.Generator().manual_seed(batch)
    keys = torch.randn(batch, PATCHES, EMBED_DIM, generator=generator).to(DEVICE, dtype)
    if case == "tome":
        return keys[:, ::2], keys[:, 1::2], None
    source = torch.stack([torch.randperm(PATCHES, generator=generator)[:CANDIDATES] for _ in range(batch)]).to(DEVICE)
    excluded = torch.zeros(batch, PATCHES, dtype=torch.bool, device=DEVICE).scatter_(1, source, True)
    return torch.gather(keys, 1, source[..., None].expand(-1, -1, EMBED_DIM)), keys, excluded


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nearest_tokens(benchmark, recorder, provider, batch, case):
    run = CaseRun(benchmark, recorder, f"nearest_tokens_{case}", provider, batch,
                  precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction("batch 4 instead of 64/256, fp32")
    run.require_provider(triton_modules=("hiap_kernels.token_similarity.kernel",), compile_cost="small")
    run.require_time(15)
    op = provider_op(provider, "nearest_tokens", nearest_tokens_reference)
    queries, candidates, excluded = _inputs(case, batch, torch.bfloat16 if ON_GPU else torch.float32)

    def call() -> None:
        with torch.no_grad():
            op(queries, candidates, excluded)

    shapes = {**DEIT_S_SHAPES, "queries": list(queries.shape), "candidates": list(candidates.shape),
              "excluded": None if excluded is None else list(excluded.shape)}
    key_rows = PATCHES if case == "tome" else PATCHES + CANDIDATES  # RAPID's queries are a gathered copy
    run.measure(call, shapes=shapes,
                work=nearest_tokens_work(batch, queries.shape[1], candidates.shape[1], EMBED_DIM, key_rows,
                                         masked=excluded is not None),
                compile_cost="small" if provider == "compiled" else None)
