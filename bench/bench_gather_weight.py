"""A fixed structure's gathered weights of one DeiT-S layer, forward + backward (the last quarter of a HiAP run).

    gather_weight_rows   qkv weight [1152, 384] and bias: the 4 of 6 heads kept (768 rows), scaled by the decision
    gather_weight_cols   fc2 weight [384, 1536]: 768 of its neuron columns

Providers: ``reference`` (``gather_weight_reference`` eager: index_select and the scale, autograd's backward of it:
zeros + index_add), ``compiled`` (torch.compile of the same) and ``triton`` (``hiap_kernels.gather_weight``: one launch
forward, one backward that writes the whole weight's gradient, zeros included). The record's shapes carry
``ops_per_call``. The batch column is 1.
"""

from __future__ import annotations

import pytest
import torch
from _gated_weight_case import measure_gated_weight
from _harness import CaseRun
from _providers import PROVIDERS
from _settings import DEVICE
from _workloads import EMBED_DIM, FFN_DIM, HEAD_DIM, NUM_HEADS, activations, gated_weight_training_work

from hiap_kernels import gather_weight_reference
from hiap_kernels.gated_weight import inverse_index


def _fixed(size: int, kept: torch.Tensor, scale: torch.Tensor | None, dim: int) -> dict:
    return {"index": kept, "inverse": inverse_index(kept, size), "scale": scale, "dim": dim}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["gather_weight_rows", "gather_weight_cols"])
def test_gather_weight(benchmark, recorder, case, provider):
    run = CaseRun(benchmark, recorder, case, provider, 1)
    if case == "gather_weight_rows":
        rows, cols, heads = 3 * NUM_HEADS * HEAD_DIM, EMBED_DIM, 4
        columns = torch.arange(heads * HEAD_DIM, device=DEVICE)
        kept = torch.cat([part * NUM_HEADS * HEAD_DIM + columns for part in range(3)])
        # Inside the kept heads a quarter of the q and v columns closed, as the decision leaves them.
        scale = (torch.arange(kept.numel(), device=DEVICE) % 4 != 0).float()
        inputs = {"weight": activations((rows, cols), seed=1).float(), "bias": activations((rows,), seed=2).float()}
        options = _fixed(rows, kept, scale, 0)
    else:
        rows, cols = EMBED_DIM, FFN_DIM
        kept = torch.arange(0, FFN_DIM, 2, device=DEVICE)
        inputs = {"weight": activations((rows, cols), seed=1).float(), "bias": None}
        options = _fixed(cols, kept, None, 1)
    shapes = {"weight": [rows, cols], "kept": kept.numel(), "dim": options["dim"]}
    work = gated_weight_training_work(rows, cols, bias=inputs["bias"] is not None)
    measure_gated_weight(run, provider, gather_weight_reference, "gather_weight", inputs, options, shapes, work,
                         triton_module="gather")
