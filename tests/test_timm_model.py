"""A pruned model is a timm model: it carries the pretrained_cfg timm's data helpers read (stored in its file and
sealed there), it scripts where a timm ViT scripts, the command line's presets are in timm's registry, and its file
loads with timm and safetensors alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

import hiap
from hiap.app.models import PRESETS, create_dense_model
from hiap.app.runtime import InputError
from tests.helpers import images, randomize_logits, tiny_vit

NO_MINIMUMS = dict(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0)
DATA = Path(__file__).parent / "data"


def _digits_pruned() -> torch.nn.Module:
    """A pruned 1-block digits preset (1 x 16 x 16 inputs, mean 0.5, std 0.5, bilinear, no crop)."""
    gated = hiap.gate_vit(timm.create_model("hiap_digits_vit", depth=1), hiap.HiAPConfig())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    return hiap.extract(gated)


def _ragged_pruned() -> torch.nn.Module:
    """A pruned tiny ViT with heads of several widths, uniform-attention heads, an FFN and an attention layer gone."""
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(dim_group=1, **NO_MINIMUMS))
    randomize_logits(gated, torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.qk"][0].fill_(-5.0)  # head 0: no q/k dims, uniform attention
        gated.gate_logits()["blocks.1.mlp.gates.block"].fill_(-5.0)
        gated.gate_logits()["blocks.2.attn.gates.head"].fill_(-5.0)
    pruned = hiap.extract(gated)
    assert 0 in pruned.blocks[0].attn.qk_widths and len(pruned.blocks[0].attn.runs) > 1
    assert pruned.blocks[1].mlp.hidden_features == 0 and pruned.blocks[2].attn.num_heads == 0
    return pruned


DIGITS_DATA_CONFIG = {"input_size": (1, 16, 16), "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,),
                      "crop_pct": 1.0, "crop_mode": "center"}


def test_an_extracted_and_a_loaded_model_give_timm_the_data_config_they_read(tmp_path):
    pruned = _digits_pruned()
    assert resolve_data_config({}, model=pruned) == DIGITS_DATA_CONFIG
    assert pruned.default_cfg is pruned.pretrained_cfg and pruned.pretrained_cfg["num_classes"] == 10
    path = hiap.save_pruned(pruned, tmp_path / "digits.safetensors")
    loaded = hiap.load_pruned(path)
    assert resolve_data_config({}, model=loaded) == DIGITS_DATA_CONFIG
    assert loaded.pretrained_cfg == pruned.pretrained_cfg


def test_the_config_follows_the_model_not_the_timm_name_it_was_created_as():
    """A timm model created with one input channel, another image size and other classes: timm's own cfg still says
    3 x 224 x 224 and 1000 classes; the pruned model's says what it reads, the RGB normalisation averaged to gray."""
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, depth=1, num_classes=7)
    assert dense.pretrained_cfg["input_size"] == (3, 224, 224)
    pruned = hiap.extract(hiap.gate_vit(dense, hiap.HiAPConfig()))
    cfg = pruned.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["num_classes"] == 7
    assert cfg["mean"] == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert cfg["interpolation"] == dense.pretrained_cfg["interpolation"]
    assert "hf_hub_id" not in cfg and "url" not in cfg  # the dense weights' source is not this model's


def test_a_file_written_before_the_config_was_stored_loads_with_its_input_size():
    with pytest.warns(UserWarning, match="no digest"):
        pruned = hiap.load_pruned(DATA / "pruned_v1.safetensors")
    architecture = hiap.read_layout(DATA / "pruned_v1.safetensors")["architecture"]
    assert resolve_data_config({}, model=pruned)["input_size"] == (architecture["in_chans"], *architecture["img_size"])
    assert "mean" not in pruned.pretrained_cfg  # not stored: timm's default, as for any model without one


