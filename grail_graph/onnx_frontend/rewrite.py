"""Rewrite an ONNX graph to the narrowed widths of a set of group plans."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from grail_graph.core import absorb, bias_correction, fold_linear_chain
from grail_graph.frontend import GroupPlan
from grail_graph.groups import BIAS, BN_ROLES, WeightRef
from grail_graph.onnx_frontend.matcher import constant_array


def to_canonical_consumer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Move a consumer weight's hidden axis to position 1: (O, H, ...)."""
    return np.moveaxis(weight, axis, 1)


def from_canonical_consumer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Undo `to_canonical_consumer`."""
    return np.moveaxis(weight, 1, axis)


def to_canonical_producer(weight: np.ndarray, axis: int) -> np.ndarray:
    """Move a producer weight's hidden axis to position 0: (H, ...)."""
    return np.moveaxis(weight, axis, 0)


class GraphRewriter:
    """Narrow producers and compensate consumers of an `ir.Model` in place."""

    def __init__(self, model: ir.Model, added_biases: dict[str, WeightRef] | None = None) -> None:
        self.model = model
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
        if plan.producer_map is not None:
            self._fold_producers(plan)
        else:
            self._narrow_producers(plan, keep)
        self._compensate_consumers(plan)
        for node_name, attribute in group.width_attributes:
            self.nodes[node_name].attributes[attribute] = ir.AttrInt64(attribute, len(keep))
        for name in group.values:
            # Stale shapes would contradict the new widths; shape inference refills them.
            self.values[name].shape = None

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
        for ref in (*group.producers, *group.narrowed, *late):
            node = self.nodes[ref.node]
            weight = constant_array(node.inputs[ref.input])
            self._set_constant(node, ref.input, np.take(weight, keep, axis=ref.axis))

    def _compensate_consumers(self, plan: GroupPlan) -> None:
        for ref in plan.group.consumers:
            node = self.nodes[ref.node]
            weight = to_canonical_consumer(constant_array(node.inputs[ref.input]), ref.axis)
            if plan.consumer_bias is not None:
                self._add_bias(node, bias_correction(weight, plan.consumer_bias).astype(weight.dtype))
            compensated = absorb(weight, plan.consumer_map)
            self._set_constant(node, ref.input, from_canonical_consumer(compensated, ref.axis))

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
        taken = set(self.graph.initializers) | set(self.values)
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        return name
