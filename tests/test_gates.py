import math

import pytest
import torch

from hiap.gates import (
    attention_decisions,
    ffn_decisions,
    gate_offset,
    step_seed,
    top_k_mask,
)
from hiap_kernels.gated_linear_reference import attention_column_masks, attention_gate_values, gate_values
from hiap_kernels.sampling import gumbel_sigmoid, philox_uniform


@pytest.mark.parametrize("logit", [-2.0, -0.3, 0.0, 1.1, 3.0])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_open_frequency_matches_sigmoid_of_the_logit(logit, tau):
    count = 40_000
    logits = torch.full((count,), logit)
    z = gumbel_sigmoid(logits, tau, seed=1234, offset=0, hard=True)
    expected = 1 / (1 + math.exp(-logit))
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


def test_top_k_mask_with_ties_and_zero():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [1.0, 0.0, 3.0, 2.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert not top_k_mask(logits, 0).any()


def test_decisions_open_positive_logits_and_enforce_the_minimums():
    head = torch.tensor([-1.0, -2.0, -0.5])
    qk = torch.full((3, 8), -1.0)
    qk[0, 3] = -0.1
    v = torch.full((3, 8), 1.0)
    keep_head, keep_qk, keep_v = attention_decisions(head, qk, v, min_heads=1, min_dim_fraction=0.125)
    assert keep_head.tolist() == [False, False, True]  # top logit kept when all are negative
    assert keep_qk.sum(dim=1).tolist() == [1, 1, 1] and keep_qk[0, 3]
    assert keep_v.all()
    keep_head, keep_qk, _ = attention_decisions(head, qk, v, min_heads=0, min_dim_fraction=0.0)
    assert not keep_head.any() and not keep_qk.any()


def test_ffn_decision_keeps_a_minimum_of_neurons_but_may_drop_the_block():
    keep_block, keep_neuron = ffn_decisions(torch.tensor([-1.0]), torch.full((20,), -3.0), min_neuron_fraction=0.1)
    assert not keep_block.item() and keep_neuron.sum() == 2


def test_step_seeds_are_deterministic_distinct_and_in_range():
    seeds = [step_seed(0, s) for s in range(1000)]
    assert seeds == [step_seed(0, s) for s in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**31 - 1 for s in seeds)
    assert step_seed(1, 0) != step_seed(0, 0)


def test_gate_offsets_give_every_module_its_own_counter_window():
    offsets = [gate_offset(layer, kind) for layer in range(24) for kind in ("attention", "ffn")]
    assert offsets == sorted(set(offsets))
    assert offsets[1] - offsets[0] == 2**20
