"""Writes under faults: a full disk, a folder where a file goes, the umask, a locked run folder, a killed run's
leftovers."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

import hiap
from hiap.app.runtime import atomic_torch_save, atomic_write_json, atomic_write_text
from hiap.files import RunFolderBusy, RunFolderLock, atomic_path, save_safetensors
from tests.cli_runs import TINY, run_cli, warm_run  # noqa: F401
from tests.helpers import randomize_logits, tiny_vit

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _pruned():
    gated = hiap.gate_vit(tiny_vit())
    randomize_logits(gated, torch.Generator().manual_seed(0))
    return hiap.extract(gated)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _torch_save_on_a_full_disk(obj, path, *args, **kwargs):
    Path(path).write_bytes(b"half a checkpoint")
    raise RuntimeError(TORCH_FULL_DISK)


def _safetensors_on_a_full_disk(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"half a file")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _text_on_a_full_disk(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["torch", "safetensors", "text"])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer):
    path = tmp_path / "out" / "file.bin"
    path.parent.mkdir()
    path.write_bytes(b"the previous version")
    if writer == "torch":
        monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
        write = lambda: atomic_torch_save({"a": torch.zeros(3)}, path)  # noqa: E731
    elif writer == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_on_a_full_disk)
        write = lambda: save_safetensors({"a": torch.zeros(3)}, path, {})  # noqa: E731
    else:
        monkeypatch.setattr(Path, "write_text", _text_on_a_full_disk)
        write = lambda: atomic_write_text("x", path)  # noqa: E731
    with pytest.raises(OSError) as error:
        write()
    message = str(error.value)
    assert str(path) in message and "no space left" in message and len(message.splitlines()) == 1
    assert ".tmp" not in message
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the previous version" and not _leftovers(path.parent)


def test_extract_onto_a_full_disk_is_a_one_line_error_that_leaves_nothing(warm_run, tmp_path, monkeypatch,  # noqa: F811
                                                                         capsys):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_on_a_full_disk)
    target = tmp_path / "pruned.safetensors"
    assert run_cli("extract", warm_run.output / "checkpoint.pt", "-o", target) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hiap extract: error: ") and len(error.splitlines()) == 1
    assert str(target) in error and "no space left" in error
    assert list(tmp_path.iterdir()) == []


def test_a_full_cache_folder_stops_prune_with_one_line(warm_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    cache = tmp_path / "cache"
    assert run_cli("prune", "-o", tmp_path / "run", "--cache-dir", cache, *TINY, "--teacher-epochs", "1") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("hiap prune: error: ") and str(cache) in error and "no space left" in error
    assert not cache.exists() or not _leftovers(cache)


def test_writing_onto_a_folder_names_the_folder_not_a_temporary_file(warm_run, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder") as error:
        with atomic_path(folder) as tmp:
            tmp.write_text("x")
    assert ".tmp" not in str(error.value) and not _leftovers(tmp_path)
    assert run_cli("extract", warm_run.output / "checkpoint.pt", "-o", folder) == 2
    message = capsys.readouterr().err.strip()
    assert f"{folder} is a folder" in message and ".tmp" not in message and len(message.splitlines()) == 1
    assert list(folder.iterdir()) == []


def test_a_folder_that_refuses_writes_names_the_file_and_the_reason(tmp_path, monkeypatch):
    import tempfile

    def refused(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abc" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as error:
        atomic_write_text("x", tmp_path / "f.txt")
    message = str(error.value)
    assert message == f"cannot write {tmp_path / 'f.txt'}: permission denied" and ".tmp" not in message


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        written = [
            hiap.save_pruned(_pruned(), tmp_path / "pruned.safetensors"),
            atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "checkpoint.pt"),
            atomic_write_json({"a": 1}, tmp_path / "report.json"),
            atomic_write_text("x", tmp_path / "report.md"),
            save_safetensors({"a": torch.zeros(2)}, tmp_path / "teacher.safetensors", {}),
        ]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path.name


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text("one", path)
    path.chmod(0o640)
    atomic_write_text("two", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "two"


def test_a_run_that_fails_on_its_flags_leaves_no_folder_and_no_lock(tmp_path, capsys):
    fresh = tmp_path / "fresh" / "run"
    assert run_cli("prune", "-o", fresh, "--cache-dir", tmp_path / "cache", *TINY, "--dim-group", "3") == 2
    assert "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_cli("prune", "-o", existing, "--cache-dir", tmp_path / "cache", *TINY, "--dim-group", "3") == 2
    assert existing.is_dir() and list(existing.iterdir()) == []
    assert not (tmp_path / "cache").exists()


def test_the_run_lock_is_released_and_removed_and_taken_again(tmp_path):
    folder = tmp_path / "run"
    with RunFolderLock(folder):
        assert (folder / RunFolderLock.NAME).exists()
    assert not folder.exists()
    folder.mkdir()
    with RunFolderLock(folder):
        pass
    assert folder.is_dir() and list(folder.iterdir()) == []  # a folder it did not create stays
    with RunFolderLock(folder):  # taken again after the file was removed
        (folder / "log.jsonl").write_text("{}\n")
    assert sorted(p.name for p in folder.iterdir()) == [RunFolderLock.NAME, "log.jsonl"]  # marks a run folder
    with RunFolderLock(folder):
        with pytest.raises(RunFolderBusy):
            RunFolderLock(folder).__enter__()


def test_extract_into_a_folder_a_run_holds_is_refused(warm_run, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "running"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((warm_run.output / "checkpoint.pt").read_bytes())
    with RunFolderLock(run):
        assert run_cli("extract", run / "checkpoint.pt") == 2
        error = capsys.readouterr().err.strip()
        assert "another hiap run is writing into" in error and len(error.splitlines()) == 1
        assert not (run / "pruned.safetensors").exists()
    assert run_cli("extract", run / "checkpoint.pt") == 0  # free again
    assert (run / "pruned.safetensors").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_cli("extract", run / "checkpoint.pt", "-o", elsewhere / "p.safetensors") == 0
    assert [p.name for p in elsewhere.iterdir()] == ["p.safetensors"]  # no lock file where no run was


def test_a_killed_teachers_temporary_files_are_removed_from_the_cache(warm_run, tmp_path):  # noqa: F811
    from hiap.app.cli import build_parser, settings_from_args
    from hiap.app.session import _fingerprint_key, teacher_fingerprint

    cache = tmp_path / "cache"
    cache.mkdir()
    argv = ["prune", "-o", tmp_path / "run", "--cache-dir", cache, *TINY, "--teacher-epochs", "1"]
    key = _fingerprint_key(teacher_fingerprint(settings_from_args(build_parser().parse_args([str(a) for a in argv]))))
    killed = cache / f".teacher-{key}.checkpoint.pt.k1ll3d.tmp"
    killed.write_bytes(b"half a checkpoint")
    other = cache / ".teacher-0123456789abcdef.checkpoint.pt.0ther.tmp"  # another teacher's, maybe being written
    other.write_bytes(b"someone else's")
    assert run_cli(*argv) == 0
    assert not killed.exists() and other.exists()
    assert (cache / f"teacher-{key}.safetensors").is_file()


class _HalfWrite:
    """A file whose write stores half the text and then finds the disk full."""

    def __init__(self, path):
        self.handle = open(path, "a")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_log_record_on_a_full_disk_is_whole_or_absent(tmp_path, monkeypatch):
    from hiap.app.checkpoint import JsonlLog

    log = JsonlLog(tmp_path / "log.jsonl")
    log.write({"event": "step", "step": 1})
    kept = log.path.read_text()
    fresh = JsonlLog(tmp_path / "fresh.jsonl")
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: _HalfWrite(self))
    for target in (log, fresh):
        with pytest.raises(OSError, match=f"cannot write {target.path}: no space left"):
            target.write({"event": "step", "step": 2})
    monkeypatch.undo()
    assert log.path.read_text() == kept and not fresh.path.exists()


def test_a_run_lock_holds_on_a_full_disk(tmp_path, monkeypatch):
    """The process id in the lock file is for people; where it cannot be written the lock still holds, and leaves
    nothing behind."""
    def full(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = RunFolderLock(tmp_path / "run")
    monkeypatch.setattr(os, "write", full)
    try:
        lock.__enter__()
    finally:
        monkeypatch.undo()
    with pytest.raises(RunFolderBusy):
        RunFolderLock(tmp_path / "run").__enter__()
    lock.__exit__(None, None, None)
    assert not (tmp_path / "run").exists()
