"""fc1 + bias + GELU in one GEMM for the FFN blocks of extracted (pruned) models.

    reference.py   ``linear_gelu_reference``: ``F.gelu(F.linear(x, W, b))``, NaN where the pre-activation is not
                   finite (``gelu_reference``, the kernels' policy); no Triton import
    kernel.py      ``fused_linear_gelu``: the GEMM with bias and GELU in its epilogue (importable as
                   ``hiap_kernels.fused_linear_gelu``)
"""

from hiap_kernels.linear_gelu.reference import GELU_APPROXIMATIONS, linear_gelu_reference

__all__ = ["GELU_APPROXIMATIONS", "linear_gelu_reference"]
