"""``hiap.optimize``: the one entry point that prepares a model for inference on the device it will run on.

For every pruned layer it times the paths that run there on inputs of the layer's own shape and keeps the fastest:
attention through SDPA (one call per run of equal-width heads) or through the ragged Triton kernel, the FFN's
first half through ``nn.Linear`` + GELU or the fused Triton kernel, and then the whole block as timm runs it or as
fused GEMMs (LayerNorm in the qkv / fc1 prologues; bias, GELU, LayerScale and residual add in the epilogues;
``hiap.method.pruned.fused_block_forward``), and the patch embedding as timm's convolution or as one GEMM over the
unfolded patches. A path that loses is never used; on a machine
without a GPU (no Triton) there is nothing to choose and the PyTorch paths stay. The timings are remembered per device,
dtype and shape on the model (``model.hiap_path_memo``, which a copy of it carries), so preparing it again for the
same shapes times nothing; the choices are written on it (``model.hiap_paths``) for the user to see.
"""

from __future__ import annotations

import statistics
import time
import types
from typing import Callable

import torch
import torch.nn as nn

from hiap.backend import triton_runs_on, use_triton_kernels
from hiap.method.pruned import PrunedAttention, PrunedMlp, fused_block_forward

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DEVICES = ("cpu", "cuda")


