"""The providers a case runs through, and why one is not timed: Triton availability, torch.compile and time budget.

    reference   the plain-PyTorch path, eager
    compiled    torch.compile of that same reference path (``compile_reference``: inductor, static shapes)
    triton      the Triton kernels of ``hiap_kernels`` (CUDA only)

A provider that cannot run here is skipped with a reason (``*_skip_reason``), never failed. Compilation is the one
cost that can eat a time-bounded run: ``COMPILE_ESTIMATE_S`` decides whether a compiled cell still fits before
``HIAP_BENCH_DEADLINE``, and ``first_call_watchdog`` aborts a first (compiling) call that runs past its limit.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
from typing import Callable

import torch
from _settings import ON_GPU, seconds_left

PROVIDERS = ("reference", "compiled", "triton")

TRITON_ON_CPU_REASON = "needs a CUDA GPU; the Triton interpreter is ~1000x slower and not a speed measurement"


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


def provider_op(provider: str, op_name: str, reference: Callable) -> Callable:
    """What a cell of ``provider`` times: ``hiap_kernels.<op_name>`` (triton), ``compile_reference(reference)``
    (compiled) or ``reference`` itself."""
    if provider == "triton":
        return getattr(importlib.import_module("hiap_kernels"), op_name)
    if provider == "compiled":
        return compile_reference(reference)
    return reference


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
