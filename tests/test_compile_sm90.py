"""Every Triton kernel compiles for an H100 (sm_90) without a GPU: ``bench/compile_sm90.py --quick`` in a subprocess.

The subprocess runs without ``TRITON_INTERPRET`` (this test process has it set by conftest.py when no GPU is present),
so the kernels' GPU autotune configs are the ones compiled; ``--quick`` takes the first config of each kernel in bf16.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {
    "_sample_gates_kernel",
    "_gated_qkv_weight_kernel",
    "_gated_qkv_weight_backward_kernel",
    "_gated_fc2_weight_kernel",
    "_gated_fc2_weight_backward_kernel",
    "_gather_weight_kernel",
    "_gather_weight_backward_kernel",
    "_gate_objective_kernel",
    "_gate_objective_kernel[per-dim]",
    "qkv_forward_kernel",
    "qkv_column_mask_kernel",
    "qkv_backward_dx_kernel",
    "qkv_backward_dw_kernel",
    "fc1_forward_kernel",
    "fc1_backward_pointwise_kernel",
    "_ragged_attention_kernel",
    "_linear_gelu_kernel",
    "_merge_tokens_kernel",
    "_nearest_tokens_kernel",
    "_token_redundancy_kernel",
    "_linear_residual_kernel",
    "_layernorm_linear_kernel",
}


def _nvidia_tool(name: str) -> Path | None:
    spec = find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() else None


def test_every_kernel_compiles_for_sm90(tmp_path):
    missing = [tool for tool in ("ptxas", "cuobjdump") if _nvidia_tool(tool) is None]
    if missing:
        pytest.skip(f"Triton's bundled {' and '.join(missing)} not found (needed to compile for sm_90)")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, leave the user's cache alone
    record_path = tmp_path / "sm90.json"
    result = subprocess.run(
        [sys.executable, "bench/compile_sm90.py", "--quick", "--json", str(record_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    record = json.loads(record_path.read_text())
    assert record["device"] == "sm_90 (compiled, not run)"
    variants = record["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    for v in variants:
        name = f"{v['kernel']} {v['dtype']} {v['config']} ({v['num_warps']} warps)"
        assert v["error"] is None, name
        assert v["local_bytes"] == 0, name
        assert v["spill_bytes"] == 0, f"{name} spills {v['spill_bytes']} bytes"
        assert 0 < v["registers"] <= 255, name
