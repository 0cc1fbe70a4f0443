"""``gated_qkv`` (Triton) against ``gated_qkv_reference``, forward and every gradient, on the same gates.

The reference runs in fp64 on the same gates (they are decided in fp32 from the logits alone, so the fp64 reference
samples exactly the same ones). Bounds: ``TOLERANCES["gated_linear"]``, or twice the error of the PyTorch reference
run in the same dtype when that is larger. Every buffer the op allocates is poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

from hiap_kernels import gated_qkv, gated_qkv_reference
from hiap_kernels.gated_linear.interface import gate_tensors
from hiap_kernels.gated_linear.qkv import _qkv_column_mask_values
from hiap_kernels.gates.reference import attention_column_masks, attention_gate_values
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
    leaves = [t.detach().clone().requires_grad_() for t in qkv.values()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_qkv(*leaves, tau=0.7, seed=1, offset=0)
    # the inputs, and tau and the seed as 0-dim tensors
    assert sorted(saved) == sorted([tuple(t.shape) for t in qkv.values()] + [(), ()])


def test_qkv_column_mask_kernel_equals_reference_masks():
    num_heads, head_dim, group = 3, 24, 8
    inputs = make_qkv_inputs(1, 1, num_heads, head_dim, group, False, torch.float32, True)
    logits = (inputs["head_logits"], inputs["qk_logits"], inputs["v_logits"])
    for hard, sample in [(True, True), (False, True), (True, False)]:
        tau, seed = gate_tensors(0.9, 77, logits[0].device)
        mask = _qkv_column_mask_values(*logits, 3 * num_heads * head_dim, tau, seed, 1000, hard, sample)
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


def test_compiled_qkv_and_attention_match_eager_without_graph_breaks():
    inputs = make_qkv_inputs(1, 17, 2, 16, 8, True, torch.float32, False)
    params = [t.requires_grad_() for t in inputs.values()]

    def step(seed):
        q, k, v = gated_qkv(*params, tau=0.7, seed=seed, offset=3)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).square().sum()

    _compiled_matches_eager_in_one_graph(step, params)


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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_odd_shapes_gpu(dtype):
    check_qkv(make_qkv_inputs(2, 17, 2, 24, 8, False, dtype, True), dtype)


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


@pytest.mark.parametrize("sample", [True, False], ids=["train", "eval"])
def test_custom_ops_pass_opcheck(sample):
    """Fake and real outputs agree in shape, strides and storage offset; the autograd registration is sound."""
    from hiap_kernels.gated_linear.qkv import _qkv_backward_op, _qkv_forward_op

    inputs = make_qkv_inputs(1, 5, 2, 16, 8, True, torch.float32, True)
    tensors = [t.detach().clone().requires_grad_() for t in inputs.values()]
    gate_args = (*gate_tensors(0.7, 3, tensors[0].device), 0, True, sample)
    torch.library.opcheck(_qkv_forward_op, (*tensors, *gate_args))
    grads = [torch.randn(1, 2, 5, 16) for _ in range(3)]
    plain = [t.detach() for t in tensors]
    torch.library.opcheck(_qkv_backward_op, (*grads, *plain, *gate_args, [True, True, True, sample]))
