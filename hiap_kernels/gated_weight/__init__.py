"""Gated weights for training: a layer's gates sampled and its masks applied to the weights the library GEMMs read.

    reference.py   ``gated_qkv_weight_reference`` / ``gated_fc2_weight_reference``: the chain of torch ops (gate
                   values, group expansion, conditioning, scaling); the reference path of ``hiap``'s gated modules
    qkv_weight.py  ``gated_qkv_weight`` / ``gated_fc2_weight``: the same in one Triton launch forward and one
    fc2_weight.py  backward each (weight gradient, gate-gradient reductions and straight-through slopes together)
    kernel.py      what they share: the tile policy, the in-kernel gate, the op schema and the argument checks
    gather.py      ``gather_weight``: once the structure is fixed, the kept rows / columns scaled by the decision,
                   and backward the gradient scattered into the whole weight, one launch each way

The GEMMs stay cuBLAS's (forward and both backward GEMMs); what a library cannot do, sampling, masking and reducing a
weight gradient to its gates, is fused here.
"""

from hiap_kernels.gated_weight.reference import (
    gated_fc2_weight_reference,
    gated_qkv_weight_reference,
    gather_weight_reference,
    inverse_index,
    qkv_row_scale,
)

__all__ = ["gated_fc2_weight_reference", "gated_qkv_weight_reference", "gather_weight_reference", "inverse_index",
           "qkv_row_scale"]
