"""The inference path of a pruned model: ``hiap.optimize``, one compiled graph, no host synchronisation.

Without a GPU these run the PyTorch path and, under the Triton interpreter, the Triton path; what a CUDA graph
needs from the forward (no host sync, static shapes, no data-dependent control flow) is checked on both.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hiap
import hiap.method.inference as inference
import hiap_kernels
from hiap_kernels import interpreter_active
from tests.helpers import LaunchingOps, images, randomize_logits, tiny_vit

NO_MINIMUMS = dict(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)
needs_triton_path = pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_active()),
                                       reason="needs a GPU or the Triton interpreter")


def pruned_model(seed: int = 0, **cfg):
    gated = hiap.gate_vit(tiny_vit(depth=3, num_heads=6, embed_dim=96), hiap.HiAPConfig(**{**NO_MINIMUMS, **cfg}))
    randomize_logits(gated, torch.Generator().manual_seed(seed))
    return hiap.extract(gated)


class HostSyncs(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device (``.item()``, ``bool(t)``, ``nonzero`` ...)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_active()), reason="needs a GPU or the Triton interpreter"))]


def _on_backend(model, backend):
    if backend == "triton":
        hiap.use_triton_kernels(model)
        for block in model.blocks:
            block.attn.attention_path = "triton"  # every layer, ragged or not, through the kernel
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_forward_never_waits_for_the_device(backend):
    model = _on_backend(pruned_model(), backend)
    x = images(model, batch=2)
    with torch.no_grad():
        model(x)  # first call: autotuning and table checks may touch the host once
        with HostSyncs() as mode:
            model(x)
    assert mode.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pruned_model_compiles_into_one_graph_on_each_backend(backend):
    import torch._dynamo

    model = _on_backend(pruned_model(seed=1), backend)
    assert any(len(block.attn.runs) > 1 for block in model.blocks)  # ragged layers are part of the graph
    x = images(model, batch=2)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_optimize_prepares_the_model_and_names_its_paths():
    model = pruned_model(seed=2)
    x = images(model, batch=3)
    with torch.no_grad():
        expected = model(x)
    optimized = hiap.optimize(model, batch_size=3)
    assert optimized is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # No GPU: nothing to choose from, every layer takes the PyTorch paths.
    assert {choice["attention"] for choice in model.hiap_paths} <= {"sdpa", None}
    assert {choice["ffn"] for choice in model.hiap_paths} <= {"linear", None}
    assert "attention: sdpa" in hiap.method.inference.describe_paths(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_optimize_keeps_only_the_path_that_measured_fastest(monkeypatch):
    model = pruned_model(seed=3)
    block = model.blocks[0]
    layer_input = torch.randn(2, 17, 96)
    timings = {"sdpa": 2.0, "triton": 1.0}
    monkeypatch.setattr(inference, "_median_ms", lambda call, device: timings[block.attn.attention_path])
    memo = {}
    assert inference._choose(block.attn, "attention_path", ("sdpa", "triton"), layer_input, ("k",), memo) == "triton"
    timings.update(sdpa=0.5)
    # Remembered per key: the same shape on the same device is not timed again ...
    assert inference._choose(block.attn, "attention_path", ("sdpa", "triton"), layer_input, ("k",), memo) == "triton"
    # ... another shape is.
    assert inference._choose(block.attn, "attention_path", ("sdpa", "triton"), layer_input, ("k2",), memo) == "sdpa"
    assert block.attn.attention_path == "sdpa"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
        (dict(dtype=torch.int8), "not supported"),
        (dict(device="meta"), "device meta is not supported"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_optimize_refuses_what_the_kernels_do_not_run_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        hiap.optimize(pruned_model(), **kwargs)
    assert "\n" not in str(error.value)


def test_optimize_leaves_a_dense_timm_model_correct():
    model = tiny_vit()
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(hiap.optimize(model)(x), expected)
    assert all(choice["attention"] is None and choice["ffn"] is None for choice in model.hiap_paths)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of a model moved to a dtype the kernels lack")
def test_a_pruned_model_in_float64_on_the_triton_backend_says_so_in_one_line():
    if not interpreter_active():
        pytest.skip("needs the Triton interpreter")
    model = _on_backend(pruned_model(), "triton").double()
    with torch.no_grad(), pytest.raises(TypeError, match="float64") as error:
        model(images(model).double())
    assert "\n" not in str(error.value)


@needs_triton_path
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_fused_block_forward_equals_the_block(init_values):
    """proj and fc2 with bias, LayerScale and the residual add in their GEMM epilogues give the block's output."""
    from hiap.method.pruned import fused_block_forward

    gated = hiap.gate_vit(tiny_vit(init_values=init_values), hiap.HiAPConfig(dim_group=1, min_heads=1))
    randomize_logits(gated, torch.Generator().manual_seed(4))
    model = hiap.extract(gated.eval()).requires_grad_(False)
    x = torch.randn(2, 17, model.embed_dim)
    with torch.no_grad():
        expected = [block(x) for block in model.blocks]
        hiap.use_triton_kernels(model)  # the fused block runs the kernels its halves resolved
        for block, reference in zip(model.blocks, expected):
            assert block.attn.kernels["fused_linear_residual"] is hiap_kernels.fused_linear_residual
            torch.testing.assert_close(fused_block_forward(block, x), reference, rtol=1e-5, atol=1e-5)
        hiap.use_reference_kernels(model)  # and where they do not run, the block as timm runs it
        for block, reference in zip(model.blocks, expected):
            torch.testing.assert_close(fused_block_forward(block, x), reference, rtol=1e-5, atol=1e-5)


