"""The ONNX front end: an `ir.Model` seen through the `FrontEnd` interface."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, ShapeInferencePass

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.errors import GrailError, UnsupportedModelError
from grail_graph.frontend import Batch, GroupPlan
from grail_graph.groups import ChannelGroup, Declined, WeightRef
from grail_graph.onnx_frontend import attention, calibration, matcher, normalize
from grail_graph.onnx_frontend.model_io import (
    PROTOBUF_LIMIT_BYTES,
    external_data_files,
    load_model,
    model_size_bytes,
    save_model,
)
from grail_graph.onnx_frontend.rewrite import GraphRewriter, to_canonical_consumer, to_canonical_producer

logger = logging.getLogger(__name__)


class OnnxFrontEnd:
    """An ONNX model loaded with onnx-ir, compressed in place."""

    def __init__(self, model: ir.Model, source: Path | None = None, device: str = "auto") -> None:
        self.model = model
        self.source = source
        self.device = device
        self._nodes: dict[str, ir.Node] | None = None
        self.added_biases: dict[str, WeightRef] = {}
        # Target-shape entries that hold head counts, by attention-head group name.
        self.head_shapes: dict[str, tuple[attention.ShapeEntry, ...]] = {}
        normalize.fold_weight_transposes(model.graph)
        NameFixPass()(model)  # the matcher and the group records address nodes by name
        try:
            ShapeInferencePass()(model)
        except Exception as error:  # shape inference is advisory here
            logger.warning("ONNX shape inference failed, continuing without it: %s", error)
        # NOTE: the uncompressed copy doubles the memory held for weights; it serves the
        # statistics modes that compare against the original model. Weights still in the
        # source's external data file are read into memory first. Otherwise the copy names
        # that file relative to the source folder, and the calibration model that embeds
        # the copy is written to another folder, where ONNX Runtime cannot find it.
        ir.external_data.load_to_model(model)
        self.reference = ir.to_proto(model)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> OnnxFrontEnd:
        return cls(load_model(path), Path(path), device)

    # Inputs -----------------------------------------------------------------------------

    def input_specs(self) -> list[tuple[str, np.dtype, tuple[int | None, ...]]]:
        """Return (name, dtype, shape) of each graph input; None marks a dynamic dimension."""
        specs = []
        for value in self.model.graph.inputs:
            if value.is_initializer():
                continue
            dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
            shape = tuple(d if isinstance(d, int) else None for d in value.shape) if value.shape else ()
            specs.append((value.name, dtype, shape))
        return specs

    # FrontEnd interface -------------------------------------------------------------------

    def find_groups(self, heads: bool = True) -> tuple[list[ChannelGroup], list[Declined]]:
        """Return the channel groups, with `heads` also the attention-head groups, and every declined candidate.

        The channel matcher declines the query, key and value projections because their
        outputs are split into heads. Those declines are dropped for projections that an
        attention-head group compresses.
        """
        groups, declined = matcher.find_groups(self.model.graph)
        if not heads:
            return groups, declined
        head_groups, head_declined, self.head_shapes = attention.find_head_groups(self.model.graph)
        in_groups = {ref.node for group in groups for ref in (*group.producers, *group.narrowed, *group.consumers)}
        kept_heads = []
        for group in head_groups:
            projections = {ref.node for ref in (*group.producers, *group.narrowed)}
            if projections & in_groups:
                names = ", ".join(sorted(projections & in_groups))
                head_declined.append(Declined(group.producers[0].node, f"projections {names} are in a channel group"))
                continue
            kept_heads.append(group)
        compressed = {ref.node for group in kept_heads for ref in (*group.producers, *group.narrowed)}
        declined = [entry for entry in declined if not set(entry.candidate.split(", ")) <= compressed]
        return groups + kept_heads, declined + head_declined

    def _weight(self, node_name: str, index: int) -> np.ndarray:
        if self._nodes is None:
            self._nodes = {node.name: node for node in self.model.graph}
        return matcher.constant_array(self._nodes[node_name].inputs[index])

    def producer_weights(self, group: ChannelGroup) -> list[np.ndarray]:
        return [to_canonical_producer(self._weight(r.node, r.input), r.axis) for r in group.producers]

    def narrowed_tensor(self, group: ChannelGroup, ref: WeightRef) -> np.ndarray:
        """Return a narrowed tensor with its hidden axis first."""
        return np.moveaxis(self._weight(ref.node, ref.input), ref.axis, 0)

    def consumer_weights(self, group: ChannelGroup) -> list[np.ndarray]:
        return [to_canonical_consumer(self._weight(r.node, r.input), r.axis) for r in group.consumers]

    def _hidden_ranks(self, groups: list[ChannelGroup]) -> dict[str, int | None]:
        ranks = {}
        for group in groups:
            weight = self._weight(group.consumers[0].node, group.consumers[0].input)
            ranks[group.name] = None if group.channels_last else weight.ndim
        return ranks

    def calibrate(
        self,
        groups: list[ChannelGroup],
        batches: Iterable[Batch],
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, GramAccumulator]:
        stats, _ = calibration.calibrate(
            self.model, groups, self._hidden_ranks(groups), batches, device=self.device, progress=progress
        )
        return stats

    def calibrate_with_reference(
        self,
        groups: list[ChannelGroup],
        batches: Iterable[Batch],
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, GramAccumulator], dict[str, CrossAccumulator]]:
        """Return Grams of the current model and its cross products with the original model."""
        return calibration.calibrate(
            self.model, groups, self._hidden_ranks(groups), batches,
            device=self.device, progress=progress, reference=self.reference,
        )  # fmt: skip

    def apply(self, plans: list[GroupPlan]) -> None:
        GraphRewriter(self.model, self.added_biases, self.head_shapes).apply(plans)
        self._nodes = None

    def verify(self) -> None:
        """Run the ONNX checker with strict shape inference on the current model."""
        try:
            if model_size_bytes(self.model) < PROTOBUF_LIMIT_BYTES // 2:
                onnx.checker.check_model(ir.to_proto(self.model), full_check=True)
                return
            with tempfile.TemporaryDirectory(prefix="grail-verify-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(self.model, path)
                onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise GrailError(f"the rewritten model fails the ONNX checker: {error}") from error

    # Output -----------------------------------------------------------------------------

    def set_metadata(self, key: str, value: str) -> None:
        self.model.metadata_props[key] = value

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
        """Write the model atomically and return the files written.

        `external_data` True writes the weights to `<name>.data` next to `path`, False
        keeps them in the model file; None (the default) uses external data only for
        models above half the protobuf limit, whatever the source file used.
        """
        guard = () if self.source is None else (self.source, *external_data_files(self.source))
        return save_model(self.model, path, overwrite_guard=guard, external_data=external_data)
