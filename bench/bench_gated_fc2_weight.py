"""The gated fc2 weight of one DeiT-S layer, forward + backward: sampling, the neuron mask and the gates' gradients.

    gated_fc2_weight   fc2 weight [384, 1536], one block gate and 12 neuron gates (groups of 128, the default
                       alignment), hard samples with the straight-through estimator

Providers as in ``bench_gated_qkv_weight``: ``reference`` (``gated_fc2_weight_reference`` eager), ``compiled`` and
``triton`` (``hiap_kernels.gated_fc2_weight``: one launch forward, one launch and one sum backward). The record's
shapes carry ``ops_per_call``. The batch column is 1.
"""

from __future__ import annotations

import pytest
from _gated_weight_case import measure_gated_weight
from _harness import CaseRun
from _providers import PROVIDERS
from _workloads import EMBED_DIM, FFN_DIM, activations, gated_weight_training_work

from hiap_kernels import gated_fc2_weight_reference

GROUP = 128


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_fc2_weight(benchmark, recorder, provider):
    run = CaseRun(benchmark, recorder, "gated_fc2_weight", provider, 1)
    inputs = {
        "weight": activations((EMBED_DIM, FFN_DIM), seed=1).float(),
        "block": 1.0 + activations((1,), seed=2).float(),
        "neuron": 2 * activations((FFN_DIM // GROUP,), seed=3).float(),
    }
    gate = {"tau": 1.0, "seed": 2603, "offset": 2**20}
    shapes = {"weight": [EMBED_DIM, FFN_DIM], "group": GROUP}
    measure_gated_weight(run, provider, gated_fc2_weight_reference, "gated_fc2_weight", inputs, gate, shapes,
                         gated_weight_training_work(EMBED_DIM, FFN_DIM, bias=False), triton_module="fc2_weight")
