"""``sample_gates`` (the in-kernel Gumbel-Sigmoid sampler) and its reference: ``gumbel_sigmoid`` on the Philox twin,
the keep probability it opens a gate with, and the gate values and masks of a layer built on it."""

import math

import pytest
import torch

from hiap_kernels import sample_gates
from hiap_kernels.gates.reference import (
    attention_column_masks,
    attention_gate_values,
    ffn_gate_values,
    ffn_neuron_mask,
    gate_values,
    gumbel_sigmoid,
    keep_probability,
    philox_uniform,
)
from tests.kernel_checks import DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("poisoned")


# ------------------------------------------------------------------------------------------------ the reference

@pytest.mark.parametrize("logit", [-2.0, -0.3, 0.0, 1.1, 3.0])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_open_frequency_matches_sigmoid_of_the_logit(logit, tau):
    count = 40_000
    logits = torch.full((count,), logit)
    z = gumbel_sigmoid(logits, tau, seed=1234, offset=0, hard=True)
    expected = keep_probability(torch.tensor(logit, dtype=torch.float64)).item()
    # Binomial standard error; 5 sigma keeps the test deterministic-safe yet meaningful.
    assert abs(z.mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / count) + 1e-9


def test_hard_gates_pass_the_soft_gradient_straight_through():
    logits = torch.randn(64, requires_grad=True)
    z = gumbel_sigmoid(logits, 0.7, seed=3, offset=10, hard=True)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    soft = gumbel_sigmoid(logits.detach(), 0.7, seed=3, offset=10, hard=False)
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.7, atol=1e-6)


