"""LayerNorm folded into the prologue of the GEMM that reads it: ``act(LN(x) @ W^T + b)``.

    reference.py   layernorm_linear_reference (F.layer_norm, F.linear, optional GELU)
    kernel.py      the Triton GEMM that normalises its x tiles in registers, and fused_layernorm_linear (a custom op
                   under torch.compile)

A transformer block opens each half with LayerNorm and a GEMM (norm1 -> qkv, norm2 -> fc1): fused, the normalised
activations never go to memory. The Triton op is importable as ``hiap_kernels.fused_layernorm_linear``.
"""
