"""Fused gated qkv / fc1 (Triton) against their plain-PyTorch references, forward and every gradient.

Errors are ||triton - reference|| / ||reference|| with the reference run in fp64 on the same gates (the gates are
decided in fp32 from the logits alone, so the fp64 reference samples exactly the same ones). The bound is the dtype's
entry in TOLERANCES, or twice the error of the PyTorch reference run in the same dtype when that is larger: a logit
gradient is a sum of products that cancel, and on tiny test shapes half precision alone can leave it a few 1e-3 off.
Every buffer the ops allocate is poisoned with NaN, so an element a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

import hiap_kernels._gated_qkv as gated_qkv_impl
import hiap_kernels._gemm as gemm
from hiap_kernels._runtime import can_run_triton
from hiap_kernels.gated_linear import gated_fc1, gated_qkv
from hiap_kernels.gated_linear_reference import (
    attention_column_masks,
    attention_gate_values,
    gated_fc1_reference,
    gated_qkv_reference,
)

# Relative L2 error against the fp64 reference, per activation dtype.
TOLERANCES = {
    torch.float32: 2e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not can_run_triton(torch.empty(0, device=DEVICE)), reason="needs CUDA or the Triton interpreter"
)


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch):
    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    # Both ops allocate through ``_gemm._empty`` (looked up on that module at call time), so this reaches them all.
    monkeypatch.setattr(gemm, "_empty", nan_filled)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm()
    if scale == 0:  # everything gated off: the kernel must give exact zeros too
        return actual.norm().item()
    return ((actual - expected).norm() / scale).item()


def assert_close_rel(name, actual, expected, dtype, same_dtype_reference=None):
    """``actual`` within TOLERANCES[dtype] of the fp64 ``expected``, or within twice the same-dtype reference's."""
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten buffer?)"
    bound = TOLERANCES[dtype]
    if same_dtype_reference is not None:
        bound = max(bound, 2 * relative_error(same_dtype_reference, expected))
    error = relative_error(actual, expected)
    assert error <= bound, f"{name}: relative error {error:.3e} > {bound:.1e}"


def run_with_grads(fn, inputs: dict, grad_outputs, **kwargs):
    """Call ``fn`` on leaf copies of ``inputs``, backprop ``grad_outputs``, return (outputs, grads by name)."""
    leaves = {name: None if t is None else t.detach().clone().requires_grad_() for name, t in inputs.items()}
    outputs = fn(*leaves.values(), **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)])
    return [o.detach() for o in outputs], {n: None if t is None else t.grad for n, t in leaves.items()}


def as_fp64(inputs: dict) -> dict:
    return {n: None if t is None else t.double() for n, t in inputs.items()}


# --------------------------------------------------------------------------------------------------------------
# qkv
# --------------------------------------------------------------------------------------------------------------


def make_qkv_inputs(batch, tokens, num_heads, head_dim, group, bias, dtype, closed):
    dim = num_heads * head_dim
    groups = head_dim // group
    inputs = {
        "x": torch.randn(batch, tokens, dim),
        "weight": torch.randn(3 * dim, dim) / dim**0.5,
        "bias": torch.randn(3 * dim) if bias else None,
        "head_logits": torch.randn(num_heads) * 2 + 1,
        "qk_logits": torch.randn(num_heads, groups) * 2 + 1,
        "v_logits": torch.randn(num_heads, groups) * 2 + 1,
    }
    if closed:
        # A closed head, a head with no q/k dims, a closed v group: all decided off at any temperature.
        inputs["head_logits"][-1] = -20.0
        inputs["qk_logits"][0] = -20.0
        inputs["v_logits"][0, -1] = -20.0
    for name in ("x", "weight", "bias"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].to(dtype)
    return {n: None if t is None else t.to(DEVICE) for n, t in inputs.items()}


def check_qkv(inputs, dtype, *, hard=True, sample=True, tau=0.7, seed=1234, offset=17):
    batch, tokens, _ = inputs["x"].shape
    num_heads = inputs["head_logits"].shape[0]
    head_dim = inputs["weight"].shape[0] // (3 * num_heads)
    grad_outputs = [torch.randn(batch, num_heads, tokens, head_dim, device=DEVICE) for _ in range(3)]
    kwargs = dict(tau=tau, seed=seed, offset=offset, hard=hard, sample=sample)

    outputs, grads = run_with_grads(gated_qkv, inputs, grad_outputs, **kwargs)
    ref_outputs, ref_grads = run_with_grads(gated_qkv_reference, as_fp64(inputs), grad_outputs, **kwargs)
    base_outputs, base_grads = run_with_grads(gated_qkv_reference, inputs, grad_outputs, **kwargs)

    for name, out, ref, base in zip("qkv", outputs, ref_outputs, base_outputs):
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close_rel(name, out, ref, dtype, base)
    for name in inputs:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], dtype, base_grads[name])
    return outputs


