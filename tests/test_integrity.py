"""A file is loaded as written or refused: the digest of a pruned model covers its layout, that of a training
checkpoint its settings; a layout is compared with the weights' shapes before anything is allocated from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hiap
from hiap.app.checkpoint import read_checkpoint
from hiap.app.runtime import InputError
from hiap.files import DIGEST_KEY, save_safetensors, tensor_digest, tensors_in
from tests.cli_runs import run_cli, warm_run  # noqa: F401
from tests.helpers import images, randomize_logits, tiny_vit

REPO = Path(__file__).resolve().parents[1]


def _pruned_file(tmp_path) -> Path:
    gated = hiap.gate_vit(tiny_vit())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    return hiap.save_pruned(hiap.extract(gated), tmp_path / "pruned.safetensors")


def _rewrite(path: Path, target: Path, edit_layout=None, digest=None) -> Path:
    """``path``'s tensors under a layout changed by ``edit_layout``, with ``digest`` (default: the one it had)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    layout = json.loads(metadata["hiap_layout"])
    if edit_layout is not None:
        edit_layout(layout)
    metadata["hiap_layout"] = json.dumps(layout)
    if digest is not None:
        metadata[DIGEST_KEY] = digest
    save_file(load_file(str(path)), str(target), metadata=metadata)
    return target


def test_an_edited_scale_in_the_layout_is_refused_though_the_tensors_are_intact(tmp_path, capsys):
    path = _pruned_file(tmp_path)
    scale = hiap.read_layout(path)["layers"][0]["scale"]
    edited = _rewrite(path, tmp_path / "edited.safetensors",
                      lambda layout: layout["layers"][0].update(scale=scale + 0.6))
    assert hiap.read_layout(edited)["layers"][0]["scale"] == scale + 0.6  # a valid layout: only the digest knows
    with pytest.raises(ValueError, match="damaged or was edited"):
        hiap.load_pruned(edited)
    assert run_cli("eval", edited, "--model-args", "depth=2") == 2
    error = capsys.readouterr().err.strip()
    assert "damaged or was edited" in error and len(error.splitlines()) == 1


def test_every_metadata_entry_is_sealed(tmp_path):
    path = save_safetensors({"w": torch.ones(2)}, tmp_path / "teacher.safetensors", {"hiap_teacher": '{"seed": 0}'})
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata["hiap_teacher"] = '{"seed": 1}'
    save_file({"w": torch.ones(2)}, str(path), metadata=metadata)
    from hiap.app.models import read_state_dict

    with pytest.raises(InputError, match="damaged or was edited"):
        read_state_dict(path)


def test_a_file_sealed_by_an_earlier_version_loads_with_a_warning_and_its_tensors_checked(tmp_path):
    path = _pruned_file(tmp_path)
    old_digest = tensor_digest(load_file(str(path)))
    old = _rewrite(path, tmp_path / "old.safetensors", digest=old_digest)
    with pytest.warns(UserWarning, match="covers the tensors only: its layout and pretrained_cfg cannot be verified"):
        model = hiap.load_pruned(old)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), hiap.load_pruned(path)(x))
    resealed = hiap.save_pruned(model, tmp_path / "resealed.safetensors")  # what the warning says to do
    hiap.load_pruned(resealed)
    state = load_file(str(path))
    state[next(iter(state))] = state[next(iter(state))] + 1
    save_file(state, str(tmp_path / "flipped.safetensors"), metadata={
        "hiap_layout": json.dumps(hiap.read_layout(path)), DIGEST_KEY: old_digest})
    with pytest.raises(ValueError, match="damaged"):
        hiap.load_pruned(tmp_path / "flipped.safetensors")


def _edited_checkpoint(source: Path, target: Path, edit) -> Path:
    payload = torch.load(source, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


def test_an_edited_setting_in_a_checkpoint_is_refused(warm_run, tmp_path, capsys):  # noqa: F811
    source = warm_run.output / "checkpoint.pt"
    assert read_checkpoint(source, phase="hiap")["hiap_config"]["min_heads"] == 1
    for name, edit in (("min_heads", lambda p: p["hiap_config"].update(min_heads=4)),
                       ("history", lambda p: p["history"].pop()),
                       ("architecture", lambda p: p["architecture"].update(mlp_ratio=2.0)),
                       ("step", lambda p: p.update(step=p["step"] - 1))):
        edited = _edited_checkpoint(source, tmp_path / f"{name}.pt", edit)
        with pytest.raises(InputError, match="damaged or was edited"):
            read_checkpoint(edited)
        assert run_cli("extract", edited, "-o", tmp_path / "pruned.safetensors") == 2
        error = capsys.readouterr().err.strip()
        assert "damaged or was edited" in error and len(error.splitlines()) == 1, name
        assert not (tmp_path / "pruned.safetensors").exists()


def test_a_checkpoint_sealed_by_an_earlier_version_loads_with_a_warning(warm_run, tmp_path):  # noqa: F811
    def tensors_only(payload):
        del payload["digest"]
        payload["digest"] = tensor_digest(tensors_in(payload))

    old = _edited_checkpoint(warm_run.output / "checkpoint.pt", tmp_path / "old.pt", tensors_only)
    with pytest.warns(UserWarning, match="its settings .* cannot be verified"):
        payload = read_checkpoint(old, phase="hiap")
    assert payload["hiap_config"]["min_heads"] == 1


def _huge_layout(layout: dict) -> None:
    """An in-bounds layout of a 2048-wide, 8-deep model (about 400 M parameters), for a file that holds a tiny one."""
    layout["architecture"].update(embed_dim=2048, depth=8, num_heads=32, head_dim=64, mlp_ratio=4.0)
    layout["layers"] = [{"qk_widths": [64] * 32, "v_widths": [64] * 32, "scale": 0.125, "ffn_width": 8192}] * 8
    layout.pop("alignment", None)


def test_a_layout_larger_than_the_weights_is_refused_before_its_model_is_allocated(tmp_path, capsys):
    path = _pruned_file(tmp_path)
    layout = hiap.read_layout(path)
    _huge_layout(layout)
    crafted = save_safetensors(load_file(str(path)), tmp_path / "crafted.safetensors",
                               {"hiap_layout": json.dumps(layout)})  # sealed: the digest holds, the shapes do not
    assert crafted.stat().st_size < 200_000
    script = ("import resource, sys\nimport hiap\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    hiap.load_pruned(sys.argv[1])\nexcept ValueError as error:\n    print(error)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    done = subprocess.run([sys.executable, "-c", script, str(crafted)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    message, grown_kib = done.stdout.strip().splitlines()
    assert "do not match the stored layout" in message
    assert int(grown_kib) < 200_000, f"{int(grown_kib) / 1e6:.1f} GB allocated"  # the model would take 1.6 GB
    assert run_cli("eval", crafted) == 2
    error = capsys.readouterr().err.strip()
    assert "do not match the stored layout" in error and len(error.splitlines()) == 1


def test_a_model_too_large_for_memory_is_a_one_line_value_error(tmp_path, monkeypatch):
    import hiap.method.extract as extract_module

    path = _pruned_file(tmp_path)
    build = extract_module.build_pruned_skeleton

    def no_memory(layout):
        if torch.empty(0).device.type == "meta":  # shapes only: no memory needed
            return build(layout)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 274877906944 bytes.")

    monkeypatch.setattr(extract_module, "build_pruned_skeleton", no_memory)
    with pytest.raises(ValueError, match="not enough memory to build its model") as error:
        hiap.load_pruned(path)
    assert len(str(error.value).splitlines()) == 1
