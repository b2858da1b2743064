"""Find compressible channel groups in a torch.fx graph.

The rules mirror the ONNX matcher: walk forward from every dense Conv / Linear module
through channel-wise nodes (BatchNorm, activations, per-channel constants, gated products,
depthwise convolutions) to the Conv / Linear modules that read the hidden value, and
decline the candidate with a reason naming the node whenever a use is not channel-wise.
Weights are addressed by their qualified parameter names, so the records refer to the
original module, not to the traced copy.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from grail_graph.fx_frontend import ops
from grail_graph.groups import BIAS, BN_ROLES, CONSTANT, DEPTHWISE, ChannelGroup, Declined, WeightRef


class Decline(Exception):
    """Raised inside the matcher when a candidate group is unsafe; carries the reason."""


@dataclass
class _Region:
    width: int
    channels_last: bool
    rank: int | None
    values: dict[str, fx.Node] = field(default_factory=dict)
    producers: dict[str, ops.LinearOp] = field(default_factory=dict)
    narrowed: dict[str, WeightRef] = field(default_factory=dict)
    consumers: dict[str, tuple[ops.LinearOp, fx.Node]] = field(default_factory=dict)
    width_attributes: set[tuple[str, str]] = field(default_factory=set)
    # Layers and weight axes whose size attributes are looked up once the region is complete.
    sized: list[tuple[ops.LinearOp, int]] = field(default_factory=list)


class FxGroupMatcher:
    """Match every dense Conv / Linear of a GraphModule into groups or declined candidates."""

    def __init__(self, gm: fx.GraphModule, model: torch.nn.Module | None = None) -> None:
        self.gm = gm
        self.model = model if model is not None else gm
        linears = (ops.describe_linear(gm, node) for node in gm.graph.nodes)
        self.calls = Counter(linear.module for linear in linears if linear is not None)
        # Readers of each parameter that the graph reads through get_attr (ATen-level graphs).
        self.readers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.readers.setdefault(node.target, []).extend(node.users)
        # Producer modules that already have a verdict (a group or a Declined record).
        self.claimed: set[str] = set()

    def run(self) -> tuple[list[ChannelGroup], list[Declined]]:
        """Return the groups and the declined candidates; each producer module is in exactly one."""
        groups: list[ChannelGroup] = []
        declined: list[Declined] = []
        self.claimed = set()
        for node in self.gm.graph.nodes:
            linear = ops.describe_linear(self.gm, node)
            if linear is None or linear.depthwise or linear.module in self.claimed:
                continue
            if ops.is_grouped(self.gm, linear):
                self.claimed.add(linear.module)
                declined.append(Declined(linear.module, f"producer {ops.describe(self.gm, node)} is a grouped convolution"))
                continue
            region = _Region(linear.width, linear.channels_last, linear.rank)
            try:
                self._add_producer(region, node)
                self._grow(region)
                group = self._finish(region, f"g{len(groups)}:{linear.module}")
            except Decline as reason:
                # The first producer is claimed even when it fails its own checks, such as
                # a module called twice, so that its other calls are not declined again.
                candidates = {linear.module, *region.producers}
                self.claimed.update(candidates)
                declined.append(Declined(", ".join(sorted(candidates)), str(reason)))
                continue
            self.claimed.update(region.producers)
            groups.append(group)
        return groups, declined

    # Growing the region -------------------------------------------------------------

    def _check_single_call(self, node: fx.Node) -> None:
        linear = ops.describe_linear(self.gm, node)
        module = linear.module
        if self.calls[module] > 1:
            raise Decline(f"module `{module}` is called {self.calls[module]} times in the graph")
        others = [reader for reader in self.readers.get(linear.weight, ()) if reader is not node]
        if others:
            raise Decline(f"weight `{linear.weight}` is also read by {ops.describe(self.gm, others[0])}")

    def _add_producer(self, region: _Region, node: fx.Node) -> None:
        linear = ops.describe_linear(self.gm, node)
        if linear.width != region.width or linear.channels_last != region.channels_last:
            raise Decline(f"producer {ops.describe(self.gm, node)} has a different width or layout than the group")
        self._check_single_call(node)
        region.producers[linear.module] = linear
        if linear.bias is not None:
            region.narrowed[linear.bias] = WeightRef(linear.bias, 0, 0, BIAS)
        region.sized.append((linear, linear.out_axis))
        self._add_value(region, node)

    def _add_value(self, region: _Region, node: fx.Node) -> None:
        if any(user.op == "output" for user in node.users):
            raise Decline(f"hidden value `{node.name}` is a graph output")
        region.values.setdefault(node.name, node)

    def _grow(self, region: _Region) -> None:
        done: set[str] = set()
        while len(done) < len(region.values):
            name = next(n for n in region.values if n not in done)
            done.add(name)
            value = region.values[name]
            for user in list(value.users):
                self._classify_use(region, value, user)

    def _classify_use(self, region: _Region, value: fx.Node, user: fx.Node) -> None:
        if ops.is_harmless_use(user):
            return
        if (read := ops.shape_read(user)) is not None:
            self._check_shape_read(region, value, user, *read)
            return
        linear = ops.describe_linear(self.gm, user)
        first = bool(user.args) and user.args[0] is value
        if linear is not None and len(user.args) > linear.data_input and user.args[linear.data_input] is value:
            self._add_linear_user(region, value, user, linear)
        elif ops.is_prelu(self.gm, user) and first:
            self._add_prelu(region, user)
        elif (tensors := ops.batchnorm_tensors(self.gm, user)) is not None and first and not region.channels_last:
            for name in tensors:
                region.narrowed[name] = WeightRef(name, 0, 0, _batchnorm_role(name))
            self._add_value(region, user)
        elif ops.is_pooling(self.gm, user) and first and not region.channels_last:
            self._add_value(region, user)
        elif ops.is_elementwise(self.gm, user) and first:
            if any(isinstance(arg, fx.Node) for arg in [*user.args[1:], *user.kwargs.values()]):
                raise Decline(f"{ops.describe(self.gm, user)} takes a second tensor argument")
            self._add_value(region, user)
        elif ops.is_binary(user):
            self._add_binary(region, value, user)
        elif ops.is_reshape(user) and first:
            self._add_reshape(region, value, user)
        elif ops.is_split(user) and first:
            raise Decline(
                f"hidden value `{value.name}` feeds {ops.describe(self.gm, user)}, which splits the channels into "
                "parts, as the output of a fused query, key and value projection is split"
            )
        else:
            raise Decline(f"hidden value `{value.name}` feeds {ops.describe(self.gm, user)}, which mixes or reshapes channels")

    def _add_linear_user(self, region: _Region, value: fx.Node, user: fx.Node, linear: ops.LinearOp) -> None:
        if linear.depthwise and linear.width == region.width and not region.channels_last:
            self._check_single_call(user)
            region.narrowed[linear.weight] = WeightRef(linear.weight, 0, 0, DEPTHWISE)
            if linear.bias is not None:
                region.narrowed[linear.bias] = WeightRef(linear.bias, 0, 0, DEPTHWISE)
            region.width_attributes.add((linear.module, "groups"))
            self._add_value(region, user)
            return
        if ops.is_grouped(self.gm, linear) or linear.depthwise:
            raise Decline(f"consumer {ops.describe(self.gm, user)} is a grouped convolution")
        if linear.channels_last != region.channels_last:
            raise Decline(f"consumer {ops.describe(self.gm, user)} reads the hidden value in another layout")
        if linear.in_width != region.width:
            raise Decline(f"consumer {ops.describe(self.gm, user)} expects {linear.in_width} channels, not {region.width}")
        self._check_single_call(user)
        region.sized.append((linear, linear.in_axis))
        region.consumers[linear.module] = (linear, value)

    def _add_size_attributes(self, region: _Region, linear: ops.LinearOp, axis: int) -> None:
        """Record the integer attributes of a layer that hold the size of weight axis `axis`.

        nn.Linear and convolutions get their sizes from the rewrite, so only other layers
        are inspected, such as Hugging Face's Conv1D with `nf` (outputs) and `nx` (inputs).
        An attribute qualifies when it is public, equals the axis size, and the layer's
        own parameters are this weight and at most a bias. When the weight is square, such an
        attribute may hold either size, so the candidate is declined.
        """
        try:
            module = self.model.get_submodule(linear.module)
        except AttributeError:
            return
        if isinstance(module, ops.SIZED_LAYERS):
            return
        allowed = {linear.weight.rpartition(".")[2], "bias"}
        if linear.bias is not None:
            allowed.add(linear.bias.rpartition(".")[2])
        if {name for name, _ in module.named_parameters(recurse=False)} - allowed:
            return
        shape = ops.get_tensor(self.gm, linear.weight).shape
        size = shape[axis]
        names = [
            name for name, value in vars(module).items()
            if not name.startswith("_") and type(value) is int and value == size
        ]  # fmt: skip
        if not names:
            return
        if len(shape) == 2 and shape[0] == shape[1]:
            raise Decline(
                f"`{linear.module}` has a square weight ({size} x {size}) and the integer attributes "
                f"{', '.join(names)} equal to {size}, so its output and input sizes cannot be told apart"
            )
        region.width_attributes.update((linear.module, name) for name in names)

    def _add_reshape(self, region: _Region, value: fx.Node, node: fx.Node) -> None:
        """Accept a reshape that keeps the hidden axis last and unchanged, such as (B, S, H) -> (B*S, H).

        Such a reshape only merges or splits the leading axes, so each channel stays in place.
        The shapes that tracing recorded prove it. A symbolic_trace graph keeps the Python
        code's shape arguments, so a literal equal to the width there is a fixed width that
        narrowing would break.
        """
        before, after = ops.known_shape(value), ops.known_shape(node)
        described = ops.describe(self.gm, node)
        if not region.channels_last:
            raise Decline(f"hidden value `{value.name}` feeds {described}, which reshapes its channel axis 1")
        if before is None or after is None:
            raise Decline(
                f"hidden value `{value.name}` feeds {described}, and the graph records no static shapes "
                "that show whether the reshape keeps the hidden axis"
            )
        if not before or not after or before[-1] != region.width or after[-1] != region.width:
            raise Decline(f"{described} reshapes hidden value `{value.name}` from {before} to {after}, which moves the hidden axis")
        # NOTE: an ATen-level graph from torch.export contains every size as a literal fixed at
        # tracing time, whether the module computes it or not. The front end traces the
        # rewritten module again, which fails if the module's code fixes the old width.
        if not ops.is_aten(node) and region.width in ops.literal_sizes(node):
            raise Decline(f"{described} has the hidden width {region.width} as a literal in its shape argument")
        self._add_value(region, node)

    def _add_prelu(self, region: _Region, node: fx.Node) -> None:
        """Accept a PReLU on the hidden value, narrowing its weight when it has one per channel.

        PReLU applies weight[c] to axis 1 of its input, so a per-channel weight matches the
        hidden axis of an NCHW tensor, and of a channels-last tensor only when that is 2-D.
        """
        weight = ops.prelu_weight(self.gm, node)
        if weight is None:
            raise Decline(f"{ops.describe(self.gm, node)} takes a computed weight, which cannot be narrowed")
        size = ops.get_tensor(self.gm, weight).numel()
        if size != 1:
            if size != region.width:
                raise Decline(f"PReLU {ops.describe(self.gm, node)} has {size} weights for {region.width} channels")
            if region.channels_last and _known_rank(node) != 2:
                raise Decline(
                    f"PReLU {ops.describe(self.gm, node)} applies its {size} weights to axis 1, which is the "
                    "hidden axis of a channels-last value only when it is 2-D"
                )
            region.narrowed[weight] = WeightRef(weight, 0, 0, CONSTANT)
        self._add_value(region, node)

    def _check_shape_read(self, region: _Region, value: fx.Node, reader: fx.Node, whole: bool, dim) -> None:
        """Accept a read of `value`'s shape unless the hidden width can reach another node.

        The width escapes when a node uses the size of the hidden axis, the whole shape, or
        a slice of the shape that covers the hidden axis. That node may build a reshape or a
        buffer of the old width, or compute with the channel count.
        """
        leak = f"the shape of hidden value `{value.name}` is read by {{}}, so the width may be used elsewhere"
        if not whole:
            if _may_be_hidden_axis(region, value, dim) and reader.users:
                raise Decline(leak.format(ops.describe(self.gm, reader)))
            return
        for user in reader.users:
            index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
            if index is None:
                raise Decline(leak.format(ops.describe(self.gm, reader)))
            if _may_be_hidden_axis(region, value, index) and user.users:
                raise Decline(leak.format(ops.describe(self.gm, user)))

    def _operands(self, user: fx.Node) -> list:
        return [*user.args[:2], *[user.kwargs[k] for k in ("other", "input") if k in user.kwargs]]

    def _add_binary(self, region: _Region, value: fx.Node, user: fx.Node) -> None:
        others = [arg for arg in self._operands(user) if arg is not value]
        for other in others:
            if isinstance(other, (int, float)) or (isinstance(other, fx.Node) and other.name in region.values):
                continue
            if isinstance(other, fx.Node) and other.op == "get_attr":
                self._narrow_constant(region, user, other)
            elif isinstance(other, fx.Node):
                self._add_upstream(region, other, user)
            else:
                raise Decline(f"{ops.describe(self.gm, user)} has an operand of type {type(other).__name__}")
        self._add_value(region, user)

    def _add_upstream(self, region: _Region, node: fx.Node, via: fx.Node) -> None:
        """Join the producers behind `node`, reached only through channel-wise nodes."""
        reason = f"{ops.describe(self.gm, via)} combines the hidden value with `{node.name}`"
        linear = ops.describe_linear(self.gm, node)
        if linear is not None and not linear.depthwise and not ops.is_grouped(self.gm, linear):
            if linear.module in self.claimed:
                raise Decline(f"{reason}, whose producer `{linear.module}` already has a verdict of its own")
            if linear.module not in region.producers:
                self._add_producer(region, node)
            return
        if ops.is_prelu(self.gm, node) and isinstance(node.args[0], fx.Node):
            if node.args[0].name not in region.values:
                self._add_upstream(region, node.args[0], via)
            self._add_prelu(region, node)
            return
        tensors = ops.batchnorm_tensors(self.gm, node)
        for name in tensors or ():
            region.narrowed[name] = WeightRef(name, 0, 0, _batchnorm_role(name))
        channel_wise = ops.is_elementwise(self.gm, node) or ops.is_binary(node) or tensors is not None
        inputs = [arg for arg in node.args if isinstance(arg, fx.Node) and arg.op != "get_attr"]
        if tensors is not None:
            inputs = inputs[:1]
        if not channel_wise or not inputs:
            raise Decline(f"{reason}, which is not computed channel-wise from a producer")
        for data_input in inputs:
            if data_input.name not in region.values:
                self._add_upstream(region, data_input, via)
        self._add_value(region, node)

    def _narrow_constant(self, region: _Region, user: fx.Node, constant: fx.Node) -> None:
        tensor = ops.get_tensor(self.gm, constant.target)
        from_end = 1 if region.channels_last else region.rank - 1
        if tensor.ndim < from_end:
            return
        size = tensor.shape[tensor.ndim - from_end]
        if size == 1:
            return
        if size != region.width:
            raise Decline(f"constant `{constant.target}` of {ops.describe(self.gm, user)} has {size} entries on the hidden axis")
        region.narrowed[constant.target] = WeightRef(constant.target, 0, tensor.ndim - from_end, CONSTANT)

    # Result ---------------------------------------------------------------------------

    def _finish(self, region: _Region, name: str) -> ChannelGroup:
        if not region.consumers:
            raise Decline("hidden channels reach no Conv or Linear consumer")
        taps = {value.name for _, value in region.consumers.values()}
        if len(taps) > 1:
            raise Decline(f"consumers read different hidden values ({', '.join(sorted(taps))})")
        for linear, axis in region.sized:
            self._add_size_attributes(region, linear, axis)
        return ChannelGroup(
            name=name,
            width=region.width,
            tap=taps.pop(),
            channels_last=region.channels_last,
            producers=tuple(WeightRef(p.weight, 0, p.out_axis) for p in region.producers.values()),
            narrowed=tuple(region.narrowed.values()),
            consumers=tuple(WeightRef(c.weight, 0, c.in_axis) for c, _ in region.consumers.values()),
            width_attributes=tuple(sorted(region.width_attributes)),
            values=tuple(region.values),
        )


def _known_rank(node: fx.Node) -> int | None:
    """Return the rank of a node's value when tracing recorded it (torch.export does), else None."""
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return len(shape) if shape is not None else None


def _may_be_hidden_axis(region: _Region, value: fx.Node, index) -> bool:
    """True unless `index` (a dimension or a slice of dimensions) provably misses the hidden axis.

    NCHW values have the hidden axis at 1 of `region.rank` dimensions (a batch is assumed,
    as for per-channel constants). Channels-last values have it at -1, so a non-negative
    index is safe only when the value's rank is known.
    """
    rank = region.rank if not region.channels_last else _known_rank(value)
    if rank is None:
        if isinstance(index, int) and index < 0:
            return index == -1
        return True
    hidden = rank - 1 if region.channels_last else 1
    if isinstance(index, slice):
        return hidden in range(rank)[index]
    if not isinstance(index, int):
        return True
    return index % rank == hidden if -rank <= index < rank else True


def _batchnorm_role(name: str) -> str:
    suffix = name.rpartition(".")[2]
    return dict(zip(("weight", "bias", "running_mean", "running_var"), BN_ROLES))[suffix]


def find_groups(gm: fx.GraphModule, model: torch.nn.Module | None = None) -> tuple[list[ChannelGroup], list[Declined]]:
    """Return the compressible groups of a traced `model` and every declined candidate."""
    return FxGroupMatcher(gm, model).run()
