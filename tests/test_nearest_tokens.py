"""nearest_tokens: the Triton kernel against its PyTorch reference and a float64 per-row definition; ties, exclusions,
NaN, strided views, the custom op under torch.compile, and its input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiap_kernels.token_similarity.reference import nearest_tokens_reference
from tests.kernel_checks import DEVICE, TOLERANCES, needs_triton
from tests.kernel_checks import relative_error as rel_error

TOL = TOLERANCES["nearest_tokens"]
# A kernel's choice may differ from the float64 one only between candidates this close (rounding of the last ulps).
NEAR_TIE = 1e-5
NAN = float("nan")


def random_keys(batch, queries, candidates, width, dtype, seed=0, excluded_fraction=0.3):
    """Queries, candidates and a random exclusion mask (None when ``excluded_fraction`` is None), on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, width, generator=generator).to(dtype)
    c = torch.randn(batch, candidates, width, generator=generator).to(dtype)
    excluded = None
    if excluded_fraction is not None:
        excluded = torch.rand(batch, candidates, generator=generator) < excluded_fraction
        excluded = excluded.to(DEVICE)
    return q.to(DEVICE), c.to(DEVICE), excluded


def similarity64(queries, candidates, excluded=None):
    """The float64 cosine matrix ``[B, M, P]`` of the (already rounded) inputs, -inf where excluded."""
    similarity = torch.matmul(F.normalize(queries.cpu().double(), dim=-1, eps=1e-12),
                              F.normalize(candidates.cpu().double(), dim=-1, eps=1e-12).transpose(1, 2))
    if excluded is not None:
        similarity = similarity.masked_fill(excluded.cpu()[:, None, :], float("-inf"))
    return similarity


def loop_reference(queries, candidates, excluded=None):
    """Row by row in float64 with an explicit first-max scan: the definition, for finite inputs."""
    batch, rows, _ = queries.shape
    score = torch.full((batch, rows), float("-inf"), dtype=torch.float64)
    index = torch.zeros(batch, rows, dtype=torch.int64)
    for b in range(batch):
        cands = candidates[b].cpu().double()
        cands = cands / cands.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for m in range(rows):
            q = queries[b, m].cpu().double()
            sims = (cands @ (q / q.norm().clamp_min(1e-12))).tolist()
            for p, s in enumerate(sims):
                if (excluded is None or not excluded[b, p]) and s > score[b, m]:
                    score[b, m], index[b, m] = s, p
    return score, index


def assert_same_choice(index, queries, candidates, excluded=None):
    """Every chosen candidate is allowed and within NEAR_TIE of the float64 best (rows with a candidate left)."""
    similarity = similarity64(queries, candidates, excluded)
    best = similarity.max(dim=-1).values
    chosen = similarity.gather(-1, index.cpu()[..., None]).squeeze(-1)
    has_choice = best > float("-inf")
    assert (chosen[has_choice] >= best[has_choice] - NEAR_TIE).all()


@pytest.mark.parametrize("shape", [(2, 7, 11, 5), (1, 9, 40, 33), (3, 1, 6, 16)])
@pytest.mark.parametrize("with_excluded", [False, True], ids=["all", "excluded"])
def test_reference_is_the_definition(shape, with_excluded):
    q, c, excluded = random_keys(*shape, torch.float32, excluded_fraction=0.3 if with_excluded else None)
    q, c, excluded = q.cpu(), c.cpu(), None if excluded is None else excluded.cpu()
    score, index = nearest_tokens_reference(q, c, excluded)
    expected, expected_index = loop_reference(q, c, excluded)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(index, expected_index)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 23, 40), (1, 5, 33, 7), (3, 20, 19, 70)], ids=str)
