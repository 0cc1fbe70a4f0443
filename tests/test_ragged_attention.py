"""Ragged inference attention: Triton kernel and both plain-PyTorch references against a float64 reference."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hiap_kernels.ragged_attn.reference import (
    build_head_table,
    packed_widths,
    padded_gather_indices,
    ragged_attention_naive,
    ragged_attention_padded,
)
from tests.kernel_checks import TOLERANCES as ALL_TOLERANCES
from tests.kernel_checks import needs_triton
from tests.kernel_checks import relative_error as rel_error

TOLERANCES = ALL_TOLERANCES["ragged_attention"]

# name -> (q/k widths, v widths, original head dim Dh)
LAYOUTS = {
    "dense": ([32, 32, 32, 32], [32, 32, 32, 32], 32),
    "one_head": ([20], [13], 64),
    "width_one": ([1, 1, 0], [1, 1, 1], 16),
    "mixed": ([8, 24, 64, 17], [64, 9, 33, 40], 64),
    "qk_zero_heads": ([0, 12, 0], [7, 16, 1], 16),
    "all_qk_zero": ([0, 0], [5, 3], 16),
}
INTERPRETER_TOKENS = [1, 17, 65]


def make_qkv(qk, v, batch, tokens, dtype, device="cpu"):
    total, _ = packed_widths(qk, v)
    return torch.randn(batch, tokens, total, dtype=torch.float32, device=device).to(dtype)


def fp64_reference(qkv, qk, v, head_dim):
    return ragged_attention_naive(qkv.double(), qk, v, head_dim**-0.5)


def triton_attention():
    from hiap_kernels import ragged_attention

    return ragged_attention


def run_kernel(qkv, qk, v, head_dim, out=None):
    ragged_attention = triton_attention()
    table = build_head_table(qk, v, device=qkv.device)
    return ragged_attention(qkv, table, head_dim**-0.5, max(qk), max(v), out=out)


# ----------------------------------------------------------------------------------------------- layout builders


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_head_table_and_gather_indices_describe_the_same_packing(layout):
    qk, v, _ = LAYOUTS[layout]
    total, out_width = packed_widths(qk, v)
    table = build_head_table(qk, v)
    q_index, k_index, v_index, out_index = padded_gather_indices(qk, v)

    assert table.dtype == torch.int32 and table.shape == (len(qk), 6)
    assert all(t.dtype == torch.int64 for t in (q_index, k_index, v_index, out_index))
    assert q_index.shape == k_index.shape == (len(qk), max(1, max(qk)))
    assert v_index.shape == (len(qk), max(v))
    assert out_index.shape == (out_width,)

    seen_columns = []
    for head, (q_off, k_off, v_off, out_off, qk_w, v_w) in enumerate(table.tolist()):
        assert (qk_w, v_w) == (qk[head], v[head])
        assert q_index[head, :qk_w].tolist() == list(range(q_off, q_off + qk_w))
        assert k_index[head, :qk_w].tolist() == list(range(k_off, k_off + qk_w))
        assert v_index[head, :v_w].tolist() == list(range(v_off, v_off + v_w))
        assert (q_index[head, qk_w:] == total).all() and (k_index[head, qk_w:] == total).all()
        assert (v_index[head, v_w:] == total).all()
        max_v = v_index.shape[1]
        assert out_index[out_off : out_off + v_w].tolist() == list(range(head * max_v, head * max_v + v_w))
        seen_columns += range(q_off, q_off + qk_w)
        seen_columns += range(k_off, k_off + qk_w)
        seen_columns += range(v_off, v_off + v_w)
    # Every qkv column belongs to exactly one head, in the packed order Q..., K..., V...
    assert sorted(seen_columns) == list(range(total))
    q_cols = [c for h in range(len(qk)) for c in q_index[h, : qk[h]].tolist()]
    assert q_cols == list(range(sum(qk)))


@pytest.mark.parametrize(
    "qk, v, message",
    [
        ([4, 4], [4], "heads"),
        ([-1], [4], ">= 0"),
        ([4], [0], ">= 1"),
    ],
)
def test_layout_builders_reject_bad_widths(qk, v, message):
    with pytest.raises(ValueError, match=message):
        build_head_table(qk, v)
    with pytest.raises(ValueError, match=message):
        padded_gather_indices(qk, v)


def test_empty_layout_builds_empty_tables():
    table = build_head_table([], [])
    q_index, _, v_index, out_index = padded_gather_indices([], [])
    assert table.shape == (0, 6) and q_index.shape[0] == 0 and v_index.shape[0] == 0 and out_index.numel() == 0


# ----------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tokens", INTERPRETER_TOKENS)
def test_padded_reference_matches_naive_in_fp64(layout, tokens):
    qk, v, head_dim = LAYOUTS[layout]
    qkv = make_qkv(qk, v, 2, tokens, torch.float64)
    ref = fp64_reference(qkv, qk, v, head_dim)
    out = ragged_attention_padded(qkv, *padded_gather_indices(qk, v), head_dim**-0.5)
    assert out.shape == ref.shape == (2, tokens, sum(v))
    assert rel_error(out, ref) < TOLERANCES[torch.float64]


def test_zero_qk_width_is_uniform_attention():
    qk, v, head_dim = [0, 8], [6, 8], 16
    qkv = make_qkv(qk, v, 2, 17, torch.float64)
    values = qkv[..., 2 * sum(qk) : 2 * sum(qk) + 6]
    expected = values.mean(dim=1, keepdim=True).expand(-1, 17, -1)
    for out in (
        ragged_attention_naive(qkv, qk, v, head_dim**-0.5),
        ragged_attention_padded(qkv, *padded_gather_indices(qk, v), head_dim**-0.5),
    ):
        torch.testing.assert_close(out[..., :6], expected)


def test_padded_reference_compiles_without_graph_breaks():
    qk, v, head_dim = [8, 0, 5], [4, 8, 3], 16
    qkv = make_qkv(qk, v, 1, 5, torch.float32)
    indices = padded_gather_indices(qk, v)
    explanation = torch._dynamo.explain(ragged_attention_padded)(qkv, *indices, head_dim**-0.5)
    assert explanation.graph_break_count == 0


# ----------------------------------------------------------------------------------------------- Triton kernel


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", INTERPRETER_TOKENS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kernel_and_references_match_fp64(layout, tokens, dtype):
    qk, v, head_dim = LAYOUTS[layout]
    qkv = make_qkv(qk, v, 2, tokens, dtype)
    ref = fp64_reference(qkv, qk, v, head_dim)
    poisoned = torch.full((2, tokens, sum(v)), float("nan"), dtype=dtype)

    out = run_kernel(qkv, qk, v, head_dim, out=poisoned)
    padded = ragged_attention_padded(qkv, *padded_gather_indices(qk, v), head_dim**-0.5)
    naive = ragged_attention_naive(qkv, qk, v, head_dim**-0.5)

    assert out is poisoned and out.dtype == dtype and not out.isnan().any()
    for name, result in (("triton", out), ("padded", padded), ("naive", naive)):
        assert result.dtype == dtype
        assert rel_error(result, ref) < TOLERANCES[dtype], name


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["mixed", "qk_zero_heads"])
def test_key_bias_matches_both_references(layout, dtype):
    """The per-key bias (token reduction's log(size)) is added to every head's scores, as in the references."""
    qk, v, head_dim = LAYOUTS[layout]
    tokens = 17
    qkv = make_qkv(qk, v, 2, tokens, dtype)
    key_bias = torch.rand(2, tokens).mul(3.0).log1p()  # log of sizes in [1, 4]
    ref = ragged_attention_naive(qkv.double(), qk, v, head_dim**-0.5, key_bias=key_bias.double())
    unbiased = ragged_attention_naive(qkv.double(), qk, v, head_dim**-0.5)
    ragged_attention = triton_attention()
    out = ragged_attention(qkv, build_head_table(qk, v), head_dim**-0.5, max(qk), max(v), key_bias=key_bias)
    padded = ragged_attention_padded(qkv, *padded_gather_indices(qk, v), head_dim**-0.5, key_bias=key_bias)
    assert rel_error(unbiased, ref) > 1e-3  # the bias matters
    for name, result in (("triton", out), ("padded", padded)):
        assert rel_error(result, ref) < TOLERANCES[dtype], name
    with pytest.raises(ValueError, match="key_bias must have shape"):
        ragged_attention(qkv, build_head_table(qk, v), head_dim**-0.5, max(qk), max(v), key_bias=key_bias[:, 1:])
    with pytest.raises(TypeError):
        ragged_attention(qkv, build_head_table(qk, v), head_dim**-0.5, max(qk), max(v), key_bias=key_bias.double())


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN it is fed
@pytest.mark.parametrize("part", ["q", "k", "v"])
@pytest.mark.parametrize("tokens", [5, 40])
def test_nan_in_the_input_propagates_as_the_math_says_on_every_path(part, tokens):
    """One NaN policy: a NaN in q poisons its query row of its head, in k every row of its head, in v its column.

    The kernel, the naive reference and the padded reference under SDPA's math backend agree element for element.
    (PyTorch's default CPU SDPA returns zeros for a query row whose scores are all NaN at short sequences; the padded
    reference inherits that from PyTorch, as dense timm does, so it is compared under the math backend.)
    """
    qk, v, head_dim = [8, 4, 0], [8, 4, 4], 16
    qkv = make_qkv(qk, v, 1, tokens, torch.float32)
    column = {"q": 1, "k": sum(qk) + 1, "v": 2 * sum(qk) + 1}[part]
    qkv[0, 2, column] = float("nan")
    naive = ragged_attention_naive(qkv, qk, v, head_dim**-0.5)
    with sdpa_kernel([SDPBackend.MATH]):
        padded = ragged_attention_padded(qkv, *padded_gather_indices(qk, v), head_dim**-0.5)
    kernel = run_kernel(qkv, qk, v, head_dim)
    expected = torch.zeros_like(naive, dtype=torch.bool)
    if part == "q":
        expected[0, 2, :8] = True
    elif part == "k":
        expected[0, :, :8] = True
    else:
        expected[0, :, 1] = True
    for name, result in (("naive", naive), ("padded", padded), ("triton", kernel)):
        assert torch.equal(result.isnan(), expected), name


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_allocates_output_without_out_argument():
    qk, v, head_dim = [8, 3], [5, 16], 16
    qkv = make_qkv(qk, v, 1, 17, torch.float32)
    out = run_kernel(qkv, qk, v, head_dim)
    assert out.shape == (1, 17, 21) and out.is_contiguous() and not out.isnan().any()
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float32]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_reads_strided_qkv_in_place_and_copies_otherwise():
    qk, v, head_dim = [12, 0, 7], [9, 4, 16], 16
    total, _ = packed_widths(qk, v)
    wide = torch.randn(2, 17, total + 10)
    sliced = wide[..., 3 : 3 + total]  # row stride T + 10, last stride 1
    token_major = torch.randn(17, 2, total).transpose(0, 1)  # batch stride T, token stride 2T
    column_major = torch.randn(2, total, 17).transpose(1, 2)  # last stride 17: needs a copy
    for qkv in (sliced, token_major, column_major):
        assert not qkv.is_contiguous()
        out = run_kernel(qkv, qk, v, head_dim)
        assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float32]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_accepts_larger_width_bounds():
    qk, v, head_dim = [5, 9], [3, 7], 16
    qkv = make_qkv(qk, v, 1, 17, torch.float32)
    table = build_head_table(qk, v)
    out = triton_attention()(qkv, table, head_dim**-0.5, 40, 33)
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float32]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_with_no_heads_returns_empty_output():
    qkv = torch.randn(2, 5, 0)
    out = triton_attention()(qkv, build_head_table([], []), 0.125, 0, 1)
    assert out.shape == (2, 5, 0)


def _valid_call():
    qk, v = [4, 2], [3, 5]
    return make_qkv(qk, v, 1, 3, torch.float32), build_head_table(qk, v), 0.25, 4, 5


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "qkv": a["qkv"].to(torch.int32)}, TypeError, "dtype"),
        (lambda a: {**a, "qkv": a["qkv"][0]}, ValueError, "dimensions"),
        (lambda a: {**a, "head_table": a["head_table"].long()}, TypeError, "int32"),
        (lambda a: {**a, "head_table": a["head_table"][:, :5]}, ValueError, r"\[Hk, 6\]"),
        (lambda a: {**a, "head_table": a["head_table"].to("meta")}, ValueError, "is on"),
        (lambda a: {**a, "head_table": build_head_table([4, 3], [3, 5])}, ValueError, "T ="),
        (lambda a: {**a, "head_table": a["head_table"].flip(0).contiguous()}, ValueError, "offsets"),
        (lambda a: {**a, "max_qk_width": 3}, ValueError, "max_qk_width"),
        (lambda a: {**a, "max_v_width": 4}, ValueError, "max_v_width"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "finite"),
        (lambda a: {**a, "out": torch.empty(1, 3, 7)}, ValueError, "shape"),
        (lambda a: {**a, "out": torch.empty(1, 3, 8, dtype=torch.float16)}, TypeError, "dtype"),
    ],
)
def test_kernel_rejects_bad_inputs(change, error, message):
    ragged_attention = triton_attention()
    qkv, table, scale, max_qk, max_v = _valid_call()
    args = {"qkv": qkv, "head_table": table, "scale": scale, "max_qk_width": max_qk, "max_v_width": max_v}
    args = change(args)
    out = args.pop("out", None)
    with pytest.raises(error, match=message):
        ragged_attention(
            args["qkv"], args["head_table"], args["scale"], args["max_qk_width"], args["max_v_width"], out=out
        )


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_table_edited_in_place_is_validated_again():
    ragged_attention = triton_attention()
    qkv, table, scale, max_qk, max_v = _valid_call()
    ragged_attention(qkv, table, scale, max_qk, max_v)
    table[0, 4] = 3  # the cached check of this table must not hide the edit
    with pytest.raises(ValueError):
        ragged_attention(qkv, table, scale, max_qk, max_v)


# ----------------------------------------------------------------------------------------------- GPU only


GPU_LAYOUTS = {
    "deit_s_dense": ([64] * 6, [64] * 6, 64),
    "deit_s_pruned": ([64, 40, 0, 17, 8, 1], [64, 33, 16, 48, 1, 57], 64),
    "vit_b_uneven": ([16, 64, 64, 0, 24, 32, 48, 56, 8, 64, 40, 12], [64, 16, 8, 64, 24, 32, 1, 56, 8, 64, 40, 12], 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 65, 197, 577])
@pytest.mark.parametrize("layout", sorted(GPU_LAYOUTS))
def test_gpu_kernel_and_references_match_fp64(layout, tokens, dtype):
    qk, v, head_dim = GPU_LAYOUTS[layout]
    qkv = make_qkv(qk, v, 4, tokens, dtype, device="cuda")
    ref = fp64_reference(qkv, qk, v, head_dim)
    poisoned = torch.full((4, tokens, sum(v)), float("nan"), dtype=dtype, device="cuda")
    out = run_kernel(qkv, qk, v, head_dim, out=poisoned)
    indices = padded_gather_indices(qk, v, device="cuda")
    # CUDA's memory-efficient SDPA may run fp32 on tf32 tensor cores; the math backend keeps the reference in fp32.
    with sdpa_kernel([SDPBackend.MATH]) if dtype == torch.float32 else contextlib.nullcontext():
        padded = ragged_attention_padded(qkv, *indices, head_dim**-0.5)
    assert not out.isnan().any()
    assert rel_error(out, ref) < TOLERANCES[dtype]
    assert rel_error(padded, ref) < TOLERANCES[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernel_on_strided_qkv_from_a_linear(dtype):
    qk, v, head_dim = GPU_LAYOUTS["deit_s_pruned"]
    total, _ = packed_widths(qk, v)
    wide = torch.randn(2, 197, total + 64, dtype=dtype, device="cuda")
    qkv = wide[..., 64:]
    out = run_kernel(qkv, qk, v, head_dim)
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[dtype]


@pytest.mark.gpu
def test_gpu_padded_reference_under_torch_compile():
    qk, v, head_dim = GPU_LAYOUTS["deit_s_pruned"]
    qkv = make_qkv(qk, v, 2, 197, torch.float16, device="cuda")
    indices = padded_gather_indices(qk, v, device="cuda")
    compiled = torch.compile(ragged_attention_padded, fullgraph=True)
    out = compiled(qkv, *indices, 1 / math.sqrt(head_dim))
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float16]


@pytest.mark.gpu
def test_gpu_kernel_with_more_than_65535_batch_heads():
    qk, v, head_dim = GPU_LAYOUTS["vit_b_uneven"]
    qkv = make_qkv(qk, v, 6000, 3, torch.float16, device="cuda")  # B * Hk = 72000 programs per query block
    out = run_kernel(qkv, qk, v, head_dim)
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float16]


@needs_triton
def test_the_package_level_op_stays_callable_after_its_module_is_imported():
    import hiap_kernels

    table = build_head_table([4, 8], [8, 2])
    qkv = torch.randn(2, 3, 34)
    first = hiap_kernels.ragged_attention(qkv, table, 0.35, 8, 8)
    again = hiap_kernels.ragged_attention(qkv, table, 0.35, 8, 8)
    assert torch.equal(first, again)


@needs_triton
def test_the_custom_op_passes_opcheck():
    from hiap_kernels.ragged_attn.kernel import packed_ragged_attention

    qk, v = [8, 0, 3], [5, 16, 2]
    qkv = make_qkv(qk, v, 2, 5, torch.float32)
    torch.library.opcheck(packed_ragged_attention, (qkv, build_head_table(qk, v), 0.25, 8, 16, 23))
    strided = torch.randn(2, 5, qkv.shape[-1] + 4)[..., 2:-2]
    torch.library.opcheck(packed_ragged_attention, (strided, build_head_table(qk, v), 0.25, 8, 16, 23))


@needs_triton
def test_a_vouched_for_table_is_not_read_on_the_host(monkeypatch):
    import hiap_kernels.ragged_attn.kernel as kernel

    qk, v, head_dim = [8, 3], [5, 16], 16
    qkv = make_qkv(qk, v, 1, 9, torch.float32)
    monkeypatch.setattr(kernel, "validate_head_table", lambda *a: pytest.fail("the table was read on the host"))
    out = triton_attention()(qkv, build_head_table(qk, v), head_dim**-0.5, 8, 16, out_width=21)
    assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[torch.float32]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tokens", INTERPRETER_TOKENS)
def test_sdpa_runs_match_fp64(layout, tokens):
    from hiap_kernels import head_runs, ragged_attention_sdpa

    qk, v, head_dim = LAYOUTS[layout]
    for dtype in (torch.float64, torch.float32):
        qkv = make_qkv(qk, v, 2, tokens, dtype)
        out = ragged_attention_sdpa(qkv, head_runs(qk, v), head_dim**-0.5)
        assert out.shape == (2, tokens, sum(v)) and out.dtype == dtype
        assert rel_error(out, fp64_reference(qkv, qk, v, head_dim)) < TOLERANCES[dtype]


def test_runs_group_neighbouring_heads_of_equal_widths():
    from hiap_kernels import head_runs

    runs = head_runs([16, 16, 8, 8, 0], [16, 16, 16, 8, 8])
    assert [(r.heads, r.qk_width, r.v_width) for r in runs] == [(2, 16, 16), (1, 8, 16), (1, 8, 8), (1, 0, 8)]
    assert [(r.q_start, r.k_start, r.v_start) for r in runs] == [(0, 48, 96), (32, 80, 128), (40, 88, 144),
                                                                  (48, 96, 152)]
    assert head_runs([], []) == ()


def test_sdpa_runs_compile_without_graph_breaks():
    from hiap_kernels import head_runs, ragged_attention_sdpa

    qk, v, head_dim = LAYOUTS["mixed"]
    qkv = make_qkv(qk, v, 1, 5, torch.float32)
    runs = head_runs(qk, v)
    explanation = torch._dynamo.explain(lambda t: ragged_attention_sdpa(t, runs, head_dim**-0.5))(qkv)
    assert explanation.graph_break_count == 0
