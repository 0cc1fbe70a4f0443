"""``hiap.Pruner``: the search schedule a user's loop drives, its landing on the budget, its state, and the CLI as its
client."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import hiap
from hiap.method.budget import land_on_budget, settle_budget
from hiap.method.pruner import FIX_EVENT, LAND_EVENT, RETIRE_EVENT
from tests.cli_runs import TINY, warm_run  # noqa: F401
from tests.helpers import images, randomize_logits, tiny_vit


def _decided(gated) -> float:
    return hiap.count_macs(gated) / hiap.dense_macs(gated)


def test_the_search_ramps_the_target_speeds_short_runs_up_lands_and_then_fixes_the_structure():
    pruner = hiap.Pruner(tiny_vit(), hiap.HiAPConfig(target=0.5), total_steps=44)
    gated, budget = pruner.model, pruner.objective.budget
    assert pruner.search_steps == 33 and pruner.landing_start == 33 - 7
    assert pruner.gate_speedup() == pytest.approx(4 * 3.0 / 33 / 0.05)
    assert budget.current_target.item() == 1.0 and gated.temperature == 2.0
    events = {}
    for _ in range(44):
        macro, micro = (group["lr"] for group in pruner._gate_optimizer.param_groups)
        step = pruner.step_count
        assert micro == pytest.approx(pruner.gate_lr(step)) and (micro == 0) == (step >= 32)  # 32: after landing
        assert macro == pytest.approx(0.1 * micro)
        if step == 8:  # half way down the ramp (half of the search)
            assert budget.current_target.item() == pytest.approx(1.0 - 0.5 * 8 / 16.5)
        if step == 20:
            assert budget.current_target.item() == 0.5 and budget.ascending and not gated.structure_fixed
        for event in pruner.step():
            events.setdefault(event["event"], []).append(event)
    # The logits never moved (no gradients here), so the first landing check did all of it, in logit order, and the
    # later checks found the decision on the budget; the fix then had nothing to settle.
    landed, = events[LAND_EVENT]
    assert landed["step"] == 26 and landed["before"] == 1.0 and landed["closed"] > 0 and landed["opened"] == 0
    assert abs(landed["after"] / 0.5 - 1) <= 0.01 and "landing on the budget" in landed["message"]
    fixed, = events[FIX_EVENT]
    assert fixed["step"] == 33 and fixed["search_steps"] == 33 and fixed["total_steps"] == 44
    assert fixed["steps"] == 0 and fixed["before"] == fixed["after"] == landed["after"] == _decided(gated)
    assert "structure fixed after 33 of 44 steps" in fixed["message"]
    assert gated.structure_fixed and not budget.ascending and gated.temperature == 0.5
    assert pruner.history == [landed, fixed]
    paper = hiap.Pruner(tiny_vit(), hiap.HiAPConfig(fix_at=1.0, landing=0.0), total_steps=44)
    assert all(paper.step() == [] for _ in range(44)) and not paper.model.structure_fixed
    assert paper.finish()["steps"] > 0  # no landing, no fix: the settling guard corrects after the last step


def test_landing_closes_the_lowest_open_micro_gates_and_leaves_macro_gates_and_the_minimums_alone():
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(target=0.5)).eval()
    randomize_logits(gated, torch.Generator().manual_seed(4), scale=0.5)
    with torch.no_grad():
        for name, logit in gated.gate_logits().items():
            logit.add_(3.0 if name.endswith(("gates.head", "gates.block")) else 0.4)
    before = {k: p.detach().clone() for k, p in gated.gate_logits().items()}
    result = land_on_budget(gated, 0.5)
    assert result["before"] == pytest.approx(0.88, abs=0.1) and result["opened"] == 0
    assert abs(result["after"] / 0.5 - 1) <= 0.01 and result["after"] == _decided(gated)
    closed, still_open = [], []
    for name, logit in gated.gate_logits().items():
        if name.endswith(("gates.head", "gates.block")):
            assert torch.equal(before[name], logit.detach()), name
            continue
        flipped = (before[name] > 0) & (logit.detach() <= 0)
        assert torch.equal(logit.detach()[flipped], torch.full_like(logit[flipped], -0.05))
        assert torch.equal(logit.detach()[~flipped], before[name][~flipped])
        closed += before[name][flipped].tolist()
        still_open += before[name][(~flipped) & (before[name] > 0)].tolist()
    assert len(closed) == result["closed"] > 0
    # Logit order, with the cheap units used to fine-tune the end and the minimums kept whatever their logit.
    assert sorted(closed)[len(closed) // 2] < sorted(still_open)[len(still_open) // 2]
    assert land_on_budget(gated, 0.5) == {"before": result["after"], "after": result["after"], "closed": 0,
                                         "opened": 0}
    # Below the band it opens the closed gates with the highest logits, up to the target.
    opened = land_on_budget(gated, 0.6)
    assert opened["closed"] == 0 and opened["opened"] > 0 and abs(opened["after"] / 0.6 - 1) <= 0.01
    # Where the micro gates cannot reach the band (every FFN block closed), the macro gates move too.
    with torch.no_grad():
        for mlp in gated.ffn_layers():
            mlp.gates.block.fill_(-1.0)
    assert _decided(gated) < 0.5
    reopened = land_on_budget(gated, 0.7)
    assert abs(reopened["after"] / 0.7 - 1) <= 0.01 and any(mlp.gates.block.item() > 0 for mlp in gated.ffn_layers())


def test_budget_settling_moves_only_micro_logits_until_the_target_is_met():
    def model_off_target():
        gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(target=0.5)).eval()
        randomize_logits(gated, torch.Generator().manual_seed(4), scale=0.5)
        with torch.no_grad():
            for name, logit in gated.gate_logits().items():
                logit.add_(3.0 if name.endswith(("gates.head", "gates.block")) else 0.4)
        return gated

    gated = model_off_target()
    before = {k: p.detach().clone() for k, p in gated.gate_logits().items()}
    result = settle_budget(gated, tolerance=0.02)
    assert result["before"] > 0.55 and result["steps"] > 0
    # Within half the tolerance, or within it once the decided MACs have crossed the target (they have here).
    assert result["after"] < 0.5 and abs(result["after"] / 0.5 - 1) <= 0.02
    assert result["after"] == hiap.count_macs(gated) / hiap.dense_macs(gated)
    for name, logit in gated.gate_logits().items():
        changed = not torch.equal(before[name], logit.detach())
        assert changed == name.endswith(("gates.qk", "gates.v", "gates.neuron")), name
    again = model_off_target()
    settle_budget(again, tolerance=0.02)
    assert all(torch.equal(a, b) for a, b in zip(gated.gate_logits().values(), again.gate_logits().values()))
    assert settle_budget(gated, tolerance=0.02)["steps"] == 0
    assert settle_budget(hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(budget="penalty"))) is None


def test_the_search_retires_gates_closed_for_good_on_its_checks_and_a_resumed_pruner_leaves_out_the_same():
    teacher = tiny_vit()
    cfg = hiap.HiAPConfig(retire_every=4)
    pruner = hiap.Pruner(teacher, cfg, total_steps=44)
    gated = pruner.model.train()
    with torch.no_grad():
        gated.gate_logits()["blocks.1.attn.gates.head"][0] = -8.0
        gated.gate_logits()["blocks.0.mlp.gates.neuron"][:2] = -8.0
    assert [pruner.step() for _ in range(3)] == [[], [], []] and gated.retired_counts()["heads"] == 0
    event, = pruner.step()  # step 4: a check
    assert event["event"] == RETIRE_EVENT and event["step"] == 4 and (event["heads"], event["neuron_groups"]) == (1, 2)
    assert "1 of 6 heads and 2 of 24 neuron groups" in event["message"]
    assert [pruner.step() for _ in range(4)] == [[]] * 4  # step 8: the same units, no new event
    assert pruner.log_values()["retired_heads"] == 1 and pruner.log_values()["retired_neuron_groups"] == 2
    # A resumed run: a fresh pruner and model from the checkpointed state leave out the same units at once.
    state, model_state = pruner.state_dict(), gated.state_dict()
    resumed = hiap.Pruner(teacher, cfg, total_steps=44)
    resumed.model.load_state_dict(model_state)
    resumed.load_state_dict(state)
    assert resumed.step_count == 8
    assert {k: v.tolist() for k, v in resumed.model.retired().items()} == \
        {k: v.tolist() for k, v in gated.retired().items()}
    with torch.no_grad():  # the logit climbs back: the next check brings the head back
        gated.gate_logits()["blocks.1.attn.gates.head"][0] = 0.5
    assert [pruner.step() for _ in range(3)] == [[]] * 3
    event, = pruner.step()
    assert event["heads"] == 0 and gated.retired_counts()["neuron_groups"] == 2
    never = hiap.Pruner(teacher, hiap.HiAPConfig(retire_below=0.0), total_steps=44)
    never.model.load_state_dict(model_state)
    assert all(never.step() == [] for _ in range(20)) and never.model.retired_counts()["neuron_groups"] == 0


def _train(pruner, optimizer, batches, steps):
    for images_, targets in batches[pruner.step_count: pruner.step_count + steps]:
        loss = pruner.loss(images_, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pruner.step()


def test_a_pruner_resumed_from_its_state_continues_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    teacher = tiny_vit()
    batches = [(images(teacher, 4, generator), torch.randint(0, 10, (4,), generator=generator)) for _ in range(20)]
    cfg = hiap.HiAPConfig(target=0.5, gate_lr=0.5, retire_every=2)

    def fresh():
        pruner = hiap.Pruner(teacher, cfg, total_steps=20)
        pruner.model.train()
        return pruner, torch.optim.AdamW(pruner.param_groups(lr=1e-3))

    pruner, optimizer = fresh()
    _train(pruner, optimizer, batches, 20)
    halfway, halfway_optimizer = fresh()
    _train(halfway, halfway_optimizer, batches, 9)
    saved = {"model": halfway.model.state_dict(), "optimizer": halfway_optimizer.state_dict(),
             "pruner": halfway.state_dict()}
    resumed, resumed_optimizer = fresh()
    resumed.model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["pruner"])
    _train(resumed, resumed_optimizer, batches, 11)
    assert resumed.history == pruner.history and any(e["event"] == FIX_EVENT for e in pruner.history)
    for (name, value), expected in zip(resumed.model.state_dict().items(), pruner.model.state_dict().values()):
        assert torch.equal(value, expected), name
    assert torch.equal(resumed.objective.budget.lambda1, pruner.objective.budget.lambda1)
    with pytest.raises(ValueError, match="another HiAPConfig"):
        hiap.Pruner(teacher, hiap.HiAPConfig(target=0.6), total_steps=20).load_state_dict(saved["pruner"])
    with pytest.raises(ValueError, match="for 20 steps, not 21"):
        hiap.Pruner(teacher, cfg, total_steps=21).load_state_dict(saved["pruner"])


def test_a_pruner_refuses_bad_arguments_in_one_line():
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        hiap.Pruner(tiny_vit(), total_steps=0)
    with pytest.raises(ValueError, match="below"):
        hiap.Pruner(tiny_vit(), hiap.HiAPConfig(target=0.01), total_steps=10)
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(target=0.5))
    with pytest.raises(ValueError, match="another HiAPConfig"):
        hiap.Pruner(gated, hiap.HiAPConfig(), total_steps=10)
    assert hiap.Pruner(gated, total_steps=10).teacher is None  # a gated model brings no teacher of its own
    with pytest.raises(ValueError, match="needs images"):
        hiap.Pruner(tiny_vit(), total_steps=10).loss(None, torch.zeros(2, dtype=torch.long))


def test_the_cli_is_a_client_of_the_pruner_a_hand_written_loop_gives_the_same_file(warm_run, tmp_path):
    """``hiap prune`` and the loop below, over the same data, teacher and seed, write byte-identical pruned files."""
    from hiap.app.cli import build_parser, settings_from_args
    from hiap.app.data import ShardedBatchSampler, digits_datasets
    from hiap.app.models import DIGITS_VIT, create_dense_model, load_dense_weights
    from hiap.app.session import _fingerprint_key, teacher_fingerprint

    settings = settings_from_args(build_parser().parse_args(["prune", *TINY]))
    teacher = create_dense_model(DIGITS_VIT, 10, model_args={"depth": 2, "embed_dim": 32})
    load_dense_weights(teacher, warm_run.cache / f"teacher-{_fingerprint_key(teacher_fingerprint(settings))}.safetensors")
    teacher.eval()
    data = digits_datasets(teacher)
    epochs, batch_size, cfg = 2, 64, hiap.HiAPConfig()
    sampler = ShardedBatchSampler(len(data.train), batch_size, seed=cfg.seed)
    total_steps = epochs * sampler.steps_per_epoch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs a model this small
    try:
        pruner = hiap.Pruner(teacher, cfg, total_steps=total_steps)
        pruner.model.train()
        optimizer = torch.optim.AdamW(pruner.param_groups(lr=cfg.lr, weight_decay=0.05), fused=True)
        schedule = LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for index in sampler:
                batch, targets = torch.stack([data.train[i][0] for i in index]), data.train.labels[index]
                loss = pruner.loss(batch, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pruner.step()
                schedule.step()
        hiap.save_pruned(pruner.extract(), tmp_path / "pruned.safetensors")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "pruned.safetensors").read_bytes() == (warm_run.output / "pruned.safetensors").read_bytes()


def test_units_are_ordered_by_magnitude_before_the_search_and_the_function_is_unchanged():
    from hiap.method.convert import order_units_by_magnitude

    vit = tiny_vit()
    x = images(vit, 3, torch.Generator().manual_seed(2))
    gated = hiap.gate_vit(vit).eval()
    order_units_by_magnitude(gated)
    torch.testing.assert_close(gated(x), vit(x), rtol=1e-5, atol=1e-5)
    for attn, mlp in zip(gated.attention_layers(), gated.ffn_layers()):
        width, head_dim = attn.attn_dim, attn.head_dim
        rows = attn.qkv.weight.abs().sum(dim=1)
        qk = (rows[:width] + rows[width:2 * width]).view(-1, head_dim)
        v = (rows[2 * width:] + attn.proj.weight.abs().sum(dim=0)).view(-1, head_dim)
        neurons = mlp.fc1.weight.abs().sum(dim=1) + mlp.fc2.weight.abs().sum(dim=0)
        for score in (qk, v, neurons[None]):
            assert torch.equal(score, score.sort(dim=-1, descending=True).values)
    # The pruner orders its own copy (the model it was given is untouched); the option turns it off.
    ordered = hiap.Pruner(vit, total_steps=4).model.eval()
    assert torch.equal(ordered.vit.blocks[0].attn.qkv.weight, gated.vit.blocks[0].attn.qkv.weight)
    plain = hiap.Pruner(vit, hiap.HiAPConfig(order_units=False), total_steps=4).model
    assert torch.equal(plain.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    with pytest.raises(TypeError, match="gated model"):
        order_units_by_magnitude(vit)
