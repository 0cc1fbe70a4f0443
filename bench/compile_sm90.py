"""Compile every Triton kernel of ``hiap_kernels`` for an H100 (sm_90) without a GPU, and report its resource use.

    python bench/compile_sm90.py [--json PATH] [--kernels NAME ...] [--quick]

What it proves: each kernel, in every autotune config a GPU can pick (bf16, plus the first config in fp32), gets
through Triton's whole pipeline and NVIDIA's ``ptxas`` for sm_90, i.e. it would not fail to compile on an H100. Each
variant is specialised exactly as a launch would specialise it (Triton's own argument binder: pointer alignment,
integers divisible by 16, integers equal to 1) for DeiT-S at batch 64 (197 tokens, D 384, 6 heads of 64, FFN 1536,
gate groups of 16 columns per head and 64 FFN neurons, hard sampling, bias, erf GELU, "ieee" dot precision). Per
variant it reports registers per thread, spilled bytes per thread (the stack frame), shared memory per CTA and what
they allow statically on an H100: resident CTAs per SM and the occupancy (resident warps / 64). A variant that needs
more than the 227 KiB of shared memory an H100 CTA can get compiles but cannot launch (flagged, not a failure).

What it does not prove: nothing runs, so nothing here says that a kernel is correct or fast on a GPU (the tests check
results under the interpreter; timings need a GPU: ``bench/run_gpu.sh``). Occupancy is the static upper bound from
registers, shared memory and warps, not what the profiler measures. Other shapes can specialise differently (e.g. a
row count not divisible by 16), which changes the code slightly. Exit status: 0, 1 if a variant failed to compile,
2 under the interpreter.

Must run where ``TRITON_INTERPRET`` is unset: the autotune config lists are chosen at import time, and under the
interpreter they collapse to one interpreter config (``hiap_kernels.common.runtime.pick_configs``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from hiap_kernels.common.runtime import interpreter_active

DEVICE = "sm_90 (compiled, not run)"
# H100 (compute capability 9.0) limits behind the occupancy columns.
REGS_PER_SM, REG_ALLOC_UNIT, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 256, 64, 32
SMEM_PER_SM, SMEM_PER_CTA_MAX, SMEM_RESERVED_PER_CTA = 228 * 1024, 227 * 1024, 1024
# DeiT-S at batch 64: tokens, embedding dim, heads, head dim, FFN width, rows of the token-wise GEMMs.
B, N, D, H, DH, F = 64, 197, 384, 6, 64, 1536
M = B * N
# The gated kernels read tau and the seed from 0-dim tensors (pointers below); the counter offset is a scalar.
GATE_FLAGS = dict(offset=0, HARD=True, SAMPLE=True)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    kernel: object  # an Autotuner (uses its .configs) or a JITFunction (uses ``configs``)
    args: Callable  # dtype -> launch arguments (tensors as triton MockTensor) and fixed constexprs, by name
    configs: list = field(default_factory=list)  # configs of a kernel its launcher does not autotune
    variants: list = field(default_factory=lambda: [{}])  # extra constexpr sets, each crossed with every config


def _mock_types():
    """The interpreter-free argument types: ``MockTensor`` (a pointer of a dtype) and the gate arguments every
    sampling kernel takes."""
    import torch
    from triton.runtime.jit import MockTensor

    gates = dict(seed_ptr=MockTensor(torch.int64), tau_ptr=MockTensor(torch.float32), **GATE_FLAGS)
    return MockTensor, torch.float32, torch.int32, gates, dict(NUM_HEADS=H, HEAD_DIM=DH, GROUP=16, **gates)


def _training_specs() -> list[KernelSpec]:
    """The kernels of a training step: the gate sampler, the gated weights, the objective, a fixed structure's
    gathers."""
    import torch
    import triton

    from hiap_kernels.gated_weight import fc2_weight, gather, qkv_weight
    from hiap_kernels.gated_weight import kernel as gated_weight
    from hiap_kernels.gates.kernel import _sample_gates_kernel
    from hiap_kernels.objective import kernel as objective

    T, f32, _, GATES, head_gates = _mock_types()
    return [
        # Logits in the row's dtype (the kernel accepts any float logits); BLOCK 128 as in sample_gates.
        KernelSpec("_sample_gates_kernel", _sample_gates_kernel,
                   lambda dt: dict(logits_ptr=T(dt), values_ptr=T(f32), slopes_ptr=T(f32),
                                   num_gates=H + 2 * H * (DH // 16), **GATES),
                   configs=[triton.Config({"BLOCK": 128})]),
        # The gated weights of training (tiles as in their launchers on a GPU): qkv's rows per head (groups of 16), fc2's
        # columns (groups of 128, the default alignment; one group per backward program).
        KernelSpec("_gated_qkv_weight_kernel", qkv_weight._gated_qkv_weight_kernel,
                   lambda dt: dict(weight_ptr=T(dt), bias_ptr=T(dt), head_ptr=T(f32), qk_ptr=T(f32), v_ptr=T(f32),
                                   out_weight_ptr=T(dt), out_bias_ptr=T(dt), rows=3 * H * DH, cols=D, stride_weight=D,
                                   stride_out=D, HAS_BIAS=True, **head_gates),
                   configs=[triton.Config(dict(zip(("BLOCK_R", "BLOCK_C"), gated_weight._tiles())))]),
        KernelSpec("_gated_qkv_weight_backward_kernel", qkv_weight._gated_qkv_weight_backward_kernel,
                   lambda dt: dict(grad_weight_ptr=T(dt), weight_ptr=T(dt), grad_bias_ptr=T(dt), bias_ptr=T(dt),
                                   head_ptr=T(f32), qk_ptr=T(f32), v_ptr=T(f32), out_grad_weight_ptr=T(dt),
                                   out_grad_bias_ptr=T(dt), out_grad_head_ptr=T(f32), out_grad_qk_ptr=T(f32),
                                   out_grad_v_ptr=T(f32), cols=D, stride_grad=D, stride_weight=D, stride_out=D,
                                   HAS_BIAS=True, BLOCK_DH=DH, BLOCK_G=DH // 16, **head_gates),
                   configs=[triton.Config({"BLOCK_C": gated_weight._tiles()[1]})]),
        KernelSpec("_gated_fc2_weight_kernel", fc2_weight._gated_fc2_weight_kernel,
                   lambda dt: dict(weight_ptr=T(dt), block_ptr=T(f32), neuron_ptr=T(f32), out_weight_ptr=T(dt), rows=D,
                                   cols=F, stride_weight=F, stride_out=F, GROUP=128, **GATES),
                   configs=[triton.Config(dict(zip(("BLOCK_R", "BLOCK_C"), gated_weight._tiles())))]),
        KernelSpec("_gated_fc2_weight_backward_kernel", fc2_weight._gated_fc2_weight_backward_kernel,
                   lambda dt: dict(grad_weight_ptr=T(dt), weight_ptr=T(dt), block_ptr=T(f32), neuron_ptr=T(f32),
                                   out_grad_weight_ptr=T(dt), out_grad_neuron_ptr=T(f32), block_partial_ptr=T(f32),
                                   rows=D, cols=F, stride_grad=F, stride_weight=F, stride_out=F, GROUP=128,
                                   GROUPS=F // 128, GROUPS_PER_PROGRAM=1, BLOCK_GP=1, **GATES),
                   configs=[triton.Config(dict(zip(("BLOCK_R", "BLOCK_C"), gated_weight._tiles())))]),
        # The gate terms of a step: DeiT-S's default layout (12 layers, 6 heads of 4 groups, 12 neuron groups), and
        # ViT-L's per-dim / per-neuron one, the widest layer the program holds (its launcher's warps for each).
        KernelSpec("_gate_objective_kernel", objective._gate_objective_kernel,
                   lambda dt: dict(flat_ptr=T(dt), constants_ptr=T(torch.float64), lambda1_ptr=T(torch.float64),
                                   lambda2_ptr=T(torch.float64), target_ptr=T(torch.float64), grad_ptr=T(dt),
                                   terms_ptr=T(f32), diagnostics_ptr=T(f32), LAYERS=12, HEADS=H, GROUPS=DH // 16,
                                   NEURON_GROUPS=F // 128, HEAD_GROUP=16, NEURON_GROUP=128, MIN_HEADS=1, DIMS_MIN=1,
                                   NEURONS_MIN=2, TARGET_MODE=True, ASCEND=True, BLOCK_H=8, BLOCK_G=4,
                                   BLOCK_N=16),
                   configs=[triton.Config({}, num_warps=4)],
                   variants=[{}, {"TARGET_MODE": False}]),
        KernelSpec("_gate_objective_kernel[per-dim]", objective._gate_objective_kernel,
                   lambda dt: dict(flat_ptr=T(dt), constants_ptr=T(torch.float64), lambda1_ptr=T(torch.float64),
                                   lambda2_ptr=T(torch.float64), target_ptr=T(torch.float64), grad_ptr=T(dt),
                                   terms_ptr=T(f32), diagnostics_ptr=T(f32), LAYERS=24, HEADS=16, GROUPS=64,
                                   NEURON_GROUPS=4096, HEAD_GROUP=1, NEURON_GROUP=1, MIN_HEADS=1, DIMS_MIN=8,
                                   NEURONS_MIN=410, TARGET_MODE=True, ASCEND=True, BLOCK_H=16,
                                   BLOCK_G=64, BLOCK_N=4096),
                   configs=[triton.Config({}, num_warps=8)]),
        # A fixed structure's gathers: two thirds of qkv's rows with bias and scale; half of fc2's columns.
        KernelSpec("_gather_weight_kernel", gather._gather_weight_kernel,
                   lambda dt: dict(weight_ptr=T(dt), bias_ptr=T(dt), index_ptr=T(torch.int64), scale_ptr=T(f32),
                                   out_ptr=T(dt), out_bias_ptr=T(dt), out_rows=2 * H * DH, out_cols=D,
                                   source_extent=3 * H * DH, stride_weight=D, stride_out=D, GATHER_ROWS=True,
                                   HAS_BIAS=True, HAS_SCALE=True),
                   configs=[triton.Config(dict(zip(("BLOCK_R", "BLOCK_C"), gated_weight._tiles())))],
                   variants=[{}, {"out_rows": D, "out_cols": F // 2, "source_extent": F, "stride_weight": F,
                                  "stride_out": F // 2, "GATHER_ROWS": False, "HAS_BIAS": False, "HAS_SCALE": False}]),
        KernelSpec("_gather_weight_backward_kernel", gather._gather_weight_backward_kernel,
                   lambda dt: dict(grad_ptr=T(dt), grad_bias_ptr=T(dt), inverse_ptr=T(torch.int64), scale_ptr=T(f32),
                                   out_grad_ptr=T(dt), out_grad_bias_ptr=T(dt), rows=3 * H * DH, cols=D,
                                   num_kept=2 * H * DH, stride_grad=D, stride_out=D, GATHER_ROWS=True, HAS_BIAS=True,
                                   HAS_SCALE=True),
                   configs=[triton.Config(dict(zip(("BLOCK_R", "BLOCK_C"), gated_weight._tiles())))],
                   variants=[{}, {"rows": D, "cols": F, "num_kept": F // 2, "stride_grad": F // 2, "stride_out": F,
                                  "GATHER_ROWS": False, "HAS_BIAS": False, "HAS_SCALE": False}]),
    ]


def _fused_gemm_specs() -> list[KernelSpec]:
    """The fused gated GEMMs (``gated_qkv``, ``gated_fc1``), forward and backward."""
    import triton

    from hiap_kernels.gated_linear import fc1_kernels as fc1
    from hiap_kernels.gated_linear import qkv_kernels as qkv

    T, f32, _, GATES, head_gates = _mock_types()
    # dq, dk, dv: contiguous [B, H, N, Dh], so stride_d == 1 (a launch specialises it to a constant).
    grad_layout = dict(M=M, N_OUT=3 * H * DH, K=D, TOKENS=N, stride_b=H * N * DH, stride_h=N * DH, stride_n=DH,
                       stride_d=1, NUM_HEADS=H, HEAD_DIM=DH, INPUT_PRECISION="ieee")
    block_m, block_n, warps = fc1.POINTWISE_BLOCKS_GPU
    return [
        KernelSpec("qkv_forward_kernel", qkv.qkv_forward_kernel,
                   lambda dt: dict(x_ptr=T(dt), w_ptr=T(dt), b_ptr=T(dt), head_logits_ptr=T(f32), qk_logits_ptr=T(f32),
                                   v_logits_ptr=T(f32), out_ptr=T(dt), M=M, N_OUT=3 * H * DH, K=D, TOKENS=N,
                                   PART_STRIDE=B * H * N * DH, HAS_BIAS=True, INPUT_PRECISION="ieee", **head_gates)),
        KernelSpec("qkv_column_mask_kernel", qkv.qkv_column_mask_kernel,  # BLOCK 128 as in its launcher
                   lambda dt: dict(head_logits_ptr=T(f32), qk_logits_ptr=T(f32), v_logits_ptr=T(f32), mask_ptr=T(f32),
                                   N_OUT=3 * H * DH, **head_gates),
                   configs=[triton.Config({"BLOCK": 128})]),
        KernelSpec("qkv_backward_dx_kernel", qkv.qkv_backward_dx_kernel,
                   lambda dt: dict(dq_ptr=T(dt), dk_ptr=T(dt), dv_ptr=T(dt), col_mask_ptr=T(f32), w_ptr=T(dt),
                                   dx_ptr=T(dt), **grad_layout)),
        KernelSpec("qkv_backward_dw_kernel", qkv.qkv_backward_dw_kernel,
                   lambda dt: dict(dq_ptr=T(dt), dk_ptr=T(dt), dv_ptr=T(dt), x_ptr=T(dt), w_ptr=T(dt),
                                   col_mask_ptr=T(f32), dw_ptr=T(dt), mask_grad_partial_ptr=T(f32), col_sum_ptr=T(f32),
                                   STORE_DW=True, BLOCK_K=qkv.DW_BLOCK_K_GPU, **grad_layout)),
        KernelSpec("fc1_forward_kernel", fc1.fc1_forward_kernel,
                   lambda dt: dict(x_ptr=T(dt), w_ptr=T(dt), b_ptr=T(dt), block_logit_ptr=T(f32),
                                   neuron_logits_ptr=T(f32), out_ptr=T(dt), pre_ptr=T(dt), M=M, N_OUT=F, K=D, GROUP=64,
                                   HAS_BIAS=True, APPROXIMATE_TANH=False, STORE_PRE=True, INPUT_PRECISION="ieee",
                                   **GATES)),
        KernelSpec("fc1_backward_pointwise_kernel", fc1.fc1_backward_pointwise_kernel,
                   lambda dt: dict(grad_ptr=T(dt), pre_ptr=T(dt), block_logit_ptr=T(f32), neuron_logits_ptr=T(f32),
                                   grad_pre_ptr=T(dt), mask_grad_partial_ptr=T(f32), bias_grad_partial_ptr=T(f32),
                                   M=M, N_OUT=F, GROUP=64, APPROXIMATE_TANH=False, **GATES),
                   configs=[triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps)]),
    ]


def _inference_specs() -> list[KernelSpec]:
    """The kernels of a pruned model: ragged attention, token reduction's steps, the fused block's GEMMs."""
    import torch
    import triton

    from hiap_kernels.layernorm_linear.kernel import _layernorm_linear_kernel
    from hiap_kernels.linear_gelu.kernel import _linear_gelu_kernel
    from hiap_kernels.linear_residual.kernel import _linear_residual_kernel
    from hiap_kernels.ragged_attn.kernel import _ragged_attention_kernel
    from hiap_kernels.token_merge import kernel as token_merge
    from hiap_kernels.token_score import kernel as token_score
    from hiap_kernels.token_similarity import kernel as token_similarity

    T, f32, i32, _, _ = _mock_types()
    widths = [{"BLOCK_QK": w, "BLOCK_V": w} for w in (64, 32, 16)]  # widest head of the layer, rounded up

    def ragged(dt):  # strides of a dense layer (T = 3 * H * Dh); those of any layout of 16-column groups divide by 16
        return dict(qkv_ptr=T(dt), table_ptr=T(i32), out_ptr=T(dt), key_bias_ptr=T(f32), num_tokens=N, num_heads=H,
                    qkv_stride_b=N * 3 * H * DH, qkv_stride_n=3 * H * DH, out_stride_b=N * H * DH, out_stride_n=H * DH,
                    scale_log2e=DH**-0.5 * 1.4426950408889634, HAS_KEY_BIAS=False, DOT_PRECISION="ieee")

    return [
        # The last variant adds token reduction's per-key bias (log of merged sizes).
        KernelSpec("_ragged_attention_kernel", _ragged_attention_kernel, ragged,
                   variants=widths + [{"BLOCK_QK": 64, "BLOCK_V": 64, "HAS_KEY_BIAS": True}]),
        KernelSpec("_merge_tokens_kernel", token_merge._merge_tokens_kernel,  # blocks as in its launcher
                   lambda dt: dict(x_ptr=T(dt), size_ptr=T(f32), keep_ptr=T(torch.int64), source_ptr=T(torch.int64),
                                   target_ptr=T(torch.int64), out_ptr=T(dt), out_size_ptr=T(f32), num_tokens=N - 1,
                                   num_kept=N - 17, num_sources=16, channels=D, x_stride_b=(N - 1) * D, x_stride_p=D,
                                   out_stride_b=(N - 17) * D, out_stride_d=D),
                   configs=[triton.Config(dict(zip(("BLOCK_D", "BLOCK_R", "BLOCK_C"), token_merge._GPU_BLOCKS[:3])),
                                          num_warps=token_merge._GPU_BLOCKS[3])]),
        # ToMe's matching: the 98 even patch tokens against the 98 odd ones (views of the keys: row stride 2 D); blocks
        # as in the launcher, whose BLOCK_M is the next power of two >= 16 of the query count, at most 64. The second
        # variant is RAPID's merge with r = 16 (16 query rows, the sources excluded), at ToMe's argument shapes.
        KernelSpec("_nearest_tokens_kernel", token_similarity._nearest_tokens_kernel,
                   lambda dt: dict(queries_ptr=T(dt), candidates_ptr=T(dt), excluded_ptr=T(torch.uint8),
                                   score_ptr=T(f32), index_ptr=T(torch.int64), num_queries=(N - 1) // 2,
                                   num_candidates=(N - 1) // 2, width=D, queries_stride_b=(N - 1) * D,
                                   queries_stride_m=2 * D, candidates_stride_b=(N - 1) * D, candidates_stride_p=2 * D,
                                   excluded_stride_b=N - 1, excluded_stride_p=1, eps=token_similarity._EPS),
                   configs=[triton.Config(dict(zip(("BLOCK_N", "BLOCK_W"), token_similarity._GPU_BLOCKS[1:3])),
                                          num_warps=token_similarity._GPU_BLOCKS[3])],
                   variants=[{"BLOCK_M": token_similarity._GPU_BLOCKS[0], "HAS_EXCLUDED": False},
                             {"BLOCK_M": 16, "HAS_EXCLUDED": True}]),
        # RAPID's prune score: one program per image, every patch token a row of the tile. DeiT-S's 196 tokens (keys
        # a view of the packed qkv projection, row stride 3 D), ViT-L/16's 576 at 384 px, and the largest tile.
        KernelSpec("_token_redundancy_kernel", token_score._token_redundancy_kernel,
                   lambda dt: dict(keys_ptr=T(dt), cls_ptr=T(f32), score_ptr=T(f32), patches=N - 1, width=D,
                                   keys_stride_b=N * 3 * D, keys_stride_p=3 * D, cls_stride_b=N, cls_stride_p=1,
                                   redundancy_scale=1.0 / (N - 2), share_scale=float(N - 1), importance_weight=1.0,
                                   eps=token_score._EPS, HAS_CLS=True),
                   configs=[triton.Config({}, num_warps=token_score._GPU_WARPS)],
                   variants=[{"BLOCK_P": block_p, "BLOCK_W": token_score._block_w(block_p)}
                             for block_p in (256, 1024, 4096)]),
        KernelSpec("_layernorm_linear_kernel", _layernorm_linear_kernel,  # norm2 -> fc1 -> GELU at the dense width
                   lambda dt: dict(x_ptr=T(dt), norm_weight_ptr=T(dt), norm_bias_ptr=T(dt), weight_ptr=T(dt),
                                   bias_ptr=T(dt), out_ptr=T(dt), num_rows=M, num_features=F, in_features=D,
                                   x_stride_m=D, weight_stride_f=D, out_stride_m=F, eps=1e-6, HAS_NORM_WEIGHT=True,
                                   HAS_NORM_BIAS=True, HAS_BIAS=True, ACTIVATION=1, DOT_PRECISION="ieee")),
        KernelSpec("_linear_residual_kernel", _linear_residual_kernel,  # fc2 at the dense width, into the stream
                   lambda dt: dict(x_ptr=T(dt), weight_ptr=T(dt), bias_ptr=T(dt), scale_ptr=T(dt), residual_ptr=T(dt),
                                   out_ptr=T(dt), num_rows=M, num_features=D, in_features=F, x_stride_m=F,
                                   weight_stride_f=F, residual_stride_m=D, out_stride_m=D, HAS_BIAS=True,
                                   HAS_SCALE=True, DOT_PRECISION="ieee")),
        KernelSpec("_linear_gelu_kernel", _linear_gelu_kernel,
                   lambda dt: dict(x_ptr=T(dt), weight_ptr=T(dt), bias_ptr=T(dt), out_ptr=T(dt), num_rows=M,
                                   num_features=F, in_features=D, x_stride_m=D, weight_stride_f=D, out_stride_m=F,
                                   HAS_BIAS=True, APPROXIMATE_TANH=False, DOT_PRECISION="ieee")),
    ]


def kernel_specs() -> list[KernelSpec]:
    """The kernels with their launchers' arguments (imported here, after the interpreter check)."""
    return _training_specs() + _fused_gemm_specs() + _inference_specs()


