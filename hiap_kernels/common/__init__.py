"""What every kernel of ``hiap_kernels`` shares.

    runtime.py   host side, no Triton import: where Triton runs, autotune config choice, input checks, the tl.dot
                 precision policy and the one allocator of kernel outputs (NaN-poisoned under test)
    tiles.py     Triton side: swizzled tile order, the ``x @ W^T`` k-loop, GELU and its derivative
"""
