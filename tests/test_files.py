"""Nothing lost, nothing silently wrong: run-folder ownership, atomic writes, digests, validated layouts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hiap
from hiap.files import RunFolderBusy, RunFolderLock, atomic_path, remove_stale_temporaries, tensor_digest
from tests.cli_runs import TINY, run_cli, warm_run  # noqa: F401
from tests.helpers import images, randomize_logits, tiny_vit


def _flip_bytes(path, count: int = 64) -> None:
    """Flip ``count`` bytes in the last quarter of ``path`` (inside the tensor data, past the header)."""
    data = bytearray(path.read_bytes())
    start = len(data) * 3 // 4
    for index in range(start, start + count):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def _pruned(tmp_path):
    gated = hiap.gate_vit(tiny_vit())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    pruned = hiap.extract(gated)
    return pruned, hiap.save_pruned(pruned, tmp_path / "pruned.safetensors")


def test_a_damaged_pruned_file_is_refused_naming_the_file(tmp_path, capsys):
    pruned, path = _pruned(tmp_path)
    x = images(pruned)
    with torch.no_grad():
        assert torch.equal(hiap.load_pruned(path)(x), pruned(x))
    _flip_bytes(path)
    with pytest.raises(ValueError, match="damaged"):
        hiap.load_pruned(path)
    assert run_cli("eval", path, "--model-args", "depth=2") == 2
    assert "damaged" in capsys.readouterr().err


def test_equal_models_save_to_equal_bytes_in_any_process(tmp_path):
    """safetensors writes metadata in a per-process hash-map order; the header is rewritten with sorted keys, so a
    pruned file's checksum depends on the model alone."""
    import struct
    import subprocess
    import sys

    script = ("import sys, torch, hiap\n"
              "from tests.helpers import randomize_logits, tiny_vit\n"
              "torch.manual_seed(0)\n"
              "gated = hiap.gate_vit(tiny_vit())\n"
              "randomize_logits(gated, torch.Generator().manual_seed(0))\n"
              "hiap.save_pruned(hiap.extract(gated), sys.argv[1])\n")
    paths = [tmp_path / f"pruned{index}.safetensors" for index in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=str(Path(__file__).parent.parent))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    data = paths[0].read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + length])["__metadata__"]
    assert list(metadata) == sorted(metadata) == ["hiap_digest", "hiap_layout", "hiap_pretrained_cfg"]
    torch.manual_seed(0)
    pruned, _ = _pruned(tmp_path)
    loaded = hiap.load_pruned(paths[0])
    x = images(loaded)
    torch.testing.assert_close(loaded.eval()(x), pruned.eval()(x), rtol=0, atol=0)


def test_a_pruned_file_without_a_digest_still_loads_with_a_warning(tmp_path):
    pruned, path = _pruned(tmp_path)
    layout = hiap.read_layout(path)
    undigested = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(undigested),
              metadata={"hiap_layout": json.dumps(layout)})
    with pytest.warns(UserWarning, match="no digest"):
        hiap.load_pruned(undigested)


def test_a_damaged_checkpoint_is_a_one_line_error(warm_run, tmp_path, capsys):  # noqa: F811
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes((warm_run.output / "checkpoint.pt").read_bytes())
    _flip_bytes(damaged)
    assert run_cli("extract", damaged, "-o", tmp_path / "x.safetensors") == 2
    error = capsys.readouterr().err.strip()
    assert "damaged" in error or "corrupt" in error
    assert len(error.splitlines()) == 1


def test_a_second_run_into_a_folder_in_use_gets_a_one_line_error(warm_run, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "busy"
    with RunFolderLock(output):
        with pytest.raises(RunFolderBusy):
            RunFolderLock(output).__enter__()
        assert run_cli("prune", "-o", output, "--cache-dir", warm_run.cache, *TINY) == 2
    assert "another hiap run is writing into" in capsys.readouterr().err


def test_a_fresh_run_does_not_mix_with_an_earlier_one(warm_run, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "reused"
    output.mkdir()
    (output / "report.json").write_text("{}")
    (output / ".checkpoint.pt.abc.tmp").write_bytes(b"half a checkpoint")
    assert run_cli("prune", "-o", output, "--cache-dir", warm_run.cache, *TINY) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (output / ".checkpoint.pt.abc.tmp").exists()  # leftovers of an interrupted write are removed
    assert run_cli("prune", "-o", output, "--cache-dir", warm_run.cache, "--overwrite", *TINY) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["method"] == "hiap"
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert len({r["time"] for r in records if r.get("event") == "epoch"}) == len(
        [r for r in records if r.get("event") == "epoch"])


def test_an_output_path_that_names_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert run_cli("prune", "-o", target, *TINY) == 2
    assert "is a file" in capsys.readouterr().err


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "value.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / ".value.txt.x.tmp").write_text("left by a crash")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".value.txt.x.tmp"]


def test_the_digest_sees_every_byte_name_dtype_and_shape():
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.zeros(4, dtype=torch.int64)}
    base = tensor_digest(tensors)
    assert tensor_digest(dict(reversed(list(tensors.items())))) == base
    changed = {**tensors, "a": tensors["a"].clone()}
    changed["a"][1, 2] += 1e-6
    for variant in (changed, {**tensors, "a": tensors["a"].view(3, 2)}, {**tensors, "b": tensors["b"].int()},
                    {"c": tensors["a"], "b": tensors["b"]}):
        assert tensor_digest(variant) != base


def _layout_with(tmp_path, edit):
    _, path = _pruned(tmp_path)
    layout = hiap.read_layout(path)
    pruned = hiap.load_pruned(path)
    layout = edit(layout)
    edited = tmp_path / "edited.safetensors"
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(edited),
              metadata={"hiap_layout": json.dumps(layout)})
    return edited