@pytest.mark.parametrize("with_excluded", [False, True], ids=["all", "excluded"])
def test_kernel_matches_the_reference(shape, dtype, with_excluded):
    """M, P and W off the block sizes (16, 16, 32 under the interpreter), several candidate and width blocks."""
    from hiap_kernels import nearest_tokens

    q, c, excluded = random_keys(*shape, dtype, excluded_fraction=0.3 if with_excluded else None)
    score, index = nearest_tokens(q, c, excluded)
    expected, _ = loop_reference(q, c, excluded)
    assert score.shape == index.shape == shape[:2] and score.dtype == torch.float32 and index.dtype == torch.int64
    assert not score.isnan().any() and (index >= 0).all()  # every element written over the poison
    assert rel_error(score.cpu(), expected) < TOL[dtype]
    assert_same_choice(index, q, c, excluded)
    if excluded is not None:
        assert not excluded.gather(1, index).any()


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_kernel_reads_strided_views_in_place():
    """ToMe's even / odd tokens of keys that are themselves a slice of a packed projection, and a strided mask."""
    from hiap_kernels import nearest_tokens

    generator = torch.Generator().manual_seed(1)
    packed = torch.randn(2, 37, 3 * 24, generator=generator).to(DEVICE)
    keys = packed[..., 24:48]  # last stride 1, row stride 72
    even, odd = keys[:, ::2], keys[:, 1::2]  # row stride 144
    mask = torch.rand(2, 2 * even.shape[1], generator=generator).to(DEVICE) < 0.25
    excluded = mask[:, ::2]  # strided bool view, [2, 19]
    for args in ((even, odd, None), (even, odd, excluded[:, : odd.shape[1]]), (odd, even, excluded)):
        score, index = nearest_tokens(*args)
        expected, expected_index = nearest_tokens_reference(*[t.contiguous() if t is not None else t for t in args])
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-6)
        assert_same_choice(index, *args)


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_ties_go_to_the_lowest_index_as_in_torch_max():
    """Integer keys make ties exact in any summation order: duplicates inside one candidate block and across blocks
    (16 candidates per block under the interpreter), with and without the lowest of them excluded."""
    from hiap_kernels import nearest_tokens

    generator = torch.Generator().manual_seed(2)
    candidates = torch.randint(-3, 4, (2, 40, 20), generator=generator).float()
    for position in (5, 9, 21, 37):
        candidates[:, position] = candidates[:, 33]  # five copies of one row: 5, 9, 21, 33, 37
    queries = torch.cat([candidates[:, [33, 33]], 2 * candidates[:, [33]], candidates[:, :3]], dim=1)
    excluded = torch.zeros(2, 40, dtype=torch.bool)
    excluded[1, [5, 9]] = True  # batch 1: the first copy left is 21, in the second block
    for dtype in (torch.float32, torch.float16):
        q, c, ex = queries.to(DEVICE, dtype), candidates.to(DEVICE, dtype), excluded.to(DEVICE)
        for mask in (None, ex):
            score, index = nearest_tokens(q, c, mask)
            expected, expected_index = nearest_tokens_reference(q, c, mask)
            assert torch.equal(index.cpu(), expected_index.cpu())
            torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-6)
        assert index[0, :3].tolist() == [5, 5, 5] and index[1, :3].tolist() == [21, 21, 21]


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_rows_without_any_allowed_candidate_give_minus_inf_and_index_0():
    from hiap_kernels import nearest_tokens

    q, c, _ = random_keys(2, 5, 20, 8, torch.float32)
    excluded = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    excluded[0] = True
    for args in ((q, c, excluded), (q, c[:, :0], None), (q, c[:, :0], excluded[:, :0])):
        score, index = nearest_tokens(*args)
        expected, expected_index = nearest_tokens_reference(*args)
        assert torch.equal(score[0], expected[0]) and torch.equal(index[0], expected_index[0])
        assert (score[0] == float("-inf")).all() and (index[0] == 0).all()
    score, index = nearest_tokens(q, c, excluded)
    assert torch.isfinite(score[1]).all()
    assert_same_choice(index[1:], q[1:], c[1:], excluded[1:])


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_zero_width_keys_and_empty_batches():
    """Width 0 (every head of a block pruned): all similarities 0, the first allowed candidate; M = 0 or B = 0:
    empty results."""
    from hiap_kernels import nearest_tokens

    q, c, excluded = random_keys(2, 4, 6, 0, torch.float32)
    excluded[:, 0] = True
    for args in ((q, c, excluded), (q[:, :0], c, excluded), (q[:0], c[:0], excluded[:0])):
        score, index = nearest_tokens(*args)
        expected, expected_index = nearest_tokens_reference(*args)
        assert score.shape == expected.shape and torch.equal(score, expected) and torch.equal(index, expected_index)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN it is fed
