"""The torch.fx front end: a PyTorch module seen through the `FrontEnd` interface."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.errors import GrailError, UnsupportedModelError
from grail_graph.frontend import GroupPlan
from grail_graph.fx_frontend import attention, calibration, matcher
from grail_graph.fx_frontend.export import export_onnx
from grail_graph.fx_frontend.rewrite import apply_plans, get_tensor, to_numpy
from grail_graph.groups import ChannelGroup, Declined


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the torch device for "auto", "cpu", "cuda" or "cuda:N", with a clear error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrailError(f"device {str(device)!r} requested but CUDA is not available", "Use --device cpu.")
    return device


def trace(model: nn.Module, example_inputs=None) -> fx.GraphModule:
    """Trace `model` with torch.fx.symbolic_trace, else with torch.export on the examples.

    symbolic_trace keeps module calls; torch.export gives an ATen-level graph whose
    parameters keep their qualified names, and it handles Python control flow that
    depends only on shapes.
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as symbolic_error:  # tracing failures come in many types
        if example_inputs is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} cannot be traced with torch.fx.symbolic_trace "
                f"({type(symbolic_error).__name__}: {symbolic_error})",
                "Pass example inputs so that torch.export can trace it, or export it to ONNX and pass the .onnx file.",
            ) from symbolic_error
    args, kwargs = (), {}
    if isinstance(example_inputs, dict):
        kwargs = example_inputs
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        return torch.export.export(model, args, kwargs).module()
    except Exception as error:  # torch.export raises many unrelated types
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced with torch.fx.symbolic_trace or torch.export "
            f"({type(error).__name__}: {error})",
            "Export the model to ONNX yourself and pass the .onnx file.",
        ) from error


class FxFrontEnd:
    """A PyTorch module compressed on a private copy; the caller's module is not changed."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs=None,
        device: str | torch.device | None = "auto",
        input_names: list[str] | None = None,
        dynamic_axes: list[tuple[int, ...]] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.input_names = input_names
        self.dynamic_axes = dynamic_axes
        self.model = copy.deepcopy(model).eval().to(self.device)
        self.example_inputs = example_inputs
        self.graph_module = trace(self.model, self._example_on_device())
        # NOTE: the uncompressed copy doubles the memory held for weights; it serves the
        # statistics modes that compare against the original model.
        self.reference = copy.deepcopy(self.model)
        self.reference_graph = trace(self.reference, self._example_on_device())
        self.metadata: dict[str, str] = {}

    # FrontEnd interface -------------------------------------------------------------------

    def find_groups(self) -> tuple[list[ChannelGroup], list[Declined]]:
        """Return channel groups and attention-head groups in graph order, and the declined candidates.

        The query, key and value projections that join a head group are removed from the
        channel matcher's declined list, which rejects them for feeding a reshape.
        """
        if any(attention.is_attention(node) for node in self.graph_module.graph.nodes):
            self._propagate_shapes()
        head_groups, head_declined = attention.find_head_groups(self.graph_module)
        groups, declined = matcher.find_groups(self.graph_module, self.model)
        in_heads = {ref.node.rpartition(".")[0] for g in head_groups for ref in (*g.producers, *g.narrowed)}
        declined = [d for d in declined if not set(d.candidate.split(", ")) <= in_heads]
        position = {node.name: index for index, node in enumerate(self.graph_module.graph.nodes)}
        groups = sorted([*groups, *head_groups], key=lambda group: position.get(group.tap, -1))
        return groups, [*declined, *head_declined]

    def _propagate_shapes(self) -> None:
        """Record tensor shapes on a symbolic_trace graph, which the head matcher reads."""
        if attention.has_shapes(self.graph_module) or self.example_inputs is None:
            return
        example = self._example_on_device()
        if isinstance(example, dict):
            return  # NOTE: keyword inputs are not mapped to placeholders here, so heads are declined
        args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(*args)

    def producer_weights(self, group: ChannelGroup) -> list[np.ndarray]:
        return [np.moveaxis(to_numpy(get_tensor(self.model, r.node)), r.axis, 0) for r in group.producers]

    def narrowed_tensor(self, group: ChannelGroup, ref) -> np.ndarray:
        """Return a narrowed tensor with its hidden axis first."""
        return np.moveaxis(to_numpy(get_tensor(self.model, ref.node)), ref.axis, 0)

    def consumer_weights(self, group: ChannelGroup) -> list[np.ndarray]:
        return [np.moveaxis(to_numpy(get_tensor(self.model, r.node)), r.axis, 1) for r in group.consumers]

    def calibrate(
        self,
        groups: list[ChannelGroup],
        batches: Iterable,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, GramAccumulator]:
        batches = (self._to_torch(batch) for batch in batches)
        return calibration.calibrate(self.model, self.graph_module, groups, batches, self.device, progress)

    def calibrate_with_reference(
        self,
        groups: list[ChannelGroup],
        batches: Iterable,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, GramAccumulator], dict[str, CrossAccumulator]]:
        """Return Grams of the current model and its cross products with the original model."""
        batches = (self._to_torch(batch) for batch in batches)
        return calibration.calibrate_with_reference(
            self.model, self.graph_module, self.reference, self.reference_graph, groups, batches, self.device, progress
        )

    def apply(self, plans: list[GroupPlan]) -> None:
        apply_plans(self.model, plans)
        self.graph_module = trace(self.model, self._example_on_device())

    def verify(self) -> None:
        """Lint the re-traced graph and run one forward pass on the example inputs."""
        self.graph_module.graph.lint()
        if self.example_inputs is None:
            return
        try:
            with torch.no_grad():
                calibration.run_batch(self.model, self._example_on_device(), self.device)
        except RuntimeError as error:
            raise GrailError(f"the rewritten module fails on the example inputs: {error}") from error

    # Output -----------------------------------------------------------------------------

    def _example_on_device(self):
        if self.example_inputs is None:
            return None
        example = self._to_torch(self.example_inputs)
        if isinstance(example, dict):
            return {key: value.to(self.device) for key, value in example.items()}
        if isinstance(example, (tuple, list)):
            return tuple(value.to(self.device) for value in example)
        return example.to(self.device)

    def _to_torch(self, batch):
        """Convert numpy batches (an array, or a dict of arrays by input name) to tensors."""
        if isinstance(batch, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(batch))
        if isinstance(batch, Mapping) and all(isinstance(v, np.ndarray) for v in batch.values()):
            tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values()]
            return tensors[0] if len(tensors) == 1 else dict(zip(batch.keys(), tensors))
        return batch

    def set_metadata(self, key: str, value: str) -> None:
        self.metadata[key] = value

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Export the compressed module to ONNX (checked in ONNX Runtime) at `path`."""
        if self.example_inputs is None:
            raise GrailError("exporting a PyTorch model needs example inputs", "Pass example_inputs or calibration data.")
        exported = export_onnx(
            self.model,
            self.example_tensors(),
            path,
            input_names=self.input_names,
            dynamic_axes=self.dynamic_axes,
            metadata=self.metadata,
        )
        return [exported]

    def example_tensors(self) -> tuple[torch.Tensor, ...]:
        """Return the example inputs as a tuple of tensors on the model's device."""
        example = self._example_on_device()
        if isinstance(example, dict):
            return tuple(example.values())
        return tuple(example) if isinstance(example, (tuple, list)) else (example,)
