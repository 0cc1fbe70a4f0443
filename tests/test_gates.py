"""The gate objects of ``hiap.method.gates``: decisions, draws, kept columns, assignment, schedule, offsets."""

import pytest
import torch

import hiap
from hiap.method.gates import (
    CLOSED_LOGIT,
    OPEN_LOGIT,
    AttentionGates,
    FfnGates,
    GateSchedule,
    gate_offset,
    step_seed,
    top_k_mask,
)
from hiap_kernels.gated_weight.reference import gated_fc2_weight_reference, gated_qkv_weight_reference
from tests.helpers import images, tiny_vit


def attention_gates(head, qk, v, *, min_heads=1, min_dim_fraction=0.125, group=1):
    gates = AttentionGates(head.shape[0], qk.shape[1] * group, group=group, init_logit=0.0, offset=0,
                           min_heads=min_heads, min_dim_fraction=min_dim_fraction)
    with torch.no_grad():
        gates.head.copy_(head), gates.qk.copy_(qk), gates.v.copy_(v)
    return gates


def test_top_k_mask_with_ties_and_zero():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [1.0, 0.0, 3.0, 2.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert not top_k_mask(logits, 0).any()


def test_decisions_open_positive_logits_and_enforce_the_minimums():
    head = torch.tensor([-1.0, -2.0, -0.5])
    qk = torch.full((3, 8), -1.0)
    qk[0, 3] = -0.1
    v = torch.full((3, 8), 1.0)
    keep_head, keep_qk, keep_v = attention_gates(head, qk, v, min_heads=1, min_dim_fraction=0.125).decisions()
    assert keep_head.tolist() == [False, False, True]  # top logit kept when all are negative
    assert keep_qk.sum(dim=1).tolist() == [1, 1, 1] and keep_qk[0, 3]
    assert keep_v.all()
    keep_head, keep_qk, _ = attention_gates(head, qk, v, min_heads=0, min_dim_fraction=0.0).decisions()
    assert not keep_head.any() and not keep_qk.any()


def test_ffn_decision_keeps_a_minimum_of_neurons_but_may_drop_the_block():
    gates = FfnGates(20, group=1, init_logit=-3.0, offset=0, min_neuron_fraction=0.1)
    gates.assign(block=False)
    keep_block, keep_neuron = gates.decisions()
    assert not keep_block.item() and keep_neuron.sum() == 2
    assert gates.kept_neurons().sum() == 0  # a closed block keeps nothing, whatever its neurons say


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


def test_kept_columns_expand_groups_and_drop_the_q_k_columns_of_removed_heads():
    head = torch.tensor([2.0, 2.0, -2.0])
    qk = torch.tensor([[1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    gates = attention_gates(head, qk, v, min_heads=0, min_dim_fraction=0.0, group=4)
    m_q, m_v = gates.kept_columns()
    assert m_q.shape == m_v.shape == (3, 8)
    # head 0: q/k group 0, v group 1; head 1 has no v column left, head 2 is closed: both removed with their q/k.
    assert m_q.sum(dim=1).tolist() == [4, 0, 0] and m_q[0, :4].all()
    assert m_v.sum(dim=1).tolist() == [4, 0, 0] and m_v[0, 4:].all()
    assert gates.kept_widths() == ([4, 0, 0], [4, 0, 0])


def test_assign_fixes_gates_and_refuses_unknown_kinds():
    gates = FfnGates(8, group=2, init_logit=0.0, offset=0, min_neuron_fraction=0.0)
    gates.assign(block=True, neuron=torch.tensor([True, False, True, False]))
    assert gates.block.tolist() == [OPEN_LOGIT]
    assert gates.neuron.tolist() == [OPEN_LOGIT, CLOSED_LOGIT, OPEN_LOGIT, CLOSED_LOGIT]
    assert gates.kept_neurons().tolist() == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="no gates"):
        gates.assign(head=True)


def test_a_draw_samples_in_training_and_decides_in_eval():
    schedule = GateSchedule(tau=0.7, seed=11, hard=True)
    gates = AttentionGates(2, 8, group=4, init_logit=0.0, offset=64, min_heads=1, min_dim_fraction=0.0,
                           schedule=schedule)
    with torch.no_grad():
        gates.qk.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    draw = gates.train().draw()
    assert draw.sample and draw.logits[0] is gates.head and draw.offset == 64 and draw.hard
    # tau and seed are the schedule's device tensors: the samplers read them without a host round trip.
    assert draw.tau is schedule.tau and draw.seed is schedule.seed
    assert float(draw.tau) == pytest.approx(0.7) and int(draw.seed) == 11
    draw = gates.eval().draw()
    assert not draw.sample
    # +-1 stand-ins of the decision: the ops open exactly the gates with a > 0
    assert draw.logits[1].tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    schedule.set_temperature(0.25)
    assert float(gates.draw().tau) == 0.25
    with pytest.raises(ValueError):
        schedule.set_temperature(float("nan"))


@pytest.mark.parametrize("training", [True, False], ids=["sampled", "decided"])
def test_a_layers_values_are_the_gates_its_gated_weight_op_applies(training):
    """Token reduction's attention reads ``values`` while the forward hands the draw to the gated-weight op: the two
    must mask the same rows and columns."""
    schedule = GateSchedule(tau=0.7, seed=11)
    attention = AttentionGates(3, 8, group=2, init_logit=0.0, offset=64, min_heads=1, min_dim_fraction=0.0,
                               schedule=schedule)
    ffn = FfnGates(12, group=3, init_logit=0.0, offset=2**20, min_neuron_fraction=0.0, schedule=schedule)
    for gates in (attention, ffn):
        with torch.no_grad():
            for logit in gates.logits().values():
                logit.normal_()
        gates.train(training)
    draw = attention.draw()
    weight, bias = torch.randn(72, 5), torch.randn(72)
    scale = attention.qkv_row_scale(attention.values(draw))
    masked_weight, masked_bias = gated_qkv_weight_reference(weight, bias, *draw.logits, **draw.options())
    assert torch.equal(weight * scale[:, None], masked_weight) and torch.equal(bias * scale, masked_bias)
    draw = ffn.draw()
    fc2_weight = torch.randn(5, 12)
    assert torch.equal(fc2_weight * ffn.neuron_scale(ffn.values(draw)),
                       gated_fc2_weight_reference(fc2_weight, *draw.logits, **draw.options()))


def test_one_schedule_per_model_and_temperature_set_in_one_place():
    gated = hiap.gate_vit(tiny_vit())
    assert all(gates.schedule is gated.schedule for gates in gated.gate_layers())
    gated.set_temperature(0.3)
    assert all(float(gates.draw().tau) == pytest.approx(0.3) for gates in gated.gate_layers())


def test_state_dicts_written_before_gate_objects_existed_still_load():
    gated = hiap.gate_vit(tiny_vit()).eval()
    with torch.no_grad():
        for logit in gated.gate_logits().values():
            logit.normal_()
    legacy = {}
    for key, value in gated.state_dict().items():
        for kind in ("head", "qk", "v", "block", "neuron"):
            key = key.replace(f".gates.{kind}", f".gate_{kind}")
        legacy[key] = value
    assert "vit.blocks.0.attn.gate_head" in legacy
    fresh = hiap.gate_vit(tiny_vit()).eval()
    fresh.load_state_dict(legacy, strict=True)
    x = images(gated)
    assert torch.equal(fresh(x), gated(x))