QKV_CASES = [
    # batch, tokens, heads, head_dim, group, bias, dtype, closed
    pytest.param(2, 17, 3, 16, 1, True, torch.float32, False, id="N17-D48-h16-g1-bias-fp32"),
    pytest.param(2, 17, 2, 24, 8, False, torch.float32, True, id="N17-D48-h24-g8-nobias-fp32-closed"),
    pytest.param(1, 65, 4, 24, 8, True, torch.float32, True, id="N65-D96-h24-g8-bias-fp32-closed"),
    pytest.param(1, 17, 6, 16, 1, False, torch.float32, True, id="N17-D96-h16-g1-nobias-fp32-closed"),
    pytest.param(2, 17, 3, 16, 8, True, torch.float16, True, id="N17-D48-h16-g8-bias-fp16-closed"),
    pytest.param(1, 65, 2, 24, 1, True, torch.float16, False, id="N65-D48-h24-g1-bias-fp16"),
    pytest.param(1, 17, 4, 24, 8, False, torch.float16, False, id="N17-D96-h24-g8-nobias-fp16"),
]


@pytest.mark.parametrize("batch, tokens, heads, head_dim, group, bias, dtype, closed", QKV_CASES)
@pytest.mark.parametrize("mode", ["hard", "soft", "eval"])
def test_qkv_matches_reference(batch, tokens, heads, head_dim, group, bias, dtype, closed, mode):
    inputs = make_qkv_inputs(batch, tokens, heads, head_dim, group, bias, dtype, closed)
    check_qkv(inputs, dtype, hard=mode != "soft", sample=mode != "eval")


def test_qkv_outputs_are_contiguous_views_of_one_packed_buffer():
    inputs = make_qkv_inputs(1, 17, 3, 16, 1, True, torch.float32, False)
    q, k, v = gated_qkv(*inputs.values(), tau=1.0, seed=0, offset=0)
    assert q.shape == k.shape == v.shape == (1, 3, 17, 16)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() - q.data_ptr() == q.numel() * q.element_size()


def test_qkv_non_contiguous_x_and_strided_grads():
    inputs = make_qkv_inputs(2, 17, 2, 24, 8, True, torch.float32, True)
    # x as a transposed view: [B, N, D] with strides of [B, D, N].
    inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["x"].is_contiguous()
    check_qkv(inputs, torch.float32)

    # Upstream gradients laid out like [B, N, H, Dh] (what a packed attention backward may hand back).
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in inputs.items()}
    outputs = gated_qkv(*leaves.values(), tau=0.7, seed=3, offset=0)
    grads = [torch.randn(2, 17, 2, 24, device=DEVICE).transpose(1, 2) for _ in range(3)]
    torch.autograd.backward(outputs, grads)
    ref_leaves = {n: None if t is None else t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref_outputs = gated_qkv_reference(*ref_leaves.values(), tau=0.7, seed=3, offset=0)
    torch.autograd.backward(ref_outputs, [g.double() for g in grads])
    for name in inputs:
        assert_close_rel(f"grad {name}", leaves[name].grad, ref_leaves[name].grad, torch.float32)


def test_qkv_grads_with_different_layouts():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, True)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    grads = [
        torch.randn(1, 2, 17, 16, device=DEVICE),
        torch.randn(1, 17, 2, 16, device=DEVICE).transpose(1, 2),
        torch.randn(1, 2, 16, 17, device=DEVICE).transpose(2, 3),
    ]
    torch.autograd.backward(gated_qkv(*leaves.values(), tau=0.7, seed=3, offset=0), grads)
    ref_outputs = gated_qkv_reference(*ref_leaves.values(), tau=0.7, seed=3, offset=0)
    torch.autograd.backward(ref_outputs, [g.double() for g in grads])
    for name in inputs:
        assert_close_rel(f"grad {name}", leaves[name].grad, ref_leaves[name].grad, torch.float32)


