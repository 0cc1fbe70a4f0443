"""Machinery shared by every benchmark: providers, synchronised timing, peak memory, roofline floors, JSON records.

A benchmark case is run once per provider on identical inputs:

    reference   the plain-PyTorch path, eager
    compiled    torch.compile of that same reference path (inductor, static shapes)
    triton      the Triton kernels of ``hiap_kernels`` (CUDA only)

(plus ``per_head_loop`` for the ragged attention, and ``dense/...`` / ``extracted/...`` variants for whole models).
Each timed call ends with ``torch.cuda.synchronize()`` on a GPU, so a figure is what the caller waits for, launch
overhead included. The first call (compilation, autotuning, allocator growth) and the warm-up rounds are excluded;
the figure kept is the median of the timed rounds. Ratios are always ``baseline median / provider median`` taken in
the same run (baseline ``reference``, or ``dense/reference`` for whole models), so > 1 means faster.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
RECORD_SCHEMA = 1

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
PROVIDERS = ("reference", "compiled", "triton")

TRITON_ON_CPU_REASON = "needs a CUDA GPU; the Triton interpreter is ~1000x slower and not a speed measurement"


# ---------------------------------------------------------------------------------------------------------------------
# Run settings (environment variables, so that they work whichever conftest pytest treats as initial)
# ---------------------------------------------------------------------------------------------------------------------

def results_dir() -> Path | None:
    """Where the JSON record goes: ``HIAP_BENCH_RESULTS`` (a folder, or ``off``), default ``bench/results``."""
    value = os.environ.get("HIAP_BENCH_RESULTS", "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    return Path(value) if value else DEFAULT_RESULTS_DIR


def deadline() -> float | None:
    """Unix time by which the whole suite must be done (``HIAP_BENCH_DEADLINE``, set by ``run_gpu.sh``)."""
    value = os.environ.get("HIAP_BENCH_DEADLINE", "").strip()
    return float(value) if value else None


def seconds_left() -> float:
    limit = deadline()
    return math.inf if limit is None else limit - time.time()


def batch_sizes(gpu_default: tuple[int, ...], cpu_default: tuple[int, ...]) -> tuple[int, ...]:
    """Batch sizes of a case: the device's default, or ``HIAP_BENCH_BATCHES=64,256`` for the GPU op cases."""
    if not ON_GPU:
        return cpu_default
    value = os.environ.get("HIAP_BENCH_BATCHES", "").strip()
    return tuple(int(v) for v in value.split(",") if v.strip()) if value else gpu_default


def set_cpu_threads() -> None:
    """One intra-op thread on a CPU-only machine unless ``HIAP_BENCH_THREADS`` says otherwise.

    On a small machine shared with other jobs, every OpenMP parallel region waits for a thread that another process
    holds: measured on the 2-core development machine, DeiT-S at batch 1 took 1.3 s with 2 threads and 0.14 s with
    one (batch 8: 2.0 s against 1.0 s). One thread gives figures that mean something there; the record states the
    thread count.
    """
    value = os.environ.get("HIAP_BENCH_THREADS", "").strip()
    if value:
        torch.set_num_threads(int(value))
    elif not ON_GPU:
        torch.set_num_threads(1)


@dataclass(frozen=True)
class TimingPolicy:
    """How long each provider of a case is timed: rounds chosen so the timed part lasts about ``target_s``."""

    target_s: float
    min_rounds: int
    max_rounds: int
    warmup_rounds: int


GPU_TIMING = TimingPolicy(target_s=0.6, min_rounds=10, max_rounds=200, warmup_rounds=3)
# Two shared cores: about two seconds per cell keeps the whole CPU run near two minutes; other jobs on the machine
# make single calls jitter by tens of percent, so the median needs at least five rounds.
CPU_TIMING = TimingPolicy(target_s=2.0, min_rounds=5, max_rounds=25, warmup_rounds=2)
# Cases where one call takes seconds (a training step, batch-32 inference): the excluded first call is the warm-up.
CPU_TIMING_HEAVY = TimingPolicy(target_s=0.0, min_rounds=5, max_rounds=5, warmup_rounds=0)


def timing_policy(heavy: bool = False) -> TimingPolicy:
    if ON_GPU:
        return GPU_TIMING
    return CPU_TIMING_HEAVY if heavy else CPU_TIMING


def autocast_context():
    """bf16 autocast on a GPU (the training precision the targets are stated in); fp32 on a CPU."""
    if ON_GPU:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def precision_label() -> str:
    return "bf16 autocast" if ON_GPU else "fp32"


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Provider availability
# ---------------------------------------------------------------------------------------------------------------------

