"""``gated_fc1`` (Triton) against ``gated_fc1_reference``, forward and every gradient, on the same gates.

The reference runs in fp64 on the same gates (they are decided in fp32 from the logits alone, so the fp64 reference
samples exactly the same ones). Bounds: ``TOLERANCES["gated_linear"]``, or twice the error of the PyTorch reference
run in the same dtype when that is larger. Every buffer the op allocates is poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import gated_fc1, gated_fc1_reference
from tests.kernel_checks import (
    DEVICE,
    TOLERANCES,
    as_fp64,
    needs_triton,
    run_with_grads,
)
from tests.kernel_checks import assert_close_rel as _assert_close_rel

pytestmark = [needs_triton, pytest.mark.usefixtures("poisoned")]


def assert_close_rel(name, actual, expected, dtype, same_dtype_reference=None):
    _assert_close_rel(name, actual, expected, TOLERANCES["gated_linear"][dtype], same_dtype_reference)


def make_fc1_inputs(leading, dim, hidden, group, bias, dtype, closed, block_open=True):
    inputs = {
        "x": torch.randn(*leading, dim),
        "weight": torch.randn(hidden, dim) / dim**0.5,
        "bias": torch.randn(hidden) if bias else None,
        "block_logit": torch.tensor([3.0 if block_open else -20.0]),
        "neuron_logits": torch.randn(hidden // group) * 2 + 1,
    }
    if closed:
        inputs["neuron_logits"][::3] = -20.0
    for name in ("x", "weight", "bias"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].to(dtype)
    return {n: None if t is None else t.to(DEVICE) for n, t in inputs.items()}


def check_fc1(inputs, dtype, *, hard=True, sample=True, approximate="none", tau=0.7, seed=4321, offset=5):
    hidden = inputs["weight"].shape[0]
    grad_outputs = [torch.randn(*inputs["x"].shape[:-1], hidden, device=DEVICE)]
    kwargs = dict(tau=tau, seed=seed, offset=offset, hard=hard, sample=sample, approximate=approximate)
    (out,), grads = run_with_grads(gated_fc1, inputs, grad_outputs, **kwargs)
    (ref,), ref_grads = run_with_grads(gated_fc1_reference, as_fp64(inputs), grad_outputs, **kwargs)
    (base,), base_grads = run_with_grads(gated_fc1_reference, inputs, grad_outputs, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_rel("hidden", out, ref, dtype, base)
    for name in inputs:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], dtype, base_grads[name])


FC1_CASES = [
    # leading shape, D, F, group, bias, dtype, closed, approximate
    pytest.param((2, 17), 48, 192, 1, True, torch.float32, False, "none", id="B2N17-D48-F192-g1-bias-fp32"),
    pytest.param((1, 65), 48, 120, 8, False, torch.float32, True, "none", id="B1N65-D48-F120-g8-nobias-fp32-closed"),
    pytest.param((17,), 96, 136, 8, True, torch.float32, True, "tanh", id="N17-D96-F136-g8-bias-fp32-tanh"),
    pytest.param((2, 17), 48, 192, 8, True, torch.float16, True, "none", id="B2N17-D48-F192-g8-bias-fp16-closed"),
    pytest.param((1, 2, 9), 96, 96, 1, False, torch.float16, False, "tanh", id="3lead-D96-F96-g1-nobias-fp16-tanh"),
]


@pytest.mark.parametrize("leading, dim, hidden, group, bias, dtype, closed, approximate", FC1_CASES)
@pytest.mark.parametrize("mode", ["hard", "soft", "eval"])
def test_fc1_matches_reference(leading, dim, hidden, group, bias, dtype, closed, approximate, mode):
    inputs = make_fc1_inputs(leading, dim, hidden, group, bias, dtype, closed)
    check_fc1(inputs, dtype, hard=mode != "soft", sample=mode != "eval", approximate=approximate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fc1_closed_block_gives_zeros_and_still_trains_the_block_logit(dtype):
    inputs = make_fc1_inputs((1, 17), 48, 64, 8, True, dtype, False, block_open=False)
    check_fc1(inputs, dtype)
    out = gated_fc1(*inputs.values(), tau=0.7, seed=1, offset=0)
    assert torch.count_nonzero(out) == 0


def test_fc1_non_contiguous_x():
    inputs = make_fc1_inputs((2, 17), 48, 64, 8, True, torch.float32, True)
    inputs["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not inputs["x"].is_contiguous()
    check_fc1(inputs, torch.float32)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast path")
def test_fc1_under_cpu_autocast_runs_in_autocast_dtype():
    inputs = make_fc1_inputs((1, 17), 48, 64, 8, True, torch.float32, True)
    grad_outputs = [torch.randn(1, 17, 64)]
    kwargs = dict(tau=0.7, seed=2, offset=0)
    with torch.autocast("cpu", dtype=torch.float16):
        (out,), grads = run_with_grads(gated_fc1, inputs, grad_outputs, **kwargs)
        (base,), base_grads = run_with_grads(gated_fc1_reference, inputs, grad_outputs, **kwargs)
    (ref,), ref_grads = run_with_grads(gated_fc1_reference, as_fp64(inputs), grad_outputs, **kwargs)
    assert out.dtype == torch.float16 and grads["weight"].dtype == torch.float32
    assert_close_rel("hidden", out, ref, torch.float16, base)
    for name in inputs:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], torch.float16, base_grads[name])


def test_fc1_without_grad_matches_reference():
    inputs = make_fc1_inputs((2, 5), 48, 64, 1, True, torch.float32, True)
    with torch.no_grad():
        out = gated_fc1(*inputs.values(), tau=0.7, seed=8, offset=3)
        ref = gated_fc1_reference(*as_fp64(inputs).values(), tau=0.7, seed=8, offset=3)
    assert_close_rel("hidden", out, ref, torch.float32)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda d: d.update(x=d["x"].int()), TypeError),
        (lambda d: d.update(weight=d["weight"].half()), TypeError),
        (lambda d: d.update(weight=d["weight"][:, :-1]), ValueError),
        (lambda d: d.update(neuron_logits=torch.zeros(5, device=DEVICE)), ValueError),  # 64 % 5
        (lambda d: d.update(block_logit=torch.zeros(2, device=DEVICE)), ValueError),
        (lambda d: d.update(bias=d["bias"][:3]), ValueError),
    ],
)
def test_fc1_bad_inputs_raise(change, error):
    inputs = make_fc1_inputs((1, 5), 48, 64, 8, True, torch.float32, False)
    change(inputs)
    with pytest.raises(error):
        gated_fc1(*inputs.values(), tau=1.0, seed=0, offset=0)


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(seed=2**31), dict(approximate="sigmoid")])
def test_fc1_bad_arguments_raise(kwargs):
    inputs = make_fc1_inputs((1, 5), 48, 64, 8, True, torch.float32, False)
    with pytest.raises(ValueError):
        gated_fc1(*inputs.values(), **{**dict(tau=1.0, seed=0, offset=0), **kwargs})




def test_nothing_mask_shaped_is_saved_for_backward():
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    fc1 = make_fc1_inputs((1, 17), 48, 64, 8, True, torch.float32, False)
    leaves = [t.detach().clone().requires_grad_() for t in fc1.values()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_fc1(*leaves, tau=0.7, seed=1, offset=0)
    # x, weight, bias, logits, the pre-activation [M, F], and tau and the seed as 0-dim tensors
    assert sorted(saved) == sorted([(17, 48), (64, 48), (64,), (1,), (8,), (17, 64), (), ()])


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter fallback; bf16 runs natively on a GPU")
def test_bf16_under_the_interpreter_runs_through_fp32():
    check_fc1(make_fc1_inputs((17,), 48, 64, 8, True, torch.bfloat16, True), torch.bfloat16)

def _compiled_matches_eager_in_one_graph(fn, params, seeds=(5, 6, 7)):
    """fullgraph compile (aot_eager): same loss and gradients as eager, and a new seed does not recompile each time."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def loss_and_grads(step, seed):
        for p in params:
            p.grad = None
        loss = step(seed)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in params]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for seed in seeds:
        for got, want in zip(loss_and_grads(compiled, seed), loss_and_grads(fn, seed)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The first seed is specialised, the second makes it symbolic, later seeds reuse that graph.
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


def test_compiled_fc1_matches_eager_without_graph_breaks():
    inputs = make_fc1_inputs((1, 17), 32, 64, 8, True, torch.float32, False)
    params = [t.requires_grad_() for t in inputs.values()]

    def step(seed):
        return gated_fc1(*params, tau=0.7, seed=seed, offset=100).square().sum()

    _compiled_matches_eager_in_one_graph(step, params)


# --------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (tl.dot on bf16 is broken in the interpreter) and DeiT-S shapes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 16])
@pytest.mark.parametrize("mode", ["hard", "soft", "eval"])
def test_fc1_deit_small_gpu(dtype, group, mode):
    inputs = make_fc1_inputs((2, 197), 384, 1536, group, True, dtype, True)
    check_fc1(inputs, dtype, hard=mode != "soft", sample=mode != "eval")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_odd_shapes_gpu(dtype):
    check_fc1(make_fc1_inputs((65,), 48, 120, 8, True, dtype, True), dtype, approximate="tanh")


@pytest.mark.parametrize("sample", [True, False], ids=["train", "eval"])
def test_custom_ops_pass_opcheck(sample):
    """Fake and real outputs agree in shape, strides and storage offset; the autograd registration is sound."""
    from hiap_kernels.gated_linear.fc1 import _fc1_backward_op, _fc1_forward_op

    inputs = make_fc1_inputs((5,), 48, 64, 8, True, torch.float32, True)
    tensors = [t.detach().clone().requires_grad_() for t in inputs.values()]
    from hiap_kernels.gated_linear.interface import gate_tensors

    gate_args = (*gate_tensors(0.7, 3, tensors[0].device), 0, True, sample)
    torch.library.opcheck(_fc1_forward_op, (*tensors, *gate_args, "tanh", True))
    plain = [t.detach() for t in tensors]
    _, pre = _fc1_forward_op(*plain, *gate_args, "tanh", True)
    grad = torch.randn(5, 64)
    torch.library.opcheck(_fc1_backward_op, (grad, *plain, pre, *gate_args, "tanh", [True, True, True, sample]))
