"""Find compressible channel groups in an ONNX graph.

The matcher walks forward from every candidate producer (Conv, Gemm or MatMul whose
weight is an initializer) through channel-wise ops until it reaches consumers (Conv, Gemm
or MatMul reading the hidden value as their data input). A binary op whose other operand
comes from another producer joins that producer to the group (gated MLPs, SiLU written as
x * Sigmoid(x)). Any use that is not channel-wise declines the whole group with a reason
that names the node. Matching never changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from grail_graph.groups import BIAS, BN_ROLES, CONSTANT, DEPTHWISE, ChannelGroup, Declined, WeightRef

# Ops applied to each element independently: they keep every channel where it is.
ELEMENTWISE_UNARY = frozenset(
    {
        "Abs", "Celu", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity",
        "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Softplus",
        "Softsign", "Sqrt", "Swish", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Pooling works on each channel of an NCHW tensor separately, so it keeps channels in place.
POOLING = frozenset({"AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "MaxPool"})
# Elementwise ops with two operands; a constant operand must be per-channel or broadcast.
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"})
LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})


class Decline(Exception):
    """Raised inside the matcher when a candidate group is unsafe; carries the reason."""


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """Return the value's tensor when it is an initializer or a Constant output."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant":
        return None
    if "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    # Exporters without constant folding write shapes and scalars in these attributes.
    for name, dtype in _CONSTANT_ATTRIBUTES.items():
        if name in node.attributes:
            return np.asarray(node.attributes[name].value, dtype=dtype)
    return None


_CONSTANT_ATTRIBUTES = {
    "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64,
}  # fmt: skip


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _shared(value: ir.Value) -> bool:
    return len(value.uses()) > 1 or value.is_graph_output()