def test_nothing_mask_shaped_is_saved_for_backward():
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    qkv = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, False)
    fc1 = make_fc1_inputs((1, 17), 48, 64, 8, True, torch.float32, False)
    qkv_leaves = [t.detach().clone().requires_grad_() for t in qkv.values()]
    fc1_leaves = [t.detach().clone().requires_grad_() for t in fc1.values()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_qkv(*qkv_leaves, tau=0.7, seed=1, offset=0)
    assert sorted(saved) == sorted(tuple(t.shape) for t in qkv.values())
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_fc1(*fc1_leaves, tau=0.7, seed=1, offset=0)
    # x, weight, bias, logits, and the pre-activation [M, F]
    assert sorted(saved) == sorted([(17, 48), (64, 48), (64,), (1,), (8,), (17, 64)])


def test_qkv_column_mask_kernel_equals_reference_masks():
    num_heads, head_dim, group = 3, 24, 8
    inputs = make_qkv_inputs(1, 1, num_heads, head_dim, group, False, torch.float32, True)
    logits = (inputs["head_logits"], inputs["qk_logits"], inputs["v_logits"])
    for hard, sample in [(True, True), (False, True), (True, False)]:
        mask = gated_qkv_impl._qkv_column_mask_values(*logits, 3 * num_heads * head_dim, 0.9, 77, 1000, hard, sample)
        z = attention_gate_values(*logits, tau=0.9, seed=77, offset=1000, hard=hard, sample=sample)
        m_q, m_v = attention_column_masks(*(t.detach() for t in z), head_dim)
        expected = torch.cat([m_q.reshape(-1), torch.ones_like(m_q).reshape(-1), m_v.reshape(-1)])
        torch.testing.assert_close(mask, expected, rtol=0, atol=1e-6)


def test_qkv_only_some_inputs_need_grad():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, False)
    x = inputs["x"].clone().requires_grad_()
    qk_logits = inputs["qk_logits"].clone().requires_grad_()
    q, k, v = gated_qkv(
        x, inputs["weight"], inputs["bias"], inputs["head_logits"], qk_logits, inputs["v_logits"],
        tau=1.0, seed=9, offset=0,
    )  # fmt: skip
    (q.sum() + v.sum()).backward()
    assert x.grad is not None and qk_logits.grad is not None and torch.isfinite(qk_logits.grad).all()


def test_qkv_large_counter_offset():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, False)
    check_qkv(inputs, torch.float32, seed=2**31 - 1, offset=2**31 - 2**20)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast path")
def test_qkv_under_cpu_autocast_runs_in_autocast_dtype():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, True)
    grad_outputs = [torch.randn(1, 2, 17, 16) for _ in range(3)]
    kwargs = dict(tau=0.7, seed=1, offset=0)
    with torch.autocast("cpu", dtype=torch.float16):
        outputs, grads = run_with_grads(gated_qkv, inputs, grad_outputs, **kwargs)
        base_outputs, base_grads = run_with_grads(gated_qkv_reference, inputs, grad_outputs, **kwargs)
    ref_outputs, ref_grads = run_with_grads(gated_qkv_reference, as_fp64(inputs), grad_outputs, **kwargs)
    assert all(o.dtype == torch.float16 for o in outputs)
    assert grads["weight"].dtype == torch.float32 and grads["head_logits"].dtype == torch.float32
    for out, ref, base in zip(outputs, ref_outputs, base_outputs):
        assert_close_rel("out", out, ref, torch.float16, base)
    for name in inputs:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], torch.float16, base_grads[name])


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter fallback; bf16 runs natively on a GPU")
def test_bf16_under_the_interpreter_runs_through_fp32():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.bfloat16, True)
    outputs = check_qkv(inputs, torch.bfloat16)
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    check_fc1(make_fc1_inputs((17,), 48, 64, 8, True, torch.bfloat16, True), torch.bfloat16)


