"""Files that are either whole or absent, whose tensors are what was written, in folders that one run owns.

A leaf module (standard library and torch): the method's file format (``save_pruned``) and the application's
checkpoints, logs and reports all write through :func:`atomic_path`, and seal what they store (tensors, settings and
metadata) with :func:`content_digest`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

TEMPORARY_SUFFIX = ".tmp"


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on failure it is removed.

    The temporary file is flushed to disk (fsync) before the rename and the folder after it, so a reader, a resumed
    run after SIGKILL or a machine after a power cut sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(handle)
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
        _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_path` left in ``folder`` (not below it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(TEMPORARY_SUFFIX)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (in name order): any flipped byte changes it.

    The digest files carried before :func:`content_digest` covered their settings and metadata too; loading such a
    file still checks its tensors with it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_in(payload: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples, keyed by its path (``optimizer.state.3.exp_avg``)."""
    if isinstance(payload, torch.Tensor):
        return {prefix: payload}
    found: dict[str, torch.Tensor] = {}
    if isinstance(payload, dict):
        items = ((str(key), value) for key, value in payload.items())
    elif isinstance(payload, (list, tuple)):
        items = ((str(index), value) for index, value in enumerate(payload))
    else:
        return found
    for key, value in items:
        found.update(tensors_in(value, f"{prefix}.{key}" if prefix else key))
    return found


class RunFolderBusy(Exception):
    """Another process holds the folder's run lock."""


class RunFolderLock:
    """An exclusive lock on ``folder`` for the lifetime of one run (``fcntl.flock`` on ``folder/.hiap-run.lock``).

    The operating system releases it when the process ends, however it ends, so a killed run never leaves a stale
    lock. Where ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    NAME = ".hiap-run.lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._file = None

    def __enter__(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._file.close()
            self._file = None
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderBusy(f"another hiap run is writing into {self.path.parent}") from None
            raise
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None


# ---------------------------------------------------------------------------------------------------------------------
# Integrity: a digest of the tensors travels with them and is checked on load
# ---------------------------------------------------------------------------------------------------------------------

DIGEST_KEY = "hiap_digest"
# A digest with this prefix covers everything stored (tensors, settings, metadata); one without it was written by an
# earlier version and covers the tensors alone.
SEALED_PREFIX = "sha256-all:"


class IntegrityError(ValueError):
    """A file's contents are not what was written (flipped bytes, a partial copy, an edit)."""


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    """Hash ``value`` (nested dicts / lists / tuples of tensors and plain values) in a form that does not depend on
    dict order and tells every type, shape, key and value apart."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"T|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D|{len(value)}|".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            digest.update(f"K|{type(key).__name__}|{key!r}|".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):  # a tuple may come back from a file as a list: the same content
        digest.update(f"L|{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V|{type(value).__module__}.{type(value).__qualname__}|{value!r}|".encode())


def content_digest(content: Any) -> str:
    """SHA-256 over everything in ``content``: every tensor's dtype, shape and bytes, and every key and plain value
    (numbers, strings, flags, None) around them, in any dict order. Marked with :data:`SEALED_PREFIX`."""
    digest = hashlib.sha256()
    _feed(digest, content)
    return SEALED_PREFIX + digest.hexdigest()


def verify_digest(content: Any, stored: str | None, path: str | os.PathLike, *,
                  tensors: dict[str, torch.Tensor] | None = None, unsealed: str = "its other contents",
                  hint: str = "") -> None:
    """IntegrityError naming ``path`` when ``content`` does not hash to the ``stored`` digest.

    A file with no digest, or with an earlier version's digest (over ``tensors`` alone, by default every tensor in
    ``content``), loads with a warning that says what cannot be verified (``unsealed``) and ``hint`` (how to get a
    file sealed whole); its tensors are still checked against that digest.
    """
    import warnings

    if stored is None:
        warnings.warn(f"{path} carries no digest (written by an earlier version): its contents cannot be verified",
                      UserWarning, stacklevel=3)
        return
    if stored.startswith(SEALED_PREFIX):
        if content_digest(content) != stored:
            raise IntegrityError(f"{path} is damaged or was edited: its contents do not match the digest stored "
                                 "with them")
        return
    if tensor_digest(tensors_in(content) if tensors is None else tensors) != stored:
        raise IntegrityError(f"{path} is damaged: its tensors do not match the digest stored with them")
    warnings.warn(f"{path} was written by an earlier version whose digest covers the tensors only: {unsealed} cannot "
                  f"be verified{'; ' + hint if hint else ''}", UserWarning, stacklevel=3)


def verify_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: str | os.PathLike,
                       *, unsealed: str = "its metadata", hint: str = "") -> None:
    """:func:`verify_digest` of a file written by :func:`save_safetensors`: its tensors and every metadata entry."""
    metadata = dict(metadata or {})
    stored = metadata.pop(DIGEST_KEY, None)
    verify_digest({"tensors": tensors, "metadata": metadata}, stored, path, tensors=tensors, unsealed=unsealed,
                  hint=hint)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``safetensors`` file with ``metadata`` and the digest of both (:func:`content_digest`), written through
    :func:`atomic_path`; :func:`verify_safetensors` checks it.

    Equal tensors and metadata give equal bytes, in any process (see :func:`sort_safetensors_metadata`).
    """
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    digest = content_digest({"tensors": tensors, "metadata": dict(metadata)})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, DIGEST_KEY: digest})
        sort_safetensors_metadata(tmp)
    return Path(path)


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with its metadata keys in sorted order.

    safetensors writes the metadata from a hash map whose order changes from one process to the next, so two runs
    that save the very same model would give files of different bytes (and checksums). The header keeps its length
    (the same keys and values, reordered), so the tensor data that follows it does not move.
    """
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # escaped differently from safetensors' own writer: leave the file as it is
            return
        file.seek(8)
        file.write(text.ljust(length, b" "))  # safetensors pads its header with spaces too
