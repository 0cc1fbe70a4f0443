"""Size-weighted token merging, the data movement of ToMe / RAPID token reduction, in one launch.

    reference.py   merge_tokens_reference: gathers, scatter_add and a division in PyTorch (the contract)
    kernel.py      the Triton kernel and merge_tokens (a custom op under torch.compile)

The Triton op is importable as ``hiap_kernels.merge_tokens``; this package's own import pulls in only the reference.
"""
