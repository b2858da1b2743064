"""Find attention-head groups in a traced graph and rewrite head counts after narrowing.

An attention-head group is the hidden dimension between the head outputs of one
scaled_dot_product_attention call and the Linear that reads them (o_proj): width
num_query_heads * head_size, head-major. Its producers are the query projection's rows,
its consumer is the output projection's columns, and the key and value projections are
narrowed by key/value head. The unit of selection is a whole head.

The matcher starts at every attention call and works on the graph alone:

1. Walk back from the query, key and value inputs to the one Linear behind each.
2. Walk forward from each projection in graph order and track the head axis and the
   head-size axis through view / reshape / transpose / permute / unsqueeze. Rotary
   embeddings pass too: products and sums with tensors that broadcast over heads, and
   slices and concatenations inside a head. So does the expand + reshape or
   repeat_interleave that repeats key/value heads. Every other use declines the candidate.
3. Walk forward from the attention output until the heads are merged back into the last
   axis, and record the Linear layers that read that value.

Head counts and head sizes come from the shapes in `node.meta` (fake tensors in
torch.export graphs, `tensor_meta` after ShapeProp).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn

from grail_graph.fx_frontend import ops
from grail_graph.groups import BIAS, KEY_VALUE, ChannelGroup, Declined, WeightRef
from grail_graph.heads import HeadStructure

logger = logging.getLogger(__name__)

aten = torch.ops.aten
ATTENTION_FUNCTIONS = {torch.nn.functional.scaled_dot_product_attention}
ATTENTION_PACKETS = {aten.scaled_dot_product_attention}
# Ops that pass a tensor through without touching its layout.
PASS_THROUGH_PACKETS = {
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.dropout, aten._to_copy, aten.to,
    aten.neg, aten.type_as,
}  # fmt: skip
PASS_THROUGH_METHODS = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "neg", "detach"}
# Ops that return nothing and only check their input.
CHECK_PACKETS = {aten._assert_tensor_metadata}
BINARY_PACKETS = {aten.add, aten.sub, aten.mul, aten.div}
RESHAPE_PACKETS = {aten.view, aten.reshape, aten._unsafe_view}
RESHAPE_METHODS = {"view", "reshape"}


class Decline(Exception):
    """Raised while matching one attention call when its heads cannot be compressed."""


@dataclass(frozen=True)
class Layout:
    """Head placement in one value.

    `head_axis` is None while the heads are merged into the last axis (head-major). Each
    source head appears `repeat` times in a row along the head axis, as repeat_interleave
    and Hugging Face's repeat_kv arrange key/value heads. `repeat_axis` is a size-n axis
    that an expand inserted right after the head axis, not yet merged into it.
    """

    heads: int
    head_size: int
    head_axis: int | None = None
    size_axis: int | None = None
    repeat: int = 1
    repeat_axis: int | None = None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """Return the static shape recorded on a node, or None without shape metadata."""
    value = node.meta.get("val")
    if value is None:
        value = node.meta.get("tensor_meta")
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(size) for size in shape)
    except TypeError:  # symbolic sizes
        return None


def has_shapes(gm: fx.GraphModule) -> bool:
    return any(shape_of(node) is not None for node in gm.graph.nodes)


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in ATTENTION_FUNCTIONS or _packet(node) in ATTENTION_PACKETS)


def _argument(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# Layout propagation ---------------------------------------------------------------------


class LayoutTracker:
    """Propagate a `Layout` through one node, or raise Decline naming the node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def describe(self, node: fx.Node) -> str:
        return ops.describe(self.gm, node)

    def step(self, node: fx.Node, layouts: dict[fx.Node, Layout]) -> Layout | None:
        """Return the layout of `node`'s output from its inputs' layouts (None: no output)."""
        packet = _packet(node)
        source = next(arg for arg in node.all_input_nodes if arg in layouts)
        layout = layouts[source]
        if packet in CHECK_PACKETS or ops.is_harmless_use(node):
            return None

        if packet in PASS_THROUGH_PACKETS or (node.op == "call_method" and node.target in PASS_THROUGH_METHODS):
            self._check_single_source(node, source)
            return layout
        if packet in RESHAPE_PACKETS or (node.op == "call_method" and node.target in RESHAPE_METHODS):
            self._check_single_source(node, source)
            return self._reshape(node, source, layout)

        if packet is aten.transpose or (node.op == "call_method" and node.target == "transpose"):
            rank = len(self._shape(source))
            first, second = (axis % rank for axis in node.args[1:3])
            order = list(range(rank))
            order[first], order[second] = second, first
            return self._permute(layout, order)
        if packet is aten.permute or (node.op == "call_method" and node.target == "permute"):
            rank = len(self._shape(source))
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return self._permute(layout, [axis % rank for axis in dims])
        if packet is aten.unsqueeze or (node.op == "call_method" and node.target == "unsqueeze"):
            rank = len(self._shape(node))
            return self._unsqueeze(node, layout, node.args[1] % rank)

        if packet is aten.expand or (node.op == "call_method" and node.target == "expand"):
            return self._expand(node, source, layout)
        if packet is aten.repeat_interleave or (node.op == "call_method" and node.target == "repeat_interleave"):
            return self._repeat_interleave(node, source, layout)

        if packet is aten.slice or packet is aten.narrow:
            self._check_not_head_axis(node, layout, node.args[1] if len(node.args) > 1 else 0, len(self._shape(source)))
            return layout
        if packet is aten.cat:
            return self._concatenate(node, layouts)
        if packet in BINARY_PACKETS or ops.is_binary(node):
            return self._binary(node, layouts)
        raise Decline(f"{self.describe(node)} is not a per-head operation")

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = shape_of(node)
        if shape is None:
            raise Decline(f"`{node.name}` has no static shape in the graph metadata")
        return shape

    def _check_single_source(self, node: fx.Node, source: fx.Node) -> None:
        if node.args and node.args[0] is not source:
            raise Decline(f"{self.describe(node)} uses the head value `{source.name}` as a parameter")

    def _check_not_head_axis(self, node: fx.Node, layout: Layout, axis: int, rank: int) -> None:
        if layout.head_axis is None:
            raise Decline(f"{self.describe(node)} slices the projection output before it is split into heads")
        if axis % rank in (layout.head_axis, layout.repeat_axis):
            raise Decline(f"{self.describe(node)} slices or joins along the head axis")

    def _reshape(self, node: fx.Node, source: fx.Node, layout: Layout) -> Layout:
        before, after = self._shape(source), self._shape(node)
        if before == after:
            return layout
        if layout.head_axis is None:
            return self._split(node, before, after, layout)
        heads, size = layout.head_axis, layout.size_axis
        if layout.repeat_axis is not None:
            return self._merge_repeat(node, before, after, layout)
        if size == heads + 1 == len(before) - 1 and after == (*before[:heads], before[heads] * before[size]):
            return replace(layout, head_axis=None, size_axis=None)
        raise Decline(f"{self.describe(node)} reshapes {before} to {after}, which moves channels across heads")

    def _split(self, node: fx.Node, before: tuple, after: tuple, layout: Layout) -> Layout:
        """Split the last axis, width heads * head_size, into (heads, head_size)."""
        rank = len(before)
        if len(after) == rank + 1 and after[: rank - 1] == before[:-1] and after[-2] * after[-1] == before[-1]:
            if after[-2] % layout.repeat:
                raise Decline(f"{self.describe(node)} splits {after[-2]} heads, not a multiple of the repeat count")
            if layout.head_size and after[-1] != layout.head_size:
                raise Decline(f"{self.describe(node)} splits heads of size {after[-1]}, not {layout.head_size}")
            return Layout(after[-2] // layout.repeat, after[-1], rank - 1, rank, layout.repeat)
        raise Decline(f"{self.describe(node)} reshapes {before} to {after}, which is not a split into heads")

    def _merge_repeat(self, node: fx.Node, before: tuple, after: tuple, layout: Layout) -> Layout:
        heads, repeat_axis = layout.head_axis, layout.repeat_axis
        if repeat_axis != heads + 1:
            raise Decline(f"{self.describe(node)} repeats heads in tiled order, not next to each source head")
        merged = (*before[:heads], before[heads] * before[repeat_axis], *before[repeat_axis + 1 :])
        if after != merged:
            raise Decline(f"{self.describe(node)} reshapes {before} to {after}, which is not a repeat of heads")
        size_axis = layout.size_axis - 1 if layout.size_axis > repeat_axis else layout.size_axis
        return replace(layout, size_axis=size_axis, repeat=layout.repeat * before[repeat_axis], repeat_axis=None)

    def _permute(self, layout: Layout, order: list[int]) -> Layout:
        if layout.head_axis is None:
            raise Decline("the projection output is permuted before it is split into heads")
        new_position = {old: new for new, old in enumerate(order)}

        def moved(axis):
            return None if axis is None else new_position[axis]

        return replace(
            layout,
            head_axis=moved(layout.head_axis),
            size_axis=moved(layout.size_axis),
            repeat_axis=moved(layout.repeat_axis),
        )

    def _unsqueeze(self, node: fx.Node, layout: Layout, axis: int) -> Layout:
        if layout.head_axis is None:
            raise Decline(f"{self.describe(node)} adds an axis before the projection output is split into heads")

        def shifted(old):
            if old is None or old < axis:
                return old
            return old + 1

        return replace(
            layout,
            head_axis=shifted(layout.head_axis),
            size_axis=shifted(layout.size_axis),
            repeat_axis=shifted(layout.repeat_axis),
        )

    def _expand(self, node: fx.Node, source: fx.Node, layout: Layout) -> Layout:
        before, after = self._shape(source), self._shape(node)
        if layout.head_axis is None or len(before) != len(after):
            raise Decline(f"{self.describe(node)} expands {before} to {after} outside a head layout")
        grown = [axis for axis in range(len(before)) if before[axis] != after[axis]]
        if layout.head_axis in grown or layout.size_axis in grown:
            raise Decline(f"{self.describe(node)} expands the head axis or the head-size axis")
        # An axis grown next to the head axis repeats heads once a reshape merges the two.
        beside = [axis for axis in (layout.head_axis + 1, layout.head_axis - 1) if axis in grown]
        if beside:
            if layout.repeat_axis is not None:
                raise Decline(f"{self.describe(node)} repeats heads twice")
            return replace(layout, repeat_axis=beside[0])
        return layout

    def _repeat_interleave(self, node: fx.Node, source: fx.Node, layout: Layout) -> Layout:
        repeats = _argument(node, 1, "repeats")
        dim = _argument(node, 2, "dim")
        rank = len(self._shape(source))
        if not isinstance(repeats, int) or dim is None or layout.head_axis is None or dim % rank != layout.head_axis:
            raise Decline(f"{self.describe(node)} is not a repeat of whole heads by a constant count")
        return replace(layout, repeat=layout.repeat * repeats)

    def _concatenate(self, node: fx.Node, layouts: dict[fx.Node, Layout]) -> Layout:
        tensors = node.args[0]
        axis = _argument(node, 1, "dim", 0)
        members = [tensor for tensor in tensors if isinstance(tensor, fx.Node)]
        if any(member not in layouts for member in members):
            raise Decline(f"{self.describe(node)} joins the head value with a tensor from elsewhere")
        layout = self._common_layout(node, [layouts[member] for member in members])
        self._check_not_head_axis(node, layout, axis, len(self._shape(node)))
        return layout

    def _binary(self, node: fx.Node, layouts: dict[fx.Node, Layout]) -> Layout:
        operands = [*node.args[:2], *node.kwargs.values()]
        tensors = [operand for operand in operands if isinstance(operand, fx.Node)]
        inside = [layouts[tensor] for tensor in tensors if tensor in layouts]
        layout = self._common_layout(node, inside)
        if layout.head_axis is None:
            outside = [tensor for tensor in tensors if tensor not in layouts]
            if outside:
                raise Decline(f"{self.describe(node)} combines the projection output with `{outside[0].name}`")
            return layout
        rank = len(self._shape(node))
        for tensor in tensors:
            if tensor in layouts:
                continue
            shape = self._shape(tensor)
            offset = rank - len(shape)
            for axis in (layout.head_axis, layout.repeat_axis):
                if axis is not None and axis >= offset and shape[axis - offset] != 1:
                    raise Decline(f"{self.describe(node)} combines the heads with `{tensor.name}`, which differs per head")
        return layout

    def _common_layout(self, node: fx.Node, layouts: list[Layout]) -> Layout:
        if any(layout != layouts[0] for layout in layouts[1:]):
            raise Decline(f"{self.describe(node)} combines values whose heads are arranged differently")
        return layouts[0]


# Matching -------------------------------------------------------------------------------


@dataclass
class _Projection:
    node: fx.Node
    linear: ops.LinearOp
    layout: Layout  # at the attention call


class AttentionMatcher:
    """Match every attention call of a GraphModule into a head group or a declined candidate."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.tracker = LayoutTracker(gm)
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}
        linears = (ops.describe_linear(gm, node) for node in gm.graph.nodes)
        self.calls = Counter(linear.module for linear in linears if linear is not None)

    def run(self) -> tuple[list[ChannelGroup], list[Declined]]:
        groups: list[ChannelGroup] = []
        declined: list[Declined] = []
        for node in self.gm.graph.nodes:
            if not is_attention(node):
                continue
            try:
                groups.append(self._match(node, f"h{len(groups)}"))
            except Decline as reason:
                declined.append(Declined(self._candidate(node), str(reason)))
        return groups, declined

    def _candidate(self, attention: fx.Node) -> str:
        """Name a declined attention call by its projections, else by the node."""
        names = []
        for index, name in enumerate(("query", "key", "value")):
            try:
                node = self._linear_behind(attention, _argument(attention, index, name))
                names.append(ops.describe_linear(self.gm, node).module)
            except Decline:
                pass
        return ", ".join(dict.fromkeys(names)) or f"attention `{attention.name}`"

    def _match(self, attention: fx.Node, prefix: str) -> ChannelGroup:
        inputs = [_argument(attention, index, name) for index, name in enumerate(("query", "key", "value"))]
        nodes = [self._linear_behind(attention, value) for value in inputs]
        linears = [ops.describe_linear(self.gm, node) for node in nodes]
        if len({linear.module for linear in linears}) < 3:
            raise Decline(f"query, key and value of `{attention.name}` come from one fused projection")
        for node, linear in zip(nodes, linears):
            if not linear.channels_last:
                raise Decline(f"projection {ops.describe(self.gm, node)} is not a Linear layer")
            # NOTE: head groups address weights in the (out, in) layout of nn.Linear, so a
            # projection written as x @ W with W stored (in, out) is declined.
            if linear.out_axis != 0:
                raise Decline(f"projection {ops.describe(self.gm, node)} stores its weight as (in, out)")
            if self.calls[linear.module] > 1:
                raise Decline(f"module `{linear.module}` is called {self.calls[linear.module]} times in the graph")
        query, key, value = (
            _Projection(node, linear, self._follow(node, linear, attention, index))
            for index, (node, linear) in enumerate(zip(nodes, linears))
        )
        structure = self._structure(attention, query, key, value)
        self._check_mask(attention)
        tap, consumers = self._output(attention, structure)
        return self._group(f"{prefix}:{owner_module(query.linear.module, key.linear.module, value.linear.module)}",
                           structure, query, key, value, tap, consumers)  # fmt: skip

    def _linear_behind(self, attention: fx.Node, value) -> fx.Node:
        """Return the one Linear node that `value` is computed from, walking back to the first Linear on every path."""
        if not isinstance(value, fx.Node):
            raise Decline(f"an input of `{attention.name}` is not a graph value")
        found: dict[fx.Node, None] = {}
        seen: set[fx.Node] = set()
        stack = [value]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if ops.describe_linear(self.gm, node) is not None:
                found[node] = None
                continue
            stack.extend(node.all_input_nodes)
        if len(found) != 1:
            names = ", ".join(f"`{node.name}`" for node in found) or "none"
            raise Decline(f"input `{value.name}` of `{attention.name}` is computed from {len(found)} linear layers ({names})")
        return next(iter(found))

    def _follow(self, start: fx.Node, linear: ops.LinearOp, attention: fx.Node, position: int) -> Layout:
        """Track the heads from a projection to argument `position` of `attention`; return the layout there."""
        layouts = {start: Layout(0, 0)}
        pending = set(start.users)
        arrived: Layout | None = None
        for node in list(self.gm.graph.nodes)[self.order[start] + 1 :]:
            if not pending:
                break
            if node not in pending:
                continue
            pending.discard(node)
            if node is attention:
                arrived = self._arrive(node, position, layouts)
                continue
            if node.op == "output":
                raise Decline(f"a value computed from `{linear.module}` is a graph output")
            if ops.describe_linear(self.gm, node) is not None or is_attention(node):
                raise Decline(f"{ops.describe(self.gm, node)} reads a value computed from `{linear.module}`")
            layout = self.tracker.step(node, layouts)
            if layout is not None:
                layouts[node] = layout
                pending.update(node.users)
        if arrived is None:
            raise Decline(f"`{linear.module}` does not reach `{attention.name}`")
        return arrived

    def _arrive(self, attention: fx.Node, position: int, layouts: dict[fx.Node, Layout]) -> Layout:
        names = ("query", "key", "value")
        arguments = [_argument(attention, index, name) for index, name in enumerate(names)]
        extra = [arg for arg in [*attention.args[3:], *attention.kwargs.values()] if arg in layouts]
        used = [index for index, arg in enumerate(arguments) if arg in layouts]
        if extra or used != [position]:
            raise Decline(f"the {names[position]} projection of `{attention.name}` also feeds another of its inputs")
        layout = layouts[arguments[position]]
        rank = len(self.tracker._shape(arguments[position]))
        if layout.head_axis != rank - 3 or layout.size_axis != rank - 1 or layout.repeat_axis is not None:
            raise Decline(f"the {names[position]} of `{attention.name}` does not have its heads on axis -3")
        return layout

    def _structure(self, attention: fx.Node, query: _Projection, key: _Projection, value: _Projection) -> HeadStructure:
        q, k, v = query.layout, key.layout, value.layout
        if q.repeat != 1:
            raise Decline(f"the query heads of `{attention.name}` are repeated")
        if k.heads != v.heads or k.repeat != v.repeat:
            raise Decline(f"key and value of `{attention.name}` have different head counts")
        if q.head_size != k.head_size or q.head_size != v.head_size:
            raise Decline(
                f"`{attention.name}` has query, key and value heads of sizes {q.head_size}, {k.head_size}, "
                f"{v.head_size}; only equal sizes are supported"
            )
        repeated = k.heads * k.repeat
        if repeated != q.heads:
            enable_gqa = bool(attention.kwargs.get("enable_gqa", False))
            if not enable_gqa or q.heads % repeated:
                raise Decline(f"`{attention.name}` has {q.heads} query heads but {repeated} key/value heads")
        structure = HeadStructure(q.heads, k.heads, q.head_size)
        for projection, heads in ((query, q.heads), (key, k.heads), (value, v.heads)):
            if projection.linear.width != heads * structure.head_size:
                raise Decline(f"`{projection.linear.module}` has {projection.linear.width} outputs, not {heads} heads")
        return structure

    def _check_mask(self, attention: fx.Node) -> None:
        mask = _argument(attention, 3, "attn_mask")
        if not isinstance(mask, fx.Node):
            return
        shape = self.tracker._shape(mask)
        if len(shape) >= 3 and shape[-3] != 1:
            raise Decline(f"attention mask `{mask.name}` of `{attention.name}` differs per head")

    def _output(self, attention: fx.Node, structure: HeadStructure) -> tuple[fx.Node, list[fx.Node]]:
        """Follow the attention output to the value with merged heads and its Linear readers."""
        rank = len(self.tracker._shape(attention))
        layouts = {attention: Layout(structure.query_heads, structure.head_size, rank - 3, rank - 1)}
        pending = set(attention.users)
        taps: dict[fx.Node, list[fx.Node]] = {}
        for node in list(self.gm.graph.nodes)[self.order[attention] + 1 :]:
            if not pending:
                break
            if node not in pending:
                continue
            pending.discard(node)
            if node.op == "output":
                raise Decline(f"the output of `{attention.name}` is a graph output")
            source = next(arg for arg in node.all_input_nodes if arg in layouts)
            if ops.describe_linear(self.gm, node) is not None:
                if layouts[source].head_axis is not None or node.args[0] is not source:
                    raise Decline(f"{ops.describe(self.gm, node)} reads the heads of `{attention.name}` before they are merged")
                taps.setdefault(source, []).append(node)
                continue
            layout = self.tracker.step(node, layouts)
            if layout is not None:
                layouts[node] = layout
                pending.update(node.users)
        if not taps:
            raise Decline(f"the output of `{attention.name}` reaches no Linear consumer")
        if len(taps) > 1:
            raise Decline(f"Linear consumers read different values ({', '.join(sorted(t.name for t in taps))})")
        tap, consumers = next(iter(taps.items()))
        for consumer in consumers:
            linear = ops.describe_linear(self.gm, consumer)
            if linear.in_axis != 1:
                raise Decline(f"output projection {ops.describe(self.gm, consumer)} stores its weight as (in, out)")
            if self.calls[linear.module] > 1:
                raise Decline(f"module `{linear.module}` is called {self.calls[linear.module]} times in the graph")
        return tap, consumers

    def _group(self, name, structure, query, key, value, tap, consumers) -> ChannelGroup:
        narrowed = []
        if query.linear.bias is not None:
            narrowed.append(WeightRef(query.linear.bias, 0, 0, BIAS))
        for projection in (key, value):
            narrowed.append(WeightRef(projection.linear.weight, 0, 0, KEY_VALUE))
            if projection.linear.bias is not None:
                narrowed.append(WeightRef(projection.linear.bias, 0, 0, KEY_VALUE))
        return ChannelGroup(
            name=name,
            width=structure.query_heads * structure.head_size,
            tap=tap.name,
            channels_last=True,
            producers=(WeightRef(query.linear.weight, 0, 0),),
            narrowed=tuple(narrowed),
            consumers=tuple(WeightRef(ops.describe_linear(self.gm, c).weight, 0, 1) for c in consumers),
            values=(tap.name,),
            unit=structure.head_size,
            kv_heads=structure.kv_heads,
        )


def owner_module(*modules: str) -> str:
    """Return the qualified name of the deepest module that contains all `modules`."""
    parts = [module.split(".")[:-1] for module in modules]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def find_head_groups(gm: fx.GraphModule) -> tuple[list[ChannelGroup], list[Declined]]:
    """Return the attention-head groups of a traced graph and every declined attention call."""
    return AttentionMatcher(gm).run()


# Head arithmetic for selection and rewriting ----------------------------------------------


def head_count_updates(module: nn.Module, old: HeadStructure, new: HeadStructure) -> dict[str, int]:
    """Return the integer attributes of `module` that hold a head count, with their new values.

    Attributes are found by value among those whose name mentions heads or groups: the
    query heads, the key/value heads, the query heads per key/value head, and the query or
    key/value width (heads * head size, such as BERT's `all_head_size`). When one value
    fits several of these, the name decides. The head size itself never changes.
    """
    roles = {
        "query": (old.query_heads, new.query_heads),
        "kv": (old.kv_heads, new.kv_heads),
        "group": (old.group_size, new.group_size),
        "query_width": (old.query_heads * old.head_size, new.query_heads * new.head_size),
        "kv_width": (old.kv_heads * old.head_size, new.kv_heads * new.head_size),
    }
    updates = {}
    for name, value in vars(module).items():
        lowered = name.lower()
        if type(value) is not int or not ("head" in lowered or "group" in lowered):
            continue
        if value == old.head_size and ("dim" in lowered or "size" in lowered) and not lowered.startswith("all"):
            continue  # the size of one head
        matches = {role: new_value for role, (old_value, new_value) in roles.items() if old_value == value}
        if len(set(matches.values())) > 1:
            matches = {role: matches[role] for role in _roles_by_name(lowered) if role in matches} or matches
        if len(set(matches.values())) == 1:
            new_value = next(iter(matches.values()))
            if new_value != value:
                updates[name] = new_value
        elif matches:
            logger.warning("attribute %s = %d of %s is ambiguous; left unchanged", name, value, type(module).__name__)
    return updates


def _roles_by_name(name: str) -> list[str]:
    if "group" in name or "rep" in name:
        return ["group"]
    width = "size" in name or "dim" in name
    if "key_value" in name or "kv" in name:
        return ["kv_width"] if width else ["kv"]
    return ["query_width"] if width else ["query"]


