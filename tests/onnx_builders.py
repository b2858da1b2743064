"""Tiny ONNX models for the front-end tests, and helpers that run them in ONNX Runtime.

Every model is float32 and opset 18 unless its builder's docstring names another opset. Weights come from a
seeded numpy generator, so each builder returns the same model for the same seed.
Node `name` writes the value `name_out`, which keeps node names and value names apart
in the matcher's messages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


class ModelBuilder:
    """Collects the nodes and initializers of one graph."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array) -> str:
        """Add an initializer with the dtype of `array` and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.constant(name, np.float32(value))

    def weight(self, name: str, shape: Sequence[int], scale: float = 0.5) -> str:
        """Add a float32 initializer drawn from N(0, scale^2) and return its name."""
        array = (scale * self.rng.standard_normal(shape)).astype(np.float32)
        return self.constant(name, array)

    def positive(self, name: str, shape: Sequence[int]) -> str:
        """Add a float32 initializer drawn from U(0.5, 1.5), for BatchNorm variances and scales."""
        return self.constant(name, self.rng.uniform(0.5, 1.5, shape).astype(np.float32))

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attributes) -> str:
        """Add a node named `name` with the single output `name_out` and return that output."""
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attributes))
        return output

    def constant_node(self, name: str, array: np.ndarray) -> str:
        """Add a Constant node (not an initializer) holding `array` and return its output."""
        tensor = numpy_helper.from_array(np.asarray(array), f"{name}_value")
        return self.node("Constant", [], name, value=tensor)

    def batch_norm(self, name: str, data: str, channels: int) -> str:
        scale = self.positive(f"{name}_scale", [channels])
        bias = self.weight(f"{name}_bias", [channels])
        mean = self.weight(f"{name}_mean", [channels])
        variance = self.positive(f"{name}_var", [channels])
        return self.node("BatchNormalization", [data, scale, bias, mean, variance], name)

    def build(
        self,
        inputs: Mapping[str, Sequence[int]],
        outputs: Sequence[str],
        opset: int = OPSET,
        check: bool = True,
    ) -> onnx.ModelProto:
        """Return the model; `check=False` skips the ONNX checker for deliberately invalid graphs.

        The first dimension of every input becomes the symbolic `batch`.
        """
        graph = helper.make_graph(
            self.nodes,
            "test",
            [
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape[1:]])
                for name, shape in inputs.items()
            ],
            [helper.make_empty_tensor_value_info(name) for name in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if check:
            # Shape inference fills in the output types that the checker requires.
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            onnx.checker.check_model(model, full_check=True)
        return model


# Models -----------------------------------------------------------------------------------

CONV_INPUT = (2, 3, 6, 6)
MLP_INPUT = (2, 5, 6)


def conv_bn_relu_conv(seed: int = 0, hidden: int = 6) -> onnx.ModelProto:
    """Build x (2, 3, 6, 6) -> conv1 (with bias) -> bn -> relu -> conv2 -> y (2, 5, 6, 6)."""
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w1", [hidden, 3, 3, 3]), b.weight("b1", [hidden])], "conv1", pads=[1, 1, 1, 1])
    h = b.batch_norm("bn", h, hidden)
    h = b.node("Relu", [h], "relu")
    y = b.node("Conv", [h, b.weight("w2", [5, hidden, 3, 3]), b.weight("b2", [5])], "conv2", pads=[1, 1, 1, 1])
    return b.build({"x": CONV_INPUT}, [y])


def inverted_residual(seed: int = 0, hidden: int = 8) -> onnx.ModelProto:
    """Build x (2, 4, 6, 6) -> 1x1 expand -> bn1 -> clip(0, 6) -> 3x3 depthwise -> bn2 -> relu -> 1x1 project."""
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w_expand", [hidden, 4, 1, 1])], "expand")
    h = b.batch_norm("bn1", h, hidden)
    h = b.node("Clip", [h, b.scalar("clip_min", 0.0), b.scalar("clip_max", 6.0)], "clip")
    depthwise_inputs = [h, b.weight("w_dw", [hidden, 1, 3, 3]), b.weight("b_dw", [hidden])]
    h = b.node("Conv", depthwise_inputs, "depthwise", group=hidden, pads=[1, 1, 1, 1])
    h = b.batch_norm("bn2", h, hidden)
    h = b.node("Relu", [h], "relu")
    y = b.node("Conv", [h, b.weight("w_project", [5, hidden, 1, 1])], "project")
    return b.build({"x": (2, 4, 6, 6)}, [y])


def conv_scale_relu_conv(
    seed: int = 0,
    scale_shape: Sequence[int] = (1, 6, 1, 1),
    constant_node: bool = True,
    hidden: int = 6,
    check: bool = True,
) -> onnx.ModelProto:
    """Build x (2, 3, 6, 6) -> conv1 -> scale (Mul by a constant of `scale_shape`) -> relu -> conv2.

    With `constant_node` the scale comes from a Constant node, else from an initializer.
    """
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w1", [hidden, 3, 3, 3])], "conv1", pads=[1, 1, 1, 1])
    factors = b.rng.uniform(0.5, 1.5, scale_shape).astype(np.float32)
    if constant_node:
        factor = b.constant_node("factor", factors)
    else:
        factor = b.constant("factor", factors)
    h = b.node("Mul", [h, factor], "scale")
    h = b.node("Relu", [h], "relu")
    y = b.node("Conv", [h, b.weight("w2", [5, hidden, 3, 3])], "conv2", pads=[1, 1, 1, 1])
    return b.build({"x": CONV_INPUT}, [y], check=check)


def conv1d_relu_conv1d(seed: int = 0, hidden: int = 6) -> onnx.ModelProto:
    """Build x (2, 3, 8) -> conv1 (kernel 3) -> relu -> conv2 (kernel 1) -> y (2, 5, 8)."""
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w1", [hidden, 3, 3])], "conv1", pads=[1, 1])
    h = b.node("Relu", [h], "relu")
    y = b.node("Conv", [h, b.weight("w2", [5, hidden, 1])], "conv2")
    return b.build({"x": (2, 3, 8)}, [y])


def conv_chain(seed: int = 0) -> onnx.ModelProto:
    """Build x (2, 3, 6, 6) -> conv1 -> relu1 -> conv2 (with bias) -> relu2 -> conv3, two chained groups."""
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w1", [6, 3, 3, 3])], "conv1", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "relu1")
    h = b.node("Conv", [h, b.weight("w2", [7, 6, 3, 3]), b.weight("b2", [7])], "conv2", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "relu2")
    y = b.node("Conv", [h, b.weight("w3", [5, 7, 1, 1])], "conv3")
    return b.build({"x": CONV_INPUT}, [y])


def mlp_two_consumers(seed: int = 0) -> onnx.ModelProto:
    """Build x (2, 5, 6) -> fc1 -> relu -> (fc_a, fc_b) -> sum, whose tap has two consumers."""
    b = ModelBuilder(seed)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    h = b.node("Relu", [h], "relu")
    y_a = b.node("MatMul", [h, b.weight("w_a", [10, 4])], "fc_a")
    y_b = b.node("MatMul", [h, b.weight("w_b", [10, 4])], "fc_b")
    y = b.node("Add", [y_a, y_b], "sum")
    return b.build({"x": MLP_INPUT}, [y])


# Activations in the node patterns that ONNX exporters produce. Each takes (builder, input)
# and returns its output value.


def relu(b: ModelBuilder, x: str) -> str:
    return b.node("Relu", [x], "relu")


def gelu_erf(b: ModelBuilder, x: str) -> str:
    """Write GELU as x * 0.5 * (1 + Erf(x / sqrt(2)))."""
    scaled = b.node("Div", [x, b.scalar("sqrt2", math.sqrt(2.0))], "gelu_div")
    erf = b.node("Erf", [scaled], "gelu_erf")
    shifted = b.node("Add", [erf, b.scalar("gelu_one", 1.0)], "gelu_add")
    product = b.node("Mul", [x, shifted], "gelu_mul")
    return b.node("Mul", [product, b.scalar("gelu_half", 0.5)], "gelu_half_mul")


def gelu_tanh(b: ModelBuilder, x: str) -> str:
    """Write tanh-approximated GELU as 0.5 * x * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))."""
    cube = b.node("Pow", [x, b.scalar("gelu_three", 3.0)], "gelu_pow")
    cubic_term = b.node("Mul", [cube, b.scalar("gelu_coefficient", 0.044715)], "gelu_cubic")
    inner = b.node("Add", [x, cubic_term], "gelu_inner")
    argument = b.node("Mul", [inner, b.scalar("gelu_sqrt_2_over_pi", math.sqrt(2.0 / math.pi))], "gelu_scale")
    tanh = b.node("Tanh", [argument], "gelu_tanh")
    shifted = b.node("Add", [tanh, b.scalar("gelu_one", 1.0)], "gelu_add")
    half = b.node("Mul", [x, b.scalar("gelu_half", 0.5)], "gelu_half_x")
    return b.node("Mul", [half, shifted], "gelu_mul")


def silu(b: ModelBuilder, x: str) -> str:
    """Write SiLU as x * Sigmoid(x)."""
    return b.node("Mul", [x, b.node("Sigmoid", [x], "sigmoid")], "silu")


def hard_swish(b: ModelBuilder, x: str) -> str:
    return b.node("HardSwish", [x], "hard_swish")


def leaky_relu(b: ModelBuilder, x: str) -> str:
    return b.node("LeakyRelu", [x], "leaky_relu", alpha=0.1)


Activation = Callable[[ModelBuilder, str], str]


def matmul_mlp(
    seed: int = 0,
    activation: Activation = relu,
    hidden: int = 10,
    input_shape: Sequence[int] = MLP_INPUT,
    output_bias: bool = True,
) -> onnx.ModelProto:
    """Build x (..., 6) -> fc1 (MatMul) -> fc1_bias (Add) -> activation -> fc2 (MatMul) [-> fc2_bias] -> y (..., 4)."""
    b = ModelBuilder(seed)
    h = b.node("MatMul", ["x", b.weight("w1", [input_shape[-1], hidden])], "fc1")
    h = b.node("Add", [h, b.weight("b1", [hidden])], "fc1_bias")
    h = activation(b, h)
    y = b.node("MatMul", [h, b.weight("w2", [hidden, 4])], "fc2")
    if output_bias:
        y = b.node("Add", [y, b.weight("b2", [4])], "fc2_bias")
    return b.build({"x": input_shape}, [y])


def gemm_gelu_gemm(seed: int = 0, hidden: int = 10) -> onnx.ModelProto:
    """Build x (4, 6) -> Gemm (transB=1) -> Gelu -> Gemm (transB=1) -> y (4, 3), at opset 20 for Gelu."""
    b = ModelBuilder(seed)
    h = b.node("Gemm", ["x", b.weight("w1", [hidden, 6]), b.weight("b1", [hidden])], "fc1", transB=1)
    h = b.node("Gelu", [h], "gelu")
    y = b.node("Gemm", [h, b.weight("w2", [3, hidden]), b.weight("b2", [3])], "fc2", transB=1)
    return b.build({"x": (4, 6)}, [y], opset=20)


def gemm_relu_gemm(seed: int = 0, hidden: int = 10) -> onnx.ModelProto:
    """Build x (4, 6) -> Gemm (weight (6, hidden), bias (1, hidden)) -> relu -> Gemm -> y (4, 3)."""
    b = ModelBuilder(seed)
    h = b.node("Gemm", ["x", b.weight("w1", [6, hidden]), b.weight("b1", [1, hidden])], "fc1")
    h = b.node("Relu", [h], "relu")
    y = b.node("Gemm", [h, b.weight("w2", [hidden, 3])], "fc2")
    return b.build({"x": (4, 6)}, [y])


def swiglu(seed: int = 0, hidden: int = 10, up_first: bool = False) -> onnx.ModelProto:
    """Build the gated MLP h = SiLU(x Wg) * (x Wu), y = h Wd on x (2, 5, 6).

    `up_first` puts the up projection first in node order, so matching starts from it.
    """
    b = ModelBuilder(seed)
    w_gate = b.weight("w_gate", [6, hidden])
    w_up = b.weight("w_up", [6, hidden])
    if up_first:
        up = b.node("MatMul", ["x", w_up], "up")
        gate = b.node("MatMul", ["x", w_gate], "gate")
    else:
        gate = b.node("MatMul", ["x", w_gate], "gate")
        up = b.node("MatMul", ["x", w_up], "up")
    sigmoid = b.node("Sigmoid", [gate], "sigmoid")
    activated = b.node("Mul", [gate, sigmoid], "silu")
    h = b.node("Mul", [activated, up], "gated")
    y = b.node("MatMul", [h, b.weight("w_down", [hidden, 6])], "down")
    return b.build({"x": MLP_INPUT}, [y])


# Running models ----------------------------------------------------------------------------


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """Open a CPU session on a model proto or a model file path."""
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Return the first output of `model` on `feeds`."""
    return session(model).run(None, dict(feeds))[0]


