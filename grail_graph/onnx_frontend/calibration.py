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

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.errors import DataError
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


def session_feeds(session: ort.InferenceSession, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Select from `batch` the arrays that `session` declares as inputs.

    A batch may carry more arrays than the model reads, such as an `attention_mask` for a
    model exported with `input_ids` alone; those are left out. An integer array is cast
    to the declared integer type, so int32 token ids feed an int64 input.
    """
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in batch:
            raise DataError(
                f"calibration batch has no array for model input '{spec.name}' (batch arrays: {', '.join(sorted(batch))})",
                "Key the calibration arrays by the model's input names.",
            )
        array = np.asarray(batch[spec.name])
        declared = _ORT_INTEGER_TYPES.get(spec.type)
        if declared is not None and np.issubdtype(array.dtype, np.integer) and array.dtype != declared:
            array = array.astype(declared)
        feeds[spec.name] = array
    return feeds


_ORT_INTEGER_TYPES = {
    f"tensor({np.dtype(dtype).name})": np.dtype(dtype)
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
}


def _opset(proto: onnx.ModelProto) -> int:
    return next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 1)


def _add_rows(graph: onnx.GraphProto, tap: str, group: ChannelGroup, rank: int | None, prefix: str, row_type: int) -> str:
    """Append nodes that turn `tap` into (rows, H) rows of `row_type`; return the rows' name."""
    if not group.channels_last:
        perm = [0, *range(2, rank), 1]
        graph.node.append(helper.make_node("Transpose", [tap], [f"{prefix}_nhwc"], perm=perm))
        tap = f"{prefix}_nhwc"
    graph.initializer.append(helper.make_tensor(f"{prefix}_shape", TensorProto.INT64, [2], [-1, group.width]))
    graph.node.append(helper.make_node("Reshape", [tap, f"{prefix}_shape"], [f"{prefix}_flat"]))
    graph.node.append(helper.make_node("Cast", [f"{prefix}_flat"], [f"{prefix}_rows"], to=row_type))
    return f"{prefix}_rows"


def _add_product(graph: onnx.GraphProto, left: str, right: str, name: str) -> str:
    """Append left^T right for two (rows, H) tensors."""
    graph.node.append(helper.make_node("Transpose", [left], [f"{name}_t"], perm=[1, 0]))
    graph.node.append(helper.make_node("MatMul", [f"{name}_t", right], [name]))
    return name


def _add_column_sums(proto: onnx.ModelProto, rows: str, name: str) -> str:
    graph = proto.graph
    if _opset(proto) >= 13:
        graph.initializer.append(helper.make_tensor(f"{name}_axis", TensorProto.INT64, [1], [0]))
        graph.node.append(helper.make_node("ReduceSum", [rows, f"{name}_axis"], [name], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceSum", [rows], [name], axes=[0], keepdims=0))
    return name


def _add_gram_outputs(
    proto: onnx.ModelProto,
    group: ChannelGroup,
    rank: int | None,
    index: int,
    row_type: int,
    reference_tap: str | None = None,
) -> list[str]:
    """Append the reduction nodes for one group and return their output names.

    The outputs are the Gram, the column sums and the shape of the rows; with a
    `reference_tap`, also the cross product reference^T current and the reference sums.
    `row_type` is the TensorProto element type that the rows are cast to before the product.
    """
    graph = proto.graph
    prefix = f"grail_calib_{index}"
    rows = _add_rows(graph, group.tap, group, rank, prefix, row_type)
    outputs = [
        _add_product(graph, rows, rows, f"{prefix}_gram"),
        _add_column_sums(proto, rows, f"{prefix}_sums"),
    ]
    graph.node.append(helper.make_node("Shape", [rows], [f"{prefix}_count"]))
    outputs.append(f"{prefix}_count")
    if reference_tap is not None:
        reference_rows = _add_rows(graph, reference_tap, group, rank, f"{prefix}_ref", row_type)
        outputs.append(_add_product(graph, reference_rows, rows, f"{prefix}_cross"))
        outputs.append(_add_column_sums(proto, reference_rows, f"{prefix}_ref_sums"))
    for name in outputs:
        graph.output.append(helper.make_empty_tensor_value_info(name))
    return outputs


REFERENCE_PREFIX = "grail_ref/"


def _merge_reference(proto: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """Add the reference graph beside `proto`'s, reading the same inputs.

    Every name of the reference gets REFERENCE_PREFIX, and Identity nodes feed its
    inputs from the current model's inputs, so one feed runs both models.
    """
    renamed = onnx.compose.add_prefix(reference, REFERENCE_PREFIX)
    graph = proto.graph
    for value in reference.graph.input:
        graph.node.append(helper.make_node("Identity", [value.name], [REFERENCE_PREFIX + value.name]))
    initializer_names = {t.name for t in renamed.graph.initializer}
    graph.node.extend(renamed.graph.node)
    graph.initializer.extend(renamed.graph.initializer)
    graph.value_info.extend(v for v in renamed.graph.value_info if v.name not in initializer_names)


def build_calibration_model(
    model: ir.Model,
    groups: list[ChannelGroup],
    ranks: Mapping[str, int | None],
    folder: Path,
    reference: onnx.ModelProto | None = None,
) -> tuple[Path, dict[str, list[str]]]:
    """Write the calibration model into `folder` and return its path and output names.

    With `reference` (the uncompressed model), each group also gets the cross product of
    the reference's tap with the current model's tap, computed on the same input.
    """
    base = folder / "base.onnx"
    save_model(model, base)
    proto = onnx.load(str(base), load_external_data=False)
    # Only the reductions are outputs, so ONNX Runtime drops every node after the last tap.
    del proto.graph.output[:]
    if reference is not None:
        _merge_reference(proto, reference)
    dtypes = {value.name: value.dtype for node in model.graph for value in node.outputs}
    outputs = {}
    for index, group in enumerate(groups):
        # Shape inference can leave a tap's type unknown, and such a tap is cast to float32.
        double = dtypes.get(group.tap) == ir.DataType.DOUBLE
        row_type = TensorProto.DOUBLE if double else TensorProto.FLOAT
        reference_tap = None if reference is None else REFERENCE_PREFIX + group.tap
        outputs[group.name] = _add_gram_outputs(proto, group, ranks.get(group.name), index, row_type, reference_tap)
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
    reference: onnx.ModelProto | None = None,
) -> tuple[dict[str, GramAccumulator], dict[str, CrossAccumulator]]:
    """Run `batches` in ONNX Runtime; return one Gram per group, and cross statistics.

    The cross statistics (reference tap against current tap, both full width) are
    computed only when `reference` is given; otherwise the second dict is empty.
    """
    stats = {group.name: GramAccumulator(group.width) for group in groups}
    crosses = {} if reference is None else {g.name: CrossAccumulator(g.width, g.width) for g in groups}
    if not groups:
        return stats, crosses
    with tempfile.TemporaryDirectory(prefix="grail-calib-") as tmp:
        path, outputs = build_calibration_model(model, groups, ranks, Path(tmp), reference)
        session = ort.InferenceSession(str(path), providers=execution_providers(device))
        logger.info("calibrating %d groups on %s", len(groups), session.get_providers()[0])
        names = [name for group in groups for name in outputs[group.name]]
        for batch in batches:
            feeds = session_feeds(session, batch)
            results = dict(zip(names, session.run(names, feeds)))
            for group in groups:
                gram, sums, shape, *cross = (results[name] for name in outputs[group.name])
                stats[group.name].add_partial(gram, sums, int(shape[0]))
                if cross:
                    crosses[group.name].add_partial(cross[0], gram, cross[1], sums, int(shape[0]))
            if progress is not None:
                progress(next(iter(feeds.values())).shape[0])
    return stats, crosses
