"""A normalised view of torch.fx nodes: what each node does to channels.

symbolic_trace graphs mix modules (`call_module`), functions (`call_function`) and
tensor methods (`call_method`); `describe_node` maps all three to one small vocabulary
so that the matcher needs a single set of rules.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# Modules and functions applied to each element independently.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.Hardtanh,
)  # fmt: skip
# Pooling works on each channel of an NCHW tensor separately, so it keeps channels in place.
POOLING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.dropout, F.hardtanh, torch.relu, torch.sigmoid,
    torch.tanh, torch.erf, torch.exp, torch.sqrt, torch.neg, torch.abs, torch.clamp, torch.clip,
    torch.pow, operator.neg, operator.pow,
}  # fmt: skip
POOLING_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "erf", "exp", "sqrt", "neg", "abs",
    "clamp", "clamp_", "clip", "contiguous", "float", "to", "type_as", "half", "bfloat16", "pow",
}  # fmt: skip
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "div_"}

# The same vocabulary at the ATen level, for graphs from torch.export (matched by packet,
# so that every overload such as relu.default and relu_.default is covered).
aten = torch.ops.aten
ATEN_CONVOLUTIONS = {aten.conv1d, aten.conv2d, aten.conv3d}
ATEN_ELEMENTWISE = {
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.tanh, aten.hardswish,
    aten.hardswish_, aten.hardsigmoid, aten.hardtanh, aten.hardtanh_, aten.leaky_relu, aten.elu,
    aten.erf, aten.exp, aten.neg, aten.clamp, aten.dropout, aten.clone, aten.mish, aten.pow,
}  # fmt: skip
ATEN_POOLING = {aten.max_pool1d, aten.max_pool2d, aten.avg_pool1d, aten.avg_pool2d, aten.adaptive_avg_pool2d}
ATEN_BINARY = {aten.add, aten.add_, aten.mul, aten.mul_, aten.sub, aten.div}
# Reading these attributes of a tensor does not depend on its channel count.
HARMLESS_ATTRIBUTES = {"ndim", "dtype", "device", "is_cuda"}
HARMLESS_METHODS = {"dim", "ndimension", "get_device"}


@dataclass(frozen=True)
class LinearOp:
    """A dense Conv or Linear module: its parameters and how it maps channels.

    `out_axis` and `in_axis` are the weight's output- and input-channel axes: 0 and 1 for
    nn.Linear and convolutions, 1 and 0 for a weight stored (in, out) and applied as
    `x @ weight` (aten.mm, aten.addmm, aten.matmul, as in GPT-2's Conv1D). `data_input` is
    the position of the data tensor among the call's arguments.
    """

    module: str
    weight: str  # qualified parameter names
    bias: str | None
    width: int  # output channels
    in_width: int
    channels_last: bool
    rank: int | None  # rank of the data tensors for convolutions
    depthwise: bool = False
    out_axis: int = 0
    in_axis: int = 1
    data_input: int = 0


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attribute = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attribute)


def _describe_aten_linear(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """Describe aten.linear / aten.convNd whose weight is a get_attr of the original module."""
    packet = _packet(node)
    if packet is not aten.linear and packet not in ATEN_CONVOLUTIONS:
        return None
    weight_node = node.args[1] if len(node.args) > 1 else None
    bias_node = node.args[2] if len(node.args) > 2 else None
    if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        return None
    weight = get_tensor(gm, weight_node.target)
    bias = bias_node.target if isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" else None
    module = weight_node.target.rpartition(".")[0]
    if packet is aten.linear:
        return LinearOp(module, weight_node.target, bias, weight.shape[0], weight.shape[1], True, None)
    groups = node.args[6] if len(node.args) > 6 else 1
    depthwise = groups > 1 and weight.shape[1] == 1 and groups == weight.shape[0]
    in_width = weight.shape[1] if groups == 1 else (groups if depthwise else -1)
    return LinearOp(module, weight_node.target, bias, weight.shape[0], in_width, False, weight.ndim, depthwise)


# Matrix products `x @ weight` with the weight stored (in, out), at the ATen level and in
# symbolic_trace graphs, mapped to the position of their bias argument (None: no bias).
ATEN_MATRIX_PRODUCTS = {aten.addmm: 0, aten.mm: None, aten.matmul: None}
MATRIX_PRODUCT_FUNCTIONS = {torch.addmm: 0, torch.mm: None, torch.matmul: None, operator.matmul: None}


def _describe_matrix_product(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """Describe `x @ W` or `addmm(b, x, W)` where W is a 2-D get_attr and b a 1-D get_attr, else None.

    addmm also needs its default scale factors (beta = alpha = 1), so that it computes b + x @ W.
    """
    if node.op != "call_function":
        return None
    packet = _packet(node)
    if packet in ATEN_MATRIX_PRODUCTS:
        bias_index = ATEN_MATRIX_PRODUCTS[packet]
    elif node.target in MATRIX_PRODUCT_FUNCTIONS:
        bias_index = MATRIX_PRODUCT_FUNCTIONS[node.target]
    else:
        return None
    data_index = 0 if bias_index is None else 1
    if len(node.args) != data_index + 2 or any(node.kwargs.get(name, 1) != 1 for name in ("beta", "alpha")):
        return None
    data, weight_node = node.args[data_index], node.args[data_index + 1]
    if not isinstance(data, fx.Node) or data.op == "get_attr":
        return None
    if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        return None
    weight = get_tensor(gm, weight_node.target)
    if weight.ndim != 2:
        return None
    bias = None
    if bias_index is not None:
        bias_node = node.args[bias_index]
        if not isinstance(bias_node, fx.Node) or bias_node.op != "get_attr":
            return None
        if tuple(get_tensor(gm, bias_node.target).shape) != (weight.shape[1],):
            return None
        bias = bias_node.target
    # A layer is named by the module that owns its `weight`. A parameter with another name
    # is named by itself, because one module may own several such weights.
    owner, _, attribute = weight_node.target.rpartition(".")
    module = owner if attribute == "weight" else weight_node.target
    return LinearOp(
        module, weight_node.target, bias, weight.shape[1], weight.shape[0], True, None,
        out_axis=1, in_axis=0, data_input=data_index,
    )  # fmt: skip


def describe_linear(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """Describe a Conv / Linear call (dense or depthwise) or a product with a weight matrix, else return None."""
    if node.op == "call_function":
        return _describe_aten_linear(gm, node) or _describe_matrix_product(gm, node)
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        return LinearOp(node.target, f"{node.target}.weight", bias, module.out_features, module.in_features, True, None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        rank = module.weight.ndim
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups != 1 and not depthwise:
            return LinearOp(node.target, f"{node.target}.weight", bias, module.out_channels, -1, False, rank)
        return LinearOp(
            node.target, f"{node.target}.weight", bias, module.out_channels, module.in_channels, False, rank, depthwise
        )
    return None


def is_grouped(gm: fx.GraphModule, op: LinearOp) -> bool:
    return op.in_width == -1


def batchnorm_tensors(gm: fx.GraphModule, node: fx.Node) -> list[str] | None:
    """Return the qualified names of a BatchNorm's four per-channel tensors, else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
        module = gm.get_submodule(node.target)
        names = ["weight", "bias", "running_mean", "running_var"]
        return [f"{node.target}.{name}" for name in names if getattr(module, name, None) is not None]
    if _packet(node) is aten.batch_norm:
        tensors = node.args[1:5]
        training = node.args[5] if len(node.args) > 5 else False
        if training or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in tensors):
            return None
        return [t.target for t in tensors]
    if node.op == "call_function" and node.target is F.batch_norm:
        arguments = list(node.args[1:3]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]
        arguments += [a for a in node.args[3:5]]
        names = []
        for argument in arguments:
            if isinstance(argument, fx.Node) and argument.op == "get_attr":
                names.append(argument.target)
            elif argument is not None:
                return None
        return sorted(set(names))
    return None


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS or _packet(node) in ATEN_ELEMENTWISE
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def is_pooling(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), POOLING_MODULES)
    return node.op == "call_function" and (node.target in POOLING_FUNCTIONS or _packet(node) in ATEN_POOLING)