def test_same_seed_and_offset_give_the_same_gates_and_other_offsets_differ():
    logits = torch.zeros(256)
    a = gumbel_sigmoid(logits, 1.0, seed=7, offset=0)
    b = gumbel_sigmoid(logits, 1.0, seed=7, offset=0)
    c = gumbel_sigmoid(logits, 1.0, seed=7, offset=256)
    d = gumbel_sigmoid(logits, 1.0, seed=8, offset=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_uniforms_are_in_the_open_unit_interval_and_look_uniform():
    u = philox_uniform(99, torch.arange(100_000))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    with pytest.raises(ValueError):
        philox_uniform(-1, torch.arange(3))


# ------------------------------------------------------------------------------------------------ a layer's gates

def test_eval_gates_are_the_sign_of_the_logit():
    logits = torch.tensor([-1.0, 0.0, 2.0])
    assert gate_values(logits, tau=1.0, seed=0, offset=0, sample=False).tolist() == [0.0, 0.0, 1.0]


def test_conditioning_products_close_micro_gates_of_closed_heads():
    head = torch.tensor([1.0, 0.0])
    qk = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    m_q, m_v = attention_column_masks(head, qk, v, head_dim=4)
    assert m_q.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert m_v.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_layer_gates_are_laid_out_head_then_qk_then_v():
    head, qk, v = torch.randn(3), torch.randn(3, 4), torch.randn(3, 4)
    z_head, z_qk, z_v = attention_gate_values(head, qk, v, tau=1.0, seed=5, offset=100)
    flat = gumbel_sigmoid(torch.cat([head, qk.flatten(), v.flatten()]), 1.0, 5, 100)
    assert torch.equal(torch.cat([z_head, z_qk.flatten(), z_v.flatten()]), flat)


def test_ffn_gates_are_laid_out_block_then_neurons_and_the_block_closes_every_neuron():
    block, neuron = torch.randn(1), torch.randn(6)
    z_block, z_neuron = ffn_gate_values(block, neuron, tau=0.8, seed=3, offset=40)
    assert torch.equal(torch.cat([z_block, z_neuron]), gumbel_sigmoid(torch.cat([block, neuron]), 0.8, 3, 40))
    mask = ffn_neuron_mask(torch.tensor([1.0]), torch.tensor([1.0, 0.0, 1.0]), hidden=6)
    assert mask.tolist() == [1, 1, 0, 0, 1, 1]
    assert not ffn_neuron_mask(torch.tensor([0.0]), torch.ones(3), hidden=6).any()


# ------------------------------------------------------------------------------------------------ the kernel


def _logits(shape, scale=3.0):
    return (torch.randn(shape) * scale).to(DEVICE)


@needs_triton
@pytest.mark.parametrize(
    "shape, seed, offset",
    [
        ((1000,), 0, 0),
        ((7, 33), 1234, 12345),
        ((257,), 2**31 - 1, 2**31 - 2**20),
    ],
)
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_hard_gates_match_reference_exactly(shape, seed, offset, tau):
    logits = _logits(shape)
    values, slopes = sample_gates(logits, tau=tau, seed=seed, offset=offset, hard=True)

    reference_logits = logits.clone().requires_grad_()
    reference = gumbel_sigmoid(reference_logits, tau, seed, offset, hard=True)
    reference.sum().backward()

    # The decision is exact; the reference's straight-through value hard + s - s may sit one ulp off 0/1.
    assert torch.equal(values > 0.5, reference.detach().reshape(-1) > 0.5)
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(slopes, reference_logits.grad.reshape(-1), rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("seed, offset", [(7, 0), (99, 4096)])
def test_soft_gates_match_reference(seed, offset):
    logits = _logits((500,))
    values, slopes = sample_gates(logits, tau=0.8, seed=seed, offset=offset, hard=False)

    reference_logits = logits.clone().requires_grad_()
    reference = gumbel_sigmoid(reference_logits, 0.8, seed, offset, hard=False)
    reference.sum().backward()

    torch.testing.assert_close(values, reference.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(slopes, reference_logits.grad, rtol=1e-5, atol=1e-7)


@needs_triton
def test_eval_decision_is_sign_of_logit_without_slope():
    logits = _logits((300,))
    logits[:5] = 0.0  # a == 0 is closed: 1[a > 0]
    values, slopes = sample_gates(logits, tau=1.0, seed=3, offset=0, sample=False)
    assert torch.equal(values, (logits > 0).float())
    assert torch.count_nonzero(slopes) == 0


@needs_triton
def test_half_precision_logits_sample_like_their_fp32_values():
    logits = _logits((200,)).half()
    values, _ = sample_gates(logits, tau=1.0, seed=11, offset=5)
    reference = gumbel_sigmoid(logits.float(), 1.0, 11, 5)
    assert torch.equal(values > 0.5, reference > 0.5)


@needs_triton
def test_open_probability_is_sigmoid_of_logit():
    # P(z = 1) = sigmoid(a) for every tau; 4096 independent counters at one logit value.
    count = 4096
    for logit in (-1.0, 0.0, 1.5):
        values, _ = sample_gates(torch.full((count,), logit, device=DEVICE), tau=0.3, seed=21, offset=0)
        expected = keep_probability(torch.tensor(logit, dtype=torch.float64)).item()
        sigma = math.sqrt(expected * (1 - expected) / count)
        assert abs(values.mean().item() - expected) < 5 * sigma


@needs_triton
def test_same_seed_same_gates_and_other_seed_other_gates():
    logits = torch.zeros(256, device=DEVICE)
    first, _ = sample_gates(logits, tau=1.0, seed=5, offset=0)
    again, _ = sample_gates(logits, tau=1.0, seed=5, offset=0)
    other, _ = sample_gates(logits, tau=1.0, seed=6, offset=0)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@needs_triton
def test_empty_logits():
    values, slopes = sample_gates(torch.empty(0, device=DEVICE), tau=1.0, seed=0, offset=0)
    assert values.shape == slopes.shape == (0,)


@needs_triton
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"tau": 0.0, "seed": 0, "offset": 0}, ValueError),
        ({"tau": -1.0, "seed": 0, "offset": 0}, ValueError),
        ({"tau": 1.0, "seed": -1, "offset": 0}, ValueError),
        ({"tau": 1.0, "seed": 2**31, "offset": 0}, ValueError),
        ({"tau": 1.0, "seed": 0, "offset": -3}, ValueError),
        ({"tau": 1.0, "seed": 0, "offset": 2**31 - 5}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs, error):
    with pytest.raises(error):
        sample_gates(torch.zeros(10, device=DEVICE), **kwargs)


@needs_triton
def test_integer_logits_raise():
    with pytest.raises(TypeError):
        sample_gates(torch.zeros(10, dtype=torch.int32, device=DEVICE), tau=1.0, seed=0, offset=0)


def test_the_philox_custom_op_passes_opcheck_and_a_tensor_seed_equals_an_int_one():
    from hiap_kernels.gates.reference import _philox_uniform_op

    torch.library.opcheck(_philox_uniform_op, (torch.tensor(1234), torch.arange(7, 40)))
    torch.library.opcheck(_philox_uniform_op, (torch.tensor(5), torch.arange(12).view(3, 4)))
    assert torch.equal(philox_uniform(torch.tensor(1234), torch.arange(9)), philox_uniform(1234, torch.arange(9)))


@needs_triton
def test_tensor_tau_and_seed_sample_like_python_ones():
    logits = _logits((300,))
    values, slopes = sample_gates(logits, tau=0.6, seed=77, offset=5)
    tensor_values, tensor_slopes = sample_gates(logits, tau=torch.tensor(0.6), seed=torch.tensor(77), offset=5)
    assert torch.equal(values, tensor_values) and torch.equal(slopes, tensor_slopes)


@needs_triton
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_values_carry_the_straight_through_gradient_of_the_reference(hard):
    from hiap_kernels.gates.kernel import _sample_gates

    logits = _logits((70,)).requires_grad_()
    reference_logits = logits.detach().clone().requires_grad_()
    weights = torch.randn(70, device=DEVICE)
    values, slopes = sample_gates(logits, tau=0.8, seed=9, offset=3, hard=hard)
    (values * weights).sum().backward()
    (gumbel_sigmoid(reference_logits, 0.8, 9, 3, hard=hard) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-7)
    assert not slopes.requires_grad
    args = (logits.detach().clone().requires_grad_(), torch.tensor(0.8), torch.tensor(9), 3, hard, True)
    torch.library.opcheck(_sample_gates, args)


@needs_triton
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_a_nan_logit_gives_a_nan_gate_on_both_paths(hard):
    """One NaN policy: a NaN logit propagates (a diverged run shows as NaN, never as a silently closed gate)."""
    logits = _logits((40,))
    logits[[3, 17]] = float("nan")
    values, _ = sample_gates(logits, tau=0.7, seed=5, offset=0, hard=hard)
    reference = gumbel_sigmoid(logits, 0.7, 5, 0, hard=hard)
    assert torch.equal(values.isnan(), reference.isnan()) and values.isnan().sum() == 2
    finite = ~values.isnan()
    assert torch.equal(values[finite] > 0.5, reference[finite] > 0.5)


def test_count_macs_refuses_nan_logits():
    import hiap
    from tests.helpers import tiny_vit

    gated = hiap.gate_vit(tiny_vit())
    with torch.no_grad():
        gated.vit.blocks[0].attn.gates.qk[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hiap.count_macs(gated)