def test_nan_wins_the_max_at_its_first_candidate_as_in_torch_max():
    """NaN in a query: (NaN, first allowed candidate). NaN in allowed candidates: (NaN, the first of them) for every
    query. NaN in an excluded candidate: masked away with it. The reference (torch.max) does the same."""
    from hiap_kernels import nearest_tokens

    q, c, _ = random_keys(2, 6, 40, 12, torch.float32)
    excluded = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    excluded[:, :2] = True
    q[0, 3, 5] = NAN  # batch 0: one poisoned query
    c[0, 1, 0] = NAN  # a candidate the mask excludes
    # Batch 1: poisoned candidates after a finite block (16 candidates per block under the interpreter), two in one
    # block and one in the next.
    c[1, 35, 2] = c[1, 20, 0] = c[1, 18, 7] = NAN
    for mask in (None, excluded):
        score, index = nearest_tokens(q, c, mask)
        expected, expected_index = nearest_tokens_reference(q, c, mask)
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        nan = score.isnan()
        assert torch.equal(index[nan], expected_index[nan])
        assert score[1].isnan().all() and (index[1] == 18).all()
        assert nan[0].tolist() == ([True] * 6 if mask is None else [False, False, False, True, False, False])
        # Unmasked, candidate 1's NaN reaches every query of batch 0, and the NaN query's row is NaN from candidate 0.
        assert index[0].tolist()[3] == (0 if mask is None else 2)
        if mask is None:
            assert index[0].tolist() == [1, 1, 1, 0, 1, 1]
    finite = [0, 1, 2, 4, 5]
    assert_same_choice(index[:1, finite], q[:1, finite], c[:1], excluded[:1])


@needs_triton
def test_custom_op_passes_opcheck():
    from hiap_kernels.token_similarity.kernel import _nearest_tokens_op

    q, c, excluded = random_keys(2, 9, 20, 24, torch.float32)
    torch.library.opcheck(_nearest_tokens_op, (q, c, excluded))
    torch.library.opcheck(_nearest_tokens_op, (q, c, None))


@needs_triton
def test_compiles_with_fullgraph_and_no_graph_breaks():
    """ToMe's use: even / odd views of one key tensor, plus RAPID's mask; the compiled call gives the eager result."""
    from hiap_kernels import nearest_tokens

    def tome_then_rapid(keys, excluded):
        edge, partner = nearest_tokens(keys[:, ::2], keys[:, 1::2])
        score, index = nearest_tokens(keys[:, :4], keys, excluded)
        return edge, partner, score, index

    keys = torch.randn(2, 21, 24, device=DEVICE)
    excluded = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    excluded[:, :4] = True
    explanation = torch._dynamo.explain(tome_then_rapid)(keys, excluded)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(tome_then_rapid, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(keys, excluded), tome_then_rapid(keys, excluded)):
        assert torch.equal(got, expected)


@needs_triton
@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda q, c, e: (q.double(), c.double(), e), TypeError, "queries has dtype"),
        (lambda q, c, e: (q, c.half(), e), TypeError, "candidates has dtype"),
        (lambda q, c, e: (q, c, e.to(torch.uint8)), TypeError, "excluded has dtype"),
        (lambda q, c, e: (q[0], c, e), ValueError, "queries must have 3 dimensions"),
        (lambda q, c, e: (q, c[:1], e), ValueError, "candidates must have shape"),
        (lambda q, c, e: (q, c[..., 1:], e), ValueError, "candidates must have shape"),
        (lambda q, c, e: (q, c, e[:, 1:]), ValueError, "excluded must have shape"),
        (lambda q, c, e: (q.transpose(1, 2), c, e), ValueError, "queries must have a unit last stride"),
        (lambda q, c, e: (q, c.transpose(1, 2).contiguous().transpose(1, 2), e), ValueError,
         "candidates must have a unit last stride"),
        (lambda q, c, e: (q, c.to("meta"), e), ValueError, "candidates is on meta"),
        (lambda q, c, e: (q, c, e.to("meta")), ValueError, "excluded is on meta"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, error, message):
    from hiap_kernels import nearest_tokens

    with pytest.raises(error, match=message) as caught:
        nearest_tokens(*change(*random_keys(2, 8, 10, 8, torch.float32)))
    assert "\n" not in str(caught.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernel_matches_the_reference_at_deit_shapes(dtype):
    """ToMe's matching (98 x 98 of 196 patches) and RAPID's merge (16 sources against all 196), keys 384 wide."""
    from hiap_kernels import nearest_tokens

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(64, 196, 384, generator=generator).to("cuda", dtype)
    score, index = nearest_tokens(keys[:, ::2], keys[:, 1::2])
    assert rel_error(score, similarity64(keys[:, ::2], keys[:, 1::2]).max(-1).values) < TOL[dtype]
    assert_same_choice(index, keys[:, ::2], keys[:, 1::2])
    order = torch.stack([torch.randperm(196, generator=generator) for _ in range(64)]).cuda()
    source = order[:, :16]
    excluded = torch.zeros(64, 196, dtype=torch.bool, device="cuda").scatter_(1, source, True)
    queries = torch.gather(keys, 1, source[..., None].expand(-1, -1, 384))
    score, index = nearest_tokens(queries, keys, excluded)
    assert rel_error(score, similarity64(queries, keys, excluded).max(-1).values) < TOL[dtype]
    assert_same_choice(index, queries, keys, excluded)
    assert not excluded.gather(1, index).any()
