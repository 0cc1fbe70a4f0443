"""The gated qkv weight of one DeiT-S layer, forward + backward: sampling, the row masks and the gates' gradients.

    gated_qkv_weight   qkv weight [1152, 384] and bias, 6 head gates and 2 x 6 x 4 dim gates (groups of 16), hard
                       samples with the straight-through estimator

Providers (the GEMMs that read the masked weight are cuBLAS's on every path, so they are not part of the case):

    reference   ``gated_qkv_weight_reference`` eager: gate sampling, group expansion, conditioning, the row scale,
                the scaled weight and bias, and autograd's backward of that chain
    compiled    torch.compile of the same
    triton      ``hiap_kernels.gated_qkv_weight``: one launch forward, one backward

The record's shapes carry ``ops_per_call``, the kernel-launching ops one forward + backward dispatches: in a
launch-bound training step that count, not the microseconds here, is what the op saves. The batch column is 1.
"""

from __future__ import annotations

import pytest
from _gated_weight_case import measure_gated_weight
from _harness import CaseRun
from _providers import PROVIDERS
from _workloads import EMBED_DIM, HEAD_DIM, NUM_HEADS, activations, gated_weight_training_work

from hiap_kernels import gated_qkv_weight_reference

GROUP = 16
ROWS = 3 * NUM_HEADS * HEAD_DIM


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_qkv_weight(benchmark, recorder, provider):
    run = CaseRun(benchmark, recorder, "gated_qkv_weight", provider, 1)
    groups = HEAD_DIM // GROUP
    inputs = {
        "weight": activations((ROWS, EMBED_DIM), seed=1).float(),
        "bias": activations((ROWS,), seed=2).float(),
        # Spread around the decision boundary, as mid-training logits are.
        "head": 2 * activations((NUM_HEADS,), seed=3).float(),
        "qk": 2 * activations((NUM_HEADS, groups), seed=4).float(),
        "v": 2 * activations((NUM_HEADS, groups), seed=5).float(),
    }
    gate = {"tau": 1.0, "seed": 2603, "offset": 0}
    shapes = {"weight": [ROWS, EMBED_DIM], "heads": NUM_HEADS, "head_dim": HEAD_DIM, "group": GROUP}
    measure_gated_weight(run, provider, gated_qkv_weight_reference, "gated_qkv_weight", inputs, gate, shapes,
                         gated_weight_training_work(ROWS, EMBED_DIM, bias=True), triton_module="qkv_weight")
