"""What a user types that cannot work is one line on stderr and exit status 2, before any work: flags out of range,
paths that name the wrong kind of thing, images no machine can decode, a missing extra."""

from __future__ import annotations

import struct
import sys
import time
import zlib

import pytest

from tests.cli_runs import TINY, run_cli, warm_run  # noqa: F401


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith(f"hiap {command}: error: "), err
    return lines[0]


def test_more_heads_kept_than_the_model_has_is_refused_before_any_work(tmp_path, capsys):
    started = time.perf_counter()
    assert run_cli("prune", "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY,
                   "--min-heads", "1000") == 2
    message = _one_line_error(capsys, "prune")
    assert "--min-heads 1000" in message and "4 heads" in message
    assert time.perf_counter() - started < 30 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags, message", [(["--eval-batch-size", "0"], "--eval-batch-size must be > 0"),
                                            (["--latency-batch", "1000000000"], "--latency-batch 1000000000"),
                                            (["--latency-repeats", "0"], "--latency-repeats must be > 0")])
def test_eval_batch_flags_are_checked_before_any_work(warm_run, capsys, flags, message):  # noqa: F811
    assert run_cli("eval", warm_run.output / "pruned.safetensors", *flags) == 2
    assert message in _one_line_error(capsys, "eval")


def test_a_latency_batch_no_machine_holds_stops_prune_before_the_teacher(tmp_path, capsys):
    started = time.perf_counter()
    assert run_cli("prune", "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY,
                   "--latency-batch", "1000000000") == 2
    message = _one_line_error(capsys, "prune")
    assert "--latency-batch 1000000000" in message and "memory" in message
    assert time.perf_counter() - started < 30 and not (tmp_path / "cache").exists()


def test_a_latency_batch_that_fits_is_not_refused(warm_run, capsys):  # noqa: F811
    from hiap.app.evaluation import check_latency_batch
    from hiap.method.extract import load_pruned

    model = load_pruned(warm_run.output / "pruned.safetensors")
    check_latency_batch(model, 4096, "cpu")  # 4096 digits images: a few MB
    with pytest.raises(Exception, match="--latency-batch 1000000000"):
        check_latency_batch(model, 10**9, "cpu")


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels, with the pixel data of a 1 x 1 image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
            + chunk(b"IEND", b""))


def test_an_image_that_declares_billions_of_pixels_is_a_one_line_error(tmp_path, capsys):
    from PIL import Image

    from hiap.app.data import _image_loader
    from hiap.app.runtime import InputError

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(40000, 40000))
    with pytest.raises(InputError, match="40000 x 40000") as error:
        _image_loader("RGB")(str(bomb))
    assert str(bomb) in str(error.value)
    root = tmp_path / "data"
    for split in ("train", "val"):
        for index, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for item in range(2):
                Image.new("RGB", (24, 24), color=(90 * index, 30 * item, 40)).save(root / split / name / f"{item}.png")
    (root / "train" / "a" / "2.png").write_bytes(bomb.read_bytes())
    model = ["--model", "vit_tiny_patch16_224", "--model-args", "img_size=32", "patch_size=8", "depth=1",
             "embed_dim=32", "num_heads=2"]
    assert run_cli("prune", "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--data", root, *model,
                   "--batch-size", "5", "--teacher-epochs", "1", "--epochs", "1", "--no-progress",
                   "--latency-batch", "2", "--latency-repeats", "1") == 2
    assert "40000 x 40000" in _one_line_error(capsys, "prune")


def test_the_val_fraction_error_states_the_range_it_checks(tmp_path, capsys):
    for value in ("1.0", "0", "1.5"):
        assert run_cli("prune", "-o", tmp_path / "run", *TINY, "--val-fraction", value) == 2
        message = _one_line_error(capsys, "prune")
        assert f"--val-fraction must lie in (0.0, 1.0), got {float(value)}" in message


def test_a_folder_given_as_a_file_is_named_a_folder(warm_run, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "folder"
    folder.mkdir()
    for argv, command in ((["prune", "-o", tmp_path / "run", "--checkpoint", folder, *TINY], "prune"),
                          (["extract", folder], "extract"),
                          (["eval", folder], "eval"),
                          (["export", folder, "--onnx", tmp_path / "m.onnx"], "export")):
        assert run_cli(*argv) == 2
        message = _one_line_error(capsys, command)
        assert f"{folder} is a folder" in message and "does not exist" not in message
    assert run_cli("export", warm_run.output / "pruned.safetensors", "--onnx", folder) == 2
    assert f"{folder} is a folder" in _one_line_error(capsys, "export")
    assert run_cli("eval", warm_run.output / "pruned.safetensors", "--json", folder) == 2
    assert f"{folder} is a folder" in _one_line_error(capsys, "eval")


def test_export_without_the_onnx_extra_says_how_to_install_it(warm_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError, as where it is not installed
    onnx = tmp_path / "model.onnx"
    assert run_cli("export", warm_run.output / "pruned.safetensors", "--onnx", onnx) == 2
    assert 'pip install ".[onnx]"' in _one_line_error(capsys, "export")
    assert not onnx.exists()
