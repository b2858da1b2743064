"""Rewrite an ONNX graph to the narrowed widths of a set of group plans."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from grail_graph.core import absorb, bias_correction, fold_linear_chain
from grail_graph.errors import GrailError
from grail_graph.frontend import GroupPlan
from grail_graph.groups import BIAS, BN_ROLES, KEY_VALUE, ChannelGroup, WeightRef
from grail_graph.heads import structure_of
from grail_graph.onnx_frontend import attention
from grail_graph.onnx_frontend.matcher import constant_array, reshape_shape_source


def to_canonical_consumer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Move a consumer weight's hidden axis to position 1: (O, H, ...)."""
    return np.moveaxis(weight, axis, 1)


def from_canonical_consumer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Undo `to_canonical_consumer`."""
    return np.moveaxis(weight, 1, axis)


def to_canonical_producer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Move a producer weight's hidden axis to position 0: (H, ...)."""
    return np.moveaxis(weight, axis, 0)


def _check_finite(array: np.ndarray, what: str) -> None:
    """Raise GrailError when a floating-point `array` contains NaN or Inf."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise GrailError(
            f"the {what} has {bad} NaN or Inf values in {array.dtype}",
            "Raise the compensation alpha, calibrate on more samples, or use --compensation none.",
        )


class GraphRewriter:
    """Narrow producers and compensate consumers of an `ir.Model` in place."""

    def __init__(
        self,
        model: ir.Model,
        added_biases: dict[str, WeightRef] | None = None,
        head_shapes: dict[str, tuple[attention.ShapeEntry, ...]] | None = None,
    ) -> None:
        self.model = model
        # Target-shape entries that hold head counts, by attention-head group name.
        self.head_shapes = {} if head_shapes is None else head_shapes
        # Biases created by affine compensation, by producer node: they postdate the group
        # records, so a later plan that narrows that node narrows them through this map.
        self.added_biases = {} if added_biases is None else added_biases
        self.graph = model.graph
        self.nodes = {node.name: node for node in self.graph}
        self.values = {value.name: value for node in self.graph for value in node.outputs}

    def apply(self, plans: list[GroupPlan]) -> None:
        for plan in plans:
            self._apply_plan(plan)
        RemoveUnusedNodesPass()(self.model)
        ShapeInferencePass()(self.model)

    def _apply_plan(self, plan: GroupPlan) -> None:
        group = plan.group
        keep = np.asarray(plan.keep, dtype=np.int64)
        # Consumers are computed and checked before any tensor changes, so a map that
        # overflows the weight dtype (float16 above 65504) leaves the model untouched.
        compensated = self._compensated_consumers(plan)
        if plan.producer_map is not None:
            self._fold_producers(plan)
        else:
            self._narrow_producers(plan, keep)
        for node, ref, weight, delta in compensated:
            if delta is not None:
                self._add_bias(node, delta)
            self._set_constant(node, ref.input, weight)
        for node_name, attribute in group.width_attributes:
            self.nodes[node_name].attributes[attribute] = ir.AttrInt64(attribute, len(keep))
        if group.kv_heads:
            self._set_head_counts(group, keep)
        else:
            self._narrow_reshapes(plan.group, len(keep))
        for name in group.values:
            # Stale shapes would contradict the new widths; shape inference refills them.
            self.values[name].shape = None

    def _narrow_reshapes(self, group: ChannelGroup, kept: int) -> None:
        """End the target shape of every Reshape inside the group in `kept`, not the width.

        The matcher accepts only Reshapes whose target ends in the group width, 0 or -1;
        the last two follow the input and stay as they are. A target built by a Concat
        that other nodes also read gets a private copy of that Concat first.
        """
        for name in group.values:
            node = self.values[name].producer()
            if node is None or node.op_type != "Reshape":
                continue
            source = reshape_shape_source(node)
            if source is None:
                continue
            holder, index = source
            entries = constant_array(holder.inputs[index])
            if entries.size == 0 or int(entries.reshape(-1)[-1]) != group.width:
                continue
            narrowed = entries.copy()
            narrowed.reshape(-1)[-1] = kept
            if holder is not node and len(node.inputs[1].uses()) > 1:
                holder = self._private_concat(node, holder)
            self._set_constant(holder, index, narrowed)

    def _set_head_counts(self, group: ChannelGroup, keep: np.ndarray) -> None:
        """Write the kept head counts into the Reshape and Expand target shapes of an attention-head group."""
        new, _ = attention.kept_structure(group, keep)
        changes = attention.head_count_changes(self.head_shapes.get(group.name, ()), structure_of(group), new)
        for node_name, position, count in changes:
            node = self.nodes[node_name]
            holder, index, _ = attention.shape_entry_source(node, position)
            if holder is not node and len(node.inputs[1].uses()) > 1:
                self._private_concat(node, holder)
            holder, index, offset = attention.shape_entry_source(node, position)
            entries = constant_array(holder.inputs[index]).copy()
            entries.reshape(-1)[offset] = count
            self._set_constant(holder, index, entries)

    def _private_concat(self, reshape: ir.Node, concat: ir.Node) -> ir.Node:
        """Give `reshape` its own copy of the Concat that builds its target shape."""
        private = ir.node(
            "Concat",
            list(concat.inputs),
            attributes={"axis": concat.attributes["axis"].value},
            name=self._unique_name(f"{concat.name}_narrowed"),
        )
        private.outputs[0].name = self._unique_name(f"{concat.outputs[0].name}_narrowed")
        self.graph.insert_before(reshape, private)
        reshape.replace_input_with(1, private.outputs[0])
        self.nodes[private.name] = private
        self.values[private.outputs[0].name] = private.outputs[0]
        return private

    def _tensor(self, ref: WeightRef) -> np.ndarray:
        return np.moveaxis(constant_array(self.nodes[ref.node].inputs[ref.input]), ref.axis, 0)

    def _store(self, ref: WeightRef, hidden_first: np.ndarray) -> None:
        self._set_constant(self.nodes[ref.node], ref.input, np.moveaxis(hidden_first, 0, ref.axis))

    def _fold_producers(self, plan: GroupPlan) -> None:
        """Merge producer rows, their biases and one BatchNorm with the averaging matrix."""
        group = plan.group
        biases = {ref.node: ref for ref in group.narrowed if ref.role == BIAS}
        biases.update({ref.node: self.added_biases[ref.node] for ref in group.producers if ref.node in self.added_biases})
        batchnorm = sorted((ref for ref in group.narrowed if ref.role in BN_ROLES), key=lambda ref: ref.input)
        eps = 1e-5
        if batchnorm:
            attribute = self.nodes[batchnorm[0].node].attributes.get("epsilon")
            eps = 1e-5 if attribute is None else attribute.value
        producers, new_biases, new_batchnorm = fold_linear_chain(
            plan.producer_map,
            [self._tensor(ref) for ref in group.producers],
            [self._tensor(biases[ref.node]) if ref.node in biases else None for ref in group.producers],
            tuple(self._tensor(ref) for ref in batchnorm) if batchnorm else None,
            eps,
        )
        for ref, weight, bias in zip(group.producers, producers, new_biases):
            self._store(ref, weight)
            if bias is not None:
                self._store(biases[ref.node], bias)
        for ref, tensor in zip(batchnorm, new_batchnorm or ()):
            self._store(ref, tensor)

    def _narrow_producers(self, plan: GroupPlan, keep: np.ndarray) -> None:
        group = plan.group
        late = [self.added_biases[ref.node] for ref in group.producers if ref.node in self.added_biases]
        kv_keep = None
        if group.kv_heads:
            try:
                _, kv_keep = attention.kept_structure(group, keep)
            except ValueError as error:
                raise GrailError(str(error), "Select whole heads with the select pass.") from error
        for ref in (*group.producers, *group.narrowed, *late):
            node = self.nodes[ref.node]
            weight = constant_array(node.inputs[ref.input])
            indices = kv_keep if ref.role == KEY_VALUE else keep
            self._set_constant(node, ref.input, np.take(weight, indices, axis=ref.axis))

    def _compensated_consumers(
        self, plan: GroupPlan
    ) -> list[tuple[ir.Node, WeightRef, np.ndarray, np.ndarray | None]]:
        """Return (node, ref, new weight, bias delta or None) for every consumer of the plan.

        The products are computed in float64 and cast to each weight's dtype; a result that
        is not finite in that dtype raises GrailError.
        """
        results = []
        for ref in plan.group.consumers:
            node = self.nodes[ref.node]
            weight = to_canonical_consumer(constant_array(node.inputs[ref.input]), ref.axis)
            delta = None
            if plan.consumer_bias is not None:
                delta = bias_correction(weight, plan.consumer_bias).astype(weight.dtype)
                _check_finite(delta, f"bias correction of consumer `{node.name}`")
            compensated = from_canonical_consumer(absorb(weight, plan.consumer_map), ref.axis)
            _check_finite(compensated, f"compensated weight of consumer `{node.name}`")
            results.append((node, ref, compensated, delta))
        return results

    def _add_bias(self, node: ir.Node, delta: np.ndarray) -> None:
        """Add `delta` (O,) to a consumer's output: its bias input, or a new Add after a MatMul."""
        if node.op_type in ("Conv", "Gemm"):
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                old = constant_array(node.inputs[2])
                self._set_constant(node, 2, (old + delta.reshape(old.shape if old.size == delta.size else -1)).astype(old.dtype))
            else:
                node.resize_inputs(3)
                self._set_input_constant(node, 2, f"{node.name}_bias", delta)
                self.added_biases[node.name] = WeightRef(node.name, 2, 0)
            return
        output = node.outputs[0]
        bias = self._new_initializer(f"{node.name}_bias", delta)
        add = ir.node("Add", [output, bias], name=self._unique_name(f"{node.name}_bias_add"))
        result = add.outputs[0]
        result.name = self._unique_name(f"{output.name}_biased")
        for user, index in list(output.uses()):
            if user is not add:
                user.replace_input_with(index, result)
        for index, graph_output in enumerate(self.graph.outputs):
            if graph_output is output:
                self.graph.outputs[index] = result
        self.graph.insert_after(node, add)
        self.values[result.name] = result
        self.nodes[add.name] = add
        self.added_biases[node.name] = WeightRef(add.name, 1, 0)

    def _new_initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self._unique_name(base)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(np.ascontiguousarray(array), name=name),
        )
        self.graph.register_initializer(value)
        return value

    def _set_input_constant(self, node: ir.Node, index: int, base: str, array: np.ndarray) -> None:
        node.replace_input_with(index, self._new_initializer(base, array))

    def _set_constant(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give input `index` of `node` the new tensor, without touching other users."""
        old = node.inputs[index]
        array = np.ascontiguousarray(array)
        _check_finite(array, f"new value of input {index} of `{node.name}`")
        sole_initializer = (
            old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_input()
        )
        if sole_initializer:
            old.const_value = ir.tensor(array, name=old.name)
            old.shape = ir.Shape(array.shape)
            return
        name = self._unique_name(f"{old.name}_narrowed")
        new = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(new)
        node.replace_input_with(index, new)

    def _unique_name(self, base: str) -> str:
        taken = set(self.graph.initializers) | set(self.values) | set(self.nodes)
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        return name
