"""Find attention-head groups in an ONNX graph and the shape entries that carry head counts.

An attention-head group has the same meaning as in the torch.fx front end: the hidden
dimension between the head outputs of one attention and the MatMul or Gemm that reads them
(the output projection), width query_heads * head_size, head-major. Its producer is the
query projection, the key and value projections (and their biases) are narrowed by
key/value head, and the unit of selection is a whole head.

The matcher starts at every Softmax and works on the graph alone:

1. Walk back from the Softmax to the MatMul of query and transposed key (the scores) and
   forward to the MatMul of the probabilities and value. Everything between them must be
   the same for every head: scalar scales, masks that broadcast over heads, IsNaN / Where.
2. Walk back from query, key and value to the one projection (MatMul or Gemm with a
   constant weight) behind each.
3. Walk forward from each projection in graph order and track the head axis through
   Reshape, Transpose, Unsqueeze, rotary embeddings (products and sums with tensors that
   broadcast over heads, Slice and Concat inside a head), and the Unsqueeze + Expand +
   Reshape that repeats key/value heads. Every other use declines the candidate.
4. Walk forward from the attention output until the heads are merged back into the last
   axis, and record the projections that read that value.

Head counts and head sizes come from the value shapes that ONNX shape inference writes.
Each Reshape or Expand on these paths whose target shape contains a head count or a width as a
constant is recorded as a `ShapeEntry`, so the rewrite can set the new count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from grail_graph.groups import BIAS, KEY_VALUE, ChannelGroup, Declined, WeightRef
from grail_graph.heads import HeadStructure, head_channels, kept_heads, structure_of
from grail_graph.onnx_frontend.matcher import Decline, LINEAR_OPS, constant_array, describe_linear

# Ops that pass a tensor through without touching its layout.
PASS_THROUGH = frozenset({"Identity", "Neg", "Cast"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
# Ops allowed between the scores MatMul and the probabilities MatMul (all act per element
# or along the key axis, so they keep heads apart).
SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Softmax", "IsNaN", "Where", "Cast", "Identity"})

# Roles of a shape entry: the count it contains.
QUERY, KV, GROUP, QUERY_WIDTH, KV_WIDTH = "query", "kv", "group", "query_width", "kv_width"


@dataclass(frozen=True)
class Layout:
    """Head placement in one value.

    `head_axis` is None while the heads are merged into the last axis (head-major). Each
    source head appears `repeat` times in a row along the head axis. `repeat_axis` is an
    axis that an Expand grew right after the head axis, not yet merged into it. `leading`
    means the head axis also contains the axes before it, heads innermost, as in the
    (batch * heads, sequence, head_size) view that exporters write around a transpose.
    """

    heads: int
    head_size: int
    head_axis: int | None = None
    size_axis: int | None = None
    repeat: int = 1
    repeat_axis: int | None = None
    leading: bool = False


@dataclass(frozen=True)
class ShapeEntry:
    """Entry `position` of the target shape of Reshape or Expand `node`, which contains count `role`."""

    node: str
    position: int
    role: str


def role_count(structure: HeadStructure, role: str) -> int:
    """Return the count that a shape entry of `role` carries."""
    return {
        QUERY: structure.query_heads,
        KV: structure.kv_heads,
        GROUP: structure.group_size,
        QUERY_WIDTH: structure.query_heads * structure.head_size,
        KV_WIDTH: structure.kv_heads * structure.head_size,
    }[role]


@dataclass
class _Path:
    """The result of a forward walk from one projection."""

    layout: Layout
    values: list[str]
    biases: list[WeightRef]
    entries: list[tuple[str, int, str, int]]
    """(node, position, kind, repeat): kind is "heads", "repeat" or "width"."""


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _shape(value: ir.Value) -> tuple:
    if value.shape is None:
        raise Decline(f"value `{value.name}` has no shape from ONNX shape inference")
    return tuple(value.shape)


def _same(first, second) -> bool:
    """Return True when two dimensions are the same int or the same named symbolic size."""
    if isinstance(first, int) or isinstance(second, int):
        return first == second
    return first.value is not None and first.value == second.value


def _same_dims(first: tuple, second: tuple) -> bool:
    return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))


def _describe(node: ir.Node) -> str:
    return f"`{node.name}` ({node.op_type})"


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _shape_input_entries(node: ir.Node) -> list[tuple[ir.Node, int, int] | str]:
    """Return, per entry of the target shape of a Reshape or Expand, where it comes from.

    An entry is (holder node, input index, offset) when a constant stores it, or the string
    "dynamic" when it is computed at run time. Raises Decline when the target is neither a
    constant nor a Concat along axis 0 of inputs of known length.
    """
    target = node.inputs[1]
    if constant_array(target) is not None:
        return [(node, 1, offset) for offset in range(constant_array(target).size)]
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or _attr(concat, "axis", 0) not in (0, -1):
        return ["dynamic"] * len(_shape(node.outputs[0]))
    entries: list[tuple[ir.Node, int, int] | str] = []
    for index, part in enumerate(concat.inputs):
        array = constant_array(part)
        if array is not None:
            entries.extend((concat, index, offset) for offset in range(array.size))
            continue
        length = _static(_shape(part)[0]) if part.shape is not None and len(part.shape) == 1 else None
        if length is None:
            raise Decline(f"input `{part.name}` of {_describe(concat)} has no static length")
        entries.extend(["dynamic"] * length)
    return entries


def shape_entry_source(node: ir.Node, position: int) -> tuple[ir.Node, int, int] | None:
    """Return (holder, input index, offset) of the constant that stores a target-shape entry, or None."""
    source = _shape_input_entries(node)[position]
    return None if source == "dynamic" else source


class LayoutTracker:
    """Propagate a `Layout` through one node, recording the shape entries on the way."""

    def step(self, node: ir.Node, index: int, layouts: dict[str, Layout], path: _Path) -> Layout | None:
        """Return the layout of `node`'s first output (None: `node` reads only the shape)."""
        value = node.inputs[index]
        layout = layouts[value.name]
        op = node.op_type
        if op == "Shape":
            return None
        if op in PASS_THROUGH or op == "Dropout" and index == 0 and not node.outputs[1:]:
            return layout
        if op in ("Reshape", "Expand", "Transpose", "Unsqueeze", "Slice") and index != 0:
            raise Decline(f"{_describe(node)} uses the head value `{value.name}` as a parameter")
        if op == "Reshape":
            return self._reshape(node, layout, path)
        if op == "Transpose":
            return self._permute(node, layout)
        if op == "Unsqueeze":
            return self._unsqueeze(node, layout)
        if op == "Expand":
            return self._expand(node, layout, path)
        if op == "Slice":
            return self._slice(node, layout)
        if op == "Concat":
            return self._concat(node, layouts)
        if op in BINARY:
            return self._binary(node, index, layouts)
        raise Decline(f"{_describe(node)} is not a per-head operation")

    def _record(self, node: ir.Node, layout: Layout, path: _Path) -> None:
        """Record the target-shape entries of `node` that hold head counts or widths."""
        rank = len(_shape(node.outputs[0]))
        wanted = []
        if layout.head_axis is None:
            wanted.append((rank - 1, "width"))
        elif layout.leading:
            wanted.append((layout.head_axis, "leading"))
        else:
            wanted.append((layout.head_axis, "heads"))
        if layout.repeat_axis is not None:
            wanted.append((layout.repeat_axis, "repeat"))
        entries = _shape_input_entries(node)
        for position, kind in wanted:
            source = entries[position]
            if source == "dynamic":
                continue
            holder, input_index, offset = source
            entry = int(constant_array(holder.inputs[input_index]).reshape(-1)[offset])
            if entry == -1 or entry == 0 and _attr(node, "allowzero", 0) == 0:
                continue  # the size follows the input
            if node.op_type == "Expand" and entry == 1:
                continue  # broadcast keeps the input size
            if kind == "leading":
                raise Decline(f"{_describe(node)} fixes the merged batch and head axis at {entry}")
            path.entries.append((node.name, position, kind, layout.repeat))

    def _reshape(self, node: ir.Node, layout: Layout, path: _Path) -> Layout:
        before, after = _shape(node.inputs[0]), _shape(node.outputs[0])
        result = self._reshaped(node, before, after, layout)
        self._record(node, result, path)
        return result

    def _reshaped(self, node: ir.Node, before: tuple, after: tuple, layout: Layout) -> Layout:
        where = f"{_describe(node)} reshapes {list(before)} to {list(after)}"
        if _same_dims(before, after):
            return layout
        rank = len(before)
        heads, size = layout.head_axis, layout.size_axis
        if heads is None:
            # Split the last axis, width heads * head_size, into (heads, head_size).
            count, head_size = (_static(after[-2]), _static(after[-1])) if len(after) >= 2 else (None, None)
            width = _static(before[-1])
            if len(after) == rank + 1 and _same_dims(before[:-1], after[:-2]) and count and head_size and count * head_size == width:
                if count % layout.repeat:
                    raise Decline(f"{where}: {count} heads are not a multiple of the repeat count {layout.repeat}")
                return Layout(count // layout.repeat, head_size, rank - 1, rank, layout.repeat)
            raise Decline(f"{where}, which is not a split into heads")
        if layout.repeat_axis is not None:
            return self._merge_repeat(where, before, after, layout)
        if layout.leading:
            # Split the merged leading axis back into (..., heads).
            count = len(after) - rank
            if heads == 0 and count >= 1 and _static(after[count]) == layout.heads * layout.repeat and _same_dims(before[1:], after[count + 1 :]):
                return replace(layout, head_axis=count, size_axis=size + count, leading=False)
            raise Decline(f"{where}, which does not split the merged batch and head axis")
        if size == heads + 1 == rank - 1 and len(after) == rank - 1 and _same_dims(before[:heads], after[:heads]):
            if _static(after[-1]) == layout.heads * layout.repeat * layout.head_size:
                return replace(layout, head_axis=None, size_axis=None)
        if len(after) == rank - heads and _same_dims(before[heads + 1 :], after[1:]):
            # Merge the head axis with every axis before it.
            return replace(layout, head_axis=0, size_axis=size - heads, leading=True)
        raise Decline(f"{where}, which moves channels across heads")

    def _merge_repeat(self, where: str, before: tuple, after: tuple, layout: Layout) -> Layout:
        heads, repeat_axis = layout.head_axis, layout.repeat_axis
        copies = _static(before[repeat_axis])
        if repeat_axis != heads + 1 or copies is None:
            raise Decline(f"{where}: heads are repeated in tiled order, not next to each source head")
        merged = _static(after[heads]) if len(after) == len(before) - 1 else None
        if merged != before[heads] * copies or not _same_dims(before[repeat_axis + 1 :], after[heads + 1 :]):
            raise Decline(f"{where}, which is not a repeat of heads")
        size_axis = layout.size_axis - 1 if layout.size_axis > repeat_axis else layout.size_axis
        return replace(layout, size_axis=size_axis, repeat=layout.repeat * copies, repeat_axis=None)

    def _permute(self, node: ir.Node, layout: Layout) -> Layout:
        if layout.head_axis is None:
            raise Decline(f"{_describe(node)} permutes the projection output before it is split into heads")
        rank = len(_shape(node.inputs[0]))
        order = list(_attr(node, "perm", list(reversed(range(rank)))))
        if layout.leading and order[0] != 0:
            raise Decline(f"{_describe(node)} moves the merged batch and head axis")
        position = {old: new for new, old in enumerate(order)}

        def moved(axis):
            return None if axis is None else position[axis]

        return replace(layout, head_axis=moved(layout.head_axis), size_axis=moved(layout.size_axis), repeat_axis=moved(layout.repeat_axis))

    def _unsqueeze(self, node: ir.Node, layout: Layout) -> Layout:
        if layout.head_axis is None:
            raise Decline(f"{_describe(node)} adds an axis before the projection output is split into heads")
        axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            raise Decline(f"{_describe(node)} has no constant axes")
        rank = len(_shape(node.outputs[0]))
        inserted = sorted(int(axis) % rank for axis in axes.reshape(-1))
        kept = [axis for axis in range(rank) if axis not in inserted]

        def shifted(old):
            return None if old is None else kept[old]

        return replace(layout, head_axis=shifted(layout.head_axis), size_axis=shifted(layout.size_axis), repeat_axis=shifted(layout.repeat_axis))

    def _expand(self, node: ir.Node, layout: Layout, path: _Path) -> Layout:
        before, after = _shape(node.inputs[0]), _shape(node.outputs[0])
        where = f"{_describe(node)} expands {list(before)} to {list(after)}"
        if layout.head_axis is None or layout.leading or len(before) != len(after):
            raise Decline(f"{where} outside a head layout")
        grown = [axis for axis in range(len(before)) if not _same(before[axis], after[axis])]
        if any(before[axis] != 1 for axis in grown):
            raise Decline(f"{where}, which changes a size other than 1")
        if grown and grown != [layout.head_axis + 1]:
            raise Decline(f"{where}, which grows other axes than the one after the head axis")
        result = replace(layout, repeat_axis=grown[0]) if grown else layout
        self._record(node, result, path)
        return result

    def _slice(self, node: ir.Node, layout: Layout) -> Layout:
        rank = len(_shape(node.inputs[0]))
        axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None:
            starts = constant_array(node.inputs[1])
            if starts is None:
                raise Decline(f"{_describe(node)} has no constant starts")
            axes = np.arange(starts.size)
        sliced = {int(axis) % rank for axis in axes.reshape(-1)}
        blocked = {rank - 1} if layout.head_axis is None else {layout.head_axis, layout.repeat_axis}
        if sliced & blocked:
            raise Decline(f"{_describe(node)} slices across heads")
        return layout

    def _concat(self, node: ir.Node, layouts: dict[str, Layout]) -> Layout:
        parts = [value for value in node.inputs if value is not None]
        missing = [value.name for value in parts if value.name not in layouts]
        if missing:
            raise Decline(f"{_describe(node)} joins the head value with `{missing[0]}`")
        layout = layouts[parts[0].name]
        if any(layouts[value.name] != layout for value in parts) or layout.head_axis is None:
            raise Decline(f"{_describe(node)} joins values with different head layouts")
        axis = _attr(node, "axis", 0) % len(_shape(parts[0]))
        if axis in (layout.head_axis, layout.repeat_axis):
            raise Decline(f"{_describe(node)} joins along the head axis")
        return layout

    def _binary(self, node: ir.Node, index: int, layouts: dict[str, Layout]) -> Layout:
        layout = layouts[node.inputs[index].name]
        other = node.inputs[1 - index]
        if other.name in layouts:
            if layouts[other.name] != layout:
                raise Decline(f"{_describe(node)} combines values with different head layouts")
            return layout
        shape = _shape(other)
        if not shape or all(dim == 1 for dim in shape):
            return layout
        rank = len(_shape(node.outputs[0]))
        axes = [rank - 1] if layout.head_axis is None else [layout.head_axis, layout.repeat_axis]
        for axis in axes:
            if axis is None:
                continue
            offset = axis - (rank - len(shape))
            if offset >= 0 and shape[offset] != 1:
                raise Decline(f"{_describe(node)} combines the heads with `{other.name}`, which differs per head")
        return layout


@dataclass(frozen=True)
class _Projection:
    node: ir.Node
    path: _Path


class AttentionMatcher:
    """Match every Softmax of a graph into an attention-head group or a declined candidate."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph)
        self.order = {id(node): position for position, node in enumerate(self.nodes)}
        self.tracker = LayoutTracker()

    def run(self) -> tuple[list[ChannelGroup], list[Declined], dict[str, tuple[ShapeEntry, ...]]]:
        groups: list[ChannelGroup] = []
        declined: list[Declined] = []
        entries: dict[str, tuple[ShapeEntry, ...]] = {}
        for node in self.nodes:
            if node.op_type != "Softmax":
                continue
            try:
                group, shape_entries = self._match(node, f"h{len(groups)}")
            except Decline as reason:
                declined.append(Declined(self._candidate(node), str(reason)))
                continue
            groups.append(group)
            entries[group.name] = shape_entries
        return groups, declined, entries

    def _candidate(self, softmax: ir.Node) -> str:
        """Name a declined attention by its projections, else by the Softmax."""
        try:
            scores, probabilities = self._core(softmax)
            inputs = (scores.inputs[0], scores.inputs[1], probabilities.inputs[1])
            names = [self._projection_behind(value).name for value in inputs]
        except Decline:
            return f"attention at `{softmax.name}`"
        return ", ".join(dict.fromkeys(names))

    # Matching --------------------------------------------------------------------------

    def _match(self, softmax: ir.Node, prefix: str) -> tuple[ChannelGroup, tuple[ShapeEntry, ...]]:
        scores, probabilities = self._core(softmax)
        arrivals = ((scores, 0), (scores, 1), (probabilities, 1))
        nodes = [self._projection_behind(node.inputs[index]) for node, index in arrivals]
        if len({id(node) for node in nodes}) < 3:
            raise Decline(f"query, key and value of the attention at `{softmax.name}` come from one fused projection")
        for node in nodes:
            self._check_weight(node)
        query, key, value = (
            _Projection(node, self._follow(node, target, index)) for node, (target, index) in zip(nodes, arrivals)
        )
        self._check_arrival(scores, 0, query.path.layout, size_last=True)
        self._check_arrival(scores, 1, key.path.layout, size_last=False)
        self._check_arrival(probabilities, 1, value.path.layout, size_last=True)
        structure = self._structure(softmax, query, key, value)
        score_values = self._check_scores(scores, probabilities)
        output, consumers = self._output(probabilities, structure)
        tap = output.values[-1]
        group = self._group(f"{prefix}:{query.node.name}", structure, query, key, value, tap, consumers,
                            [*score_values, *output.values])  # fmt: skip
        shape_entries = self._entries(structure, query, key, value, output)
        return group, shape_entries

    def _core(self, softmax: ir.Node) -> tuple[ir.Node, ir.Node]:
        """Return the scores MatMul (query times transposed key) and the probabilities MatMul of a Softmax."""
        scores = self._search(softmax.inputs[0], backward=True)
        if len(scores) != 1:
            raise Decline(f"`{softmax.name}` reads {len(scores)} products of two computed values, not one")
        probabilities = self._search(softmax.outputs[0], backward=False)
        if len(probabilities) != 1:
            raise Decline(f"`{softmax.name}` reaches {len(probabilities)} MatMul nodes as their first input, not one")
        return scores[0], probabilities[0]

    def _search(self, start: ir.Value, backward: bool) -> list[ir.Node]:
        """Find the MatMul of two computed values next to a Softmax through score ops (at most 4 steps)."""
        found: list[ir.Node] = []
        frontier = [start]
        for _ in range(4):
            following = []
            for value in frontier:
                if backward:
                    node = value.producer()
                    candidates = [] if node is None else [(node, None)]
                else:
                    candidates = list(value.uses())
                for node, index in candidates:
                    if node.op_type == "MatMul" and all(constant_array(v) is None for v in node.inputs):
                        if (backward or index == 0) and node not in found:
                            found.append(node)
                    elif node.op_type in SCORE_OPS:
                        following.extend(node.inputs if backward else node.outputs)
            frontier = [value for value in following if value is not None and constant_array(value) is None]
        return found

    def _projection_behind(self, value: ir.Value) -> ir.Node:
        """Return the one projection that `value` is computed from, walking back to the first one on every path."""
        found: dict[str, ir.Node] = {}
        seen: set[str] = set()
        stack = [value]
        while stack:
            current = stack.pop()
            if current is None or current.name in seen:
                continue
            seen.add(current.name)
            node = current.producer()
            if node is None or node.op_type == "Shape":
                continue  # a Shape reads only the size of its input, not its values
            if node.op_type in LINEAR_OPS and describe_linear(node) is not None:
                found[node.name] = node
                continue
            stack.extend(node.inputs)
        if len(found) != 1:
            names = ", ".join(f"`{name}`" for name in found) or "none"
            raise Decline(f"attention input `{value.name}` is computed from {len(found)} projections ({names})")
        return next(iter(found.values()))

    def _check_weight(self, node: ir.Node) -> None:
        linear = describe_linear(node)
        if not linear.channels_last:
            raise Decline(f"projection {_describe(node)} is not a MatMul or Gemm")
        weight = node.inputs[linear.weight_input]
        if len(weight.uses()) > 1 or weight.is_graph_output():
            raise Decline(f"weight of projection `{node.name}` is shared with another node")

    def _follow(self, start: ir.Node, target: ir.Node, position: int) -> _Path:
        """Track the heads from projection `start` to input `position` of `target`."""
        linear = describe_linear(start)
        path = _Path(Layout(0, 0), [start.outputs[0].name], [], [])
        layouts = {start.outputs[0].name: Layout(0, 0)}
        if len(start.inputs) > 2 and start.inputs[2] is not None:
            path.biases.append(WeightRef(start.name, 2, 0 if constant_array(start.inputs[2]).ndim == 1 else 1))
        pending = {id(node): (node, index) for node, index in start.outputs[0].uses()}
        arrived = None
        for node in self.nodes[self.order[id(start)] + 1 :]:
            if not pending:
                break
            if id(node) not in pending:
                continue
            node, index = pending.pop(id(node))
            if node is target:
                if node.inputs[position].name not in layouts or node.inputs[1 - position].name in layouts:
                    raise Decline(f"projection `{start.name}` reaches {_describe(target)} at another input")
                arrived = layouts[node.inputs[position].name]
                continue
            if node.op_type in LINEAR_OPS or node.op_type == "Softmax":
                raise Decline(f"{_describe(node)} reads a value computed from projection `{start.name}`")
            if self._is_bias(node, index, layouts, linear.width):
                path.biases.append(WeightRef(node.name, 1 - index, 0))
                layout = layouts[node.inputs[index].name]
            else:
                layout = self.tracker.step(node, index, layouts, path)
            if layout is None:
                continue
            output = node.outputs[0]
            if output.is_graph_output():
                raise Decline(f"value `{output.name}` computed from projection `{start.name}` is a graph output")
            layouts[output.name] = layout
            path.values.append(output.name)
            for user, user_index in output.uses():
                pending.setdefault(id(user), (user, user_index))
        if arrived is None:
            raise Decline(f"projection `{start.name}` does not reach {_describe(target)}")
        path.layout = arrived
        return path

    def _is_bias(self, node: ir.Node, index: int, layouts: dict[str, Layout], width: int) -> bool:
        """Return True for an Add of a constant (width,) vector right on the projection output."""
        if node.op_type != "Add" or layouts[node.inputs[index].name] != Layout(0, 0):
            return False
        bias = constant_array(node.inputs[1 - index])
        return bias is not None and bias.shape == (width,) and len(node.inputs[1 - index].uses()) == 1

    def _check_arrival(self, node: ir.Node, position: int, layout: Layout, size_last: bool) -> None:
        rank = len(_shape(node.inputs[position]))
        size_axis = rank - 1 if size_last else rank - 2
        if layout.head_axis != rank - 3 or layout.size_axis != size_axis or layout.repeat_axis is not None or layout.leading:
            raise Decline(f"input {position} of {_describe(node)} does not have its heads on axis -3 and its head size on axis {size_axis - rank}")

    def _structure(self, softmax: ir.Node, query: _Projection, key: _Projection, value: _Projection) -> HeadStructure:
        q, k, v = query.path.layout, key.path.layout, value.path.layout
        if q.repeat != 1:
            raise Decline(f"the query heads of the attention at `{softmax.name}` are repeated")
        if k.heads != v.heads or k.repeat != v.repeat:
            raise Decline(f"key and value of the attention at `{softmax.name}` have different head counts")
        if not q.head_size == k.head_size == v.head_size:
            raise Decline(f"query, key and value heads of the attention at `{softmax.name}` have sizes {q.head_size}, {k.head_size}, {v.head_size}")
        if k.heads * k.repeat != q.heads:
            raise Decline(f"the attention at `{softmax.name}` has {q.heads} query heads but {k.heads * k.repeat} key/value heads")
        structure = HeadStructure(q.heads, k.heads, q.head_size)
        for projection, heads in ((query, q.heads), (key, k.heads), (value, v.heads)):
            width = describe_linear(projection.node).width
            if width != heads * structure.head_size:
                raise Decline(f"projection `{projection.node.name}` has {width} outputs, not {heads} heads")
        return structure

    def _check_scores(self, scores: ir.Node, probabilities: ir.Node) -> list[str]:
        """Check that every op from the scores to the probabilities treats heads alike; return their values."""
        chain = {scores.outputs[0].name}
        pending = {id(node): node for node, _ in scores.outputs[0].uses()}
        for node in self.nodes[self.order[id(scores)] + 1 :]:
            if not pending:
                break
            if pending.pop(id(node), None) is None:
                continue
            if node is probabilities:
                if node.inputs[0].name not in chain or node.inputs[1].name in chain:
                    raise Decline(f"the attention scores reach {_describe(node)} at another input")
                continue
            if node.op_type not in SCORE_OPS:
                raise Decline(f"{_describe(node)} reads the attention scores")
            if node.op_type == "Softmax" and _attr(node, "axis", -1) not in (-1, len(_shape(node.inputs[0])) - 1):
                raise Decline(f"{_describe(node)} normalizes across another axis than the keys")
            for other in node.inputs:
                if other is not None and other.name not in chain:
                    shape = _shape(other)
                    if len(shape) >= 3 and shape[-3] != 1:
                        raise Decline(f"{_describe(node)} combines the attention scores with `{other.name}`, which differs per head")
            output = node.outputs[0]
            if output.is_graph_output():
                raise Decline(f"the attention scores `{output.name}` are a graph output")
            chain.add(output.name)
            for user, _ in output.uses():
                pending.setdefault(id(user), user)
        return sorted(chain)

    def _output(self, probabilities: ir.Node, structure: HeadStructure) -> tuple[_Path, list[ir.Node]]:
        """Follow the attention output to the value with merged heads and the projections that read it.

        Returns the path, whose last value is that value (the tap), and the projections.
        """
        output = probabilities.outputs[0]
        rank = len(_shape(output))
        layouts = {output.name: Layout(structure.query_heads, structure.head_size, rank - 3, rank - 1)}
        path = _Path(layouts[output.name], [output.name], [], [])
        pending = {id(node): (node, index) for node, index in output.uses()}
        taps: dict[str, list[ir.Node]] = {}
        for node in self.nodes[self.order[id(probabilities)] + 1 :]:
            if not pending:
                break
            if id(node) not in pending:
                continue
            node, index = pending.pop(id(node))
            source = node.inputs[index]
            if node.op_type in LINEAR_OPS:
                if describe_linear(node) is None or index != 0 or layouts[source.name].head_axis is not None:
                    raise Decline(f"{_describe(node)} reads the attention heads before they are merged")
                taps.setdefault(source.name, []).append(node)
                continue
            layout = self.tracker.step(node, index, layouts, path)
            if layout is None:
                continue
            value = node.outputs[0]
            if value.is_graph_output():
                raise Decline(f"the attention output `{value.name}` is a graph output")
            layouts[value.name] = layout
            path.values.append(value.name)
            for user, user_index in value.uses():
                pending.setdefault(id(user), (user, user_index))
        if len(taps) != 1:
            raise Decline(f"the attention output of {_describe(probabilities)} reaches {len(taps)} merged values read by projections, not one")
        tap, consumers = next(iter(taps.items()))
        for consumer in consumers:
            weight = consumer.inputs[describe_linear(consumer).weight_input]
            if len(weight.uses()) > 1:
                raise Decline(f"weight of output projection `{consumer.name}` is shared with another node")
        path.values = [name for name in path.values if name != tap] + [tap]
        return path, consumers

    # Result --------------------------------------------------------------------------

    def _group(self, name, structure, query, key, value, tap, consumers, extra_values) -> ChannelGroup:
        narrowed = [replace(ref, role=BIAS) for ref in query.path.biases]
        for projection in (key, value):
            linear = describe_linear(projection.node)
            narrowed.append(WeightRef(projection.node.name, linear.weight_input, linear.out_axis, KEY_VALUE))
            narrowed.extend(replace(ref, role=KEY_VALUE) for ref in projection.path.biases)
        query_linear = describe_linear(query.node)
        values = [*query.path.values, *key.path.values, *value.path.values, *extra_values]
        return ChannelGroup(
            name=name,
            width=structure.query_heads * structure.head_size,
            tap=tap,
            channels_last=True,
            producers=(WeightRef(query.node.name, query_linear.weight_input, query_linear.out_axis),),
            narrowed=tuple(narrowed),
            consumers=tuple(WeightRef(node.name, 1, describe_linear(node).in_axis) for node in consumers),
            values=tuple(dict.fromkeys(values)),
            unit=structure.head_size,
            kv_heads=structure.kv_heads,
        )

    def _entries(self, structure, query, key, value, output) -> tuple[ShapeEntry, ...]:
        """Give each recorded shape entry the role of the count it contains."""
        entries = []
        for path, kv in ((query.path, False), (key.path, True), (value.path, True), (output, False)):
            for node, position, kind, repeat in path.entries:
                if kind == "repeat":
                    role = GROUP
                elif kv and repeat == 1:
                    role = KV_WIDTH if kind == "width" else KV
                elif repeat in (1, structure.group_size):
                    role = QUERY_WIDTH if kind == "width" else QUERY
                else:
                    raise Decline(f"`{node}` repeats key/value heads {repeat} times, not {structure.group_size}")
                entry = ShapeEntry(node, position, role)
                self._check_entry(entry, structure)
                entries.append(entry)
        return tuple(dict.fromkeys(entries))

    def _check_entry(self, entry: ShapeEntry, structure: HeadStructure) -> None:
        node = next(node for node in self.nodes if node.name == entry.node)
        holder, index, offset = shape_entry_source(node, entry.position)
        found = int(constant_array(holder.inputs[index]).reshape(-1)[offset])
        if found != role_count(structure, entry.role):
            raise Decline(f"entry {entry.position} of the target shape of {_describe(node)} is {found}, not the {entry.role} count {role_count(structure, entry.role)}")


def find_head_groups(graph: ir.Graph) -> tuple[list[ChannelGroup], list[Declined], dict[str, tuple[ShapeEntry, ...]]]:
    """Return the attention-head groups of `graph`, every declined attention and each group's shape entries."""
    return AttentionMatcher(graph).run()


def head_count_changes(entries: tuple[ShapeEntry, ...], old: HeadStructure, new: HeadStructure) -> list[tuple[str, int, int]]:
    """Return (node, position, new count) for every shape entry whose count changes."""
    changes = []
    for entry in entries:
        if role_count(old, entry.role) != role_count(new, entry.role):
            changes.append((entry.node, entry.position, role_count(new, entry.role)))
    return changes


def kept_structure(group: ChannelGroup, keep: np.ndarray) -> tuple[HeadStructure, np.ndarray]:
    """Return the head counts after keeping channels `keep` and the key/value channels they read.

    Raises ValueError unless `keep` is whole query heads, with the same number of query
    heads kept in every kept key/value group, the layout that the repeated key/value
    heads of grouped-query attention can express.
    """
    old = structure_of(group)
    heads, kv_heads = kept_heads(group, keep)
    kv_channels = head_channels(kv_heads, old.head_size)
    return HeadStructure(len(heads), len(kv_heads), old.head_size), kv_channels
