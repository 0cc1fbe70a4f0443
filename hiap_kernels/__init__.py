"""Triton kernels for HiAP: fused gate sampling + gated matmuls for training, ragged attention for inference.

One package per op family, each with its plain-PyTorch reference beside the kernels (``reference.py``, no Triton
import), which the tests compare against and ``hiap`` uses as its reference path:

    gates/          sample_gates       the in-kernel Gumbel-Sigmoid sampler; reference: gumbel_sigmoid on a
                                       bit-exact Philox twin (philox_uniform)
    gated_linear/   gated_qkv          fused qkv GEMM + gate sampling + q/v masks -> [3, B, H, N, Dh]   (training)
                    gated_fc1          fused fc1 GEMM + bias + GELU + neuron mask                         (training)
    gated_weight/   gated_qkv_weight   gate sampling + the row masks of qkv's weight, one launch each way (training)
                    gated_fc2_weight   the same for the neuron columns of fc2's weight                  (training)
                    gather_weight      a fixed structure's kept rows / columns, scaled; backward in one (training)
    objective/      gate_objective     budget + feasibility of every layer's gates and their gradient, one launch
                                       (training)
    ragged_attn/    ragged_attention   attention over per-head q/k and v widths, packed in and out     (inference);
                                       its PyTorch path ragged_attention_sdpa: one SDPA call per run of equal heads
    linear_gelu/    fused_linear_gelu  fc1 GEMM with bias + GELU in the epilogue                       (inference)
    layernorm_linear/ fused_layernorm_linear  LayerNorm in the prologue of the GEMM that reads it    (inference)
    linear_residual/ fused_linear_residual  proj / fc2 GEMM with bias, LayerScale and residual add  (inference)
    token_merge/    merge_tokens       size-weighted gather + fold + divide of token reduction          (inference)
    token_similarity/ nearest_tokens   each token's most cosine-similar candidate, no similarity matrix (inference)
    token_score/    token_redundancy   RAPID's prune score: redundancy minus attention share, per image   (inference)
    common/         what every kernel shares: tile order, k-loop, GELU, precision policy, allocation

This package never imports ``hiap``. Every op is a plain import from the module that defines it; where Triton is
missing, ``import hiap_kernels`` still gives the references and layout helpers, and naming an op says it needs
Triton.
"""

from hiap_kernels.common.runtime import can_run_triton, interpreter_active, kernel_cache_dir, triton_available
from hiap_kernels.gated_linear.reference import gated_fc1_reference, gated_qkv_reference
from hiap_kernels.gated_weight.reference import (
    gated_fc2_weight_reference,
    gated_qkv_weight_reference,
    gather_weight_reference,
)
from hiap_kernels.gates.reference import gumbel_sigmoid, logistic_noise, philox_uniform
from hiap_kernels.layernorm_linear.reference import layernorm_linear_reference
from hiap_kernels.linear_gelu.reference import linear_gelu_reference
from hiap_kernels.linear_residual.reference import linear_residual_reference
from hiap_kernels.objective.reference import GateLayout, ObjectiveConstants, gate_objective_reference
from hiap_kernels.ragged_attn.reference import build_head_table, ragged_attention_padded
from hiap_kernels.ragged_attn.sdpa import head_runs, ragged_attention_sdpa
from hiap_kernels.token_merge.reference import merge_tokens_reference
from hiap_kernels.token_score.reference import token_redundancy_reference
from hiap_kernels.token_similarity.reference import nearest_tokens_reference

if triton_available():
    # Each op from the module that defines it, as a reader follows it.
    from hiap_kernels.gated_linear.fc1 import gated_fc1
    from hiap_kernels.gated_linear.qkv import gated_qkv
    from hiap_kernels.gated_weight.fc2_weight import gated_fc2_weight
    from hiap_kernels.gated_weight.gather import gather_weight
    from hiap_kernels.gated_weight.qkv_weight import gated_qkv_weight
    from hiap_kernels.gates.kernel import sample_gates
    from hiap_kernels.layernorm_linear.kernel import fused_layernorm_linear
    from hiap_kernels.linear_gelu.kernel import fused_linear_gelu
    from hiap_kernels.linear_residual.kernel import fused_linear_residual
    from hiap_kernels.objective.kernel import gate_objective
    from hiap_kernels.ragged_attn.kernel import ragged_attention
    from hiap_kernels.token_merge.kernel import merge_tokens
    from hiap_kernels.token_score.kernel import token_redundancy
    from hiap_kernels.token_similarity.kernel import nearest_tokens

# The Triton ops, which need Triton: where it is missing, naming one says so (the references work everywhere).
TRITON_OPS = ("gated_fc1", "gated_qkv", "gated_fc2_weight", "gather_weight", "gated_qkv_weight", "sample_gates",
              "fused_layernorm_linear", "fused_linear_gelu", "fused_linear_residual", "gate_objective",
              "ragged_attention", "merge_tokens", "token_redundancy", "nearest_tokens")

__all__ = [
    "GateLayout",
    "ObjectiveConstants",
    "build_head_table",
    "can_run_triton",
    "fused_layernorm_linear",
    "fused_linear_gelu",
    "fused_linear_residual",
    "gated_fc1",
    "gated_fc1_reference",
    "gated_fc2_weight",
    "gated_fc2_weight_reference",
    "gated_qkv",
    "gated_qkv_reference",
    "gated_qkv_weight",
    "gated_qkv_weight_reference",
    "gather_weight",
    "gather_weight_reference",
    "gate_objective",
    "gate_objective_reference",
    "gumbel_sigmoid",
    "head_runs",
    "interpreter_active",
    "kernel_cache_dir",
    "layernorm_linear_reference",
    "linear_gelu_reference",
    "linear_residual_reference",
    "logistic_noise",
    "merge_tokens",
    "merge_tokens_reference",
    "nearest_tokens",
    "nearest_tokens_reference",
    "philox_uniform",
    "ragged_attention",
    "ragged_attention_padded",
    "ragged_attention_sdpa",
    "sample_gates",
    "token_redundancy",
    "token_redundancy_reference",
    "triton_available",
]


def __getattr__(name: str):
    if name in TRITON_OPS:
        raise ImportError(f"hiap_kernels.{name} needs Triton, which is not installed here (pip install triton on "
                          "Linux); the PyTorch references (hiap_kernels.*_reference) work without it")
    raise AttributeError(f"module 'hiap_kernels' has no attribute {name!r}")
