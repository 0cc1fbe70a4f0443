"""The Python API refuses a bad argument with the exception its docstring promises, naming the argument: a value
out of range is a ValueError, a value of the wrong type a TypeError; and it reports what really runs."""

from __future__ import annotations

import pytest
import torch

import hiap
from hiap import backend
from tests.helpers import images, randomize_logits, tiny_vit


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    gated = hiap.gate_vit(tiny_vit())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    return hiap.save_pruned(hiap.extract(gated), tmp_path_factory.mktemp("api") / "pruned.safetensors")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "", "cpu:-3"])
def test_an_unknown_device_is_a_value_error(pruned_file, device):
    model = hiap.load_pruned(pruned_file)
    with pytest.raises(ValueError, match="device"):
        hiap.optimize(model, device=device)
    with pytest.raises(ValueError, match="device"):
        hiap.load_pruned(pruned_file, device)


@pytest.mark.parametrize("device", [3.5, object(), ["cpu"]])
def test_a_device_of_the_wrong_type_is_a_type_error(pruned_file, device):
    model = hiap.load_pruned(pruned_file)
    with pytest.raises(TypeError, match="device"):
        hiap.optimize(model, device=device)
    with pytest.raises(TypeError, match="device"):
        hiap.load_pruned(pruned_file, device)


def test_a_missing_gpu_is_a_value_error(pruned_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="cuda"):
        hiap.load_pruned(pruned_file, "cuda")


def test_other_arguments_of_the_wrong_type_are_type_errors_naming_them(pruned_file):
    model = hiap.load_pruned(pruned_file)
    with pytest.raises(TypeError, match="dtype"):
        hiap.optimize(model, dtype="float32")
    with pytest.raises(TypeError, match="path"):
        hiap.load_pruned(12)
    with pytest.raises(TypeError, match="path"):
        hiap.save_pruned(model, 12)
    with pytest.raises(TypeError, match="path"):
        hiap.read_layout(None)


@pytest.mark.parametrize("switch", [hiap.use_triton_kernels, hiap.use_reference_kernels, hiap.kernels_in_use])
@pytest.mark.parametrize("model", ["triton", 3, tiny_vit().state_dict()])
def test_the_kernel_switch_takes_a_model_or_nothing(switch, model):
    with pytest.raises(TypeError, match="model"):
        switch(model)
    assert hiap.kernels_in_use() == "reference"


@pytest.mark.parametrize("cfg", ["x", {"target": 0.5}, 0.5])
def test_gate_vit_takes_a_config_or_nothing(cfg):
    with pytest.raises(TypeError, match="cfg"):
        hiap.gate_vit(tiny_vit(), cfg)
    with pytest.raises(TypeError, match="model"):
        hiap.gate_vit("deit_small_patch16_224")


def test_more_heads_kept_than_a_layer_has_is_refused_not_clamped():
    with pytest.raises(ValueError, match="min_heads=4 is more than the 3 heads"):
        hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(min_heads=4))
    assert hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(min_heads=3)).cfg.min_heads == 3


def test_the_kernels_in_use_are_those_that_run_where_the_model_is(monkeypatch):
    """On a CPU without the Triton interpreter a Triton-switched model runs the PyTorch path (warning once), and
    says so."""
    pytest.importorskip("triton")
    gated = hiap.gate_vit(tiny_vit()).eval()
    hiap.use_reference_kernels(gated)
    backend.missing_triton_ops()  # the kernels are defined (imported) as every test here runs them, before the switch
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_warned_fallback", True)
    with hiap.use_triton_kernels(gated):
        assert hiap.kernels_in_use(gated) == "reference"
        gated(images(gated))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with hiap.use_triton_kernels(gated):
        assert hiap.kernels_in_use(gated) == "triton"


@pytest.mark.parametrize("schedule", [5, None, [1, 2], "rapid:r=2".encode()])
def test_a_token_schedule_of_the_wrong_type_is_a_type_error_naming_it(schedule):
    with pytest.raises(TypeError, match="schedule"):
        hiap.reduce_tokens(tiny_vit(), schedule)
    with pytest.raises(TypeError, match="steps"):
        hiap.TokenSchedule("p1,-")


def test_build_vit_takes_the_description_describe_vit_gives():
    with pytest.raises(TypeError, match="description"):
        hiap.build_vit("deit_small_patch16_224")
    description = hiap.describe_vit(tiny_vit())
    del description["depth"]
    with pytest.raises(ValueError, match="depth"):
        hiap.build_vit(description)


@pytest.mark.parametrize("args", [("x", 10), (1, "10"), (1, 10, "2.0"), (1, 10, 2.0, None)])
def test_temperature_at_takes_numbers(args):
    with pytest.raises(TypeError, match="step|total_steps|tau0|tau_min"):
        hiap.temperature_at(*args)
