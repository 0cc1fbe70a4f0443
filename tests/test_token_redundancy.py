"""token_redundancy: the Triton kernel against its PyTorch reference and a float64 definition; strided views, half
keys, no attention term, NaN, the custom op under torch.compile, and its input errors."""

from __future__ import annotations

import pytest
import torch

from hiap_kernels.token_score.reference import token_redundancy_reference
from tests.kernel_checks import DEVICE, TOLERANCES, needs_triton
from tests.kernel_checks import relative_error as rel_error

TOL = TOLERANCES["token_redundancy"]


def random_inputs(batch, patches, width, dtype, seed=0):
    """Keys as attention hands them over (a slice of a packed q|k|v projection, row stride 3 W) and the class
    token's attention (a softmax row, strided: every token's but the class token's own), on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randn(batch, patches, 3 * width, generator=generator).to(DEVICE, dtype)
    attention = torch.softmax(torch.randn(batch, patches + 1, generator=generator), dim=-1).to(DEVICE)
    return packed[..., width : 2 * width], attention[:, 1:]


def definition(keys, cls, importance_weight):
    """Token by token in float64: the mean cosine similarity to every other token, minus the weighted share."""
    keys = keys.cpu().double()
    batch, patches, _ = keys.shape
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = torch.zeros(batch, patches, dtype=torch.float64)
    for b in range(batch):
        for i in range(patches):
            others = [float(unit[b, i] @ unit[b, j]) for j in range(patches) if j != i]
            score[b, i] = sum(others) / max(len(others), 1)
    if cls is not None and importance_weight:
        cls = cls.cpu().double()
        score -= importance_weight * cls / cls.sum(dim=-1, keepdim=True) * patches
    return score


@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 23, 40), (3, 1, 16)], ids=str)
@pytest.mark.parametrize("importance_weight", [0.0, 1.0, 2.5])
def test_reference_is_the_definition(shape, importance_weight):
    keys, cls = random_inputs(*shape, torch.float32)
    keys, cls = keys.cpu(), cls.cpu()
    score = token_redundancy_reference(keys, cls, importance_weight)
    assert score.dtype == torch.float32 and score.shape == shape[:2]
    torch.testing.assert_close(score.double(), definition(keys, cls, importance_weight), rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 40), (1, 5, 33), (3, 20, 7), (2, 1, 16)], ids=str)
@pytest.mark.parametrize("with_cls", [False, True], ids=["redundancy", "with_importance"])
def test_kernel_matches_the_reference(shape, dtype, with_cls):
    """P and W off the block sizes (the next power of two of P, 16 wide under the interpreter), several width
    chunks, the keys a strided view; against the float64 definition of the same (rounded) inputs."""
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(*shape, dtype)
    cls = cls if with_cls else None
    score = token_redundancy(keys, cls, 1.5)
    expected = definition(keys, cls, 1.5)
    assert score.shape == shape[:2] and score.dtype == torch.float32
    assert not score.isnan().any()  # every element written over the poison
    assert rel_error(score.cpu(), expected) < TOL[dtype]
    reference = token_redundancy_reference(keys, cls, 1.5)
    torch.testing.assert_close(score, reference, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_the_prune_step_keeps_the_same_tokens_with_the_kernel():
    """redundancy_prune with the kernel's score keeps exactly the reference's tokens (prefix tokens in front)."""
    from hiap.tokens.reduce import redundancy_prune
    from hiap_kernels import token_redundancy

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1 + 30, 24, generator=generator).to(DEVICE)
    packed = torch.randn(3, 1 + 30, 3 * 20, generator=generator).to(DEVICE)
    attention = torch.softmax(torch.randn(3, 31, generator=generator), dim=-1).to(DEVICE)
    ones = torch.ones(1, 1, 1, device=DEVICE)
    args = (x, ones, packed[..., 20:40], attention, 9, 1.0)
    got, _ = redundancy_prune(*args, prefix=1, score=token_redundancy)
    expected, _ = redundancy_prune(*args, prefix=1)
    assert torch.equal(got, expected)


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_nan_in_a_key_makes_its_image_nan_as_in_the_reference():
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(2, 9, 12, torch.float32)
    keys = keys.clone()
    keys[1, 4, 3] = float("nan")
    score = token_redundancy(keys, cls, 1.0)
    reference = token_redundancy_reference(keys, cls, 1.0)
    assert score[1].isnan().all() and reference[1].isnan().all()
    torch.testing.assert_close(score[0], reference[0], rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.usefixtures("poisoned")
def test_zero_keys_width_and_empty_batches():
    """A zero key is a zero unit vector (as F.normalize makes it); zero width scores every token -1 / (P - 1)."""
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(2, 6, 8, torch.float32)
    keys = keys.clone()
    keys[0, 2] = 0.0
    torch.testing.assert_close(token_redundancy(keys, cls, 1.0), token_redundancy_reference(keys, cls, 1.0),
                               rtol=1e-5, atol=1e-6)
    empty_width = torch.empty(2, 6, 0, device=DEVICE)
    torch.testing.assert_close(token_redundancy(empty_width), token_redundancy_reference(empty_width))
    assert token_redundancy(torch.empty(0, 6, 8, device=DEVICE)).shape == (0, 6)


@needs_triton
def test_custom_op_passes_opcheck():
    from hiap_kernels.token_score.kernel import _token_redundancy_op

    keys, cls = random_inputs(2, 9, 12, torch.float32)
    torch.library.opcheck(_token_redundancy_op, (keys.contiguous(), cls.contiguous(), 1.0))
    torch.library.opcheck(_token_redundancy_op, (keys.contiguous(), None, 0.0))


@needs_triton
def test_compiles_with_fullgraph_and_no_graph_breaks():
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(2, 9, 12, torch.float32)

    def prune_order(keys, cls):
        return torch.topk(token_redundancy(keys, cls, 1.0), 5, dim=1, largest=False).indices

    compiled = torch.compile(prune_order, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(keys, cls), prune_order(keys, cls))


@needs_triton
@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda k, c, w: (k.double(), c, w), TypeError, "keys has dtype"),
        (lambda k, c, w: (k, c.to(torch.int64), w), TypeError, "cls has dtype"),
        (lambda k, c, w: (k[0], c, w), ValueError, "keys must have 3 dimensions"),
        (lambda k, c, w: (k, c[:, 1:], w), ValueError, "cls must have shape"),
        (lambda k, c, w: (k, c, -1.0), ValueError, "importance_weight must be finite and >= 0"),
        (lambda k, c, w: (k, c, float("nan")), ValueError, "importance_weight must be finite and >= 0"),
        (lambda k, c, w: (k, c.to("meta"), w), ValueError, "cls is on meta"),
        (lambda k, c, w: (torch.zeros(1, 4097, 2, device=k.device), None, w), ValueError, "at most 4096"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, error, message):
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(2, 8, 10, torch.float32)
    with pytest.raises(error, match=message) as caught:
        token_redundancy(*change(keys, cls, 1.0))
    assert "\n" not in str(caught.value)


def test_the_op_refuses_a_device_it_cannot_run_on(monkeypatch):
    pytest.importorskip("triton")
    from hiap_kernels import token_redundancy

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    keys, cls = random_inputs(1, 4, 8, torch.float32)
    if keys.device.type == "cuda":
        pytest.skip("the device is a GPU: the kernel runs")
    with pytest.raises(RuntimeError, match="token_redundancy_reference"):
        token_redundancy(keys.cpu(), cls.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("patches", [196, 576, 4096])
def test_gpu_kernel_matches_the_reference_at_vit_shapes(dtype, patches):
    """DeiT-S's 196 patch tokens, ViT-L/16 at 384 px (576) and the largest tile, keys 384 wide."""
    from hiap_kernels import token_redundancy

    keys, cls = random_inputs(8 if patches < 4096 else 2, patches, 384, dtype)
    score = token_redundancy(keys, cls, 1.0)
    unit = torch.nn.functional.normalize(keys.double(), dim=-1, eps=1e-12)
    cls = cls.double()
    expected = ((unit @ unit.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1) - 1) / (patches - 1)
    expected -= cls / cls.sum(dim=-1, keepdim=True) * patches
    assert rel_error(score.double(), expected) < TOL[dtype]
