import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import hiap
from tests.helpers import images, randomize_logits, tiny_vit


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # DeiT-Tiny-sized, class token, qkv bias
        dict(class_token=False, global_pool="avg"),
        dict(qkv_bias=False, init_values=1e-2),  # LayerScale
        dict(reg_tokens=2, no_embed_class=True),
    ],
    ids=["deit-tiny", "no-class-token", "layerscale-no-qkv-bias", "registers"],
)
def test_gated_model_with_every_gate_open_reproduces_timm_exactly(overrides):
    args = dict(img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=10)
    args.update(overrides)
    model = VisionTransformer(**args).eval()
    gated = hiap.gate_vit(model, hiap.HiAPConfig()).eval()
    x = images(model)
    with torch.no_grad():
        assert torch.allclose(gated(x), model(x), rtol=0, atol=1e-6)


def test_timm_zoo_models_are_accepted():
    for name in ("deit_tiny_patch16_224", "vit_small_patch16_224"):
        model = timm.create_model(name, pretrained=False, img_size=32, num_classes=5).eval()
        gated = hiap.gate_vit(model).eval()
        x = images(model, batch=1)
        with torch.no_grad():
            assert torch.allclose(gated(x), model(x), atol=1e-6)


def test_the_input_model_is_left_untouched_and_gates_are_named():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gated = hiap.gate_vit(model, hiap.HiAPConfig(dim_group=8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = set(gated.gate_logits())
    assert {"blocks.0.attn.gates.head", "blocks.0.attn.gates.qk", "blocks.0.attn.gates.v",
            "blocks.1.mlp.gates.block", "blocks.1.mlp.gates.neuron"} <= names
    assert gated.gate_logits()["blocks.0.attn.gates.qk"].shape == (3, 2)
    assert gated.gate_logits()["blocks.0.mlp.gates.neuron"].shape == (24,)
    assert not set(gated.weight_parameters()) & {f"vit.{n}" for n in names}


def test_training_forward_samples_a_new_seed_each_step_and_eval_is_deterministic():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(init_logit=0.0)).train()
    x = images(gated)
    first, second = gated(x), gated(x)
    assert int(gated.gate_step) == 2 and not torch.allclose(first, second)
    gated.eval()
    assert torch.equal(gated(x), gated(x)) and int(gated.gate_step) == 2


def test_same_step_gives_the_same_gates():
    model = tiny_vit()
    a = hiap.gate_vit(model, hiap.HiAPConfig(init_logit=0.0)).train()
    b = hiap.gate_vit(model, hiap.HiAPConfig(init_logit=0.0)).train()
    x = images(model)
    assert torch.equal(a(x), b(x))


def test_set_temperature_reaches_every_module():
    gated = hiap.gate_vit(tiny_vit())
    gated.set_temperature(0.7)
    assert all(float(gates.schedule.tau) == pytest.approx(0.7) for gates in gated.gate_layers())
    assert all(gates.schedule is gated.schedule for gates in gated.gate_layers())
    with pytest.raises(ValueError):
        gated.set_temperature(0.0)


class NotAViT(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NotAViT(), "VisionTransformer"),
        (lambda: timm.create_model("resnet18", pretrained=False), "VisionTransformer"),
        (lambda: tiny_vit(qk_norm=True), "qk_norm"),
        (lambda: tiny_vit(global_pool="map"), "global_pool"),
    ],
    ids=["plain-module", "resnet", "qk-norm", "attention-pool"],
)
def test_unsupported_models_are_rejected_clearly(build, message):
    with pytest.raises(hiap.UnsupportedModelError, match=message):
        hiap.gate_vit(build())


def test_bad_dim_group_and_double_gating_are_rejected():
    with pytest.raises(ValueError, match="dim_group"):
        hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(dim_group=5))
    with pytest.raises(ValueError, match="gated already"):
        hiap.gate_vit(hiap.gate_vit(tiny_vit()))