def reshape_shape_source(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Return the (node, input index) of the constant that ends a Reshape's target shape.

    The target is either a constant, or a Concat along axis 0 whose last input is a
    constant: exporters write the second form for (batch, sequence, hidden) with dynamic
    batch and sequence axes. Returns None for any other target.
    """
    target = node.inputs[1] if len(node.inputs) > 1 else None
    if target is None:
        return None
    if constant_array(target) is not None:
        return node, 1
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or _attr(concat, "axis", 0) not in (0, -1):
        return None
    if not concat.inputs or constant_array(concat.inputs[-1]) is None:
        return None
    return concat, len(concat.inputs) - 1


def _fixed_row_entries(node: ir.Node) -> list[int]:
    """Return the positive constant entries before the last one in a Reshape's target.

    -1 and 0 (copy, unless allowzero) take their size from the input, and entries that
    a Concat computes at run time are not constants, so none of those is returned.
    """
    source = reshape_shape_source(node)
    if source is None:
        return []
    holder, index = source
    if holder is node:
        parts = [constant_array(node.inputs[1]).reshape(-1)[:-1]]
    else:
        last_part = constant_array(holder.inputs[index]).reshape(-1)[:-1]
        parts = [constant_array(value) for value in holder.inputs[:index]] + [last_part]
    return [int(entry) for part in parts if part is not None for entry in part.reshape(-1) if entry > 0]


def reshape_last_entry(node: ir.Node) -> int | None:
    """Return the last entry of a Reshape's target shape when it is a constant, else None."""
    source = reshape_shape_source(node)
    if source is None:
        return None
    holder, index = source
    entries = constant_array(holder.inputs[index]).reshape(-1)
    return int(entries[-1]) if entries.size else None


@dataclass(frozen=True)
class _Linear:
    """How a Conv / Gemm / MatMul reads and writes channels."""

    weight_input: int
    out_axis: int  # hidden axis of the weight when the node is a producer
    in_axis: int  # hidden axis of the weight when the node is a consumer
    width: int  # output channels
    channels_last: bool
    rank: int | None  # rank of the data tensors, when the weight fixes it


def describe_linear(node: ir.Node) -> _Linear | None:
    """Describe a dense Conv / Gemm / MatMul with a constant weight, else return None."""
    if node.op_type == "Conv":
        weight = constant_array(node.inputs[1])
        if weight is None or _attr(node, "group", 1) != 1:
            return None
        return _Linear(1, 0, 1, weight.shape[0], False, weight.ndim)
    if node.op_type == "Gemm":
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or _attr(node, "transA", 0) != 0:
            return None
        trans_b = _attr(node, "transB", 0) != 0
        out_axis = 0 if trans_b else 1
        return _Linear(1, out_axis, 1 - out_axis, weight.shape[out_axis], True, 2)
    if node.op_type == "MatMul":
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or constant_array(node.inputs[0]) is not None:
            return None
        return _Linear(1, 1, 0, weight.shape[1], True, None)
    return None


def _not_a_producer(node: ir.Node) -> str | None:
    """Return why a Conv / Gemm / MatMul with a constant weight is no candidate, else None.

    Nodes without a constant weight (attention products) and depthwise convolutions
    (channel-wise ops inside other groups) are not candidates and get no verdict.
    """
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return None
    if node.op_type == "Conv":
        if weight.shape[1] == 1 and _attr(node, "group", 1) == weight.shape[0]:
            return None
        return f"producer `{node.name}` is a grouped convolution (group={_attr(node, 'group', 1)})"
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return f"producer `{node.name}` is a Gemm with transA=1"
    return f"producer `{node.name}` has a weight of rank {weight.ndim}, not 2"


def _is_depthwise(node: ir.Node, width: int) -> bool:
    weight = constant_array(node.inputs[1]) if node.op_type == "Conv" else None
    return (
        weight is not None
        and _attr(node, "group", 1) == width
        and weight.shape[0] == width
        and weight.shape[1] == 1
    )


@dataclass
class _Region:
    """The group under construction."""

    width: int
    channels_last: bool
    rank: int | None
    values: dict[str, ir.Value] = field(default_factory=dict)
    producers: dict[str, ir.Node] = field(default_factory=dict)
    narrowed: dict[tuple[str, int], WeightRef] = field(default_factory=dict)
    consumers: dict[str, tuple[ir.Node, ir.Value]] = field(default_factory=dict)
    width_attributes: set[tuple[str, str]] = field(default_factory=set)
    channel_ops: set[str] = field(default_factory=set)


class GroupMatcher:
    """Match every candidate producer of a graph into groups or declined candidates."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph

    def run(self) -> tuple[list[ChannelGroup], list[Declined]]:
        groups: list[ChannelGroup] = []
        declined: list[Declined] = []
        claimed: set[str] = set()
        for node in self.graph:
            if node.op_type not in LINEAR_OPS or node.name in claimed:
                continue
            linear = describe_linear(node)
            if linear is None:
                reason = _not_a_producer(node)
                if reason:
                    declined.append(Declined(node.name, reason))
                continue
            region = _Region(linear.width, linear.channels_last, linear.rank)
            try:
                self._add_producer(region, node)
                self._grow(region)
                group = self._finish(region, f"g{len(groups)}:{node.name}")
            except Decline as reason:
                claimed.update(region.producers)
                names = ", ".join(sorted(region.producers)) or node.name
                declined.append(Declined(names, str(reason)))
                continue
            claimed.update(region.producers)
            groups.append(group)
        return groups, declined

    # Growing the region -------------------------------------------------------------

    def _add_producer(self, region: _Region, node: ir.Node) -> None:
        linear = describe_linear(node)
        if linear is None:
            raise Decline(f"producer `{node.name}` has no constant weight or is grouped")
        if linear.width != region.width or linear.channels_last != region.channels_last:
            raise Decline(f"producer `{node.name}` has a different width or layout than the group")
        if _shared(node.inputs[linear.weight_input]):
            raise Decline(f"weight of producer `{node.name}` is shared with another node")
        region.producers[node.name] = node
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._narrow_constant(region, node, 2)
        self._add_value(region, node.outputs[0])

    def _add_value(self, region: _Region, value: ir.Value) -> None:
        if value.is_graph_output():
            raise Decline(f"hidden value `{value.name}` is a graph output")
        region.values.setdefault(value.name, value)

    def _grow(self, region: _Region) -> None:
        done: set[str] = set()
        while len(done) < len(region.values):
            name = next(n for n in region.values if n not in done)
            done.add(name)
            value = region.values[name]
            for node, index in value.uses():
                self._classify_use(region, value, node, index)

    def _classify_use(self, region: _Region, value: ir.Value, node: ir.Node, index: int) -> None:
        op = node.op_type
        if op in LINEAR_OPS and index == 0 and not (op == "Conv" and _is_depthwise(node, region.width)):
            self._add_consumer(region, value, node)
        elif op == "Conv" and index == 0 and _is_depthwise(node, region.width) and not region.channels_last:
            region.channel_ops.add(node.name)
            region.narrowed[(node.name, 1)] = WeightRef(node.name, 1, 0, DEPTHWISE)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                region.narrowed[(node.name, 2)] = WeightRef(node.name, 2, 0, DEPTHWISE)
            region.width_attributes.add((node.name, "group"))
            self._add_value(region, node.outputs[0])
        elif op == "Reshape" and index == 0 and region.channels_last:
            self._add_reshape(region, value, node)
        elif op in POOLING and not region.channels_last and not node.outputs[1:]:
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
        elif op in ELEMENTWISE_UNARY or (op == "Clip" and index == 0):
            self._check_scalar_inputs(node, skip=index)
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
        elif op == "BatchNormalization" and index == 0 and not region.channels_last:
            if len(node.outputs) > 1 and any(out.uses() for out in node.outputs[1:]):
                raise Decline(f"BatchNormalization `{node.name}` is in training mode")
            for input_index in range(1, 5):
                self._narrow_constant(region, node, input_index, exact_vector=True)
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
        elif op in ELEMENTWISE_BINARY:
            self._add_binary(region, node, index)
        else:
            where = f"input {index} of `{node.name}` ({op})"
            raise Decline(f"hidden value `{value.name}` feeds {where}, which mixes or reshapes channels")

    def _add_reshape(self, region: _Region, value: ir.Value, node: ir.Node) -> None:
        """Accept a Reshape that only regroups the leading axes of a channels-last value.

        Row-major order keeps every row of H channels intact when the input and the
        output both end in H, so such a Reshape (GPT-2 flattens (batch, seq, H) to
        (batch * seq, H) around its Gemm layers) is channel-wise. The rewrite changes a
        target that ends in H to end in the kept width.
        """
        where = f"hidden value `{value.name}` feeds `{node.name}` (Reshape), whose target shape"
        last = reshape_last_entry(node)
        copies_last = last == 0 and _attr(node, "allowzero", 0) == 0
        output_shape = node.outputs[0].shape
        inferred_last = output_shape[-1] if output_shape is not None and len(output_shape) else None
        # NOTE: a trailing -1 is accepted when shape inference reports an output ending in H.
        # This assumes that the other entries count rows and do not depend on H.
        infers_last = last == -1 and inferred_last == region.width
        if last != region.width and not copies_last and not infers_last:
            shown = "not a constant" if last is None else str(last)
            raise Decline(f"{where} does not end in the {region.width} hidden channels (last entry: {shown})")
        fixed = _fixed_row_entries(node)
        if fixed:
            # NOTE: such a target also keeps rows intact. It is declined because it fixes
            # the number of rows, which exporters with dynamic axes do not write.
            raise Decline(f"{where} fixes the row count with the constant entries {fixed}")
        region.channel_ops.add(node.name)
        self._add_value(region, node.outputs[0])

    def _add_consumer(self, region: _Region, value: ir.Value, node: ir.Node) -> None:
        linear = describe_linear(node)
        if linear is None:
            raise Decline(f"consumer `{node.name}` ({node.op_type}) is grouped or has no constant weight")
        if linear.channels_last != region.channels_last:
            raise Decline(f"consumer `{node.name}` reads the hidden value in another layout")
        weight = constant_array(node.inputs[1])
        if weight.shape[linear.in_axis] != region.width:
            raise Decline(f"consumer `{node.name}` expects {weight.shape[linear.in_axis]} channels, not {region.width}")
        if _shared(node.inputs[1]):
            raise Decline(f"weight of consumer `{node.name}` is shared with another node")
        region.consumers[node.name] = (node, value)

    def _add_binary(self, region: _Region, node: ir.Node, index: int) -> None:
        other_index = 1 - index
        other = node.inputs[other_index]
        if other is not None and other.name in region.values:
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
            return
        if constant_array(other) is not None:
            self._narrow_constant(region, node, other_index)
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
            return
        if node.op_type in ("Mul", "Add", "Sub", "Div"):
            self._add_upstream(region, other, node)
            region.channel_ops.add(node.name)
            self._add_value(region, node.outputs[0])
            return
        raise Decline(f"`{node.name}` ({node.op_type}) combines the hidden value with `{other.name}`")

    def _add_upstream(self, region: _Region, value: ir.Value, via: ir.Node, operand: ir.Value | None = None) -> None:
        """Join the producers behind `value`, reached only through channel-wise ops.

        `operand` is the input of `via` that the search started from. A decline names it
        and, when the search went further up, the value where it stopped.
        """
        node = value.producer()
        operand = value if operand is None else operand
        residual = f"`{via.name}` ({via.op_type}) combines the hidden value with `{operand.name}`"
        if node is None:
            where = "a graph input" if operand is value else f"which depends on the graph input `{value.name}`"
            raise Decline(f"{residual}, {where}")
        if node.op_type in LINEAR_OPS and describe_linear(node) is not None:
            if node.name not in region.producers:
                self._add_producer(region, node)
            return
        data_inputs = [v for v in node.inputs if v is not None and constant_array(v) is None]
        channel_wise = node.op_type in ELEMENTWISE_UNARY or node.op_type in ELEMENTWISE_BINARY
        if node.op_type == "BatchNormalization" and not region.channels_last:
            for input_index in range(1, 5):
                self._narrow_constant(region, node, input_index, exact_vector=True)
            channel_wise, data_inputs = True, data_inputs[:1]
        if not channel_wise or not data_inputs:
            origin = f"{node.op_type} `{node.name}` writes `{value.name}`"
            raise Decline(f"{residual}, which is not computed channel-wise from a producer: {origin}")
        for data_input in data_inputs:
            if data_input.name not in region.values:
                self._add_upstream(region, data_input, via, operand)
        self._add_value(region, value)

    # Per-channel constants ------------------------------------------------------------

    def _hidden_axis_from_end(self, region: _Region) -> int:
        if region.channels_last:
            return 1
        if region.rank is None:
            raise Decline("rank of the hidden value is unknown")
        return region.rank - 1

    def _narrow_constant(self, region: _Region, node: ir.Node, index: int, exact_vector: bool = False) -> None:
        array = constant_array(node.inputs[index])
        if array is None:
            raise Decline(f"input {index} of `{node.name}` ({node.op_type}) is not a constant")
        if exact_vector or node.op_type in ("Conv", "Gemm") and index == 2:
            role = BN_ROLES[index - 1] if node.op_type == "BatchNormalization" else BIAS
            if array.ndim == 1 and array.shape[0] == region.width:
                region.narrowed[(node.name, index)] = WeightRef(node.name, index, 0, role)
                return
            if node.op_type == "Gemm" and array.size == 1:
                return
            if node.op_type == "Gemm" and array.ndim == 2 and array.shape == (1, region.width):
                region.narrowed[(node.name, index)] = WeightRef(node.name, index, 1, role)
                return
            raise Decline(f"input {index} of `{node.name}` has shape {array.shape}, not ({region.width},)")
        from_end = self._hidden_axis_from_end(region)
        if not region.channels_last and array.ndim > region.rank:
            raise Decline(f"constant input {index} of `{node.name}` has more dimensions than the hidden value")
        if array.ndim < from_end:
            return  # broadcast along the hidden axis: the same for every channel
        size = array.shape[array.ndim - from_end]
        if size == 1:
            return
        if size != region.width:
            raise Decline(f"constant input {index} of `{node.name}` has {size} entries on the hidden axis")
        region.narrowed[(node.name, index)] = WeightRef(node.name, index, array.ndim - from_end, CONSTANT)

    def _check_scalar_inputs(self, node: ir.Node, skip: int) -> None:
        for index, value in enumerate(node.inputs):
            if index == skip or value is None:
                continue
            array = constant_array(value)
            if array is None or array.size != 1:
                raise Decline(f"input {index} of `{node.name}` ({node.op_type}) is not a constant scalar")

    # Result ---------------------------------------------------------------------------

    def _finish(self, region: _Region, name: str) -> ChannelGroup:
        if not region.consumers:
            raise Decline("hidden channels reach no Conv, Gemm or MatMul consumer")
        taps = {value.name for _, value in region.consumers.values()}
        if len(taps) > 1:
            raise Decline(f"consumers read different hidden values ({', '.join(sorted(taps))})")
        producers = []
        for node in region.producers.values():
            linear = describe_linear(node)
            producers.append(WeightRef(node.name, linear.weight_input, linear.out_axis))
        consumers = []
        for node, _ in region.consumers.values():
            consumers.append(WeightRef(node.name, 1, describe_linear(node).in_axis))
        return ChannelGroup(
            name=name,
            width=region.width,
            tap=taps.pop(),
            channels_last=region.channels_last,
            producers=tuple(producers),
            narrowed=tuple(region.narrowed.values()),
            consumers=tuple(consumers),
            width_attributes=tuple(sorted(region.width_attributes)),
            values=tuple(region.values),
        )


def find_groups(graph: ir.Graph) -> tuple[list[ChannelGroup], list[Declined]]:
    """Return the compressible groups of `graph` and every declined candidate."""
    return GroupMatcher(graph).run()
