"""Fused training kernels for gated projections: ``gated_qkv`` and ``gated_fc1``, forward and backward.

Both ops compute ``y = x @ W^T + b`` tile by tile and, in the GEMM epilogue, sample the layer's gates with ``tl.rand``
(``hiap_kernels.gates.kernel``), form the conditioned column mask and multiply it in. The backward passes regenerate the masks from
``(seed, offset)``; nothing mask-shaped is stored between forward and backward.

    gated_qkv   timm's fused qkv projection; writes q, k, v straight into the [3, B, H, N, Dh] layout that
                ``F.scaled_dot_product_attention`` reads. Masks: m_q = dqk (q/k-dim gates), k unmasked,
                m_v = g * dv (head gate times v-dim gates).
    gated_fc1   the FFN hidden layer ``GELU(x @ W^T + b) * (z_block * z_neuron)``; keeps the pre-activation for
                the backward, whose two weight-side GEMMs run on the vendor GEMM.

Contract: :func:`hiap_kernels.gated_linear.reference.gated_qkv_reference` and ``gated_fc1_reference`` (same
arguments, same gates for the same seed, same values and gradients up to float rounding).

Gate gradients without the pre-mask output. For a masked column ``y[:, n] = m[n] * (x @ W[n] + b[n])``::

    G = dY^T @ x                       (the unmasked weight gradient)
    dW[n] = m[n] * G[n]                db[n] = m[n] * colsum(dY)[n]
    dL/dm[n] = <W[n], G[n]> + b[n] * colsum(dY)[n]

so the dW kernel of qkv emits ``dL/dm`` from its epilogue; the chain rule from ``dL/dm`` through the conditioning
products and group sums to the logits is a handful of tiny torch ops on per-gate vectors.

Files:

    reference.py      plain-PyTorch twins (``gated_qkv_reference``, ``gated_fc1_reference``)
    interface.py      host plumbing both ops share: argument checks, dtypes, custom-op / autograd glue
    qkv_kernels.py    qkv Triton kernels (forward, column mask, backward dx and dW) and the backward configs
    qkv.py            qkv launchers, ``GatedQKVFunction`` (eager), custom ops (torch.compile), ``gated_qkv``
    fc1_kernels.py    fc1 Triton kernels (forward with the GELU epilogue, backward pointwise pass)
    fc1.py            fc1 launchers, ``GatedFC1Function``, custom ops, ``gated_fc1``

The Triton ops are importable from ``hiap_kernels`` (``hiap_kernels.gated_qkv``, ``hiap_kernels.gated_fc1``); this
package's own import pulls in only the references, so it works where Triton does not.
"""

from hiap_kernels.gated_linear.reference import gated_fc1_reference, gated_qkv_reference

__all__ = ["gated_fc1_reference", "gated_qkv_reference"]
