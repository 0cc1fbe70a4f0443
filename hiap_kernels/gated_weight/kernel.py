"""What the gated-weight kernels share: the tile policy, the in-kernel gate, the op schema of the gate arguments and
the argument checks. The ops themselves are ``qkv_weight.py`` (``gated_qkv_weight``) and ``fc2_weight.py``
(``gated_fc2_weight``); ``gather.py`` tiles by the same policy.

Forward: every program regenerates the gates its rows (qkv) or columns (fc2) use from ``(seed, offset + i)`` with the
in-kernel sampler and writes ``W * m``. Backward: ``dW = dW' * m`` and the gate gradients
``dL/dm[r] = <dW'[r], W[r]> + db'[r] b[r]``, reduced over each gate's group and multiplied by the straight-through
slope, all in the same pass over ``dW'`` and ``W``, with deterministic sums (no atomics):

    qkv   one program per head and part (q, k or v rows): the head gate's sum over its v groups stays in the program
    fc2   one program per run of whole neuron groups; the block gate's sum over programs is one torch ``sum`` of the
          per-program partials

Against the chain of small torch ops this replaces (concatenate logits, sample, split, expand groups, condition, build
the row scale, scale weight and bias; their backward), a layer's gating costs one launch forward and one (qkv) or two
(fc2) backward: a training step of DeiT-S launches about 500 fewer kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hiap_kernels.common import runtime
from hiap_kernels.common.runtime import check_tensor
from hiap_kernels.gates.kernel import gate_value_and_slope
from hiap_kernels.gates.reference import check_gate_arguments

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tiles() -> tuple[int, int]:
    """(rows, columns) of a tile. On a GPU 32 x 64 elements per program (the passes are memory-bound and a weight has
    ~10^5-10^6 elements); the interpreter pays per program, not per element, so it takes far larger tiles."""
    return (256, 256) if runtime.interpreter_active() else (32, 64)


@triton.jit
def _gate(logits_ptr, index, mask, seed, counter, tau, HARD: tl.constexpr, SAMPLE: tl.constexpr):
    """Value and straight-through slope of the gates at ``index`` of one logit tensor (fp32; 0 where masked off)."""
    logit = tl.load(logits_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return gate_value_and_slope(logit, seed, counter, tau, HARD, SAMPLE)


# The gate arguments every custom op of the family takes, in its schema.
_GATE_SCHEMA = "Tensor tau, Tensor seed, SymInt offset, bool hard, bool sample"


def _empty_like_rows(tensor: torch.Tensor) -> torch.Tensor:
    return runtime.empty(tuple(tensor.shape), tensor.dtype, tensor.device)


def _check_common(op: str, weight: torch.Tensor, logits: dict, tau, seed, offset: int, num_gates: int) -> None:
    check_tensor("weight", weight, ndim=2)
    runtime.require_triton_device(op, weight, f"hiap_kernels.gated_weight.{op}_reference")
    for name, logit in logits.items():
        check_tensor(name, logit, dtypes=LOGIT_DTYPES, device=weight.device)
    check_gate_arguments(tau, seed, offset, num_gates)
