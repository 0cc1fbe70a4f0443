"""The timing of one op of ``hiap_kernels.gated_weight`` (``bench_gated_qkv_weight``, ``bench_gated_fc2_weight``,
``bench_gather_weight``): forward + backward of one DeiT-S layer's weight, per provider, with the number of
launching ops an eager call dispatches recorded beside the time (the figure that decides a launch-bound step)."""

from __future__ import annotations

from typing import Callable

import torch
from _harness import CaseRun
from _providers import compile_reference
from _timing import Work, drop_gradients, launching_ops


def measure_gated_weight(run: CaseRun, provider: str, reference: Callable, triton_op: str, inputs: dict,
                         options: dict, shapes: dict, work: Work, triton_module: str) -> None:
    """Time ``provider`` on forward + backward of the op: ``inputs`` (tensors or None, in argument order) requiring
    gradients, a fixed random output gradient, the keyword arguments ``options`` (the gate draw, or a gather's
    index); ``triton_module``: the module of ``hiap_kernels.gated_weight`` that defines the op."""
    run.require_provider(triton_modules=(f"hiap_kernels.gated_weight.{triton_module}",), compile_cost="small")
    run.require_time(20)
    leaves = [t.requires_grad_() if t is not None else None for t in inputs.values()]
    if provider == "triton":
        import hiap_kernels

        op = getattr(hiap_kernels, triton_op)
    else:
        op = compile_reference(reference) if provider == "compiled" else reference

    def forward():
        outputs = op(*leaves, **options)
        return [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]

    grads = [torch.randn_like(o) for o in forward()]

    def call() -> None:
        torch.autograd.backward(forward(), grads)

    if provider != "compiled":  # under a dispatch mode torch.compile falls back to eager: no count for it
        shapes = {**shapes, "ops_per_call": launching_ops(call)}
    run.measure(call, prepare=drop_gradients(*[t for t in leaves if t is not None]), shapes=shapes, work=work,
                compile_cost="small" if provider == "compiled" else None)
