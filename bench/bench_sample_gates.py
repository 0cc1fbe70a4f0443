"""Gumbel-Sigmoid gate sampling over every gate of a DeiT-S: values and straight-through slopes.

    sample_gates   a flat fp32 logit vector of 12 x (6 + 2*6*64 + 1 + 1536) = 27,732 gates (a gated DeiT-S at
                   dim_group 1), hard samples with the straight-through estimator, seed and offset fixed

Providers produce the same two outputs, each gate's hard value and its slope ``dz/da = s (1 - s) / tau``:

    reference   ``gumbel_sigmoid`` eager (Philox twin in int64 tensor ops), forward, then backward of a ones gradient
                so that the logits' gradient is the slope
    compiled    torch.compile of that forward, backward as above (the Philox twin stays an opaque custom op inside
                the graph)
    triton      ``hiap_kernels.sample_gates``: one launch returns values and slopes

The batch column of the record is 1: the gate count does not depend on the batch.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, compile_reference
from _timing import drop_gradients
from _workloads import DEIT_S_GATES, DEPTH, GATES_PER_LAYER, activations, gate_sampling_work

from hiap_kernels import gumbel_sigmoid

TAU = 1.0
SEED = 2603
OFFSET = 0
BATCH = 1


def _sample(logits: torch.Tensor) -> torch.Tensor:
    return gumbel_sigmoid(logits, TAU, SEED, OFFSET, hard=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_gates(benchmark, recorder, provider):
    run = CaseRun(benchmark, recorder, "sample_gates", provider, BATCH)
    run.require_provider(triton_modules=("hiap_kernels.gates.kernel",), compile_cost="small")
    run.require_time(20)

    # Spread around the decision boundary, as mid-training logits are, so that samples differ from the decisions.
    logits = (2.0 * activations((DEIT_S_GATES,), seed=SEED)).requires_grad_()
    if provider == "triton":
        from hiap_kernels import sample_gates

        prepare = None

        def call() -> None:
            sample_gates(logits, tau=TAU, seed=SEED, offset=OFFSET, hard=True)
    else:
        sample = compile_reference(_sample) if provider == "compiled" else _sample
        ones = torch.ones_like(logits)
        prepare = drop_gradients(logits)

        def call() -> None:
            sample(logits).backward(ones)  # values, and the slopes in logits.grad

    shapes = {"gates": DEIT_S_GATES, "layers": DEPTH, "gates_per_layer": GATES_PER_LAYER, "tau": TAU, "hard": True}
    run.measure(call, prepare=prepare, shapes=shapes, work=gate_sampling_work(DEIT_S_GATES),
                compile_cost="small" if provider == "compiled" else None)
