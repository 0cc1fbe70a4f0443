"""Timing one provider, its peak memory, and the floor it is measured against.

Each timed call ends with ``torch.cuda.synchronize()`` on a GPU, so a figure is what the caller waits for, launch
overhead included. The first call (compilation, autotuning, allocator growth) and the warm-up rounds are excluded;
the figure kept is the median of the timed rounds (pytest-benchmark). Peak memory is ``max_memory_allocated`` over
one extra, untimed call.

The floor of a call is its minimum ``Work`` (FLOPs, bytes) over this machine's measured peaks (``measure_peaks``:
dense matmul throughput and copy bandwidth), whichever bound is larger.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from _providers import first_call_watchdog
from _settings import DEVICE, ON_GPU
from torch.utils._python_dispatch import TorchDispatchMode


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


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


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
    matmul_s = _best_time(partial(torch.mm, a, b), repeats)
    del a, b
    source = torch.empty(copy_bytes // 4, device=DEVICE, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    copy_s = _best_time(partial(target.copy_, source), repeats)
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


# Ops that only make views: they launch nothing.
_VIEW_OPS = {"view", "t", "detach", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "expand",
             "_unsafe_view", "unbind", "as_strided", "alias", "split", "split_with_sizes", "reshape", "lift_fresh"}


class _LaunchCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in _VIEW_OPS
        return func(*args, **(kwargs or {}))


def launching_ops(call: Callable[[], object]) -> int:
    """How many dispatched ops one ``call`` runs that launch work (views excluded; a custom op counts once): in a
    launch-bound step, the count the host pays for. Runs ``call`` once, eagerly."""
    with _LaunchCount() as counter:
        call()
    return counter.count


def paired_speedup(baseline: Callable[[], object], call: Callable[[], object], rounds: int = 7) -> dict:
    """``baseline`` and ``call`` timed in alternation: each round runs one side twice and times the second run (the
    first brings its weights back into the caches the other side evicted), then the other side; the result is the
    median and quartiles of ``baseline time / call time`` over the rounds. A machine whose speed drifts between cells
    (a shared CPU: 10 % and more over a run) slows both sides of a round alike, so their ratio holds where a ratio of
    two cells' medians does not. The side that goes first alternates."""
    ratios = []
    for index in range(rounds):
        times = {}
        for name, fn in (("baseline", baseline), ("call", call))[:: 1 if index % 2 == 0 else -1]:
            fn()
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name] = time.perf_counter() - start
        ratios.append(times["baseline"] / times["call"])
    ratios.sort()
    quartile = len(ratios) // 4
    return {"median": ratios[len(ratios) // 2], "q1": ratios[quartile], "q3": ratios[-1 - quartile],
            "rounds": rounds}


def drop_gradients(*tensors: torch.Tensor) -> Callable[[], None]:
    """A ``prepare`` for ``time_provider``: set each tensor's ``.grad`` to None, so every backward allocates afresh."""

    def prepare() -> None:
        for tensor in tensors:
            tensor.grad = None

    return prepare


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