def triton_skip_reason(*kernel_modules: str) -> str | None:
    """Why the ``triton`` provider cannot be timed here, or None when it can."""
    if not ON_GPU:
        return TRITON_ON_CPU_REASON
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False"):
        return "TRITON_INTERPRET is set: the kernels would run in the interpreter, not on the GPU"
    for name in kernel_modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # an unfinished kernel module must not take the whole suite down
            return f"cannot import {name}: {type(error).__name__}: {error}"
    return None


def _cpp_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


# Compilation cost on a GPU machine (16 cores, cold inductor cache), seconds, per compiled graph. Used only to decide
# whether a compiled provider still fits before ``HIAP_BENCH_DEADLINE``; generous on purpose.
COMPILE_ESTIMATE_S = {"small": 40.0, "block": 60.0, "model": 90.0, "training": 150.0}


def compile_skip_reason(cost: str, cpu_ok: bool, cpu_why_not: str = "") -> str | None:
    """Why the ``compiled`` provider is not timed for a case of compile cost ``cost``, or None when it is.

    Args:
        cost: key of ``COMPILE_ESTIMATE_S``.
        cpu_ok: whether compiling this case on a CPU fits the CPU run's few-minute budget.
        cpu_why_not: what makes it too slow on a CPU (put into the reason).
    """
    if os.environ.get("HIAP_BENCH_COMPILE", "1") == "0":
        return "HIAP_BENCH_COMPILE=0: torch.compile providers switched off"
    if not ON_GPU:
        if _cpp_compiler() is None:
            return "torch.compile on a CPU needs a C++ compiler (none found)"
        if not cpu_ok:
            return f"torch.compile skipped on CPU: {cpu_why_not}"
    left = seconds_left()
    if left < COMPILE_ESTIMATE_S[cost] * 1.5:
        return (f"time budget: {left:.0f} s left before HIAP_BENCH_DEADLINE, compiling this case takes "
                f"~{COMPILE_ESTIMATE_S[cost]:.0f} s")
    return None


def budget_skip_reason(estimate_s: float) -> str | None:
    """Why a case is skipped for lack of time before the deadline, or None."""
    left = seconds_left()
    if left < estimate_s:
        return f"time budget: {left:.0f} s left before HIAP_BENCH_DEADLINE, this case needs ~{estimate_s:.0f} s"
    return None


def compile_reference(fn: Callable) -> Callable:
    """torch.compile with static shapes: each batch size gets its own specialised graph, the fairest comparison."""
    return torch.compile(fn, dynamic=False)


def allow_many_compiled_variants(limit: int = 64) -> None:
    """Every batch size and every distinct gate offset is its own guarded variant; the default limit of 8 per
    function would silently fall back to eager half-way through the suite."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 8 * limit))


class CompileTimeout(Exception):
    pass


class first_call_watchdog:
    """Abort a first (compiling) call that runs past ``seconds``, so one pathological compile cannot eat the run.

    Uses SIGALRM, so it only arms in the main thread of a Unix process (where pytest runs tests); elsewhere it is
    a no-op.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._armed = False

    def __enter__(self):
        import signal
        import threading

        if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
            return self
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            return self

        def expire(signum, frame):
            raise CompileTimeout(f"first call (torch.compile) ran past {self.seconds:.0f} s")

        self._previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self._armed = True
        return self

    def __exit__(self, *exc):
        if self._armed:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        return False


def compile_time_limit(cost: str) -> float:
    """Seconds the first compiled call may take: twice the estimate, and never past the deadline."""
    return max(10.0, min(2.0 * COMPILE_ESTIMATE_S[cost] if ON_GPU else 240.0, seconds_left() - 5.0))