def cuda_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill bytes, local and static shared memory of the cubin's kernel, from ``cuobjdump -res-usage``.

    Spills land in the stack frame (``STACK``, the "bytes stack frame" of ``ptxas -v``); ``LOCAL`` stays 0 when ptxas
    spills. Triton kernels make no calls and keep no local arrays, so their stack frame is spill space.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuda_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"Function \S+:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text!r}")
    return dict(zip(("registers", "spill_bytes", "static_shared_bytes", "local_bytes"), map(int, found.groups())))


def occupancy(registers: int, warps: int, shared: int) -> tuple[int, float]:
    """Resident CTAs per SM and the fraction of the SM's 64 warp slots they fill (static bound)."""
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    ctas = min(MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // warps, REGS_PER_SM // (regs_per_warp * warps),
               SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA))
    return ctas, ctas * warps / MAX_WARPS_PER_SM


def compile_variant(spec: KernelSpec, dtype, config, variant: dict) -> dict:
    """Compile one (kernel, dtype, config) for sm_90 the way a launch would; return its record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = spec.kernel if isinstance(spec.kernel, JITFunction) else spec.kernel.fn  # the Autotuner wraps the JITFunction
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launch = {**spec.args(dtype), **variant, **config.all_kwargs()}
    record = dict(kernel=spec.name, dtype=str(dtype).removeprefix("torch."), config={**variant, **config.kwargs},
                  num_warps=config.num_warps, num_stages=config.num_stages)
    start = time.perf_counter()
    try:
        # Triton's own binder: the signature, constants and alignment attributes a launch with these values gets.
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(**launch)
        opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as error:  # reported per variant; the script exits 1
        first = (str(error).strip().splitlines() or [""])[0]
        if getattr(error, "error_message", None):  # a CompilationError's first line is only "at LINE:COL:"
            first += " " + str(error.error_message).strip().splitlines()[0]
        return {**record, "error": f"{type(error).__name__}: {first}"}
    shared = compiled.metadata.shared + usage["static_shared_bytes"]
    ctas, occ = occupancy(usage["registers"], config.num_warps, shared)
    return {**record, **usage, "shared_bytes": compiled.metadata.shared, "launchable": shared <= SMEM_PER_CTA_MAX,
            "ctas_per_sm": ctas, "occupancy": round(occ, 3), "compile_s": round(time.perf_counter() - start, 2),
            "error": None}


def flags(r: dict) -> str:
    notes = []
    if r["spill_bytes"] or r["local_bytes"]:
        notes.append("SPILLS")
    if r["num_warps"] >= 8 and r["registers"] > 200:
        notes.append("REGS>200")
    if not r["launchable"]:
        notes.append("SMEM>227K: CANNOT LAUNCH")
    elif r["shared_bytes"] > 200 * 1024:
        notes.append("SMEM>200K")
    return " ".join(notes)


def print_table(records: list[dict]) -> None:
    head = f"{'kernel':30} {'dtype':8} {'config':44} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} " \
           f"{'smem':>7} {'CTA/SM':>6} {'occ':>5} {'s':>5}  flags"
    print(head)
    print("-" * len(head))
    for r in records:
        config = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r["config"].items())
        lead = f"{r['kernel']:30} {r['dtype']:8} {config:44} {r['num_warps']:5} {r['num_stages']:6}"
        if r["error"]:
            print(f"{lead} FAILED: {r['error']}")
        else:
            print(f"{lead} {r['registers']:4} {r['spill_bytes']:5} {r['shared_bytes']:7} {r['ctas_per_sm']:6} "
                  f"{r['occupancy']:5.0%} {r['compile_s']:5.1f}  {flags(r)}")


def main(argv: list[str] | None = None) -> int:
    if interpreter_active():
        print("compile_sm90: TRITON_INTERPRET is set, so the autotune configs are the interpreter's; unset it",
              file=sys.stderr)
        return 2
    specs = kernel_specs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the record to this path")
    parser.add_argument("--kernels", nargs="+", choices=[s.name for s in specs], help="only these kernels")
    parser.add_argument("--quick", action="store_true", help="only the first config of each kernel, bf16 only")
    args = parser.parse_args(argv)

    import torch
    import triton

    jobs = []
    for spec in specs:
        if args.kernels and spec.name not in args.kernels:
            continue
        configs = getattr(spec.kernel, "configs", None) or spec.configs
        combos = [(variant, config) for variant in spec.variants for config in configs]
        jobs += [(spec, torch.bfloat16, c, v) for v, c in (combos[:1] if args.quick else combos)]
        if not args.quick:
            jobs.append((spec, torch.float32, combos[0][1], combos[0][0]))
    start = time.perf_counter()
    records = [compile_variant(*job) for job in jobs]
    total = time.perf_counter() - start
    print_table(records)
    failures = sum(r["error"] is not None for r in records)
    built = [r for r in records if r["error"] is None]
    print(f"\n{len(records)} variants compiled for sm_90 in {total:.1f} s; {failures} failed; "
          f"{sum(bool(r['spill_bytes'] or r['local_bytes']) for r in built)} spill; "
          f"{sum(not r['launchable'] for r in built)} need more than the 227 KiB of shared memory an H100 CTA gets "
          f"(a launch raises OutOfResources; autotune skips them)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=DEVICE, triton=triton.__version__, torch=torch.__version__,
                           workload=f"DeiT-S, batch {B}, {N} tokens (argument specialisation of a launch)",
                           total_compile_s=round(total, 1), failures=failures, variants=records), f, indent=1)
            f.write("\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
