"""Triton kernels for HiAP: fused gate sampling + gated matmuls for training, ragged attention for inference.

This package never imports ``hiap``. The plain-PyTorch twins of the kernels (used as references by the tests and as
the reference path of ``hiap``) need no Triton and live beside them.
"""

from hiap_kernels._runtime import can_run_triton, interpreter_active, triton_available
from hiap_kernels.sampling import gumbel_sigmoid, logistic_noise, philox_uniform

__all__ = [
    "can_run_triton",
    "gumbel_sigmoid",
    "interpreter_active",
    "logistic_noise",
    "philox_uniform",
    "triton_available",
]
