"""Crash-safe training state: the JSONL run log and the training checkpoint (atomic writes, strict reading,
config fingerprints that a resume must match)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from hiap.app.runtime import InputError
from hiap.files import IntegrityError, atomic_path, content_digest, verify_digest, write_error

CHECKPOINT_FORMAT = "hiap-train-checkpoint"
CHECKPOINT_VERSION = 2


class JsonlLog:
    """Append-only JSON-lines log; a no-op on ranks other than 0."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        before = self.path.stat().st_size if self.path.exists() else None
        try:
            with self.path.open("a") as handle:
                handle.write(line)
        except OSError as error:
            # A record is whole or absent: what this write put there goes (the file too, if the write made it).
            with contextlib.suppress(OSError):
                if before is None:
                    self.path.unlink(missing_ok=True)
                else:
                    os.truncate(self.path, before)
            translated = write_error(error, self.path)
            if translated is None:
                raise
            raise translated from error

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """Every complete record; a line cut short by a kill is skipped."""
        records = []
        path = Path(path)
        if not path.exists():
            return records
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop ``phase`` records past ``step``: they came from steps a resumed run is about to redo. Everything
        written up to a checkpoint at ``step`` carries a step ``<= step`` (an event that applies from ``step`` was
        raised when step ``step - 1`` ended), so a resumed run's log equals the uninterrupted run's."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read(self.path) if r.get("phase") != phase or r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_checkpoint(path: str | Path, phase: str | None = None) -> dict:
    """A training checkpoint written by ``fit``; InputError when it is missing, corrupt or of another phase."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a foreign pickle's protocol warning would split the one-line error
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises pickle, zip or runtime errors
        raise InputError(f"checkpoint {path} is corrupt or not a hiap training checkpoint ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {path} is not a hiap training checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"checkpoint {path} has format version {payload.get('version')}, expected {CHECKPOINT_VERSION}")
    if phase is not None and payload.get("phase") != phase:
        raise InputError(f"checkpoint {path} belongs to the {payload.get('phase')!r} phase, not {phase!r}")
    stored = payload.pop("digest", None)
    try:
        verify_digest(payload, stored, path, unsealed="its settings (hiap_config, architecture, history, fingerprint)",
                      hint="a run resumed from it, or started again, writes a checkpoint sealed whole")
    except IntegrityError as error:
        raise InputError(str(error)) from error
    return payload


def seal(payload: dict) -> dict:
    """``payload`` with the digest of everything in it (tensors and the settings, history and fingerprint around
    them: ``hiap.files.content_digest``), which ``read_checkpoint`` checks."""
    return {**payload, "digest": content_digest(payload)}


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): values}


def config_difference(saved: dict, current: dict) -> str | None:
    """``"epochs: 25 -> 30"`` for the first setting that differs between two run fingerprints, None when equal."""
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            return f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
    return None


def check_resume(path: str | Path, saved: dict, current: dict) -> None:
    """InputError when a run is resumed from a checkpoint written under another config (``saved`` and ``current``
    are run fingerprints), naming the first setting that differs."""
    difference = config_difference(saved, current)
    if difference is not None:
        raise InputError(f"--resume: {path} was written with a different config ({difference}); resume with the "
                         "original settings or use a new --output")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
