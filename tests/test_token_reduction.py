"""Token reduction (RAPID prune/merge, ToMe) on timm, gated and pruned models: exactness, MACs, schedules, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import hiap
import hiap_kernels
from hiap.tokens import LayerStep, TokenSchedule, parse_schedule, reduce_tokens, restore_tokens, token_counts
from hiap.method.token_overhead import merge_candidates
from hiap.tokens.reduce import bipartite_soft_matching, importance_merge, redundancy_prune
from tests.helpers import images, randomize_logits, tiny_vit
from tests.kernel_checks import needs_triton

# 64 px with 8 px patches: 64 patch tokens and a class token per image.
SCHEDULES = ["rapid:r=6", "rapid:r=4,switch=0.25,weight=1", "tome:r=6", "p5,m7,t4", "-,m9,-", "rapid:keep=0.6"]


def _vit(**overrides):
    torch.manual_seed(0)
    return tiny_vit(img_size=64, depth=3, **overrides)


def _flop_counter_macs(model, x):
    model = copy.deepcopy(model).requires_grad_(False)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model(x)
    return counter.get_total_flops() // 2


def test_a_schedule_that_removes_nothing_leaves_the_model_bit_for_bit():
    model = _vit(reg_tokens=2)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        for spec in ("-,-,-", "rapid:r=0", "tome:r=0"):
            reduce_tokens(model, spec)
            assert torch.equal(model(x), expected), spec
        reduce_tokens(model, "tome:r=5")
        assert not torch.equal(model(x), expected)
        restore_tokens(model)
        assert torch.equal(model(x), expected)
    assert all("forward" not in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("spec", SCHEDULES)
def test_macs_count_every_block_at_its_tokens_exactly_as_a_flop_counter(spec):
    model = _vit()
    reduce_tokens(model, spec)
    x = images(model, batch=1)
    assert hiap.count_macs(model) == _flop_counter_macs(model, x)
    assert hiap.count_macs(model) < hiap.count_macs(restore_tokens(copy.deepcopy(model)))


@pytest.mark.parametrize("spec", ["rapid:r=6", "tome:r=6", "p5,m7,t4"])
def test_gated_model_reduces_tokens_as_its_extracted_copy_does(spec):
    gated = hiap.gate_vit(_vit(), hiap.HiAPConfig(dim_group=1, min_heads=1, min_dim_fraction=0.0,
                                                  min_neuron_fraction=0.0))
    generator = torch.Generator().manual_seed(3)
    randomize_logits(gated, generator)
    logits = gated.gate_logits()
    with torch.no_grad():
        # v widths equal to q/k widths: on a CPU a head whose two widths differ runs SDPA zero-padded, which a FLOP
        # counter would count at the padded width.
        for name in logits:
            if name.endswith(".v"):
                logits[name].copy_(logits[name.removesuffix(".v") + ".qk"])
    pruned = hiap.extract(gated.eval())
    reduce_tokens(gated, spec)
    reduce_tokens(pruned, spec)
    x = images(gated, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gated(x), rtol=1e-4, atol=1e-4)
    assert hiap.count_macs(gated) == hiap.count_macs(pruned) == _flop_counter_macs(pruned, x[:1])


@pytest.mark.parametrize("spec", ["p10,-,-", "m10,-,-", "t10,-,-"])
def test_register_tokens_and_the_class_token_are_never_touched(spec):
    model = _vit(reg_tokens=3)
    x = images(model)
    outputs = []
    model.blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(x)
        reduce_tokens(model, spec)
        model(x)
    assert token_counts(model) == [(68, 58), (58, 58), (58, 58)]
    full, reduced = outputs
    assert reduced.shape == (x.shape[0], 58, model.embed_dim)
    # Block 0 reduces after its attention; LayerNorm and MLP work row by row, so the 4 prefix rows come out as
    # they do without reduction.
    torch.testing.assert_close(reduced[:, :4], full[:, :4], rtol=1e-5, atol=1e-6)


def test_merged_tokens_are_size_weighted_means_and_sizes_add_up():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=generator)
    keys = torch.randn(2, 9, 4, generator=generator)
    size = torch.randint(1, 4, (2, 9, 1), generator=generator).float()
    cls = torch.rand(2, 9, generator=generator)
    for reduce in (lambda: importance_merge(x, size, keys, cls, 3), lambda: bipartite_soft_matching(x, size, keys, 3)):
        merged, merged_size = reduce()
        assert merged.shape == (2, 6, 5) and merged_size.shape == (2, 6, 1)
        # The size-weighted sum of the tokens (the "mass") is kept, and so is the total size.
        torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1))
        torch.testing.assert_close(merged_size.sum(1), size.sum(1))
    kept, kept_size = redundancy_prune(x, size, keys, cls, 3)
    assert kept.shape == (2, 6, 5)
    # Pruning keeps rows of x as they are, in their order.
    for batch in range(2):
        rows = [int((x[batch] == row).all(dim=1).nonzero()) for row in kept[batch]]
        assert rows == sorted(rows)


def test_redundancy_prune_drops_the_duplicated_pattern_first():
    keys = torch.eye(6)[None].repeat(1, 1, 1)
    keys[0, 3:] = keys[0, 2]  # tokens 2..5 share one pattern
    x = torch.arange(6.0)[None, :, None]
    kept, _ = redundancy_prune(x, torch.ones(1, 6, 1), keys, None, 2, importance_weight=0.0)
    assert kept.flatten().tolist()[:2] == [0.0, 1.0]  # the unique tokens stay
    # With importance, a token the class token attends to strongly is protected even when redundant.
    cls = torch.tensor([[0.01, 0.01, 0.9, 0.02, 0.03, 0.03]])
    kept, _ = redundancy_prune(x, torch.ones(1, 6, 1), keys, cls, 2, importance_weight=1.0)
    assert 2.0 in kept.flatten().tolist()


def test_importance_merge_keeps_the_most_attended_tokens_unchanged():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 3, generator=generator)
    keys = torch.randn(1, 8, 4, generator=generator)
    cls = torch.tensor([[0.5, 0.01, 0.2, 0.02, 0.1, 0.03, 0.1, 0.04]])
    merged, size = importance_merge(x, torch.ones(1, 8, 1), keys, cls, 3, pool=1.0)
    # Tokens 1, 3 and 5 (least attended) are merged away; the rest keep their order.
    assert size.sum() == 8 and merged.shape[1] == 5
    untouched = size.flatten() == 1
    kept_order = [0, 2, 4, 6, 7]
    for position, token in enumerate(kept_order):
        if untouched[position]:
            assert torch.equal(merged[0, position], x[0, token])


@pytest.mark.parametrize("pool", [2.0, 1.5])
def test_importance_merge_pool_merges_the_candidates_with_a_near_twin(pool):
    """r = 2 of 8 patch tokens with a pool of 4 candidates (1.5 * 2 = 3 rounds to 3, 2 * 2 = 4): of the least
    attended, those whose keys nearly copy a token outside the candidates are the ones merged, into that token."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 3, generator=generator)
    keys = torch.randn(1, 8, 4, generator=generator)
    keys[0, 3] = keys[0, 2] * 1.5  # a twin of token 2 (cosine 1)
    keys[0, 5] = keys[0, 4] + 1e-3  # a near twin of token 4
    cls = torch.tensor([[0.5, 0.01, 0.2, 0.02, 0.1, 0.03, 0.1, 0.04]])  # least attended: 1, 3, 5, 7
    merged, size = importance_merge(x, torch.ones(1, 8, 1), keys, cls, 2, pool=pool)
    kept = [0, 1, 2, 4, 6, 7]
    assert merged.shape == (1, 6, 3) and size.flatten().tolist() == [1, 1, 2, 2, 1, 1]
    for position, token in enumerate(kept):
        expected = (x[0, token] + x[0, token + 1]) / 2 if token in (2, 4) else x[0, token]
        torch.testing.assert_close(merged[0, position], expected)