def is_binary(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in BINARY_FUNCTIONS or _packet(node) in ATEN_BINARY
    return node.op == "call_method" and node.target in BINARY_METHODS


RESHAPE_PACKETS = {aten.view, aten.reshape, aten._unsafe_view}
RESHAPE_METHODS = {"view", "reshape"}
SPLIT_PACKETS = {aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split}
SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
SPLIT_METHODS = {"split", "chunk", "unbind", "tensor_split"}
# Layers whose size attributes the rewrite sets from their narrowed weights.
SIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)


def is_aten(node: fx.Node) -> bool:
    """True for a call of an ATen operator, as in graphs from torch.export."""
    return _packet(node) is not None


def is_split(node: fx.Node) -> bool:
    """True for a split of a tensor into parts (split, chunk, unbind, tensor_split)."""
    if node.op == "call_method":
        return node.target in SPLIT_METHODS
    return node.op == "call_function" and (node.target in SPLIT_FUNCTIONS or _packet(node) in SPLIT_PACKETS)


def is_reshape(node: fx.Node) -> bool:
    """True for view / reshape of the first argument, at the ATen level or in symbolic_trace graphs."""
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    return node.op == "call_function" and (node.target is torch.reshape or _packet(node) in RESHAPE_PACKETS)


def known_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Return the static shape that tracing recorded for a node's value, else None.

    torch.export records it in `meta["val"]` and ShapeProp in `meta["tensor_meta"]`. A
    symbolic (dynamic) size gives None.
    """
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    if shape is None or not all(isinstance(size, int) for size in shape):
        return None
    return tuple(shape)


def literal_sizes(node: fx.Node) -> list[int]:
    """Return the integer literals among a reshape's shape arguments (nested lists included)."""
    sizes: list[int] = []
    pending = [*node.args[1:], *node.kwargs.values()]
    while pending:
        argument = pending.pop()
        if isinstance(argument, (list, tuple)):
            pending.extend(argument)
        elif isinstance(argument, int) and not isinstance(argument, bool):
            sizes.append(argument)
    return sizes


