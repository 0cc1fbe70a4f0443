"""The output projections of a transformer block with their residual add fused: ``residual + gamma * (x W^T + b)``.

    reference.py   linear_residual_reference (F.linear, LayerScale, add)
    kernel.py      the Triton GEMM with bias, LayerScale and the residual add in its epilogue, and
                   fused_linear_residual (a custom op under torch.compile)

The Triton op is importable as ``hiap_kernels.fused_linear_residual``; this package's import pulls in only the
reference.
"""