def test_optimize_fuses_a_block_only_when_that_measured_faster(monkeypatch):
    from hiap.method.pruned import fused_block_forward

    model = pruned_model(seed=3)
    block = model.blocks[0]
    layer_input = torch.randn(2, 17, 96)
    timings = {"modules": 1.0, "fused": 2.0}
    calls = iter(["modules", "fused"] * 4)
    monkeypatch.setattr(inference, "_median_ms", lambda call, device: timings[next(calls)])
    memo = {}
    assert inference._choose_block(block, layer_input, ("b",), memo) == "modules" and "forward" not in block.__dict__
    timings.update(fused=0.5)
    assert inference._choose_block(block, layer_input, ("b2",), memo) == "fused"
    assert block.forward.__func__ is fused_block_forward and block.forward.__self__ is block
    # Chosen again for another shape: the patched forward is taken off before timing and put back only if it wins.
    timings.update(fused=3.0)
    assert inference._choose_block(block, layer_input, ("b3",), memo) == "modules" and "forward" not in block.__dict__
    # A block that token reduction patched keeps its forward.
    hiap.reduce_tokens(model, "t2,-,-")
    assert inference._choose_block(model.blocks[0], layer_input, ("b4",), memo) == "modules"
    assert "hiap_token_plan" in model.blocks[0].__dict__


@pytest.mark.parametrize("overrides", [dict(), dict(in_chans=1, patch_size=4), dict(embed_dim=48, img_size=(32, 48))])
def test_patch_embedding_as_one_gemm_equals_the_convolution(overrides):
    model = tiny_vit(**overrides)
    x = images(model, batch=3)
    with torch.no_grad():
        expected = model.patch_embed(x)
        got = inference.gemm_patch_embed_forward(model.patch_embed, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert inference._gemm_patch_embed_applies(model.patch_embed)
    assert not inference._gemm_patch_embed_applies(tiny_vit(dynamic_img_size=True).patch_embed)


def test_optimize_takes_the_patch_embedding_gemm_only_when_it_measured_faster(monkeypatch):
    model = tiny_vit()
    x = images(model, batch=2)
    timings = {"conv": 1.0, "gemm": 2.0}
    calls = iter(["conv", "gemm"] * 3)
    monkeypatch.setattr(inference, "_median_ms", lambda call, device: timings[next(calls)])
    memo = {}
    assert inference._choose_patch_embed(model.patch_embed, x, ("p",), memo) == "conv"
    assert "forward" not in model.patch_embed.__dict__
    timings.update(gemm=0.5)
    assert inference._choose_patch_embed(model.patch_embed, x, ("p2",), memo) == "gemm"
    assert model.patch_embed.forward.__func__ is inference.gemm_patch_embed_forward
    with torch.no_grad():
        patched = model(x)
        del model.patch_embed.forward
        torch.testing.assert_close(patched, model(x), rtol=1e-5, atol=1e-5)


@needs_triton_path
def test_a_fused_block_launches_half_a_dense_blocks_ops_and_a_removed_half_one_add():
    """Four fused GEMMs and the ragged attention against the ten ops of a dense timm block; a half with no head or no
    neuron left is one add of its bias, its LayerNorm skipped: what a launch-bound batch 1 pays for."""
    import types

    from hiap.method.pruned import fused_block_forward

    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(min_heads=0, min_neuron_fraction=0.0, init_logit=3.0))
    with torch.no_grad():
        gated.gate_logits()["blocks.1.attn.gates.head"].fill_(-3.0)  # block 1: no head left
        gated.gate_logits()["blocks.2.mlp.gates.block"].fill_(-3.0)  # block 2: no FFN left
    model = _on_backend(hiap.extract(gated.eval()).requires_grad_(False), "triton")
    dense = tiny_vit(depth=1).eval()
    x = torch.randn(2, 17, model.embed_dim)
    launches = []
    for block in [dense.blocks[0], *model.blocks]:
        if block is not dense.blocks[0]:
            block.attn.attention_path = "triton"
            block.forward = types.MethodType(fused_block_forward, block)
        with torch.no_grad(), LaunchingOps() as ops:
            out = block(x)
        launches.append(ops.count)
        if block is not dense.blocks[0]:
            torch.testing.assert_close(out, block.__class__.forward(block, x), rtol=1e-5, atol=1e-5)
    assert launches == [10, 5, 3, 4], launches
