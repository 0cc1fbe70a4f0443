"""merge_tokens: the Triton kernel against its PyTorch reference and an explicit per-row loop."""

from __future__ import annotations

import pytest
import torch

from hiap_kernels.token_merge.reference import merge_tokens_reference
from tests.kernel_checks import DEVICE, TOLERANCES, needs_triton
from tests.kernel_checks import relative_error as rel_error

TOL = TOLERANCES["merge_tokens"]


def random_merge(batch, tokens, channels, sources, dtype, seed=0, device="cpu"):
    """Random tokens, sizes in [1, 4], and a random split into kept tokens and sources with random targets."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator).to(dtype)
    size = torch.randint(1, 5, (batch, tokens), generator=generator).float()
    order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])
    source, keep = order[:, :sources], order[:, sources:].sort(dim=1).values
    target = torch.randint(0, tokens - sources, (batch, sources), generator=generator)
    return [t.to(device) for t in (x, size, keep, source, target)]


def loop_reference(x, size, keep, source, target):
    """Row by row in float64: the definition, with nothing vectorised."""
    batch, kept = keep.shape
    out = torch.zeros(batch, kept, x.shape[-1], dtype=torch.float64)
    out_size = torch.zeros(batch, kept, dtype=torch.float64)
    for b in range(batch):
        for d in range(kept):
            members = [int(keep[b, d])] + [int(source[b, r]) for r in range(source.shape[1]) if int(target[b, r]) == d]
            weights = size[b, members].double()
            out[b, d] = (x[b, members].double() * weights[:, None]).sum(0) / weights.sum()
            out_size[b, d] = weights.sum()
    return out, out_size


@pytest.mark.parametrize("shape", [(2, 17, 24, 5), (1, 9, 40, 0), (3, 33, 7, 16)])
def test_reference_is_the_definition(shape):
    inputs = random_merge(*shape, torch.float32)
    out, out_size = merge_tokens_reference(*inputs)
    expected, expected_size = loop_reference(*inputs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_size.double(), expected_size)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 24, 5), (1, 9, 40, 0), (3, 45, 70, 19)], ids=str)
def test_kernel_matches_the_reference(shape, dtype):
    from hiap_kernels import merge_tokens

    inputs = random_merge(*shape, dtype, device=DEVICE)
    out, out_size = merge_tokens(*inputs)
    expected, expected_size = loop_reference(*[t.cpu() for t in inputs])
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    assert not out.isnan().any() and not out_size.isnan().any()
    assert rel_error(out.cpu(), expected) < TOL[dtype]
    torch.testing.assert_close(out_size.cpu().double(), expected_size)


@needs_triton
def test_kernel_reads_a_strided_view_and_compiles_without_graph_breaks():
    from hiap_kernels import merge_tokens

    x, size, keep, source, target = random_merge(2, 20, 16, 6, torch.float32, device=DEVICE)
    wide = torch.randn(2, 20, 40, device=DEVICE)
    wide[..., 8:24] = x
    view = wide[..., 8:24]  # last stride 1, row stride 40
    torch.testing.assert_close(merge_tokens(view, size, keep, source, target)[0],
                               merge_tokens_reference(x, size, keep, source, target)[0], rtol=1e-6, atol=1e-6)
    explanation = torch._dynamo.explain(merge_tokens)(x, size, keep, source, target)
    assert explanation.graph_break_count == 0


@needs_triton
def test_custom_op_passes_opcheck():
    from hiap_kernels.token_merge.kernel import _merge_tokens_op

    torch.library.opcheck(_merge_tokens_op, random_merge(2, 17, 24, 5, torch.float32, device=DEVICE))


@needs_triton
@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: [a[0].double(), *a[1:]], TypeError, "x has dtype"),
        (lambda a: [a[0], a[1][:, 1:], *a[2:]], ValueError, "size must have shape"),
        (lambda a: [a[0], a[1].half(), *a[2:]], TypeError, "size has dtype"),
        (lambda a: [*a[:2], a[2].int(), *a[3:]], TypeError, "keep has dtype"),
        (lambda a: [*a[:4], a[4][:, 1:]], ValueError, "must share B"),
        (lambda a: [a[0], a[1], torch.cat([a[2], a[2]], 1), *a[3:]], ValueError, "more than"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, error, message):
    from hiap_kernels import merge_tokens

    with pytest.raises(error, match=message) as caught:
        merge_tokens(*change(random_merge(2, 17, 24, 5, torch.float32, device=DEVICE)))
    assert "\n" not in str(caught.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernel_matches_the_reference_at_deit_shapes(dtype):
    from hiap_kernels import merge_tokens

    inputs = random_merge(64, 196, 384, 16, dtype, device="cuda")
    out, out_size = merge_tokens(*inputs)
    expected, expected_size = merge_tokens_reference(*[t.float() if t.is_floating_point() else t for t in inputs])
    assert rel_error(out.float(), expected) < TOL[dtype]
    torch.testing.assert_close(out_size, expected_size)


# Indices out of range: refused on the host where the tensors are there already (CPU), flagged in the kernel and in
# the reference's device path (no host read on a GPU), never read


def _broken(inputs, name, position, value):
    x, size, keep, source, target = (t.clone() for t in inputs)
    index = {"keep": keep, "source": source, "target": target}[name]
    index[position] = value
    return x, size, keep, source, target


BROKEN = [("keep", (0, 1), 99, "keep holds 99, outside \\[0, 17\\)"),
          ("keep", (1, 0), -1, "keep holds -1, outside \\[0, 17\\)"),
          ("source", (0, 2), 17, "source holds 17, outside \\[0, 17\\)"),
          ("target", (1, 4), 12, "target holds 12, outside \\[0, 12\\)"),
          ("target", (0, 0), -5, "target holds -5, outside \\[0, 12\\)")]


@pytest.mark.parametrize("name, position, value, message", BROKEN)
def test_the_reference_refuses_indices_out_of_range_on_the_cpu(name, position, value, message):
    inputs = _broken(random_merge(2, 17, 24, 5, torch.float32), name, position, value)
    with pytest.raises(ValueError, match=message) as caught:
        merge_tokens_reference(*inputs)
    assert "\n" not in str(caught.value)


@needs_triton
@pytest.mark.parametrize("name, position, value, message", BROKEN)
def test_the_kernel_refuses_indices_out_of_range_on_the_cpu(name, position, value, message):
    from hiap_kernels import merge_tokens

    inputs = _broken(random_merge(2, 17, 24, 5, torch.float32), name, position, value)
    with pytest.raises(ValueError, match=message):
        merge_tokens(*inputs)


def _flagged_rows(name, position, kept):
    """Which output rows an index out of range turns NaN: the row of a bad ``keep``, every row of the image of a bad
    ``source`` or ``target``."""
    flagged = torch.zeros(2, kept, dtype=torch.bool)
    batch, item = position
    if name == "keep":
        flagged[batch, item] = True
    else:
        flagged[batch] = True
    return flagged


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("name, position, value, message", BROKEN + [("keep", (0, 3), 10**12, ""),
                                                                     ("source", (1, 1), -(10**12), "")])
def test_kernel_and_device_reference_flag_indices_out_of_range_with_nan_and_agree(name, position, value, message):
    """Where indices are not read on the host (on a GPU): the rows they touch come out NaN, in the kernel and in the
    reference alike; every other row is the merge of valid indices."""
    from hiap_kernels.token_merge.kernel import _merge_tokens_op
    from hiap_kernels.token_merge.reference import merge_tokens_flagged

    good = random_merge(2, 17, 24, 5, torch.float32, device=DEVICE)
    inputs = _broken(good, name, position, value)
    out, out_size = _merge_tokens_op(*inputs)
    ref, ref_size = merge_tokens_flagged(*inputs)
    expected, expected_size = merge_tokens_reference(*good)
    flagged = _flagged_rows(name, position, 12).to(DEVICE)
    for got, got_size in ((out, out_size), (ref, ref_size)):
        assert got[flagged].isnan().all() and got_size[flagged].isnan().all()
        assert rel_error(got[~flagged].cpu(), expected[~flagged].cpu().double()) < TOL[torch.float32]
        torch.testing.assert_close(got_size[~flagged], expected_size[~flagged])


def test_the_reference_compiles_into_one_graph_without_reading_indices_on_the_host():
    """Under torch.compile (a token-reduced model with hiap.optimize(compile=True)) no index is read on the host;
    the reference flags indices out of range instead, as the kernel does."""
    inputs = random_merge(2, 20, 16, 6, torch.float32)
    compiled = torch.compile(merge_tokens_reference, fullgraph=True, backend="aot_eager")
    out, out_size = compiled(*inputs)
    expected, expected_size = merge_tokens_reference(*inputs)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_size, expected_size)
    out, _ = compiled(*_broken(inputs, "keep", (0, 1), 99))
    assert out[0, 1].isnan().all() and not out[1].isnan().any()
