"""Tests of the ONNX group matcher on tiny models built in each test."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from grail_graph.groups import BIAS, BN_ROLES, CONSTANT, DEPTHWISE, ChannelGroup, Declined, WeightRef
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from tests.onnx_builders import (
    CONV_INPUT,
    MLP_INPUT,
    ModelBuilder,
    conv_bn_relu_conv,
    conv_scale_relu_conv,
    gelu_erf,
    gelu_tanh,
    gemm_gelu_gemm,
    gemm_relu_gemm,
    hard_swish,
    inverted_residual,
    leaky_relu,
    matmul_mlp,
    mlp_two_consumers,
    relu,
    silu,
    swiglu,
)


def match(model: onnx.ModelProto) -> tuple[list[ChannelGroup], list[Declined]]:
    return OnnxFrontEnd(ir.from_proto(model), device="cpu").find_groups()


def only_group(groups: list[ChannelGroup]) -> ChannelGroup:
    assert len(groups) == 1, f"expected one group, found {[group.name for group in groups]}"
    return groups[0]


def reason_for(declined: list[Declined], candidate: str) -> str:
    reasons = {entry.candidate: entry.reason for entry in declined}
    assert candidate in reasons, f"{candidate} was not declined; declined: {reasons}"
    return reasons[candidate]


def test_conv_bn_relu_conv_group():
    groups, declined = match(conv_bn_relu_conv(seed=0, hidden=6))

    group = only_group(groups)
    assert group.width == 6
    assert group.tap == "relu_out"
    assert not group.channels_last
    assert group.producers == (WeightRef("conv1", 1, 0),)
    assert group.consumers == (WeightRef("conv2", 1, 1),)
    bn_tensors = {WeightRef("bn", index, 0, BN_ROLES[index - 1]) for index in range(1, 5)}
    assert set(group.narrowed) == {WeightRef("conv1", 2, 0, BIAS)} | bn_tensors
    assert group.width_attributes == ()
    assert set(group.values) == {"conv1_out", "bn_out", "relu_out"}
    # conv2 writes the graph output, so it cannot be a producer.
    assert "`conv2_out` is a graph output" in reason_for(declined, "conv2")


def test_residual_add_declined():
    b = ModelBuilder(1)
    h = b.node("Conv", ["x", b.weight("w1", [3, 3, 3, 3])], "conv1", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "relu")
    h = b.node("Add", [h, "x"], "add")
    y = b.node("Conv", [h, b.weight("w2", [5, 3, 1, 1])], "conv2")
    model = b.build({"x": CONV_INPUT}, [y])

    groups, declined = match(model)

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "`add`" in reason
    assert "`x`" in reason


def test_hidden_graph_output_declined():
    b = ModelBuilder(2)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    h = b.node("Relu", [h], "relu")
    y = b.node("MatMul", [h, b.weight("w2", [10, 4])], "fc2")
    model = b.build({"x": MLP_INPUT}, [y, h])

    groups, declined = match(model)

    assert groups == []
    assert "hidden value `relu_out` is a graph output" in reason_for(declined, "fc1")


def two_conv_branches(shared_producer: bool, shared_consumer: bool) -> onnx.ModelProto:
    """Two conv -> relu -> conv branches on x that may share their first or last weight."""
    b = ModelBuilder(3)
    w_a = b.weight("w_a", [6, 3, 3, 3])
    w_b = w_a if shared_producer else b.weight("w_b", [6, 3, 3, 3])
    w_out_a = b.weight("w_out_a", [5, 6, 1, 1])
    w_out_b = w_out_a if shared_consumer else b.weight("w_out_b", [5, 6, 1, 1])
    outputs = []
    for branch, w_in, w_out in (("a", w_a, w_out_a), ("b", w_b, w_out_b)):
        h = b.node("Conv", ["x", w_in], f"conv_{branch}", pads=[1, 1, 1, 1])
        h = b.node("Relu", [h], f"relu_{branch}")
        outputs.append(b.node("Conv", [h, w_out], f"out_{branch}"))
    return b.build({"x": CONV_INPUT}, outputs)


def test_unshared_branches_both_match():
    groups, _ = match(two_conv_branches(shared_producer=False, shared_consumer=False))

    assert sorted(group.producers[0].node for group in groups) == ["conv_a", "conv_b"]


def test_shared_producer_weight_declined():
    groups, declined = match(two_conv_branches(shared_producer=True, shared_consumer=False))

    assert groups == []
    assert "weight of producer `conv_a` is shared" in reason_for(declined, "conv_a")
    assert "weight of producer `conv_b` is shared" in reason_for(declined, "conv_b")


def test_shared_consumer_weight_declined():
    groups, declined = match(two_conv_branches(shared_producer=False, shared_consumer=True))

    assert groups == []
    assert "weight of consumer `out_a` is shared" in reason_for(declined, "conv_a")
    assert "weight of consumer `out_b` is shared" in reason_for(declined, "conv_b")


def test_grouped_consumer_declined():
    b = ModelBuilder(4)
    h = b.node("Conv", ["x", b.weight("w1", [4, 3, 3, 3])], "conv1", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "relu")
    y = b.node("Conv", [h, b.weight("w2", [6, 2, 3, 3])], "conv2", group=2, pads=[1, 1, 1, 1])
    model = b.build({"x": CONV_INPUT}, [y])

    groups, declined = match(model)

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "consumer `conv2`" in reason
    assert "grouped" in reason


def test_inverted_residual_depthwise_group():
    groups, declined = match(inverted_residual(seed=5, hidden=8))

    group = only_group(groups)
    assert group.width == 8
    assert group.tap == "relu_out"
    assert group.producers == (WeightRef("expand", 1, 0),)
    assert group.consumers == (WeightRef("project", 1, 1),)
    expected = {WeightRef(bn, index, 0, BN_ROLES[index - 1]) for bn in ("bn1", "bn2") for index in range(1, 5)}
    expected |= {WeightRef("depthwise", 1, 0, DEPTHWISE), WeightRef("depthwise", 2, 0, DEPTHWISE)}
    assert set(group.narrowed) == expected
    assert group.width_attributes == (("depthwise", "group"),)
    assert {"clip_out", "depthwise_out", "bn2_out"} <= set(group.values)
    # The depthwise Conv is channel-wise, so it is neither producer nor declined candidate.
    assert {entry.candidate for entry in declined} == {"project"}


def test_gemm_gelu_gemm_group():
    groups, _ = match(gemm_gelu_gemm(seed=6, hidden=10))

    group = only_group(groups)
    assert group.width == 10
    assert group.channels_last
    assert group.tap == "gelu_out"
    # transB=1 stores Gemm weights as (out, in), so the hidden axis is 0 for fc1 and 1 for fc2.
    assert group.producers == (WeightRef("fc1", 1, 0),)
    assert group.narrowed == (WeightRef("fc1", 2, 0, BIAS),)
    assert group.consumers == (WeightRef("fc2", 1, 1),)


def test_gemm_without_transpose_axes():
    group = only_group(match(gemm_relu_gemm(seed=7, hidden=10))[0])

    assert group.producers == (WeightRef("fc1", 1, 1),)
    # The (1, hidden) bias keeps its channels on axis 1.
    assert group.narrowed == (WeightRef("fc1", 2, 1, BIAS),)
    assert group.consumers == (WeightRef("fc2", 1, 0),)


@pytest.mark.parametrize(
    ("activation", "tap"),
    [
        (relu, "relu_out"),
        (gelu_erf, "gelu_half_mul_out"),
        (gelu_tanh, "gelu_mul_out"),
        (silu, "silu_out"),
        (hard_swish, "hard_swish_out"),
        (leaky_relu, "leaky_relu_out"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_matmul_mlp_activation_group(activation, tap):
    groups, declined = match(matmul_mlp(seed=8, activation=activation, hidden=10))

    group = only_group(groups)
    assert group.width == 10
    assert group.channels_last
    assert group.tap == tap
    assert group.producers == (WeightRef("fc1", 1, 1),)
    assert group.narrowed == (WeightRef("fc1_bias", 1, 0, CONSTANT),)
    assert group.consumers == (WeightRef("fc2", 1, 0),)
    assert {"fc1_out", "fc1_bias_out", tap} <= set(group.values)
    assert {entry.candidate for entry in declined} == {"fc2"}


@pytest.mark.parametrize("up_first", [False, True], ids=["gate_first", "up_first"])
def test_swiglu_single_group(up_first):
    groups, declined = match(swiglu(seed=9, hidden=10, up_first=up_first))

    group = only_group(groups)
    assert group.width == 10
    assert group.tap == "gated_out"
    assert set(group.producers) == {WeightRef("gate", 1, 1), WeightRef("up", 1, 1)}
    assert group.consumers == (WeightRef("down", 1, 0),)
    assert group.narrowed == ()
    assert set(group.values) == {"gate_out", "up_out", "sigmoid_out", "silu_out", "gated_out"}
    assert {entry.candidate for entry in declined} == {"down"}


def test_two_consumers_of_one_tap():
    groups, _ = match(mlp_two_consumers(seed=18))

    group = only_group(groups)
    assert group.tap == "relu_out"
    assert group.producers == (WeightRef("fc1", 1, 1),)
    assert group.consumers == (WeightRef("fc_a", 1, 0), WeightRef("fc_b", 1, 0))


def test_transpose_on_hidden_declined():
    b = ModelBuilder(10)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    h = b.node("Relu", [h], "relu")
    h = b.node("Transpose", [h], "transpose", perm=[0, 2, 1])
    y = b.node("MatMul", [h, b.weight("w2", [5, 4])], "fc2")
    model = b.build({"x": MLP_INPUT}, [y])

    groups, declined = match(model)

    assert groups == []
    reason = reason_for(declined, "fc1")
    assert "`relu_out`" in reason
    assert "`transpose` (Transpose)" in reason


def test_reshape_on_hidden_declined():
    # (2, 5, 10) -> (10, 10) keeps the width seen by fc2 but mixes tokens into channels.
    b = ModelBuilder(11)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    h = b.node("Relu", [h], "relu")
    h = b.node("Reshape", [h, b.constant("new_shape", np.array([10, 10], dtype=np.int64))], "reshape")
    y = b.node("MatMul", [h, b.weight("w2", [10, 4])], "fc2")
    model = b.build({"x": MLP_INPUT}, [y])

    groups, declined = match(model)

    assert groups == []
    assert "`reshape` (Reshape)" in reason_for(declined, "fc1")


def test_consumers_of_different_values_declined():
    b = ModelBuilder(12)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    activated = b.node("Relu", [h], "relu")
    y_a = b.node("MatMul", [activated, b.weight("w_a", [10, 4])], "fc_a")
    y_b = b.node("MatMul", [h, b.weight("w_b", [10, 4])], "fc_b")
    model = b.build({"x": MLP_INPUT}, [y_a, y_b])

    groups, declined = match(model)

    assert groups == []
    reason = reason_for(declined, "fc1")
    assert "different hidden values" in reason
    assert "fc1_out" in reason
    assert "relu_out" in reason


@pytest.mark.parametrize(
    ("scale_shape", "axis"),
    [((1, 6, 1, 1), 1), ((6, 1, 1), 0)],
    ids=["rank4", "rank3"],
)
def test_constant_node_scale_narrowed(scale_shape, axis):
    groups, _ = match(conv_scale_relu_conv(seed=13, scale_shape=scale_shape, constant_node=True))

    group = only_group(groups)
    assert group.width == 6
    assert group.narrowed == (WeightRef("scale", 1, axis, CONSTANT),)
    assert group.consumers == (WeightRef("conv2", 1, 1),)


def test_broadcast_scale_not_narrowed():
    # A (1, 1, 1, 6) factor scales image columns, the same for every channel.
    groups, _ = match(conv_scale_relu_conv(seed=14, scale_shape=(1, 1, 1, 6), constant_node=False))

    group = only_group(groups)
    assert group.narrowed == ()


def test_wrong_size_scale_declined():
    # Invalid on purpose: 4 factors cannot broadcast against 6 channels.
    model = conv_scale_relu_conv(seed=15, scale_shape=(1, 4, 1, 1), constant_node=True, check=False)

    groups, declined = match(model)

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "`scale`" in reason
    assert "4 entries on the hidden axis" in reason


def test_wrong_size_batch_norm_declined():
    b = ModelBuilder(16)
    h = b.node("Conv", ["x", b.weight("w1", [6, 3, 3, 3])], "conv1", pads=[1, 1, 1, 1])
    h = b.batch_norm("bn", h, 3)
    y = b.node("Conv", [h, b.weight("w2", [5, 6, 1, 1])], "conv2")
    model = b.build({"x": CONV_INPUT}, [y], check=False)

    groups, declined = match(model)

    assert groups == []
    assert "`bn`" in reason_for(declined, "conv1")


def test_matching_leaves_graph_unchanged():
    model = conv_bn_relu_conv(seed=17)
    front_end = OnnxFrontEnd(ir.from_proto(model), device="cpu")
    before = ir.to_proto(front_end.model).SerializeToString()

    front_end.find_groups()

    assert ir.to_proto(front_end.model).SerializeToString() == before
