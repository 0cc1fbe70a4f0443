"""Fused training kernels for gated projections: ``gated_qkv`` and ``gated_fc1``, forward and backward.

Both ops compute ``y = x @ W^T + b`` tile by tile and, in the GEMM epilogue, sample the layer's gates with ``tl.rand``
(see ``gates.py``), form the conditioned column mask and multiply it in. The backward passes regenerate the masks from
``(seed, offset)``; nothing mask-shaped is stored between forward and backward.

    gated_qkv   timm's fused qkv projection; writes q, k, v straight into the [3, B, H, N, Dh] layout that
                ``F.scaled_dot_product_attention`` reads. Masks: m_q = dqk (q/k-dim gates), k unmasked,
                m_v = g * dv (head gate times v-dim gates).
    gated_fc1   the FFN hidden layer ``GELU(x @ W^T + b) * (z_block * z_neuron)``; keeps the pre-activation for
                the backward, whose two weight-side GEMMs run on the vendor GEMM.

Contract: :func:`hiap_kernels.gated_linear_reference.gated_qkv_reference` and ``gated_fc1_reference`` (same arguments,
same gates for the same seed, same values and gradients up to float rounding).

Gate gradients without the pre-mask output. For a masked column ``y[:, n] = m[n] * (x @ W[n] + b[n])``::

    G = dY^T @ x                       (the unmasked weight gradient)
    dW[n] = m[n] * G[n]                db[n] = m[n] * colsum(dY)[n]
    dL/dm[n] = <W[n], G[n]> + b[n] * colsum(dY)[n]

so the dW kernel of qkv emits ``dL/dm`` from its epilogue; the chain rule from ``dL/dm`` through the conditioning
products and group sums to the logits is a handful of tiny torch ops on per-gate vectors.

Eager calls go through ``torch.autograd.Function`` subclasses; under ``torch.compile`` the same launchers run as
custom ops (``hiap_kernels::gated_qkv_forward`` ...) with fake shapes and a registered autograd formula.

This module is the public entry point; the code lives in:

    _gemm.py                  shared: forward autotune configs, swizzled tile order, the ``x @ W^T`` tile loop,
                              tl.dot precision, the ``_empty`` allocation helper (tests poison it with NaN),
                              argument checks, dtype unification, custom-op / autograd plumbing
    _gated_qkv_kernels.py     qkv Triton kernels (forward, column mask, backward dx and dW) and backward configs
    _gated_qkv.py             qkv launchers, GatedQKVFunction, custom ops, ``gated_qkv``
    _gated_fc1_kernels.py     fc1 Triton kernels (forward with GELU epilogue, backward pointwise) and block sizes
    _gated_fc1.py             fc1 launchers, GatedFC1Function, custom ops, ``gated_fc1``

(The implementation modules are not named ``gated_qkv.py`` / ``gated_fc1.py``: importing such a submodule would set
the package attribute ``hiap_kernels.gated_qkv`` to the module and shadow the function that ``hiap_kernels`` exports
lazily under that name.)
"""

from __future__ import annotations

from hiap_kernels._gated_fc1 import GatedFC1Function, gated_fc1
from hiap_kernels._gated_qkv import GatedQKVFunction, gated_qkv

__all__ = ["GatedFC1Function", "GatedQKVFunction", "gated_fc1", "gated_qkv"]
