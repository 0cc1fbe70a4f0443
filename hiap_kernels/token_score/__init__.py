"""The scoring step of RAPID's token pruning: each patch token's redundancy minus its importance, in one launch.

    reference.py   token_redundancy_reference: inverse key norms, the sum of unit keys and each key against it, the
                   class token's attention share, in PyTorch (the contract)
    kernel.py      the Triton kernel and token_redundancy (a custom op under torch.compile): one program per image,
                   two passes over its keys, only the scores reach memory

The Triton op is importable as ``hiap_kernels.token_redundancy``; this package's own import pulls in only the
reference.
"""
