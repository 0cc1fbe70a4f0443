"""Gumbel-Sigmoid gate sampling: the in-kernel sampler and its bit-exact Philox twin in plain PyTorch.

    reference.py   ``philox_uniform`` (Triton's ``tl.rand`` reproduced with int64 tensor ops), ``logistic_noise``,
                   ``gumbel_sigmoid`` (the straight-through sample), ``check_gate_arguments``; no Triton import
    kernel.py      ``gate_value_and_slope`` (@triton.jit, called in the fused kernels' epilogues) and
                   ``sample_gates``, the same helper over a flat logit vector

Gate ``i`` of a layer draws its uniform from Philox counter ``offset + i`` of stream ``seed`` on both sides.
"""

from hiap_kernels.gates.reference import (
    MAX_COUNTER,
    MAX_SEED,
    UNIFORM_EPS,
    check_gate_arguments,
    gumbel_sigmoid,
    logistic_noise,
    philox_uniform,
)

__all__ = [
    "MAX_COUNTER",
    "MAX_SEED",
    "UNIFORM_EPS",
    "check_gate_arguments",
    "gumbel_sigmoid",
    "logistic_noise",
    "philox_uniform",
]