def device_argument(device, who: str) -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cuda:0"`` or a GPU index) as a device a model can move to
    here.

    Raises:
        TypeError: ``device`` is of another type.
        ValueError: torch knows no such device, it is neither CPU nor CUDA, or that GPU is not there.
    """
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{who}: device must be a torch.device, a string such as 'cuda:0' or a GPU index, got "
                        f"{type(device).__name__}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{who}: device {device!r} is not a device torch knows ({error})") from None
    if resolved.type not in SUPPORTED_DEVICES:
        raise ValueError(f"{who}: device {resolved} is not supported; use one of {SUPPORTED_DEVICES}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{who}: device {resolved} was requested but no CUDA GPU is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{who}: device {resolved} was requested but this machine has "
                             f"{torch.cuda.device_count()} GPUs")
    return resolved


def _resolve(model: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    first = next(iter(model.parameters()), None)
    if device is not None:
        device = device_argument(device, "hiap.optimize")
    else:
        device = first.device if first is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"hiap.optimize: dtype must be a torch.dtype such as torch.float16, got {type(dtype).__name__}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hiap.optimize: dtype {dtype} is not supported; use one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)}")
    return device, dtype


def _median_ms(call: Callable[[], object], device: torch.device, repeats: int = 7) -> float:
    """Median time of ``call`` after two warm-up calls (the first compiles and autotunes a Triton kernel)."""
    for _ in range(2):
        call()
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def _triton_runs_here(device: torch.device) -> bool:
    """Whether compiled Triton kernels run on ``device`` (a GPU; the interpreter is never worth timing)."""
    return device.type == "cuda" and triton_runs_on(device)


def _choose(module: nn.Module, attribute: str, candidates: tuple[str, str], layer_input: torch.Tensor,
            key: tuple, memo: dict) -> str:
    """Time ``module`` with ``attribute`` set to each candidate; keep (and remember in ``memo`` under ``key``) the
    fastest."""
    if key not in memo:
        timings = {}
        with torch.inference_mode():
            for path in candidates:
                setattr(module, attribute, path)
                timings[path] = _median_ms(lambda: module(layer_input), layer_input.device)
        memo[key] = min(timings, key=timings.get)
    setattr(module, attribute, memo[key])
    return memo[key]


def gemm_patch_embed_forward(patch_embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``PatchEmbed`` with its convolution (kernel = stride, no padding) as one GEMM over the unfolded patches.

    Non-overlapping patches are a reshape of the image: ``[B, C, H, W] -> [B, N, C * p * p]``, times the flattened
    kernel ``[D, C * p * p]``, the same sums the convolution takes. Bound to the module by ``hiap.optimize`` where it
    measured faster than the convolution. ``x [B, C, H, W] -> [B, N, D]``.
    """
    batch, channels, height, width = x.shape
    ph, pw = patch_embed.patch_size
    if (height, width) != tuple(patch_embed.img_size):
        raise ValueError(f"input is {height} x {width} but the model takes {tuple(patch_embed.img_size)}")
    proj = patch_embed.proj
    patches = (x.reshape(batch, channels, height // ph, ph, width // pw, pw).permute(0, 2, 4, 1, 3, 5)
               .reshape(batch, (height // ph) * (width // pw), channels * ph * pw))
    out = torch.nn.functional.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
    return patch_embed.norm(out)


def _gemm_patch_embed_applies(patch_embed: nn.Module) -> bool:
    """Whether the patch embedding is a plain non-overlapping convolution flattened to tokens (timm's default)."""
    proj = getattr(patch_embed, "proj", None)
    return (isinstance(proj, nn.Conv2d) and getattr(patch_embed, "flatten", False)
            and not getattr(patch_embed, "dynamic_img_pad", False) and getattr(patch_embed, "img_size", None) is not None
            and tuple(proj.kernel_size) == tuple(proj.stride) == tuple(patch_embed.patch_size)
            and tuple(proj.padding) == (0, 0) and tuple(proj.dilation) == (1, 1) and proj.groups == 1)


def _choose_forward(module: nn.Module, replacement: Callable, names: tuple[str, str], example: torch.Tensor,
                    key: tuple, memo: dict) -> str:
    """Time ``module`` as it is (``names[0]``) and with ``replacement`` as its forward (``names[1]``); keep the faster,
    binding ``replacement`` to the module only when it won. A replacement bound earlier is taken off first."""
    module.__dict__.pop("forward", None)
    if key not in memo:
        with torch.inference_mode():
            timings = {names[0]: _median_ms(lambda: module(example), example.device),
                       names[1]: _median_ms(lambda: replacement(module, example), example.device)}
        memo[key] = min(timings, key=timings.get)
    if memo[key] == names[1]:
        module.forward = types.MethodType(replacement, module)
    return memo[key]


def _choose_patch_embed(patch_embed: nn.Module, images: torch.Tensor, key: tuple, memo: dict) -> str:
    """The patch embedding as timm's convolution (``conv``) or as one GEMM (``gemm``), whichever is faster."""
    if not _gemm_patch_embed_applies(patch_embed):
        patch_embed.__dict__.pop("forward", None)
        return "conv"
    return _choose_forward(patch_embed, gemm_patch_embed_forward, ("conv", "gemm"), images, key, memo)


def _choose_block(block: nn.Module, layer_input: torch.Tensor, key: tuple, memo: dict) -> str:
    """A pruned block as timm runs it (``modules``) or as fused GEMMs (``fused``), whichever is faster. A block patched
    by token reduction keeps its forward."""
    if "hiap_token_plan" in block.__dict__:
        return "modules"
    return _choose_forward(block, fused_block_forward, ("modules", "fused"), layer_input, key, memo)


def _layer_inputs(model: nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    vit = getattr(model, "vit", model)
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    return torch.randn(batch_size, tokens, vit.embed_dim, device=device, dtype=dtype)


def optimize(model: nn.Module, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             batch_size: int = 64, compile: bool = False, measure: bool = True) -> nn.Module:
    """Prepare ``model`` (a pruned model from ``hiap.extract`` / ``hiap.load_pruned``, or any timm ViT) for inference.

    Moves it to ``device`` / ``dtype`` (default: where it is), puts it in eval mode with no parameter asking for
    gradients, and on a GPU with Triton times each pruned layer's paths at ``[batch_size, N, D]`` and keeps the
    fastest (``measure=False`` keeps the construction-time defaults). ``compile=True`` returns
    ``torch.compile(model, fullgraph=True)``: a pruned model compiles into one graph, Triton kernels included.

    Returns:
        the model (or its compiled wrapper); ``model.hiap_paths`` lists ``{"layer", "attention", "ffn"}`` per block.

    Raises:
        ValueError: an unsupported device or dtype, or a batch size below 1.
        TypeError: ``model`` is not an ``nn.Module``, or ``device`` / ``dtype`` / ``batch_size`` is of another type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hiap.optimize needs an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"hiap.optimize: batch_size must be an integer >= 1, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"hiap.optimize: batch_size must be an integer >= 1, got {batch_size!r}")
    device, dtype = _resolve(model, device, dtype)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    blocks = list(getattr(getattr(model, "vit", model), "blocks", []))
    paths = []
    triton_here = measure and _triton_runs_here(device)
    layer_input = _layer_inputs(model, batch_size, device, dtype) if triton_here and blocks else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # (device name, dtype, batch, tokens, layer signature) -> the path that measured fastest
    memo = model.__dict__.setdefault("hiap_path_memo", {})
    for index, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        choice = {"layer": index, "attention": None, "ffn": None, "block": None}
        shape_key = (device_name, dtype, batch_size, None if layer_input is None else layer_input.shape[1])
        if isinstance(attn, PrunedAttention) and attn.num_heads:
            if triton_here:
                use_triton_kernels(attn)
                key = (*shape_key, "attention", tuple(attn.qk_widths), tuple(attn.v_widths))
                choice["attention"] = _choose(attn, "attention_path", ("sdpa", "triton"), layer_input, key, memo)
            else:
                attn.attention_path = "sdpa"
                choice["attention"] = "sdpa"
        if isinstance(mlp, PrunedMlp) and mlp.hidden_features:
            if triton_here and type(mlp.act) is nn.GELU:
                use_triton_kernels(mlp)
                key = (*shape_key, "ffn", mlp.hidden_features)
                choice["ffn"] = _choose(mlp, "ffn_path", ("linear", "triton"), layer_input, key, memo)
            else:
                mlp.ffn_path = "linear"
                choice["ffn"] = "linear"
        if triton_here and isinstance(attn, PrunedAttention) and isinstance(mlp, PrunedMlp):
            key = (*shape_key, "block", tuple(attn.qk_widths), tuple(attn.v_widths), mlp.hidden_features)
            choice["block"] = _choose_block(block, layer_input, key, memo)
        paths.append(choice)
    vit = getattr(model, "vit", model)
    if triton_here and hasattr(vit, "patch_embed"):
        patch_embed = vit.patch_embed
        channels, (height, width) = patch_embed.proj.in_channels, patch_embed.img_size
        images = torch.randn(batch_size, channels, height, width, device=device, dtype=dtype)
        model.hiap_patch_embed = _choose_patch_embed(
            patch_embed, images, (device_name, dtype, batch_size, "patch_embed", channels, height, width,
                                  patch_embed.proj.out_channels, tuple(patch_embed.patch_size)), memo)
    model.hiap_paths = paths
    if compile:
        return torch.compile(model, fullgraph=True)
    return model


def describe_paths(model: nn.Module) -> str:
    """One line per distinct choice, e.g. ``attention: sdpa x10, triton x2; ffn: linear x12``."""
    model = getattr(model, "_orig_mod", model)
    paths = getattr(model, "hiap_paths", None)
    if not paths:
        return "attention and FFN: timm's own modules"
    parts = []
    for kind in ("attention", "ffn", "block"):
        counts: dict[str, int] = {}
        for choice in paths:
            if choice.get(kind) is not None:
                counts[choice[kind]] = counts.get(choice[kind], 0) + 1
        if kind == "block" and not counts:
            continue  # no block-level choice where Triton does not run
        parts.append(f"{kind}: " + (", ".join(f"{path} x{n}" for path, n in sorted(counts.items())) or "none left"))
    if getattr(model, "hiap_patch_embed", None):
        parts.append(f"patch embedding: {model.hiap_patch_embed}")
    return "; ".join(parts)
