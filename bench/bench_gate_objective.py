"""The gate terms of one HiAP training step for DeiT-S, forward + backward: expected and decided MACs, the Lagrangian
budget (target mode, multipliers ascending) and the feasibility penalties, from every layer's logits.

    gate_objective   12 layers of 6 heads with 4 q/k and 4 v groups (16 dims each) and 12 neuron groups (128 each),
                     the default aligned layout: 1,020 logits

Providers: ``reference`` (``gate_objective_reference`` eager: the torch ops ``hiap``'s reference path runs),
``compiled`` (it under torch.compile) and ``triton`` (``hiap_kernels.gate_objective``: one launch forward, one multiply
backward). The record's shapes carry ``ops_per_call``, the launching ops of one eager call. The batch column is 1.
"""

from __future__ import annotations

import pytest
import torch
from _harness import CaseRun
from _providers import PROVIDERS, compile_reference
from _timing import Work, drop_gradients, launching_ops
from _workloads import activations

from hiap_kernels import GateLayout, ObjectiveConstants, gate_objective_reference

# DeiT-S at 224 px: 197 tokens, embed dim 384; MACs of one kept q/k dim, v dim and neuron; patch embedding + head.
TOKENS, EMBED = 197, 384
UNIT = 2 * TOKENS * EMBED + TOKENS * TOKENS
LAYOUT = GateLayout(layers=12, heads=6, groups=4, neuron_groups=12, head_group=16, neuron_group=128, min_heads=1,
                    dims_min=1, neurons_min=2)
CONSTANTS = ObjectiveConstants(unit_qk=UNIT, unit_v=UNIT, unit_neuron=2 * TOKENS * EMBED, static=58_007_040,
                               dense=4_607_188_224, lambda_macro=1.0, lambda_micro=1.0, lagrangian_lr=0.05,
                               feasibility_weight=1.0, min_dim_fraction=0.125, min_neuron_fraction=0.125)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gate_objective(benchmark, recorder, provider):
    run = CaseRun(benchmark, recorder, "gate_objective", provider, 1)
    run.require_provider(triton_modules=("hiap_kernels.objective.kernel",), compile_cost="small")
    run.require_time(20)
    flat = (2 * activations((LAYOUT.numel,), seed=5).float()).requires_grad_()
    device = flat.device
    constants = CONSTANTS.tensor(device)
    state = [torch.tensor(value, dtype=torch.float64, device=device) for value in (0.0, 0.5, 0.67)]
    if provider == "triton":
        import hiap_kernels

        op = hiap_kernels.gate_objective
    else:
        op = compile_reference(gate_objective_reference) if provider == "compiled" else gate_objective_reference

    def call() -> None:
        gate_terms, _ = op(flat, constants, *state, LAYOUT, target_mode=True, ascend=True)
        gate_terms.backward()

    shapes = {"layout": list(LAYOUT), "logits": LAYOUT.numel}
    if provider != "compiled":  # under a dispatch mode torch.compile falls back to eager: no count for it
        shapes["ops_per_call"] = launching_ops(call)
    # Reads the logits, writes their gradient; the FLOPs are a few per logit. The floor is a launch, not this.
    work = Work(0.0, 2 * 4 * LAYOUT.numel)
    run.measure(call, prepare=drop_gradients(flat), shapes=shapes, work=work,
                compile_cost="small" if provider == "compiled" else None)
