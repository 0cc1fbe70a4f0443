"""ONNX export of a pruned model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hiap.app.evaluation import model_input_shape
from hiap.app.runtime import InputError
from hiap.files import atomic_path

# Opsets the TorchScript exporter writes for these models (below 9 it cannot express them; above 20 it does not go).
OPSETS = (9, 20)


def require_onnx() -> None:
    """InputError with the install line when the ``onnx`` extra (onnx and onnxruntime) is missing."""
    import importlib

    for name in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f'ONNX export needs the {name} package, which is not installed: pip install ".[onnx]" '
                             '(the onnx extra)') from None


@dataclass
class ExportCheck:
    path: Path
    opset: int
    max_abs_error: float
    batch_checked: int
    nodes: int


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17, atol: float = 1e-4,
                check_batch: int = 3) -> ExportCheck:
    """Write ``model`` (input ``images [B, C, H, W]``, output ``logits [B, classes]``, dynamic B) to ONNX and compare
    onnxruntime's output with PyTorch's on a random batch of another size than the export trace.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no network, and it traces the ragged per-head
    layout (heads of different widths, zero-width FFNs and attention layers) as plain gathers and matmuls.

    Raises:
        RuntimeError: onnxruntime's output differs from PyTorch's by more than ``atol``.
        InputError: the ``onnx`` extra is not installed (the message says how to install it).
    """
    require_onnx()
    import onnx
    import onnxruntime

    path = Path(path)
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset must lie in [{OPSETS[0]}, {OPSETS[1]}], got {opset}")
    if not atol > 0 or atol != atol:
        raise ValueError(f"atol must be a number > 0, got {atol}")
    model = model.eval().cpu()
    example = torch.randn(2, *model_input_shape(model))
    # The file appears under its name only once it passed the check: a refused export leaves nothing behind.
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # The tracer warns about timm's Python-side shape checks; they are constant for a fixed model.
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        images = torch.randn(check_batch, *model_input_shape(model), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(["logits"], {"images": images.numpy()})[0]
        error = float(abs(got - expected).max())
        if not error <= atol:
            raise RuntimeError(f"ONNX output differs from PyTorch by {error:.3g} (> {atol:g}) for {path}")
    return ExportCheck(path=path, opset=opset, max_abs_error=error, batch_checked=check_batch,
                       nodes=len(graph.graph.node))
