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