def is_harmless_use(node: fx.Node) -> bool:
    """True for uses that read only metadata, such as `getattr(x, "ndim")` or `x.dim()`."""
    if node.op == "call_method":
        return node.target in HARMLESS_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in HARMLESS_ATTRIBUTES


def prelu_weight(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Return the qualified name of a PReLU's weight (module, F.prelu or aten.prelu), else None.

    A functional PReLU qualifies only when its weight is a get_attr of the module.
    """
    if node.op == "call_module":
        return f"{node.target}.weight" if isinstance(gm.get_submodule(node.target), nn.PReLU) else None
    if node.op != "call_function" or (node.target is not torch.prelu and _packet(node) is not aten.prelu):
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def is_prelu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for any PReLU call, including a functional one whose weight is computed."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.PReLU)
    return node.op == "call_function" and (node.target is torch.prelu or _packet(node) is aten.prelu)


def shape_read(node: fx.Node) -> tuple[bool, int | None] | None:
    """Describe a read of a tensor's shape: (True, None) for `x.shape` or `x.size()`.

    Returns (False, dim) for `x.size(dim)` or aten.sym_size(x, dim), where only one
    dimension is read, and None when `node` reads no shape.
    """
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return True, None
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (True, None) if dim is None else (False, dim)
    if node.op == "call_function" and _packet(node) is aten.sym_size:
        return (True, None) if len(node.args) < 2 else (False, node.args[1])
    return None


def is_module_call(gm: fx.GraphModule, model: torch.nn.Module, op: LinearOp) -> bool:
    """True when `op.module` is a Conv / Linear module of `model`, so a hook sees its input."""
    try:
        module = model.get_submodule(op.module)
    except AttributeError:
        return False
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """Return a short human-readable name of a node for decline reasons."""
    if node.op == "call_module":
        return f"`{node.name}` ({type(gm.get_submodule(node.target)).__name__} `{node.target}`)"
    if node.op == "call_function":
        return f"`{node.name}` ({getattr(node.target, '__name__', node.target)})"
    return f"`{node.name}` ({node.op} {node.target})"
