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
import stat
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


class WriteError(OSError):
    """A file could not be written (a full disk, a refused folder, ...): one line naming the file and the reason.

    An ``OSError`` with the original errno, so callers that catch ``OSError`` still do; its text names the file the
    caller asked for, never the temporary file the write went through.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None):
        super().__init__(code if code is not None else errno.EIO, reason, str(path))
        self.message = f"cannot write {path}: {reason}"

    def __str__(self) -> str:
        return self.message


class NoSpaceLeft(WriteError):
    """The disk (or the quota) holding the file is full."""

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(path, "no space left on the device" + (f" ({detail})" if detail else ""), errno.ENOSPC)


class FolderInTheWay(WriteError, IsADirectoryError):
    """The path to write names an existing folder."""

    def __init__(self, path: str | os.PathLike):
        WriteError.__init__(self, path, "it is a folder; name a file", errno.EISDIR)
        self.message = f"{path} is a folder, not a file; name a file to write"


class WriteRefused(WriteError, PermissionError):
    """The folder or the file does not allow writing."""


_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# How torch.save reports a write that stopped short (its zip writer checks its position after every record).
_TORCH_SHORT_WRITE = ("inline_container.cc", "PytorchStreamWriter failed writing")


def write_error(error: BaseException, path: str | os.PathLike, temporary: str | None = None) -> WriteError | None:
    """The :class:`WriteError` that ``error``, raised while writing ``path`` (through ``temporary``), stands for;
    None for an error that is not about writing that file.

    Recognises a full disk however the writer reports it: ``OSError`` ENOSPC / EDQUOT, safetensors'
    ``SafetensorError`` (``os error 28``), and torch.save's ``RuntimeError`` from its zip writer (``enforce fail at
    inline_container.cc``), which it raises when the disk fills and says nothing more.
    """
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _FULL_ERRNOS:
            return NoSpaceLeft(path)
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = "the file system is read-only" if error.errno == errno.EROFS else "permission denied"
            return WriteRefused(path, reason, error.errno)
        if error.errno == errno.EISDIR and error.filename in (str(path), temporary):
            return FolderInTheWay(path)
        if error.filename is not None and error.filename in (str(path), temporary):
            return WriteError(path, (error.strerror or type(error).__name__).lower(), error.errno)
        return None
    text = str(error)
    if type(error).__name__ == "SafetensorError" and ("os error 28" in text or "No space left" in text):
        return NoSpaceLeft(path)
    if isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_SHORT_WRITE):
        return NoSpaceLeft(path, "the write stopped short")
    return None


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder (and those above it); a file where a folder must be is a WriteError naming it."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise WriteError(path, f"{ancestor} is a file, not a folder", errno.ENOTDIR)
    path.parent.mkdir(parents=True, exist_ok=True)


def _umask() -> int:
    """The process umask, read without changing it where ``/proc`` tells it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the portable way reads it by setting it (and puts it back at once)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` leaves: the file's own when it exists, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on failure it is removed.

    The temporary file is flushed to disk (fsync) before the rename and the folder after it, so a reader, a resumed
    run after SIGKILL or a machine after a power cut sees the old file or the new one, never a half-written one. The
    file gets the mode a plain write would give it (the umask, or the mode of the file it replaces). A failed write
    raises a :class:`WriteError` naming ``path`` and the reason (a full disk: :class:`NoSpaceLeft`; ``path`` a folder:
    :class:`FolderInTheWay`), and leaves nothing of itself behind.
    """
    path = Path(path)
    if path.is_dir():
        raise FolderInTheWay(path)
    tmp_name = None
    try:
        _make_parent(path)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.close(handle)
        mode = _new_file_mode(path)
        yield Path(tmp_name)
        os.chmod(tmp_name, mode)  # after the writer, which may have replaced the file (safetensors does)
        with open(tmp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        translated = write_error(error, path, tmp_name)
        if translated is None or translated is error:
            raise
        raise translated from error
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_path` left in ``folder`` (not below it) whose names
    start with ``prefix`` (``.<file name>.`` for one file's). Only for a folder (or files) no other process writes:
    one whose lock this process holds."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix) and p.name.startswith(".")
             and p.name.endswith(TEMPORARY_SUFFIX)]
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


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class FileLock:
    """An exclusive ``fcntl.flock`` on the file ``path`` for as long as it is held; the file is removed on release.

    The operating system releases the lock when the process ends, however it ends, so a killed holder never leaves a
    stale lock (at most the empty file, which the next holder takes over). Taking it again after a holder removed the
    file is safe: a process that opened the old file before it went checks, once it holds the lock, that ``path``
    still names the file it locked, and starts over if not. On release the folders that taking the lock created are
    removed again if they hold nothing. Where ``fcntl`` does not exist (Windows) the lock is a no-op.

    Args:
        path: the lock file.
        wait: block until the holder releases it (False: raise :class:`RunFolderBusy` at once).
    """

    def __init__(self, path: str | os.PathLike, *, wait: bool = False):
        self.path = Path(path)
        self.wait = wait
        self._file: int | None = None
        self._created: list[Path] = []

    def busy_message(self) -> str:
        return f"another process holds {self.path}"

    def __enter__(self) -> "FileLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._created = _missing_folders(self.path.parent)
        try:
            _make_parent(self.path)
            while True:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
                except OSError as error:
                    os.close(descriptor)
                    if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise RunFolderBusy(self.busy_message()) from None
                    raise
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = None
                if current == os.fstat(descriptor).st_ino:
                    break
                os.close(descriptor)  # the holder removed the file while this process opened it: lock the new one
        except BaseException as error:
            self._remove_created()
            translated = write_error(error, self.path)
            if translated is None or translated is error:
                raise
            raise translated from error
        self._file = descriptor
        try:  # the holder's process id, for a person who looks; the lock itself is the flock
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the run's first real write says so, naming its file
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._file is None:
            return
        if self.remove_on_release():
            # Removed while still held, so whoever locks next finds the file it locked gone and takes a new one.
            self.path.unlink(missing_ok=True)
        os.close(self._file)  # closing the descriptor releases the lock
        self._file = None
        self._remove_created()

    def remove_on_release(self) -> bool:
        """Whether releasing the lock removes its file."""
        return True

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created = []


class RunFolderLock(FileLock):
    """An exclusive lock on ``folder`` for the lifetime of one run (``folder/.hiap-run.lock``, see :class:`FileLock`).

    A run that fails before writing anything leaves the folder as it found it: the lock file goes when nothing else
    is in the folder, and so does the folder when taking the lock created it. A folder with a run's files keeps the
    lock file, which marks it as a run folder.

    ``existing_only``: take the lock only where a lock file exists already (a folder some run used); elsewhere
    holding it is a no-op and creates nothing (for a command that writes one file into a folder that may be a run's).
    """

    NAME = ".hiap-run.lock"

    def __init__(self, folder: str | os.PathLike, *, wait: bool = False, existing_only: bool = False):
        super().__init__(Path(folder) / self.NAME, wait=wait)
        self.existing_only = existing_only

    def __enter__(self) -> "RunFolderLock":
        if self.existing_only and not self.path.is_file():
            return self
        super().__enter__()
        return self

    def remove_on_release(self) -> bool:
        try:
            return [p.name for p in self.path.parent.iterdir()] == [self.NAME]
        except OSError:
            return False

    def busy_message(self) -> str:
        return f"another hiap run is writing into {self.path.parent}"


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
