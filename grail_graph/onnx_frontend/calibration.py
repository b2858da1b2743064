"""Gram statistics computed inside ONNX Runtime.

The calibration model is the original graph plus, for each group's tap value, a Gram
reduction added as extra outputs: the tap is moved to channels-last, flattened to rows
(one per token or pixel), cast to float32 (float64 stays float64) and reduced to
rows^T rows and per-channel sums. Only H x H matrices leave the runtime; partial Grams
are merged in float64 by `GramAccumulator`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from grail_graph.core import GramAccumulator
from grail_graph.groups import ChannelGroup
from grail_graph.onnx_frontend.model_io import save_model

logger = logging.getLogger(__name__)


def execution_providers(device: str = "auto") -> list[str]:
    """Return ONNX Runtime providers for `device` ("auto", "cpu" or "cuda")."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        from grail_graph.errors import GrailError

        raise GrailError(
            "device 'cuda' requested but ONNX Runtime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)})",
            "Install grail-opt[gpu] in an environment without the CPU onnxruntime, or use --device cpu.",
        )
    return ["CPUExecutionProvider"]


def _opset(proto: onnx.ModelProto) -> int:
    return next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 1)


def _add_gram_outputs(
    proto: onnx.ModelProto, group: ChannelGroup, rank: int | None, index: int, row_type: int
) -> list[str]:
    """Append the reduction nodes for one group and return their output names.

    `row_type` is the TensorProto element type that the rows are cast to before the product.
    """
    graph = proto.graph
    prefix = f"grail_calib_{index}"
    tap = group.tap
    nodes = []
    if not group.channels_last:
        perm = [0, *range(2, rank), 1]
        nodes.append(helper.make_node("Transpose", [tap], [f"{prefix}_nhwc"], perm=perm))
        tap = f"{prefix}_nhwc"
    graph.initializer.append(
        helper.make_tensor(f"{prefix}_shape", TensorProto.INT64, [2], [-1, group.width])
    )
    nodes.append(helper.make_node("Reshape", [tap, f"{prefix}_shape"], [f"{prefix}_flat"]))
    nodes.append(helper.make_node("Cast", [f"{prefix}_flat"], [f"{prefix}_rows"], to=row_type))
    rows = f"{prefix}_rows"
    nodes.append(helper.make_node("Transpose", [rows], [f"{prefix}_cols"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", [f"{prefix}_cols", rows], [f"{prefix}_gram"]))
    if _opset(proto) >= 13:
        graph.initializer.append(helper.make_tensor(f"{prefix}_axis", TensorProto.INT64, [1], [0]))
        nodes.append(
            helper.make_node("ReduceSum", [rows, f"{prefix}_axis"], [f"{prefix}_sums"], keepdims=0)
        )
    else:
        nodes.append(helper.make_node("ReduceSum", [rows], [f"{prefix}_sums"], axes=[0], keepdims=0))
    nodes.append(helper.make_node("Shape", [rows], [f"{prefix}_count"]))
    graph.node.extend(nodes)
    outputs = [f"{prefix}_gram", f"{prefix}_sums", f"{prefix}_count"]
    for name in outputs:
        graph.output.append(helper.make_empty_tensor_value_info(name))
    return outputs


def build_calibration_model(
    model: ir.Model, groups: list[ChannelGroup], ranks: Mapping[str, int | None], folder: Path
) -> tuple[Path, dict[str, list[str]]]:
    """Write the calibration model into `folder` and return its path and output names."""
    base = folder / "base.onnx"
    save_model(model, base)
    proto = onnx.load(str(base), load_external_data=False)
    dtypes = {value.name: value.dtype for node in model.graph for value in node.outputs}
    outputs = {}
    for index, group in enumerate(groups):
        # Shape inference can leave a tap's type unknown, and such a tap is cast to float32.
        double = dtypes.get(group.tap) == ir.DataType.DOUBLE
        row_type = TensorProto.DOUBLE if double else TensorProto.FLOAT
        outputs[group.name] = _add_gram_outputs(proto, group, ranks.get(group.name), index, row_type)
    path = folder / "calibration.onnx"
    onnx.save(proto, str(path))
    return path, outputs


def calibrate(
    model: ir.Model,
    groups: list[ChannelGroup],
    ranks: Mapping[str, int | None],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    device: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> dict[str, GramAccumulator]:
    """Run `batches` through the model in ONNX Runtime and return one Gram per group."""
    stats = {group.name: GramAccumulator(group.width) for group in groups}
    if not groups:
        return stats
    with tempfile.TemporaryDirectory(prefix="grail-calib-") as tmp:
        path, outputs = build_calibration_model(model, groups, ranks, Path(tmp))
        session = ort.InferenceSession(str(path), providers=execution_providers(device))
        logger.info("calibrating %d groups on %s", len(groups), session.get_providers()[0])
        names = [name for group in groups for name in outputs[group.name]]
        for batch in batches:
            results = dict(zip(names, session.run(names, dict(batch))))
            for group in groups:
                gram, sums, shape = (results[name] for name in outputs[group.name])
                stats[group.name].add_partial(gram, sums, int(shape[0]))
            if progress is not None:
                progress(next(iter(batch.values())).shape[0])
    return stats