def test_merge_candidates_bounds():
    assert merge_candidates(196, 14, 1.5) == 21 and merge_candidates(196, 14, 1.0) == 14
    assert merge_candidates(8, 3, 1.5) == 4  # at most half the patches ...
    assert merge_candidates(8, 6, 1.5) == 6  # ... but never fewer than r
    assert merge_candidates(10, 1, 1.5) == 2  # 1.5 rounds half up


def test_proportional_attention_sees_a_merged_token_as_its_copies():
    """A token of size s must attract the attention of s identical tokens: merge two identical tokens and compare
    with the unmerged model on a block that only keeps."""
    model = _vit()
    x = images(model)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = model._pos_embed(tokens)
        block = model.blocks[0]
        duplicated = torch.cat([tokens, tokens[:, -1:]], dim=1)  # the last token twice
        expected = block.attn(block.norm1(duplicated))[:, :-1]
        from hiap.tokens.attention import attend
        from hiap.tokens.patch import _proportional_bias

        size = torch.ones(tokens.shape[0], tokens.shape[1], 1)  # every token's, the class token's included
        size[:, -1] = 2.0
        got = attend(block.attn, block.norm1(tokens), _proportional_bias(size, tokens.dtype), keys=False,
                     cls=False).out
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_patched_model_deep_copies_into_an_independent_model():
    model = reduce_tokens(_vit(), "rapid:r=6")
    copied = copy.deepcopy(model)
    assert copied.blocks[0].forward.__self__ is copied.blocks[0]
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
        copied.blocks[1].mlp.fc2.bias.add_(1.0)
        assert not torch.equal(copied(x), model(x))