def test_gradients_reach_weights_and_every_gate_logit():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(init_logit=0.5)).train()
    randomize_logits(gated, torch.Generator().manual_seed(1), scale=0.5)
    gated(images(gated)).square().mean().backward()
    for name, logit in gated.gate_logits().items():
        assert logit.grad is not None and torch.isfinite(logit.grad).all(), name
    assert gated.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_training_forward_compiles_with_inductor_in_one_graph():
    # Guards the Philox twin staying opaque to inductor (unrolled inline it made compilation run for many minutes).
    gated = hiap.gate_vit(tiny_vit(depth=1), hiap.HiAPConfig(init_logit=0.0)).train()
    x = images(gated)
    expected = gated.vit(x)
    compiled = torch.compile(gated.vit, fullgraph=True)
    assert torch.allclose(compiled(x), expected, atol=1e-5)
    with torch.no_grad():  # with a head and two neuron groups retired: their gathers are in the one graph too
        gated.gate_logits()["blocks.0.attn.gates.head"][1] = -8.0
        gated.gate_logits()["blocks.0.mlp.gates.neuron"][:2] = -8.0
    assert gated.retire_closed(0.01)["neuron_groups"] == 2
    assert torch.allclose(compiled(x), gated.vit(x), atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_an_annealed_training_run_compiles_once(backend):
    """tau and the step seed are device tensors the samplers read: a new temperature and seed every step reuse the
    graph (forward and backward) instead of recompiling it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hiap_kernels import interpreter_active

    if backend == "triton" and not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs a GPU or the Triton interpreter")
    gated = hiap.gate_vit(tiny_vit(depth=1), hiap.HiAPConfig(init_logit=0.5)).train()
    if backend == "triton":
        hiap.use_triton_kernels(gated)
    x = images(gated)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gated.vit, backend="aot_eager", fullgraph=True)
    losses = []
    for step, tau in enumerate((2.0, 1.3, 0.9)):
        gated.set_temperature(tau)
        gated.schedule.set_seed(hiap.method.gates.step_seed(0, step))
        loss = compiled(x).square().mean()
        loss.backward()
        reference = gated.vit(x).square().mean()
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        losses.append(float(loss.detach()))
    assert counters["stats"]["unique_graphs"] == 1 and len(set(losses)) > 1
    torch._dynamo.reset()


def _retired_twin(gated: hiap.HiAPViT) -> hiap.HiAPViT:
    """A copy of ``gated`` without retirement whose retired gates are forced shut by their logits: what retirement
    must compute (a retired gate is closed and its logits learn nothing from the task)."""
    import copy

    twin = copy.deepcopy(gated)
    twin.set_retired({})
    logits = twin.gate_logits()
    with torch.no_grad():
        for name, mask in gated.retired().items():
            logit = logits[f"{name}.gates.head" if "attn" in name else f"{name}.gates.neuron"]
            logit[mask.to(logit.device)] = -1e4
    return twin


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_retired_heads_and_neurons_are_closed_and_cost_nothing_while_the_other_gates_sample(path):
    from hiap_kernels import interpreter_active

    if path == "triton" and not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs a GPU or the Triton interpreter")
    _check_retirement(path, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_retirement_on_the_gpus_kernels_gpu():
    """The same on the compiled kernels (``pytest -m gpu`` runs only marked tests)."""
    _check_retirement("triton", "cuda")


def _check_retirement(path: str, device: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig()).to(device).train()
    randomize_logits(gated, torch.Generator().manual_seed(3))
    logits = gated.gate_logits()
    with torch.no_grad():
        logits["blocks.0.attn.gates.head"][1] = -8.0  # a head gate closed for good
        logits["blocks.1.attn.gates.v"][2] = -8.0  # every v group of a head
        logits["blocks.0.mlp.gates.neuron"][:3] = -8.0  # three neuron groups
        logits["blocks.1.mlp.gates.block"].fill_(-8.0)  # a whole FFN block
        logits["blocks.1.mlp.gates.neuron"][0] = -8.0  # (its groups are retired with it)
    counts = gated.retire_closed(0.01)
    retired = gated.retired()
    assert counts == {"heads": 2, "heads_total": 6, "neuron_groups": 15, "neuron_groups_total": 24}
    assert retired["blocks.0.attn"].tolist() == [False, True, False] and retired["blocks.1.mlp"].all()
    twin = _retired_twin(gated)
    x = images(gated, batch=3, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        eval_before = gated.eval()(x)
    gated.train()
    with hiap.use_triton_kernels(gated) if path == "triton" else hiap.use_reference_kernels(gated):
        with FlopCounterMode(display=False) as retired_flops:
            out = gated(x)
        out.square().mean().backward()
    with FlopCounterMode(display=False) as full_flops:
        expected = twin(x)
    expected.square().mean().backward()
    # The same draw of every live gate (the same step's seed, the same Philox counters), the retired ones closed.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = dict(twin.named_parameters())
    for name, parameter in gated.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, mask in retired.items():  # the retired gates learn nothing from the task
        kind = "head" if "attn" in name else "neuron"
        assert logits[f"{name}.gates.{kind}"].grad[mask.to(device)].abs().max() == 0

    def linear_flops(counter) -> int:
        counts = counter.get_flop_counts()["Global"].items()
        return sum(n for op, n in counts if str(op).split(".")[1] in ("mm", "addmm"))

    # Two heads of 16 (qkv's 48 rows and proj's 16 columns each) and 15 neuron groups of 16 (fc1 rows, fc2 columns).
    batch, tokens, width, head_dim, neuron_group = 3, 17, 48, 16, 16
    saved = 2 * 2 * 4 * head_dim * batch * tokens * width + 15 * neuron_group * 2 * 2 * batch * tokens * width
    assert linear_flops(full_flops) - linear_flops(retired_flops) == saved
    with torch.no_grad():  # eval mode applies the decision and ignores retirement
        torch.testing.assert_close(gated.eval()(x), eval_before, rtol=0, atol=0)
    gated.set_retired({})
    assert gated.retired_counts()["heads"] == 0 and gated.attention_layers()[0].live_rows is None


def test_retirement_keeps_what_the_decision_keeps_and_rejects_bad_masks():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(min_heads=1, min_neuron_fraction=0.25))
    with torch.no_grad():
        for logit in gated.gate_logits().values():
            logit.fill_(-8.0)
        gated.gate_logits()["blocks.0.attn.gates.head"][2] = -7.0
        gated.gate_logits()["blocks.0.mlp.gates.block"].fill_(1.0)
    retired = {name: mask.tolist() for name, mask in (gated.retire_closed(0.01), gated.retired())[1].items()}
    # The decision's minimums keep one head per layer (the top logit) and a quarter of a kept block's neuron groups.
    assert retired["blocks.0.attn"] == [True, True, False] and sum(retired["blocks.1.attn"]) == 2
    assert sum(retired["blocks.0.mlp"]) == 12 - 3 and all(retired["blocks.1.mlp"])
    assert hiap.count_macs(gated) == hiap.count_macs(hiap.extract(gated))
    with pytest.raises(ValueError, match="bool tensor of shape \\(3,\\)"):
        gated.attention_layers()[0].retire(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no gated modules named"):
        gated.set_retired({"blocks.9.attn": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="retire_below must lie in"):
        gated.retire_closed(0.7)
