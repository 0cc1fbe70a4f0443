"""Fewer tokens: DeiT-S with RAPID-style token reduction and with ToMe, alone and on top of the extracted model.

Both schedules remove about 40 % of the token-layer work (``keep=0.6``: the mean over blocks of the tokens attention
and FFN see is 60 % of 197). GPU: throughput at batch 256, bf16. CPU: latency at batch 16, fp32. Variants:

    dense/reference, dense/compiled     timm's DeiT-S: the baseline of every ratio here
    rapid/reference, rapid/compiled     the same model patched with ``rapid:keep=0.6`` (prune shallow, merge deep)
    tome/reference, tome/compiled       patched with ``tome:keep=0.6`` (bipartite soft matching, equal tokens removed)
    pruned+rapid/optimized, /compiled   the extracted default-config DeiT-S (~2/3 of the MACs, ``_workloads``) through
                                        ``hiap.optimize``, patched with the same RAPID schedule: both effects at once

Accuracy at equal token counts is a separate matter (``hiap compare``); this file measures speed.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from _harness import CaseRun
from _settings import DEVICE, ON_GPU
from _workloads import DEIT_S_SHAPES, dense_deit_s, extracted_deit_s, images, inference_work, lazy_inference_call

import hiap
from hiap.tokens import reduce_tokens

BATCH = 256 if ON_GPU else 16
SCHEDULES = {"rapid": "rapid:keep=0.6", "tome": "tome:keep=0.6"}
VARIANTS = ("dense/reference", "dense/compiled", "rapid/reference", "rapid/compiled", "tome/reference",
            "tome/compiled", "pruned+rapid/optimized", "pruned+rapid/compiled")


@lru_cache(maxsize=None)
def _model_on_cpu(name: str) -> torch.nn.Module:
    if name == "dense":
        return dense_deit_s()
    if name == "pruned":
        return extracted_deit_s().cpu()
    base, _, method = name.partition("+")
    if not method:
        base, method = "dense", name
    return reduce_tokens(copy.deepcopy(_model_on_cpu(base)), SCHEDULES[method])


def _prepared(model_name: str, provider: str, dtype: torch.dtype):
    model = copy.deepcopy(_model_on_cpu(model_name)).to(DEVICE, dtype).eval().requires_grad_(False)
    if model_name.startswith("pruned"):
        return hiap.optimize(model, batch_size=BATCH, compile=provider == "compiled"), model
    if provider == "compiled":
        return torch.compile(model), model
    return model, model


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.replace("/", "-") for v in VARIANTS])
def test_deit_s_token_reduction(benchmark, recorder, variant):
    weight_dtype = torch.bfloat16 if ON_GPU else torch.float32
    run = CaseRun(benchmark, recorder, "token_reduction", variant, BATCH, baseline="dense/reference",
                  precision="bf16 weights" if ON_GPU else "fp32")
    model_name, provider = variant.split("/")
    compiled = provider == "compiled"
    run.require_provider(triton_modules=(), compile_cost="model", cpu_ok=False,
                         cpu_why_not="compiling a whole DeiT-S with inductor takes minutes on two cores")
    run.require_time(60 if compiled else 25)
    run.note_cpu_reduction("batch 16 instead of 256, fp32 weights")

    forward, model = _prepared(model_name, provider, weight_dtype)
    inputs = images(BATCH, weight_dtype)

    def call() -> None:
        with torch.no_grad():
            forward(inputs)

    schedule = hiap.tokens.token_schedule(model)
    dense = _model_on_cpu("dense")
    shapes = {**DEIT_S_SHAPES, "images": [BATCH, 3, 224, 224],
              "gmacs_per_image": round(hiap.count_macs(model) / 1e9, 3),
              "mac_ratio_vs_dense": round(hiap.count_macs(dense) / hiap.count_macs(model), 4),
              "schedule": None if schedule is None else schedule.describe(),
              "token_counts": hiap.tokens.token_counts(model)}
    weight_bytes = torch.finfo(weight_dtype).bits // 8
    run.measure(call, shapes=shapes, work=inference_work(model, BATCH, weight_bytes), heavy=True,
                compile_cost="model" if compiled else None, 
                paired_baseline=lazy_inference_call(lambda: _prepared("dense", "reference", weight_dtype)[0], inputs))
