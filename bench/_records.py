"""The JSON record of a run: every figure and skip, the machine it ran on, and the project's performance targets.

One ``Recorder`` per pytest session (``session_recorder``) rewrites ``<device>_<date>_<time>.json`` in
``results_dir()`` after each result, so a run stopped by a time limit still leaves what it measured. Ratios are always
``baseline median / provider median`` taken in the same run (baseline ``reference``, or ``dense/reference`` for whole
models), so > 1 means faster. ``RECORD_SCHEMA`` is what ``render_table.py`` reads.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _settings import DEVICE, ON_GPU, REPO_DIR, precision_label, results_dir
from _timing import CPU_TIMING, CPU_TIMING_HEAVY, GPU_TIMING, MachinePeaks, Work, measure_peaks

RECORD_SCHEMA = 1


@dataclass(frozen=True)
class Target:
    """A performance goal of the project: ``provider`` against ``baseline`` on ``case``.

    ``device`` is where it is judged (``cuda``: an H100 or H200 in bf16; ``cpu``: fp32). With ``of_mac_ratio`` the
    bar is ``minimum_speedup`` times the provider's MAC ratio to the baseline (``shapes["mac_ratio_vs_dense"]``).
    """

    name: str
    case: str
    provider: str
    baseline: str
    minimum_speedup: float
    batch: int | None = None
    maximum_memory_ratio: float | None = None
    device: str = "cuda"
    of_mac_ratio: bool = False


# The gated layers are judged on what training runs: each layer trains on the faster of the masks on the weights
# (``triton``) and the fused gated GEMM (``triton-fused``), measured at its first step, so the fused ops are held to
# beating the path a layer would run without them, and both Triton paths to beating the eager PyTorch path.
TARGETS = (
    Target("gated FFN fwd+bwd: fused gated_fc1 vs the masks on the weights", "gated_mlp_fwd_bwd", "triton-fused",
           "triton", 1.0),
    Target("gated attention fwd+bwd: fused gated_qkv vs the masks on the weights", "gated_attention_fwd_bwd",
           "triton-fused", "triton", 1.0),
    Target("gated FFN fwd+bwd vs eager", "gated_mlp_fwd_bwd", "triton", "reference", 1.8),
    Target("gated attention fwd+bwd vs eager", "gated_attention_fwd_bwd", "triton", "reference", 1.4),
    # A HiAP step (full objective) at most 1.1x a dense timm step, and at most 0.9x late in training: half of the
    # structure at CLOSED_LOGIT, which a run's next check retires (``HiAPConfig.retire_below``).
    Target("HiAP training step vs a dense timm step (b64)", "training_step", "hiap/triton", "dense/reference",
           1 / 1.1, batch=64),
    Target("HiAP training step vs a dense timm step (b256)", "training_step", "hiap/triton", "dense/reference",
           1 / 1.1, batch=256),
    Target("HiAP training step, half the structure closed, vs a dense timm step", "training_step",
           "hiap-retired/triton", "dense/reference", 1 / 0.9, batch=256),
    Target("ragged attention vs padded SDPA", "ragged_attention", "triton", "reference", 1.5),
    Target("extracted DeiT-S (hiap.optimize, compiled) throughput vs dense timm eager", "deit_s_inference",
           "extracted/compiled", "dense/reference", 1.3, batch=256),
    Target("extracted DeiT-S (hiap.optimize, compiled) throughput vs dense timm compiled", "deit_s_inference",
           "extracted/compiled", "dense/compiled", 1.15, batch=256),
    Target("extracted DeiT-S batch-1 latency vs dense timm, both in CUDA graphs", "deit_s_inference",
           "extracted/optimized+cudagraph", "dense/cudagraph", 1.15, batch=1),
    Target("extracted DeiT-S on a CPU: speedup >= 0.95x its MAC ratio (batch 1)", "deit_s_inference",
           "extracted/optimized", "dense/reference", 0.95, batch=1, device="cpu", of_mac_ratio=True),
    Target("extracted DeiT-S on a CPU: speedup >= 0.95x its MAC ratio (batch 16)", "deit_s_inference",
           "extracted/optimized", "dense/reference", 0.95, batch=16, device="cpu", of_mac_ratio=True),
    Target("DeiT-S with RAPID (~40% of token work removed) throughput vs dense timm eager", "token_reduction",
           "rapid/compiled", "dense/reference", 1.5, batch=256),
    Target("HiAP-pruned DeiT-S (~2/3 MACs) + RAPID throughput vs dense timm eager", "token_reduction",
           "pruned+rapid/compiled", "dense/reference", 2.0, batch=256),
    Target("DeiT-S with RAPID on a CPU: speedup >= 0.95x its MAC ratio (batch 16)", "token_reduction",
           "rapid/reference", "dense/reference", 0.95, batch=16, device="cpu", of_mac_ratio=True),
)


def judged_here(case: str, provider: str, batch: int) -> bool:
    """Whether a target of this device judges this cell (the cells that measure a paired ratio on a CPU)."""
    return any(t.device == DEVICE.type and t.case == case and t.provider == provider and t.batch in (None, batch)
               for t in TARGETS)


def _device_description() -> dict:
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(DEVICE),
                "memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    from hiap.method.profile import device_name

    return {"kind": "cpu", "name": device_name("cpu"), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "timm", "hiap"):
        try:
            versions[module] = getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception:
            versions[module] = None
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


@dataclass
class Recorder:
    """Collects every figure and skip of one pytest session and keeps the JSON record on disk up to date.

    The record is rewritten after each result, so a run stopped by a time limit still leaves what it measured.
    """

    started: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))
    results: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    peaks: MachinePeaks | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.device = _device_description()
        folder = results_dir()
        if folder is not None:
            stamp = self.started.strftime("%Y-%m-%d_%H%M%S")
            self.path = folder / f"{_slug(self.device['kind'] + '-' + self.device['name'])}_{stamp}.json"

    def machine_peaks(self) -> MachinePeaks:
        if self.peaks is None:
            self.peaks = measure_peaks()
        return self.peaks

    def note(self, case: str, text: str) -> None:
        """A sentence about how a case was measured (reduced shapes, what a provider means there)."""
        self.notes[case] = text

    def add_result(self, *, case: str, provider: str, batch: int, shapes: dict, timing: dict, work: Work | None,
                   baseline: str = "reference", precision: str | None = None) -> dict:
        entry = {"case": case, "batch": batch, "provider": provider, "baseline": baseline,
                 "precision": precision or precision_label(), "shapes": shapes, **timing}
        if work is not None:
            entry.update(work.floors(self.machine_peaks()))
            if entry.get("median_ms"):
                entry["floor_fraction"] = entry["floor_ms"] / entry["median_ms"]
        self.results.append(entry)
        self.write()
        return entry

    def add_skip(self, *, case: str, provider: str, batch: int | None, reason: str) -> None:
        self.skipped.append({"case": case, "batch": batch, "provider": provider, "reason": reason})
        self.write()

    def _with_ratios(self) -> list[dict]:
        by_key = {(r["case"], r["batch"], r["provider"]): r for r in self.results}
        rows = []
        for row in self.results:
            row = dict(row)
            base = by_key.get((row["case"], row["batch"], row["baseline"]))
            if base and base.get("median_ms") and row.get("median_ms"):
                row["speedup_vs_baseline"] = base["median_ms"] / row["median_ms"]
            if base and base.get("peak_mb") and row.get("peak_mb"):
                row["memory_vs_baseline"] = row["peak_mb"] / base["peak_mb"]
            rows.append(row)
        return rows

    def target_status(self) -> list[dict]:
        """Each target with its measured ratio per batch ("not measured" when a side is missing)."""
        by_key = {(r["case"], r["batch"], r["provider"]): r for r in self.results}
        statuses = []
        for target in TARGETS:
            batches = sorted({r["batch"] for r in self.results if r["case"] == target.case})
            if target.batch is not None:
                batches = [b for b in batches if b == target.batch]
            for batch in batches or [target.batch]:
                entry = {"target": target.name, "case": target.case, "batch": batch, "provider": target.provider,
                         "baseline": target.baseline, "minimum_speedup": target.minimum_speedup,
                         "maximum_memory_ratio": target.maximum_memory_ratio}
                mine = by_key.get((target.case, batch, target.provider))
                base = by_key.get((target.case, batch, target.baseline))
                if target.device != DEVICE.type:
                    entry["status"] = f"not applicable (stated for {'an H100/H200 in bf16' if target.device == 'cuda' else 'a CPU in fp32'})"
                elif not (mine and base and mine.get("median_ms") and base.get("median_ms")):
                    entry["status"] = "not measured"
                else:
                    speedup = base["median_ms"] / mine["median_ms"]
                    paired = mine.get("paired_speedup")
                    if paired and target.baseline == mine.get("baseline"):
                        # Judged on rounds alternating with the baseline (drift cancels); the ratio of the two
                        # cells' medians stays beside it.
                        entry["speedup_of_cell_medians"] = speedup
                        entry["judged_on"] = f"median of {paired['rounds']} alternating rounds"
                        speedup = paired["median"]
                    entry["speedup"] = speedup
                    if target.of_mac_ratio:
                        mac_ratio = mine["shapes"]["mac_ratio_vs_dense"] / base["shapes"].get("mac_ratio_vs_dense", 1.0)
                        entry["minimum_speedup"] = round(target.minimum_speedup * mac_ratio, 4)
                    met = speedup >= entry["minimum_speedup"]
                    if target.maximum_memory_ratio is not None and mine.get("peak_mb") and base.get("peak_mb"):
                        entry["memory_ratio"] = mine["peak_mb"] / base["peak_mb"]
                        met = met and entry["memory_ratio"] <= target.maximum_memory_ratio
                    entry["status"] = "met" if met else "missed"
                statuses.append(entry)
        return statuses

    def as_dict(self) -> dict:
        return {
            "schema": RECORD_SCHEMA,
            "created": self.started.isoformat(timespec="seconds"),
            "device": self.device,
            "versions": _versions(),
            "git_commit": _git_commit(),
            "command": " ".join(sys.argv),
            "precision": precision_label(),
            "timing": {
                "policy": ({"all": GPU_TIMING.__dict__} if ON_GPU
                           else {"default": CPU_TIMING.__dict__, "heavy cases": CPU_TIMING_HEAVY.__dict__}),
                "synchronised": ON_GPU,
                "statistic": "median of timed rounds; first call and warm-up rounds excluded",
                "ratio": "speedup_vs_baseline = baseline median / provider median (same run); a cell a CPU target "
                         "judges also carries paired_speedup, the median of baseline / provider over alternating "
                         "rounds, which the target uses",
            },
            "peaks": self.peaks.as_dict() if self.peaks else None,
            # Set by run_gpu.sh: the summary line of the `pytest tests -m gpu` run that preceded the benchmarks.
            "gpu_tests": os.environ.get("HIAP_BENCH_GPU_TESTS") or None,
            "notes": self.notes,
            "results": self._with_ratios(),
            "skipped": self.skipped,
            "targets": self.target_status(),
        }

    def write(self) -> None:
        if self.path is None or not self.results:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.as_dict(), indent=1, sort_keys=False) + "\n")
        os.replace(temporary, self.path)


_SESSION_RECORDER: Recorder | None = None


def session_recorder() -> Recorder:
    global _SESSION_RECORDER
    if _SESSION_RECORDER is None:
        _SESSION_RECORDER = Recorder()
    return _SESSION_RECORDER


def current_recorder() -> Recorder | None:
    return _SESSION_RECORDER
