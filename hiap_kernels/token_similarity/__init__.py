"""The similarity step of token reduction: every query token's most similar candidate token (cosine), in one launch.

    reference.py   nearest_tokens_reference: F.normalize, a similarity matmul, a mask and a max in PyTorch (the
                   contract)
    kernel.py      the Triton kernel and nearest_tokens (a custom op under torch.compile): normalisation, similarity
                   and the running max / argmax fused, no similarity matrix in memory

The Triton op is importable as ``hiap_kernels.nearest_tokens``; this package's own import pulls in only the reference.
"""