def test_reduced_model_compiles_without_graph_breaks():
    model = reduce_tokens(_vit(), "p5,m7,t4")
    explanation = torch._dynamo.explain(model)(images(model))
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("t40,-,-", "at most half"),
        ("p64,-,-", "all but one"),
        ("rapid:r=30", "all but one"),
        ("p1,p1", "3 blocks"),
        ("x3,-,-", "use p<r>"),
        ("rapid:r=2,speed=3", "unknown option"),
        ("rapid:keep=0.6,r=2", "not both"),
        ("tome:keep=0", "keep must lie"),
        ("rapid:r=2,pool=0.5", "merge_pool must be finite and >= 1"),
        ("rapid:r=2,weight=-1", "importance_weight must be finite and >= 0"),
        ("tome:r=2,pool=2", "unknown option"),
        ("", "empty"),
    ],
)
def test_impossible_schedules_are_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        reduce_tokens(_vit(), spec)
    assert "\n" not in str(caught.value)


def test_models_that_pool_by_averaging_are_refused_but_may_keep_all_tokens():
    model = _vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class-token model"):
        reduce_tokens(model, "tome:r=2")
    reduce_tokens(model, "-,-,-")  # nothing removed: allowed, and exact


def test_rapid_options_reach_the_schedule():
    schedule = parse_schedule("rapid:r=4,weight=0.5,pool=2,switch=0.25", depth=12, patches=196, prefix=1)
    assert (schedule.importance_weight, schedule.merge_pool) == (0.5, 2.0)
    assert [step.kind for step in schedule.steps] == ["prune"] * 3 + ["merge"] * 9
    default = parse_schedule("rapid:r=4", depth=12, patches=196, prefix=1)
    assert (default.importance_weight, default.merge_pool) == (0.0, 1.5)


def test_keep_fraction_picks_the_smallest_r_that_reaches_it():
    schedule = parse_schedule("tome:keep=0.7", depth=12, patches=196, prefix=1)
    assert schedule.work_fraction(196, 1) <= 0.7
    smaller = TokenSchedule(tuple(LayerStep("tome", schedule.steps[0].r - 1) for _ in range(12)))
    assert smaller.work_fraction(196, 1) > 0.7