# ---------------------------------------------------------------------------------------------------------------------
# Roofline floors
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MachinePeaks:
    """Measured (not datasheet) peaks of this machine: dense matmul throughput and device-memory copy bandwidth."""

    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_shape: tuple[int, int, int]
    copy_bytes_per_s: float
    copy_size_bytes: int

    def as_dict(self) -> dict:
        return {
            "matmul_tflops": self.matmul_flops_per_s / 1e12,
            "matmul_dtype": self.matmul_dtype,
            "matmul_shape": list(self.matmul_shape),
            "copy_gb_per_s": self.copy_bytes_per_s / 1e9,
            "copy_size_mb": self.copy_size_bytes / 2**20,
        }


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` synchronised calls: a peak is what the machine can do, not what it usually does."""
    best = math.inf
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks() -> MachinePeaks:
    """Matmul peak in the benchmark precision (bf16 on a GPU, fp32 on a CPU) and copy bandwidth (read + write)."""
    if ON_GPU:
        size, dtype, repeats, copy_bytes = 8192, torch.bfloat16, 10, 1 << 30
    else:
        size, dtype, repeats, copy_bytes = 1024, torch.float32, 10, 64 << 20
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    matmul_s = _best_time(lambda: torch.mm(a, b), repeats)
    del a, b
    source = torch.empty(copy_bytes // 4, device=DEVICE, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    copy_s = _best_time(lambda: target.copy_(source), repeats)
    del source, target
    if ON_GPU:
        torch.cuda.empty_cache()
    return MachinePeaks(
        matmul_flops_per_s=2 * size**3 / matmul_s,
        matmul_dtype=str(dtype).replace("torch.", ""),
        matmul_shape=(size, size, size),
        copy_bytes_per_s=2 * copy_bytes / copy_s,
        copy_size_bytes=copy_bytes,
    )


@dataclass(frozen=True)
class Work:
    """Minimum work of one call: FLOPs, and bytes that must cross device memory at least once."""

    flops: float
    bytes: float

    def floors(self, peaks: MachinePeaks) -> dict:
        compute_s = self.flops / peaks.matmul_flops_per_s
        memory_s = self.bytes / peaks.copy_bytes_per_s
        return {"gflop": self.flops / 1e9, "mbytes": self.bytes / 2**20, "compute_floor_ms": compute_s * 1e3,
                "memory_floor_ms": memory_s * 1e3, "floor_ms": max(compute_s, memory_s) * 1e3}


# ---------------------------------------------------------------------------------------------------------------------
# Timing one provider
# ---------------------------------------------------------------------------------------------------------------------

def _peak_memory(call: Callable[[], object], prepare: Callable[[], None]) -> dict | None:
    """Peak CUDA memory of one extra, untimed call: absolute peak and the part above what was allocated before it."""
    if not ON_GPU:
        return None  # no allocator statistics for CPU tensors
    prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "peak_above_inputs_mb": (peak - before) / 2**20}


def time_provider(benchmark, call: Callable[[], object], *, prepare: Callable[[], None] | None = None,
                  policy: TimingPolicy | None = None, first_call_limit_s: float | None = None) -> dict:
    """Time ``call`` with pytest-benchmark: one excluded first call, warm-up rounds, then synchronised timed rounds.

    Args:
        benchmark: the pytest-benchmark fixture.
        call: the work to time (its result is dropped).
        prepare: untimed set-up run before every call (e.g. dropping gradients so each backward allocates them fresh,
            as ``zero_grad(set_to_none=True)`` does in training).
        policy: rounds and warm-up; the device's default when None.
        first_call_limit_s: raise ``CompileTimeout`` when the first call (where compilation happens) takes longer.

    Returns:
        ``median_ms``, ``min_ms``, ``iqr_ms``, ``rounds``, ``first_call_s`` (compilation / autotuning included) and, on
        a GPU, ``peak_mb`` / ``peak_above_inputs_mb``.
    """
    policy = policy or timing_policy()
    prepare = prepare or (lambda: None)

    def prepared() -> None:
        prepare()
        synchronize()

    def timed() -> None:
        call()
        synchronize()

    prepared()
    start = time.perf_counter()
    with first_call_watchdog(first_call_limit_s if first_call_limit_s is not None else math.inf):
        timed()
    first_call_s = time.perf_counter() - start
    if policy.target_s > 0:
        prepared()
        start = time.perf_counter()
        timed()
        one_call_s = max(time.perf_counter() - start, 1e-6)
        rounds = int(min(policy.max_rounds, max(policy.min_rounds, math.ceil(policy.target_s / one_call_s))))
    else:
        rounds = policy.min_rounds
    benchmark.pedantic(timed, setup=prepared, rounds=rounds, warmup_rounds=policy.warmup_rounds, iterations=1)
    result = {"rounds": rounds, "warmup_rounds": policy.warmup_rounds, "first_call_s": first_call_s}
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        result.update(median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, iqr_ms=stats.iqr * 1e3)
    memory = _peak_memory(call, prepared)
    if memory:
        result.update(memory)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A performance goal of the project: ``provider`` against ``baseline`` on ``case`` (GPU, bf16)."""

    name: str
    case: str
    provider: str
    baseline: str
    minimum_speedup: float
    batch: int | None = None
    maximum_memory_ratio: float | None = None


TARGETS = (
    Target("gated FFN fwd+bwd vs eager", "gated_ffn_fwd_bwd", "triton", "reference", 1.8),
    Target("gated FFN fwd+bwd vs compiled", "gated_ffn_fwd_bwd", "triton", "compiled", 1.15),
    Target("gated attention fwd+bwd vs eager", "gated_attention_fwd_bwd", "triton", "reference", 1.4),
    Target("training step vs eager (and peak memory)", "training_step", "triton", "reference", 1.3,
           maximum_memory_ratio=0.85),
    Target("ragged attention vs padded SDPA", "ragged_attention", "triton", "reference", 1.5),
    Target("extracted DeiT-S throughput vs dense timm", "deit_s_inference", "extracted/triton", "dense/reference", 1.48,
           batch=256),
)


def _device_description() -> dict:
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(DEVICE),
                "memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    from hiap.runtime import cpu_name

    return {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


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
                if not ON_GPU:
                    entry["status"] = "not applicable (targets are stated for an H100 in bf16)"
                elif not (mine and base and mine.get("median_ms") and base.get("median_ms")):
                    entry["status"] = "not measured"
                else:
                    speedup = base["median_ms"] / mine["median_ms"]
                    entry["speedup"] = speedup
                    met = speedup >= target.minimum_speedup
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
                "ratio": "speedup_vs_baseline = baseline median / provider median (same run)",
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


def skip_provider(recorder: Recorder, *, case: str, provider: str, batch: int | None, reason: str) -> None:
    """Record why ``provider`` is not timed for this case, then skip the test with that reason."""
    recorder.add_skip(case=case, provider=provider, batch=batch, reason=reason)
    pytest.skip(reason)


_SESSION_RECORDER: Recorder | None = None


def session_recorder() -> Recorder:
    global _SESSION_RECORDER
    if _SESSION_RECORDER is None:
        _SESSION_RECORDER = Recorder()
    return _SESSION_RECORDER


def current_recorder() -> Recorder | None:
    return _SESSION_RECORDER


def _caused_by(error: BaseException, kind: type) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@dataclass
class CaseRun:
    """One (case, batch, provider) cell of the suite: its skip decisions, its timing and its entry in the record."""

    benchmark: object
    recorder: Recorder
    case: str
    provider: str
    batch: int
    baseline: str = "reference"
    precision: str | None = None

    def __post_init__(self) -> None:
        self.benchmark.group = f"{self.case} batch={self.batch}"
        self.benchmark.extra_info.update(case=self.case, provider=self.provider, batch=self.batch)

    def note_cpu_reduction(self, text: str) -> None:
        """State in the record how the CPU run departs from the GPU shapes (nothing on a GPU)."""
        if not ON_GPU:
            self.recorder.note(self.case, f"CPU: {text}")

    def skip(self, reason: str) -> None:
        skip_provider(self.recorder, case=self.case, provider=self.provider, batch=self.batch, reason=reason)

    def require_time(self, estimate_s: float) -> None:
        reason = budget_skip_reason(estimate_s)
        if reason:
            self.skip(reason)

    def require_triton(self, *kernel_modules: str) -> None:
        reason = triton_skip_reason(*kernel_modules)
        if reason:
            self.skip(reason)

    def require_gpu(self, what: str) -> None:
        if not ON_GPU:
            self.skip(f"{what} needs a CUDA GPU")

    def require_compile(self, cost: str, *, cpu_ok: bool, cpu_why_not: str = "") -> None:
        reason = compile_skip_reason(cost, cpu_ok, cpu_why_not)
        if reason:
            self.skip(reason)

    def require_provider(self, *, triton_modules: tuple[str, ...], compile_cost: str, cpu_ok: bool = True,
                         cpu_why_not: str = "") -> None:
        """Skip unless this case's provider can run here: its Triton kernels for a Triton provider, a compile within
        the time budget for ``compiled``; eager providers always run. ``model/provider`` names count by their provider.
        """
        provider = self.provider.rsplit("/", 1)[-1]
        if "triton" in provider:
            self.require_triton(*triton_modules)
        if provider == "compiled":
            self.require_compile(compile_cost, cpu_ok=cpu_ok, cpu_why_not=cpu_why_not)

    def measure(self, call: Callable[[], object], *, prepare: Callable[[], None] | None = None,
                work: Work | None = None, shapes: dict | None = None, heavy: bool = False,
                compile_cost: str | None = None) -> dict:
        """Time the provider and record it. A compiled provider whose compilation fails or overruns is skipped with
        the reason (a torch.compile limitation is a finding, not a failure of this package); other errors fail."""
        limit_s = compile_time_limit(compile_cost) if compile_cost else None
        try:
            timing = time_provider(self.benchmark, call, prepare=prepare, policy=timing_policy(heavy),
                                   first_call_limit_s=limit_s)
        except Exception as error:
            if _caused_by(error, CompileTimeout):
                self.skip(f"torch.compile: the first (compiling) call ran past its {limit_s:.0f} s limit")
            if compile_cost is not None:
                self.skip(f"torch.compile failed: {type(error).__name__}: {error}".splitlines()[0][:300])
            raise
        if "median_ms" not in timing:  # --benchmark-disable: the call ran once as a smoke test, nothing was timed
            return timing
        return self.recorder.add_result(case=self.case, provider=self.provider, batch=self.batch,
                                        shapes=shapes or {}, timing=timing, work=work, baseline=self.baseline,
                                        precision=self.precision)