def _set(layout, keys, value):
    node = layout
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return layout


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda l: _set(l, ["architecture", "depth"], 10**7), "depth"),
        (lambda l: _set(l, ["architecture", "embed_dim"], 10**9), "embed_dim"),
        (lambda l: _set(l, ["architecture", "act"], "relu"), "act"),
        (lambda l: _set(l, ["layers", 0, "scale"], float("nan")), "scale"),
        (lambda l: _set(l, ["layers", 0, "qk_widths"], [10**6]), "qk_widths"),
        (lambda l: _set(l, ["layers", 0, "ffn_width"], -3), "ffn_width"),
        (lambda l: _set(l, ["layers"], None), "layers"),
        (lambda l: _set(l, ["layers"], []), "layers"),
        (lambda l: _set(l, ["architecture"], []), "architecture"),
    ],
    ids=["huge-depth", "huge-width", "unknown-activation", "nan-scale", "wide-head", "negative-ffn", "null-layers",
         "no-layers", "array-architecture"],
)
def test_a_layout_is_validated_before_anything_is_allocated(tmp_path, edit, message):
    path = _layout_with(tmp_path, edit)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        hiap.load_pruned(path)
    assert time.perf_counter() - started < 5


def test_deeply_nested_layout_json_is_refused(tmp_path):
    _, path = _pruned(tmp_path)
    pruned = hiap.load_pruned(path)
    nested = tmp_path / "nested.safetensors"
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(nested),
              metadata={"hiap_layout": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="not valid JSON|unsupported layout"):
        hiap.load_pruned(nested)


def test_a_diverged_run_stops_with_one_line_and_saves_nothing(tmp_path):
    from hiap.app.data import digits_datasets
    from hiap.app.jobs import DenseJob
    from hiap.app.models import DIGITS_VIT, create_dense_model
    from hiap.app.runtime import DistContext, InputError
    from hiap.app.train import LoopSettings, fit

    model = create_dense_model(DIGITS_VIT, 10, model_args={"depth": 1, "embed_dim": 32})
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # every logit of class 0 is NaN from the first step
    checkpoint = tmp_path / "checkpoint.pt"
    settings = LoopSettings(epochs=1, batch_size=64, log_every=5, checkpoint_every=3, show_progress=False, amp=False)
    with pytest.raises(InputError, match="diverged") as error:
        fit(DenseJob(model, lr=1e-3), digits_datasets(model), settings, ctx=DistContext(), device=torch.device("cpu"),
            checkpoint_path=checkpoint, log=None, fingerprint={}, resume=False)
    assert len(str(error.value).splitlines()) == 1
    assert not checkpoint.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "-1"], "--workers"),
        (["--split-seed", "-1"], "--split-seed"),
        (["--weight-decay", "-5"], "--weight-decay"),
        (["--teacher-lr", "nan"], "--teacher-lr"),
        (["--dim-group", "3"], "does not divide"),
        (["--val-fraction", "1.5"], "--val-fraction"),
    ],
)
def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, capsys, flags, message):
    started = time.perf_counter()
    assert run_cli("prune", "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY, *flags) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert time.perf_counter() - started < 30  # refused up front, no teacher trained


def test_compare_seeds_and_export_options_are_checked(tmp_path, capsys):
    assert run_cli("compare", "--seeds", "-1", "-o", tmp_path / "c", *TINY) == 2
    assert "--seeds" in capsys.readouterr().err
    _, path = _pruned(tmp_path)
    for flags, message in ((["--opset", "1"], "--opset"), (["--atol", "-1"], "--atol")):
        onnx = tmp_path / "model.onnx"
        assert run_cli("export", path, "--onnx", onnx, *flags) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1 and not onnx.exists()


def test_unwritable_outputs_are_one_line_errors(warm_run, tmp_path, capsys):  # noqa: F811
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    pruned_path = warm_run.output / "pruned.safetensors"
    assert run_cli("eval", pruned_path, "--model-args", "depth=2", "embed_dim=32", "--json", a_file / "x.json") == 2
    assert "is a file" in capsys.readouterr().err
    assert run_cli("extract", warm_run.output / "checkpoint.pt", "-o", a_file / "x.safetensors") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_imagefolder_needs_two_classes_and_readable_images(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(root / split / "only" / "0.png")
    assert run_cli("prune", "--data", root, "-o", tmp_path / "run", *TINY) == 2
    assert "at least two" in capsys.readouterr().err
