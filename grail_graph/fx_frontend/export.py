"""Export a PyTorch module to ONNX and check it in ONNX Runtime."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn

from grail_graph.errors import GrailError
from grail_graph.onnx_frontend.model_io import save_model

logger = logging.getLogger(__name__)

# Largest max-abs difference between ONNX Runtime and eager PyTorch accepted for fp32 output,
# relative to max(1, max |output|), because float32 rounding error grows with the values.
EXPORT_TOLERANCE = 1e-4


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    opset: int = 18,
    tolerance: float | None = EXPORT_TOLERANCE,
    dynamic_batch: bool = True,
    dynamic_axes: Sequence[Sequence[int]] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export `model` to one ONNX file at `path`, then compare it with eager PyTorch.

    The model is exported with torch's default (torch.export-based) exporter, a dynamic
    batch dimension, and constants folded. With `tolerance`, the max-abs difference between
    ONNX Runtime's and eager PyTorch's outputs on `example_inputs` must be at most
    tolerance * max(1, max |output|), else GrailError. `dynamic_axes` lists, per input,
    further dynamic axes (such as the sequence axis of token ids); an axis index names one
    dimension shared by all inputs. `metadata` goes into the model's metadata_props. The
    file is written atomically.
    """
    inputs = _as_tuple(example_inputs)
    names = list(input_names) if input_names else [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    model = model.eval()
    batch = torch.export.Dim("batch") if dynamic_batch and inputs[0].shape[0] > 1 else None
    dimensions: dict[int, object] = {}
    dynamic_shapes = []
    for index, tensor in enumerate(inputs):
        axes = {0: batch} if batch is not None else {}
        for axis in dynamic_axes[index] if dynamic_axes else ():
            # torch.export specialises sizes 0 and 1, so such an example cannot make an axis dynamic.
            if axis > 0 and tensor.shape[axis] > 1:
                axes[axis] = dimensions.setdefault(axis, torch.export.Dim(f"dim{axis}"))
        dynamic_shapes.append(axes or None)
    dynamic_shapes = tuple(dynamic_shapes)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, inputs, input_names=names, opset_version=opset, dynamic_shapes=dynamic_shapes, optimize=True
            )
    except Exception as error:  # the exporter raises many unrelated types
        raise GrailError(f"torch.onnx.export failed for {type(model).__name__}: {error}") from error
    path = Path(path)
    program.model.metadata_props.update(metadata or {})
    save_model(program.model, path)
    if tolerance is not None:
        check_export(model, inputs, path, tolerance)
    return path


def check_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, tolerance: float) -> float:
    """Return the max-abs output difference between ONNX Runtime and eager PyTorch.

    Raises GrailError when it exceeds tolerance * max(1, max |output| of eager PyTorch).
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.detach().cpu().numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    ort_outputs = session.run(None, feeds)
    with torch.no_grad():
        torch_outputs = model(*inputs)
    torch_outputs = torch_outputs if isinstance(torch_outputs, (tuple, list)) else (torch_outputs,)
    difference = max(
        float(np.abs(np.asarray(a, dtype=np.float64) - b.detach().cpu().double().numpy()).max())
        for a, b in zip(ort_outputs, torch_outputs)
    )
    scale = max([1.0, *(float(output.detach().abs().max()) for output in torch_outputs if output.numel())])
    if difference > tolerance * scale:
        raise GrailError(
            f"ONNX export of {type(model).__name__} differs from PyTorch by {difference:.3g}, more than "
            f"{tolerance} x max(1, max |output|) = {tolerance * scale:.3g}"
        )
    logger.info("ONNX export matches PyTorch within %.3g", difference)
    return difference
