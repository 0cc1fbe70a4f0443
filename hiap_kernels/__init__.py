"""Triton kernels for HiAP: fused gate sampling + gated matmuls for training, ragged attention for inference.

One public function per op; each has a plain-PyTorch twin in a ``*_reference`` module beside it (no Triton import),
which the tests compare against and ``hiap`` uses as its reference path. This package never imports ``hiap``.

    gated_qkv          fused qkv GEMM + in-kernel gate sampling + q/v masks, writes [3, B, H, N, Dh]   (training)
    gated_fc1          fused fc1 GEMM + bias + GELU + neuron mask                                    (training)
    ragged_attention   attention over per-head q/k and v widths, straight from the packed qkv         (inference)
    fused_linear_gelu  fc1 GEMM with bias + GELU in the epilogue                                      (inference)

The Triton ops are imported on first use, so ``import hiap_kernels`` works where Triton does not.
"""

from hiap_kernels._runtime import can_run_triton, interpreter_active, triton_available
from hiap_kernels.sampling import gumbel_sigmoid, logistic_noise, philox_uniform

_TRITON_OPS = {
    "gated_qkv": "hiap_kernels.gated_linear",
    "gated_fc1": "hiap_kernels.gated_linear",
    "ragged_attention": "hiap_kernels.ragged_attention",
    "fused_linear_gelu": "hiap_kernels.inference_ffn",
}

__all__ = [
    "can_run_triton",
    "fused_linear_gelu",
    "gated_fc1",
    "gated_qkv",
    "gumbel_sigmoid",
    "interpreter_active",
    "logistic_noise",
    "philox_uniform",
    "ragged_attention",
    "triton_available",
]


def __getattr__(name: str):
    if name in _TRITON_OPS:
        import importlib

        return getattr(importlib.import_module(_TRITON_OPS[name]), name)
    raise AttributeError(f"module 'hiap_kernels' has no attribute {name!r}")
