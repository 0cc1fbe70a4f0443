"""RAPID's prune score (each patch token's redundancy minus its attention share), inference, DeiT-S shapes.

    token_redundancy   keys [B, 196, 384], a view of the packed qkv projection (row stride 1152), and the class
                       token's attention to the 196 patch tokens (importance weight 1)

Providers: ``token_redundancy_reference`` (inverse norms, two GEMVs, the attention share and about fifteen small ops
in PyTorch, eager) / torch.compile of it / ``hiap_kernels.token_redundancy`` (one launch, one program per image).
bf16 keys on a GPU, fp32 on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, provider_op
from _settings import DEVICE, ON_GPU, batch_sizes
from _workloads import DEIT_S_SHAPES, EMBED_DIM, token_redundancy_work

from hiap_kernels import token_redundancy_reference

BATCHES = batch_sizes(gpu_default=(64, 256), cpu_default=(4,))
PATCHES = 196


def _inputs(batch: int, dtype: torch.dtype):
    """(keys, cls) as attention hands them to the prune step: the key slice of a packed projection and a softmax row
    without the class token's own entry."""
    generator = torch.Generator().manual_seed(batch)
    packed = torch.randn(batch, PATCHES + 1, 3 * EMBED_DIM, generator=generator).to(DEVICE, dtype)
    attention = torch.softmax(torch.randn(batch, PATCHES + 1, generator=generator), dim=-1).to(DEVICE)
    return packed[:, 1:, EMBED_DIM : 2 * EMBED_DIM], attention[:, 1:]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_token_redundancy(benchmark, recorder, provider, batch):
    run = CaseRun(benchmark, recorder, "token_redundancy", provider, batch, precision="bf16" if ON_GPU else "fp32")
    run.note_cpu_reduction("batch 4 instead of 64/256, fp32")
    run.require_provider(triton_modules=("hiap_kernels.token_score.kernel",), compile_cost="small")
    run.require_time(15)
    op = provider_op(provider, "token_redundancy", token_redundancy_reference)
    keys, cls = _inputs(batch, torch.bfloat16 if ON_GPU else torch.float32)

    def call() -> None:
        with torch.no_grad():
            op(keys, cls, 1.0)

    shapes = {**DEIT_S_SHAPES, "keys": list(keys.shape), "cls": list(cls.shape)}
    run.measure(call, shapes=shapes, work=token_redundancy_work(batch, PATCHES, EMBED_DIM),
                compile_cost="small" if provider == "compiled" else None)