@needs_triton
@pytest.mark.parametrize("spec", ["m6,p6,m6", "tome:r=6"])
def test_pruned_model_on_the_triton_backend_merges_and_attends_as_the_reference(spec):
    """On the Triton backend merges run through merge_tokens and nearest_tokens, prunes through token_redundancy, and
    once tokens are merged the ragged kernel adds log(size) per key, as SDPA's mask does: the outputs match the
    PyTorch path."""
    gated = hiap.gate_vit(_vit(), hiap.HiAPConfig(dim_group=1, min_heads=1, min_dim_fraction=0.0,
                                                  min_neuron_fraction=0.0))
    randomize_logits(gated, torch.Generator().manual_seed(5))
    pruned = reduce_tokens(hiap.extract(gated.eval()), spec)
    x = images(pruned)
    with torch.no_grad():
        expected = pruned(x)
        hiap.use_triton_kernels(pruned)
        for block in pruned.blocks:
            block.attn.attention_path = "triton"
        calls = []
        original = hiap_kernels.ragged_attention

        def spy(*args, **kwargs):
            calls.append(kwargs.get("key_bias") is not None)
            return original(*args, **kwargs)

        used = {"merge_tokens": [], "nearest_tokens": [], "token_redundancy": []}
        for block in pruned.blocks:
            # Spies in the tables the switch resolved: the forward reads them, it does not look the ops up again.
            kernels = block.attn.kernels
            assert kernels["ragged_attention"] is original and kernels["merge_tokens"] is hiap_kernels.merge_tokens
            kernels["ragged_attention"] = spy
            for name in used:
                kernels[name] = lambda *args, _op=kernels[name], _used=used[name]: _used.append(1) or _op(*args)
        got = pruned(x)
    assert calls and any(calls)  # the kernel ran, and with a bias after the first merge
    assert used["merge_tokens"] and used["nearest_tokens"]  # and the merges went through the Triton ops
    assert bool(used["token_redundancy"]) == ("p" in spec)  # and the prune's score
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merge_steps_choose_the_same_tokens_with_the_triton_kernels(dtype):
    """importance_merge and bipartite_soft_matching with nearest_tokens and merge_tokens pick the same partners as
    the references (keys a strided slice of a packed projection, as attention hands them over): same sizes, same
    tokens up to the merge's rounding."""
    from hiap_kernels import merge_tokens, nearest_tokens

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 33, 12, generator=generator)
    size = torch.randint(1, 4, (2, 33, 1), generator=generator).float()
    keys = torch.randn(2, 33, 3 * 20, generator=generator).to(dtype)[..., 20:40]
    cls = torch.rand(2, 33, generator=generator)
    for step in (lambda **ops: importance_merge(x, size, keys, cls, 7, **ops),
                 lambda **ops: bipartite_soft_matching(x, size, keys, 7, **ops)):
        expected, expected_size = step()
        got, got_size = step(merge=merge_tokens, nearest=nearest_tokens)
        assert torch.equal(got_size, expected_size)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


class _ResidualStreamWrites(TorchDispatchMode):
    """Counts the ops that write a new tensor as large as a step's output (in-place ops and views excluded)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.writes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and not func.is_view and isinstance(out, torch.Tensor) \
                and out.numel() >= self.numel and out._base is None:
            self.writes.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("step", ["prune", "merge", "tome"])
def test_a_step_writes_the_residual_stream_once_prefix_included(step):
    """The prefix tokens ride along in the step's gather or merge: no split and concatenation of the residual stream,
    and the size-weighted merge runs in place on what it gathered."""
    generator = torch.Generator().manual_seed(0)
    batch, prefix, patches, channels, width, r = 2, 3, 20, 16, 12, 5
    x = torch.randn(batch, prefix + patches, channels, generator=generator)
    keys = torch.randn(batch, prefix + patches, width, generator=generator)
    cls = torch.rand(batch, prefix + patches, generator=generator)
    size = torch.rand(batch, prefix + patches, 1, generator=generator) + 1
    size[:, :prefix] = 1.0
    run = {"prune": lambda: redundancy_prune(x, size, keys, cls, r, prefix=prefix),
           "merge": lambda: importance_merge(x, size, keys, cls, r, prefix=prefix),
           "tome": lambda: bipartite_soft_matching(x, size, keys, r, prefix=prefix)}[step]
    with _ResidualStreamWrites(batch * (prefix + patches - r) * channels) as counted:
        out, out_size = run()
    assert counted.writes == [counted.writes[0]], counted.writes
    assert out.shape == (batch, prefix + patches - r, channels) and out_size.shape == (batch, prefix + patches - r, 1)
    assert torch.equal(out[:, :prefix], x[:, :prefix]) and (out_size[:, :prefix] == 1).all()


def test_rapid_and_tome_alone_take_the_default_amount():
    for kind in ("rapid", "tome"):
        assert parse_schedule(kind, 12, 196, 1) == parse_schedule(f"{kind}:keep=0.6", 12, 196, 1)
        alone, spelled = (tiny_vit(img_size=64, depth=6) for _ in range(2))
        reduce_tokens(alone, kind)
        reduce_tokens(spelled, f"{kind}:keep=0.6")
        assert hiap.count_macs(alone) == hiap.count_macs(spelled) < hiap.count_macs(tiny_vit(img_size=64, depth=6))
    with pytest.raises(ValueError, match="not both"):
        parse_schedule("rapid:r=2,keep=0.5", 12, 196, 1)
