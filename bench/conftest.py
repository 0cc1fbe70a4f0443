"""pytest wiring of the benchmark suite: collect ``bench_*.py``, one recorder per session, a summary at the end.

Run from the repository root: ``python -m pytest bench/ --benchmark-only``. The root's pytest configuration only
collects ``test_*.py``; the hook below adds this folder's ``bench_*.py`` files whatever the ini says.

Environment variables (read at run time):
    HIAP_BENCH_RESULTS   folder for the JSON record (default bench/results), or "off"
    HIAP_BENCH_DEADLINE  unix time by which the suite must end; cases that would overrun are skipped with the reason
    HIAP_BENCH_BATCHES   GPU batch sizes of every case but whole-model inference and the gate ops (sample_gates,
                         gated_qkv_weight, gated_fc2_weight: no batch); default "64,256"
    HIAP_BENCH_COMPILE   "0" skips every torch.compile provider
    HIAP_BENCH_THREADS   torch CPU threads (default 1 on a machine without a GPU: _settings.set_cpu_threads says why)

Modules: ``_harness.CaseRun`` is what every case goes through; its docstring maps the others (``_settings``,
``_providers``, ``_timing``, ``_records``, ``_workloads``). One ``bench_<op>.py`` per public op of ``hiap_kernels``
(sample_gates, gated_qkv_weight, gated_fc2_weight, gated_qkv, gated_fc1, ragged_attention, ...), plus
``bench_block.py`` (gated modules and the training step) and ``bench_model.py`` (whole-model inference).
"""

from __future__ import annotations

import fnmatch
import gc

import pytest
import torch
from _providers import allow_many_compiled_variants
from _records import Recorder, current_recorder, session_recorder
from _settings import BENCH_DIR, set_cpu_threads
from render_table import ordered_rows

allow_many_compiled_variants()
set_cpu_threads()


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if file_path.parent != BENCH_DIR:
        return None
    # Files named on the command line, or matched by the ini's python_files, are collected by pytest itself.
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


# Compiled providers run after every other cell, cheapest compilations first, so that a run bounded by
# HIAP_BENCH_DEADLINE loses the most expensive compilations, never the eager / Triton figures.
_COMPILED_PRIORITY = ("test_sample_gates", "test_gate_objective", "test_gated_qkv_weight", "test_gated_fc2_weight",
                      "test_gather_weight",
                      "test_fused_linear_gelu", "test_fused_linear_residual", "test_fused_layernorm_linear", "test_merge_tokens", "test_nearest_tokens",
                      "test_gated_fc1_fwd_bwd", "test_gated_attention_fwd_bwd", "test_ragged_attention",
                      "test_gated_qkv_fwd_bwd", "test_gated_block_fwd_bwd", "test_deit_s_inference",
                      "test_deit_s_token_reduction", "test_training_step")


def _run_order(item) -> tuple[int, int]:
    callspec = getattr(item, "callspec", None)
    values = callspec.params.values() if callspec else ()
    if not any(isinstance(value, str) and value.endswith("compiled") for value in values):
        return (0, 0)
    name = item.originalname if hasattr(item, "originalname") else item.name
    rank = _COMPILED_PRIORITY.index(name) if name in _COMPILED_PRIORITY else len(_COMPILED_PRIORITY)
    return (1, rank)


def pytest_collection_modifyitems(session, config, items):
    bench_items = [item for item in items if BENCH_DIR in item.path.parents]
    if not bench_items:
        return
    others = [item for item in items if BENCH_DIR not in item.path.parents]
    items[:] = others + sorted(bench_items, key=_run_order)


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    rec = session_recorder()
    yield rec
    rec.write()


@pytest.fixture(autouse=True)
def _fresh_device_state():
    """Each cell starts from the same seed and an empty allocator, so peak memory compares like with like."""
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _format_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = current_recorder()
    if rec is None:
        return
    record = rec.as_dict()
    write = terminalreporter.write_line
    terminalreporter.section("HiAP benchmark summary")
    device = record["device"]
    write(f"device: {device['name']} ({device['kind']}); precision: {record['precision']}")
    peaks = record["peaks"]
    if peaks:
        tflops = peaks["matmul_tflops"]
        matmul = f"{tflops:.0f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"
        write(f"measured peaks: matmul {matmul} ({peaks['matmul_dtype']}), copy {peaks['copy_gb_per_s']:.1f} GB/s")
    if not record["results"] and not record["skipped"]:
        write("nothing was timed (--benchmark-disable?)")
        return
    header = (f"{'case':<26} {'batch':>5} {'provider':<28} {'median ms':>10} {'speedup':>8} {'peak MB':>9} "
              f"{'floor ms':>9}")
    write(header)
    write("-" * len(header))
    for row in ordered_rows(record["results"]):
        speedup = row.get("speedup_vs_baseline")
        peak = row.get("peak_mb")
        write(f"{row['case']:<26} {row['batch']:>5} {row['provider']:<28} {_format_ms(row.get('median_ms')):>10} "
              f"{(f'{speedup:.2f}x' if speedup else '-'):>8} {(f'{peak:.0f}' if peak else '-'):>9} "
              f"{_format_ms(row.get('floor_ms')):>9}")
    if record["skipped"]:
        write("")
        write("skipped:")
        reasons: dict[str, list[str]] = {}
        for skip in record["skipped"]:
            reasons.setdefault(skip["reason"], []).append(f"{skip['case']}[{skip['provider']}, b{skip['batch']}]")
        for reason, cells in reasons.items():
            write(f"  {reason}")
            write(f"      {', '.join(cells)}")
    if any(t["status"] in ("met", "missed") for t in record["targets"]):
        write("")
        write("targets:")
        for target in record["targets"]:
            measured = f"{target['speedup']:.2f}x" if "speedup" in target else "-"
            needed = f">= {target['minimum_speedup']}x"
            if "memory_ratio" in target:
                measured += f", peak memory {target['memory_ratio']:.2f}x"
                needed += f", peak memory <= {target['maximum_memory_ratio']}x"
            write(f"  {target['status']:<12} {target['target']} (batch {target['batch']}): {measured} (needs {needed})")
    if rec.path is not None and rec.results:
        write("")
        write(f"record: {rec.path}")
