"""Tiny end-to-end runs of the ``hiap`` command shared by the pipeline tests (a 2-block, 32-wide digits ViT)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model-args", "depth=2", "embed_dim=32", "--teacher-epochs", "3", "--epochs", "2", "--no-progress",
        "--latency-batch", "8", "--latency-repeats", "1", "--log-every", "2"]


def run_cli(*argv: str) -> int:
    from hiap.app.cli import main

    return main([str(a) for a in argv])


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "hiap.app.cli", *[str(a) for a in argv]]


@dataclass
class WarmRun:
    cache: Path
    output: Path


@pytest.fixture(scope="session")
def warm_run(tmp_path_factory) -> WarmRun:
    """One tiny ``hiap prune``; it also caches the tiny teacher every other run here reuses."""
    root = tmp_path_factory.mktemp("hiap-cli")
    run = WarmRun(cache=root / "cache", output=root / "warm")
    assert run_cli("prune", "-o", run.output, "--cache-dir", run.cache, *TINY) == 0
    return run