def run_tap(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], tap: str) -> np.ndarray:
    """Return the value `tap` by running a copy of `model` with it added as a graph output."""
    tapped = copy.deepcopy(model)
    tapped.graph.output.append(helper.make_tensor_value_info(tap, TensorProto.FLOAT, None))
    return session(tapped).run([tap], dict(feeds))[0]


def map_tap(model: onnx.ModelProto, tap: str, matrix: np.ndarray, channels_last: bool, rank: int) -> onnx.ModelProto:
    """Return a copy of `model` whose readers of `tap` see t' = t R along the hidden axis.

    `matrix` is R, shape (H, H). A 0/1 diagonal R zeroes channels, and R = S B^T with the
    selection S (H, K) rebuilds the tap from its kept channels the way a consumer map B does.
    """
    mapped = copy.deepcopy(model)
    graph = mapped.graph
    matrix = matrix.astype(np.float32)
    weight_name, output = f"{tap}_matrix", f"{tap}_mapped"
    if channels_last:
        mapping = helper.make_node("MatMul", [tap, weight_name], [output], name=f"{tap}_map")
        weight = matrix
    else:
        # A 1x1 convolution with weight[o, i] = R[i, o] applies R to every pixel.
        mapping = helper.make_node("Conv", [tap, weight_name], [output], name=f"{tap}_map")
        weight = matrix.T.reshape(matrix.shape + (1,) * (rank - 2))
    graph.initializer.append(numpy_helper.from_array(weight, weight_name))
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == tap:
                node.input[index] = output
    producer_index = next(i for i, node in enumerate(graph.node) if tap in node.output)
    graph.node.insert(producer_index + 1, mapping)
    return mapped


def initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}


def node_inputs(model: onnx.ModelProto, node_name: str) -> list[str]:
    return list(next(node for node in model.graph.node if node.name == node_name).input)


def initializer_shape(model: onnx.ModelProto, node_name: str, index: int) -> tuple[int, ...]:
    """Return the shape of the initializer that feeds input `index` of node `node_name`."""
    return initializer_shapes(model)[node_inputs(model, node_name)[index]]


# Transformer layouts ---------------------------------------------------------------------


def swiglu_swish(seed: int = 0, hidden: int = 10) -> onnx.ModelProto:
    """Build h = Swish(x Wg) * (x Wu), y = h Wd on x (2, 5, 6), with the opset 24 Swish op."""
    b = ModelBuilder(seed)
    gate = b.node("MatMul", ["x", b.weight("w_gate", [6, hidden])], "gate")
    up = b.node("MatMul", ["x", b.weight("w_up", [6, hidden])], "up")
    activated = b.node("Swish", [gate], "swish")
    h = b.node("Mul", [activated, up], "gated")
    y = b.node("MatMul", [h, b.weight("w_down", [hidden, 6])], "down")
    return b.build({"x": MLP_INPUT}, [y], opset=24)


def conv1d_layout_blocks(seed: int = 0, hidden: int = 10) -> onnx.ModelProto:
    """Build two GPT-2 style MLP blocks on x (2, 5, 6), with Gemm on flattened rows.

    Each linear layer flattens its input to (rows, channels) with Reshape, runs a Gemm
    whose weight is stored (in, out) as in GPT-2's Conv1D, and reshapes back to
    (batch, seq, out) with a target that a Concat builds from Shape(x). Block one is
    fc1 (6 -> hidden) -> Tanh -> fc2 (hidden -> 6), block two fc3 (6 -> hidden) -> Tanh
    -> fc4 (hidden -> 4). Both blocks read the same Concat target for their hidden
    Reshape and the same constant [-1, hidden] to flatten, as exporters share them.
    """
    b = ModelBuilder(seed)
    batch_seq = b.node("Shape", ["x"], "batch_seq", start=0, end=2)
    targets = {
        width: b.node("Concat", [batch_seq, b.constant(f"last_{width}", np.array([width], np.int64))], f"target_{width}", axis=0)
        for width in sorted({6, hidden, 4})
    }
    flatten = {width: b.constant(f"rows_{width}", np.array([-1, width], np.int64)) for width in sorted({6, hidden})}

    def linear(name: str, data: str, width_in: int, width_out: int) -> str:
        rows = b.node("Reshape", [data, flatten[width_in]], f"{name}_rows")
        weight, bias = b.weight(f"{name}_w", [width_in, width_out]), b.weight(f"{name}_b", [width_out])
        out = b.node("Gemm", [rows, weight, bias], name)
        return b.node("Reshape", [out, targets[width_out]], f"{name}_view")

    h = b.node("Tanh", [linear("fc1", "x", 6, hidden)], "act1")
    h = linear("fc2", h, hidden, 6)
    h = b.node("Tanh", [linear("fc3", h, 6, hidden)], "act2")
    y = linear("fc4", h, hidden, 4)
    return b.build({"x": MLP_INPUT}, [y])
