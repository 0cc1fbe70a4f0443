"""The run log after a resume equals the uninterrupted run's, also when the run was killed before its first
checkpoint."""

from __future__ import annotations

import torch

from hiap.app.checkpoint import JsonlLog
from hiap.app.data import digits_datasets
from hiap.app.jobs import DenseJob
from hiap.app.models import DIGITS_VIT, create_dense_model
from hiap.app.runtime import DistContext
from hiap.app.train import LoopSettings, fit

SETTINGS = LoopSettings(epochs=1, batch_size=128, log_every=2, checkpoint_every=0, show_progress=False, amp=False)


def _fit(tmp_path, name: str, log: JsonlLog, resume: bool):
    torch.manual_seed(0)
    model = create_dense_model(DIGITS_VIT, 10, model_args={"depth": 1, "embed_dim": 16})
    return fit(DenseJob(model, lr=1e-3), digits_datasets(model), SETTINGS, ctx=DistContext(),
               device=torch.device("cpu"), checkpoint_path=tmp_path / name / "checkpoint.pt", log=log,
               fingerprint={}, resume=resume)


def _records(log: JsonlLog) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "time"} for record in JsonlLog.read(log.path)]


def test_a_resume_without_a_checkpoint_redoes_the_log_of_the_killed_run(tmp_path):
    uninterrupted = JsonlLog(tmp_path / "uninterrupted" / "log.jsonl")
    _fit(tmp_path, "uninterrupted", uninterrupted, resume=False)
    expected = _records(uninterrupted)
    steps = [record for record in expected if record["event"] == "step"]
    assert len(steps) >= 3

    # Killed (SIGKILL) after logging its first steps, before its first checkpoint (only at the epoch's end here),
    # with a line cut short: the log holds what it wrote, and no checkpoint exists.
    killed = JsonlLog(tmp_path / "killed" / "log.jsonl")
    lines = uninterrupted.path.read_text().splitlines(keepends=True)
    killed.path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    result = _fit(tmp_path, "killed", killed, resume=True)
    assert result.resumed_from is None
    assert _records(killed) == expected