def _rewrite_cfg(path: Path, target: Path, edit) -> Path:
    """``path`` with its stored pretrained_cfg changed by ``edit`` and its digest kept."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    cfg = json.loads(metadata["hiap_pretrained_cfg"])
    edit(cfg)
    metadata["hiap_pretrained_cfg"] = json.dumps(cfg)
    save_file(load_file(str(path)), str(target), metadata=metadata)
    return target


def test_the_stored_config_is_sealed_and_checked_against_the_architecture(tmp_path):
    path = hiap.save_pruned(_digits_pruned(), tmp_path / "digits.safetensors")
    edited = _rewrite_cfg(path, tmp_path / "edited.safetensors", lambda cfg: cfg.update(mean=[0.25]))
    with pytest.raises(ValueError, match="damaged or was edited"):
        hiap.load_pruned(edited)
    for edit, message in ((lambda cfg: cfg.update(mean=[0.5, 0.5, 0.5]), r"pretrained_cfg.mean must be a list of 1"),
                          (lambda cfg: cfg.update(input_size=[1, 32, 32]), r"input_size must be the architecture's"),
                          (lambda cfg: cfg.update(std=[0.0]), r"pretrained_cfg.std\[0\]"),
                          (lambda cfg: cfg.update(hf_hub_id="timm/x"), r"unknown fields \['hf_hub_id'\]")):
        bad = _rewrite_cfg(path, tmp_path / "bad.safetensors", edit)
        with pytest.raises(ValueError, match=message):
            hiap.load_pruned(bad)
    unparsable = tmp_path / "unparsable.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), "hiap_pretrained_cfg": "{"}
    save_file(load_file(str(path)), str(unparsable), metadata=metadata)
    with pytest.raises(ValueError, match="pretrained_cfg metadata is not valid JSON"):
        hiap.load_pruned(unparsable)


@pytest.fixture(autouse=True)
def _torchscript_without_its_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(model)


def test_a_pruned_model_scripts_like_a_timm_vit(tmp_path):
    _script(tiny_vit())  # what timm itself scripts
    pruned = _ragged_pruned()
    x = images(pruned, batch=3)
    scripted = _script(pruned)
    with torch.no_grad():
        expected = pruned(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    torch.jit.save(scripted, str(tmp_path / "pruned.pt"))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "pruned.pt"))(x), expected, rtol=1e-5, atol=1e-5)
    loaded = hiap.load_pruned(hiap.save_pruned(pruned, tmp_path / "pruned.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_script(hiap.optimize(loaded))(x), expected, rtol=1e-5, atol=1e-5)


def test_a_block_bound_to_the_fused_kernels_scripts_to_timm_s_block_forward():
    """``hiap.optimize`` binds the fused Triton block forward where it measured faster (a GPU); TorchScript cannot
    launch Triton kernels, so the scripted block runs as timm's Block does, with the same result."""
    from hiap.method.pruned import fused_block_forward

    pruned = _ragged_pruned()
    x = images(pruned)
    with torch.no_grad():
        expected = pruned(x)
    for block in pruned.blocks:
        block.forward = types.MethodType(fused_block_forward, block)
    with torch.no_grad():
        torch.testing.assert_close(_script(pruned)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_presets_are_timm_models_with_the_data_config_they_are_trained_on(name):
    timm_name = PRESETS[name]
    assert timm_name.startswith("hiap_") and timm.is_model(timm_name) and timm_name in timm.list_models("hiap_*")
    torch.manual_seed(0)
    from_timm = timm.create_model(timm_name, num_classes=10)
    torch.manual_seed(0)
    from_cli, again = create_dense_model(name, 10), create_dense_model(timm_name, 10)
    assert all(torch.equal(a, b) for a, b in zip(from_timm.state_dict().values(), from_cli.state_dict().values()))
    assert again.pretrained_cfg == from_cli.pretrained_cfg
    config = resolve_data_config({}, model=from_timm)
    channels, height, width = config["input_size"]
    assert (channels, height, width) == (from_timm.patch_embed.proj.in_channels, *from_timm.patch_embed.img_size)
    assert len(config["mean"]) == len(config["std"]) == channels
    with pytest.raises(InputError, match="has no pretrained weights"):
        create_dense_model(timm_name, 10, pretrained=True)


def test_a_preset_built_at_another_size_reports_that_size():
    model = timm.create_model("hiap_digits_vit", img_size=32, in_chans=3, num_classes=4, depth=1)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["num_classes"] == 4


def _recipe() -> str:
    """The loading recipe in ``hiap.load_pruned``'s docstring, as code."""
    doc = hiap.load_pruned.__doc__
    match = re.search(r"::\n\n((?:        .*\n|\n)+)", doc)
    assert match, "load_pruned's docstring holds no code block"
    return textwrap.dedent(match.group(1))


def test_a_pruned_file_loads_with_timm_and_safetensors_alone(tmp_path):
    """The recipe of load_pruned's docstring, run in a process where hiap cannot be imported, rebuilds a model that
    computes what hiap's does and gives timm the same data config."""
    path = hiap.save_pruned(_ragged_pruned(), tmp_path / "pruned.safetensors")
    loaded = hiap.load_pruned(path)
    x = images(loaded, batch=3)
    torch.save(x, tmp_path / "images.pt")
    script = tmp_path / "load_with_timm.py"
    script.write_text(
        "import sys\n"
        "sys.modules['hiap'] = sys.modules['hiap_kernels'] = None  # any import of them fails\n"
        + _recipe()
        + "\nimport json\n"
        "from timm.data import resolve_data_config\n"
        "model = load_pruned_with_timm(sys.argv[1])\n"
        "assert 'hiap' not in {type(m).__module__.split('.')[0] for m in model.modules()}\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n"
        "print(json.dumps(resolve_data_config({}, model=model)))\n")
    result = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "images.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), loaded(x), rtol=1e-5, atol=1e-5)
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config == json.loads(json.dumps(resolve_data_config({}, model=loaded)))
