"""The gate distribution: Gumbel-Sigmoid sampling in a kernel and its bit-exact Philox twin in plain PyTorch, the keep
probability P(open) = sigmoid(logit), the gate values and straight-through slopes, the gate layout of a layer.

    reference.py   ``philox_uniform`` (Triton's ``tl.rand`` reproduced with int64 tensor ops), ``logistic_noise``,
                   ``gumbel_sigmoid`` (the straight-through sample), ``keep_probability``, ``gate_values`` (sampled
                   or decided) and a layer's gates and masks (``attention_gate_values``, ``attention_column_masks``,
                   ``ffn_gate_values``, ``ffn_neuron_mask``), ``check_gate_arguments``; no Triton import
    kernel.py      the same distribution as @triton.jit helpers the fused kernels call: ``gate_value_and_slope`` (in
                   the gated kernels' epilogues), ``keep_probability`` (in the objective kernel); and
                   ``sample_gates``, the sampler over a flat logit vector

Gate ``i`` of a layer draws its uniform from Philox counter ``offset + i`` of stream ``seed`` on both sides.
"""

from hiap_kernels.gates.reference import (
    MAX_COUNTER,
    MAX_SEED,
    UNIFORM_EPS,
    attention_column_masks,
    attention_gate_values,
    check_gate_arguments,
    ffn_gate_values,
    ffn_neuron_mask,
    gate_values,
    gumbel_sigmoid,
    keep_probability,
    logistic_noise,
    philox_uniform,
)

__all__ = [
    "MAX_COUNTER",
    "MAX_SEED",
    "UNIFORM_EPS",
    "attention_column_masks",
    "attention_gate_values",
    "check_gate_arguments",
    "ffn_gate_values",
    "ffn_neuron_mask",
    "gate_values",
    "gumbel_sigmoid",
    "keep_probability",
    "logistic_noise",
    "philox_uniform",
]