def _qkv_kwargs():
    return dict(tau=1.0, seed=0, offset=0)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda d: d.update(x=d["x"][0]), ValueError),  # x must be [B, N, D]
        (lambda d: d.update(x=d["x"].int()), TypeError),
        (lambda d: d.update(x=d["x"].half()), TypeError),  # dtype mismatch outside autocast
        (lambda d: d.update(weight=d["weight"][:-1]), ValueError),  # rows not 3 * H * Dh
        (lambda d: d.update(weight=d["weight"][:, :-1]), ValueError),  # D mismatch
        (lambda d: d.update(bias=d["bias"][:-1]), ValueError),
        (lambda d: d.update(v_logits=d["v_logits"][:, :1]), ValueError),
        # head dim 16 is not divisible by 3 groups
        (lambda d: d.update(qk_logits=torch.zeros(2, 3), v_logits=torch.zeros(2, 3)), ValueError),
        (lambda d: d.update(head_logits=torch.zeros(3, device=DEVICE)), ValueError),
        (lambda d: d.update(weight=d["weight"].to("meta")), ValueError),  # device mismatch
    ],
)
def test_qkv_bad_inputs_raise(change, error):
    inputs = make_qkv_inputs(1, 5, 2, 16, 8, True, torch.float32, False)
    change(inputs)
    with pytest.raises(error):
        gated_qkv(*inputs.values(), **_qkv_kwargs())


@pytest.mark.parametrize(
    "kwargs", [dict(tau=0.0), dict(tau=-0.5), dict(seed=-1), dict(seed=2**31), dict(offset=2**31 - 5)]
)
def test_qkv_bad_gate_arguments_raise(kwargs):
    inputs = make_qkv_inputs(1, 5, 2, 16, 8, True, torch.float32, False)
    with pytest.raises(ValueError):
        gated_qkv(*inputs.values(), **{**_qkv_kwargs(), **kwargs})


# --------------------------------------------------------------------------------------------------------------
# fc1
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# torch.compile: one graph (no graph break), same values and gradients as eager, a new seed does not recompile each time
# --------------------------------------------------------------------------------------------------------------


def test_compiled_block_matches_eager_without_graph_breaks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    qkv = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, False)
    fc1 = make_fc1_inputs((1, 17), 32, 64, 8, True, torch.float32, False)
    params = [t.requires_grad_() for t in (*qkv.values(), *list(fc1.values())[1:])]

    def block(x, seed):
        q, k, v = gated_qkv(x, *params[1:6], tau=0.7, seed=seed, offset=3)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        hidden = gated_fc1(attended, *params[6:], tau=0.7, seed=seed, offset=100)
        return hidden.square().sum()

    def loss_and_grads(fn, seed):
        for p in params:
            p.grad = None
        loss = fn(params[0], seed)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in params]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for seed in (5, 6, 7):
        for got, want in zip(loss_and_grads(compiled, seed), loss_and_grads(block, seed)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The first seed is specialised, the second makes it symbolic, later seeds reuse that graph.
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (tl.dot on bf16 is broken in the interpreter) and DeiT-S shapes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 16])
@pytest.mark.parametrize("mode", ["hard", "soft", "eval"])
def test_qkv_deit_small_gpu(dtype, group, mode):
    inputs = make_qkv_inputs(2, 197, 6, 64, group, True, dtype, True)
    check_qkv(inputs, dtype, hard=mode != "soft", sample=mode != "eval")


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
    check_qkv(make_qkv_inputs(2, 17, 2, 24, 8, False, dtype, True), dtype)
    check_fc1(make_fc1_inputs((65,), 48, 120, 8, True, dtype, True), dtype, approximate="tanh")


@pytest.mark.gpu
def test_cuda_autocast_bf16_gpu():
    inputs = make_qkv_inputs(2, 197, 6, 64, 8, True, torch.float32, True)
    grad_outputs = [torch.randn(2, 6, 197, 64, device=DEVICE) for _ in range(3)]
    kwargs = dict(tau=0.7, seed=1, offset=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs, grads = run_with_grads(gated_qkv, inputs, grad_outputs, **kwargs)
        base_outputs, base_grads = run_with_grads(gated_qkv_reference, inputs, grad_outputs, **kwargs)
    ref_outputs, ref_grads = run_with_grads(gated_qkv_reference, as_fp64(inputs), grad_outputs, **kwargs)
    assert all(o.dtype == torch.bfloat16 for o in outputs) and grads["weight"].dtype == torch.float32
    for out, ref, base in zip(outputs, ref_outputs, base_outputs):
        assert_close_rel("out", out, ref, torch.bfloat16, base)
    for name in inputs:
        assert_close_rel(f"grad {name}", grads[name], ref_grads[name], torch.bfloat16, base_grads[name])
