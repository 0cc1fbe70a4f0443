"""One cell of the suite, ``CaseRun``: what every ``bench_*.py`` case goes through to be skipped or timed and recorded.

A benchmark case is run once per provider on identical inputs (``_providers``: ``reference``, ``compiled``,
``triton``; plus ``per_head_loop`` for the ragged attention, and ``dense/...`` / ``extracted/...`` variants for whole
models). A case builds a ``CaseRun`` for its (case, provider, batch), states what the provider needs
(``require_provider``, ``require_time``, ``require_gpu``), then hands ``measure`` the call, its minimum ``Work`` and its
shapes. The machinery lies in modules of its own, none of which imports this one:

    _settings.py    device, folders, precision, run settings from HIAP_BENCH_* (imports no bench module)
    _providers.py   the providers, their skip reasons, torch.compile set-up, compile budget and first-call watchdog
    _timing.py      timing policy, synchronised timing, peak memory, measured machine peaks, ``Work`` and its floors
    _records.py     ``Recorder`` (the JSON record), targets, device and version description
    _workloads.py   the DeiT-S shaped models, layouts and inputs, and the minimum work of each case
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from _providers import (
    CompileTimeout,
    budget_skip_reason,
    compile_skip_reason,
    compile_time_limit,
    triton_skip_reason,
)
from _records import Recorder, judged_here
from _settings import ON_GPU
from _timing import Work, paired_speedup, time_provider, timing_policy


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
        """Record why this provider is not timed for this cell, then skip the test with that reason."""
        self.recorder.add_skip(case=self.case, provider=self.provider, batch=self.batch, reason=reason)
        pytest.skip(reason)

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
                compile_cost: str | None = None, paired_baseline: Callable[[], object] | None = None) -> dict:
        """Time the provider and record it. A compiled provider whose compilation fails or overruns is skipped with
        the reason (a torch.compile limitation is a finding, not a failure of this package); other errors fail.

        ``paired_baseline``: the baseline's call; where a target of this device judges the cell, the two are also
        timed in alternating rounds (``paired_speedup``) and the target reads that ratio."""
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
        if paired_baseline is not None and judged_here(self.case, self.provider, self.batch):
            timing["paired_speedup"] = paired_speedup(paired_baseline, call)
        return self.recorder.add_result(case=self.case, provider=self.provider, batch=self.batch,
                                        shapes=shapes or {}, timing=timing, work=work, baseline=self.baseline,
                                        precision=self.precision)
