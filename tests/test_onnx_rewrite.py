"""Tests of ONNX calibration, rewriting and saving on tiny models built in each test.

Each rewritten model must pass the ONNX checker with full shape inference, run in ONNX
Runtime with the narrowed initializer shapes, and give the outputs that the plan implies.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from grail_graph.core import prune_map, slice_map
from grail_graph.errors import GrailError
from grail_graph.frontend import GroupPlan
from grail_graph.groups import ChannelGroup
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.onnx_frontend.model_io import save_model
from tests.onnx_builders import (
    CONV_INPUT,
    MLP_INPUT,
    conv1d_relu_conv1d,
    conv_bn_relu_conv,
    conv_chain,
    conv_scale_relu_conv,
    gelu_erf,
    gelu_tanh,
    gemm_gelu_gemm,
    gemm_relu_gemm,
    hard_swish,
    initializer_shape,
    inverted_residual,
    leaky_relu,
    map_tap,
    matmul_mlp,
    mlp_two_consumers,
    relu,
    run,
    run_tap,
    session,
    silu,
    swiglu,
)


def front_end(model: onnx.ModelProto) -> OnnxFrontEnd:
    return OnnxFrontEnd(ir.from_proto(model), device="cpu")


def only_group(front: OnnxFrontEnd) -> ChannelGroup:
    groups, _ = front.find_groups()
    assert len(groups) == 1, f"expected one group, found {[group.name for group in groups]}"
    return groups[0]


def rewrite(front: OnnxFrontEnd, plans: list[GroupPlan]) -> onnx.ModelProto:
    """Apply `plans`, check the result and return it as a proto."""
    front.apply(plans)
    front.verify()
    proto = ir.to_proto(front.model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def random_input(seed: int, shape) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def tap_rows(tap: np.ndarray, channels_last: bool) -> np.ndarray:
    """Flatten a tap value to float64 rows (one per pixel or token) of its hidden channels."""
    if not channels_last:
        tap = np.moveaxis(tap, 1, -1)
    return tap.reshape(-1, tap.shape[-1]).astype(np.float64)


def assert_narrowed(model: onnx.ModelProto, group: ChannelGroup, kept_width: int) -> None:
    """Assert that every tensor and width attribute of `group` has `kept_width` hidden channels."""
    for ref in (*group.producers, *group.narrowed, *group.consumers):
        shape = initializer_shape(model, ref.node, ref.input)
        assert shape[ref.axis] == kept_width, f"input {ref.input} of {ref.node} has shape {shape}"
    nodes = {node.name: node for node in model.graph.node}
    for node_name, attribute_name in group.width_attributes:
        attribute = next(a for a in nodes[node_name].attribute if a.name == attribute_name)
        assert attribute.i == kept_width, f"{attribute_name} of {node_name} is {attribute.i}"


def reconstruction(width: int, keep: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return R = S B^T, shape (H, H), which rebuilds the full tap from its kept channels as t' = t R."""
    return slice_map(width, keep) @ b.T


# (model, input shape, rank of the hidden value) for the rewrite cases.
MODELS = {
    "conv_bn": (lambda: conv_bn_relu_conv(seed=20), CONV_INPUT, 4),
    "constant_scale": (lambda: conv_scale_relu_conv(seed=21), CONV_INPUT, 4),
    "depthwise": (lambda: inverted_residual(seed=22), (2, 4, 6, 6), 4),
    "mlp_gelu_erf": (lambda: matmul_mlp(seed=23, activation=gelu_erf), MLP_INPUT, 3),
    "gemm_gelu": (lambda: gemm_gelu_gemm(seed=24), (4, 6), 2),
    "gemm_plain": (lambda: gemm_relu_gemm(seed=27), (4, 6), 2),
    "conv1d": (lambda: conv1d_relu_conv1d(seed=28), (2, 3, 8), 3),
    "swiglu": (lambda: swiglu(seed=25), MLP_INPUT, 3),
    "two_consumers": (lambda: mlp_two_consumers(seed=26), MLP_INPUT, 3),
}


# Calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv_bn", "conv1d", "mlp_gelu_erf"])
def test_gram_matches_numpy(name):
    build, shape, _ = MODELS[name]
    model = build()
    front = front_end(model)
    group = only_group(front)
    feeds = random_input(30, shape)

    stats = front.calibrate([group], [feeds])[group.name]

    rows = tap_rows(run_tap(model, feeds, group.tap), group.channels_last)
    if group.channels_last:
        expected_count = math.prod(shape[:-1])
    else:
        expected_count = shape[0] * math.prod(shape[2:])
    assert rows.shape[0] == expected_count
    assert stats.count == expected_count
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.sums, rows.sum(axis=0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["conv_bn", "mlp_gelu_erf"])
def test_gram_merges_batches(name):
    build, shape, _ = MODELS[name]
    model = build()
    front = front_end(model)
    group = only_group(front)
    batches = [random_input(31, (2, *shape[1:])), random_input(32, (3, *shape[1:]))]
    progress: list[int] = []

    stats = front.calibrate([group], batches, progress.append)[group.name]

    rows = np.concatenate([tap_rows(run_tap(model, batch, group.tap), group.channels_last) for batch in batches])
    assert stats.count == rows.shape[0]
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.sums, rows.sum(axis=0), rtol=1e-5, atol=1e-4)
    assert progress == [2, 3]


def test_gram_of_float64_tap_in_float64():
    rng = np.random.default_rng(34)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 10)), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((10, 4)), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["fc1_out"], name="fc1"),
        helper.make_node("Relu", ["fc1_out"], ["relu_out"], name="relu"),
        helper.make_node("MatMul", ["relu_out", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "float64",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    front = front_end(model)
    group = only_group(front)
    # Large, offset inputs make a float32 Gram lose about 7 significant digits.
    x = 1e3 * rng.standard_normal((50, 6)) + 1e4

    stats = front.calibrate([group], [{"x": x}])[group.name]

    rows = np.maximum(x @ numpy_helper.to_array(w1), 0.0)
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-12)


def test_calibrate_without_groups():
    front = front_end(conv_bn_relu_conv(seed=33))

    assert front.calibrate([], [random_input(33, CONV_INPUT)]) == {}


# Rewriting --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_plan_keeps_outputs(name):
    build, shape, _ = MODELS[name]
    model = build()
    front = front_end(model)
    group = only_group(front)
    plan = GroupPlan(group, np.arange(group.width), np.eye(group.width))
    feeds = random_input(40, shape)

    compressed = rewrite(front, [plan])

    difference = np.abs(run(compressed, feeds) - run(model, feeds))
    assert difference.max() == 0.0


def numpy_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def matmul_mlp_reference(model: onnx.ModelProto, x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Compute the MatMul + ReLU MLP in numpy with the removed hidden channels zeroed."""
    hidden = np.maximum(x @ initializer(model, "w1") + initializer(model, "b1"), 0.0)
    hidden[..., removed] = 0.0
    return hidden @ initializer(model, "w2") + initializer(model, "b2")


def gemm_mlp_reference(model: onnx.ModelProto, x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Compute the Gemm + Gelu MLP (weights stored transposed) in numpy with channels zeroed."""
    hidden = numpy_gelu(x @ initializer(model, "w1").T + initializer(model, "b1"))
    hidden[..., removed] = 0.0
    return hidden @ initializer(model, "w2").T + initializer(model, "b2")


@pytest.mark.parametrize(
    ("build", "shape", "reference", "expected_shapes"),
    [
        (
            lambda: matmul_mlp(seed=41, activation=relu, hidden=10),
            MLP_INPUT,
            matmul_mlp_reference,
            {("fc1", 1): (6, 6), ("fc1_bias", 1): (6,), ("fc2", 1): (6, 4)},
        ),
        (
            lambda: gemm_gelu_gemm(seed=42, hidden=10),
            (4, 6),
            gemm_mlp_reference,
            {("fc1", 1): (6, 6), ("fc1", 2): (6,), ("fc2", 1): (3, 6)},
        ),
    ],
    ids=["matmul_relu", "gemm_gelu"],
)
def test_slice_plan_zeroes_removed_channels(build, shape, reference, expected_shapes):
    model = build()
    front = front_end(model)
    group = only_group(front)
    keep = np.array([0, 2, 3, 5, 7, 8])
    removed = np.setdiff1d(np.arange(group.width), keep)
    feeds = random_input(43, shape)

    compressed = rewrite(front, [GroupPlan(group, keep, slice_map(group.width, keep))])

    for (node, index), expected in expected_shapes.items():
        assert initializer_shape(compressed, node, index) == expected
    expected_output = reference(model, feeds["x"].astype(np.float64), removed)
    np.testing.assert_allclose(run(compressed, feeds), expected_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("compensation", ["slice", "prune"])
def test_rewrite_matches_tap_reconstruction(name, compensation):
    """The compressed model equals the original with its tap replaced by t S B^T."""
    build, shape, rank = MODELS[name]
    model = build()
    front = front_end(model)
    group = only_group(front)
    keep = np.sort(np.random.default_rng(44).choice(group.width, size=group.width - 3, replace=False))
    feeds = random_input(45, shape)
    if compensation == "slice":
        b = slice_map(group.width, keep)
    else:
        gram = front.calibrate([group], [random_input(46, shape)])[group.name].gram
        b = prune_map(gram, keep, alpha=1e-3)

    compressed = rewrite(front, [GroupPlan(group, keep, b)])

    assert_narrowed(compressed, group, keep.size)
    matrix = reconstruction(group.width, keep, b)
    expected = run(map_tap(model, group.tap, matrix, group.channels_last, rank), feeds)
    np.testing.assert_allclose(run(compressed, feeds), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "activation", [relu, gelu_erf, gelu_tanh, silu, hard_swish, leaky_relu], ids=lambda a: a.__name__
)
def test_mlp_activation_rewrite(activation):
    model = matmul_mlp(seed=47, activation=activation, hidden=10)
    front = front_end(model)
    group = only_group(front)
    keep = np.array([0, 1, 3, 6, 8, 9])
    gram = front.calibrate([group], [random_input(48, MLP_INPUT)])[group.name].gram
    plan = GroupPlan(group, keep, prune_map(gram, keep))
    feeds = random_input(49, MLP_INPUT)

    compressed = rewrite(front, [plan])

    assert initializer_shape(compressed, "fc1", 1) == (6, 6)
    assert initializer_shape(compressed, "fc1_bias", 1) == (6,)
    assert initializer_shape(compressed, "fc2", 1) == (6, 4)
    matrix = reconstruction(group.width, keep, plan.consumer_map)
    expected = run(map_tap(model, group.tap, matrix, channels_last=True, rank=3), feeds)
    np.testing.assert_allclose(run(compressed, feeds), expected, rtol=1e-4, atol=1e-4)


def test_prune_plan_is_least_squares():
    model = matmul_mlp(seed=50, activation=relu, hidden=12, input_shape=(64, 6), output_bias=False)
    front = front_end(model)
    group = only_group(front)
    feeds = random_input(51, (64, 6))
    hidden = run_tap(model, feeds, group.tap).astype(np.float64)
    gram = hidden.T @ hidden
    keep = np.array([1, 2, 4, 6, 9, 11])
    w2 = initializer(model, "w2").astype(np.float64)
    full = hidden @ w2

    pruned = run(rewrite(front, [GroupPlan(group, keep, prune_map(gram, keep, alpha=0.0))]), feeds)
    sliced_front = front_end(model)
    sliced = run(rewrite(sliced_front, [GroupPlan(group, keep, slice_map(group.width, keep))]), feeds)

    refit, *_ = np.linalg.lstsq(hidden[:, keep], full, rcond=None)
    np.testing.assert_allclose(pruned, hidden[:, keep] @ refit, rtol=1e-4, atol=1e-4)
    pruned_error = np.linalg.norm(full - pruned)
    sliced_error = np.linalg.norm(full - sliced)
    assert pruned_error <= sliced_error


def test_depthwise_rewrite_narrows_group():
    model = inverted_residual(seed=60, hidden=8)
    front = front_end(model)
    group = only_group(front)
    keep = np.array([0, 1, 3, 4, 6])
    gram = front.calibrate([group], [random_input(61, (2, 4, 6, 6))])[group.name].gram

    compressed = rewrite(front, [GroupPlan(group, keep, prune_map(gram, keep))])

    assert initializer_shape(compressed, "expand", 1) == (5, 4, 1, 1)
    assert initializer_shape(compressed, "depthwise", 1) == (5, 1, 3, 3)
    assert initializer_shape(compressed, "depthwise", 2) == (5,)
    for bn in ("bn1", "bn2"):
        for index in range(1, 5):
            assert initializer_shape(compressed, bn, index) == (5,)
    assert initializer_shape(compressed, "project", 1) == (5, 5, 1, 1)
    depthwise = next(node for node in compressed.graph.node if node.name == "depthwise")
    group_attribute = next(attribute for attribute in depthwise.attribute if attribute.name == "group")
    assert group_attribute.i == 5
    assert run(compressed, random_input(62, (2, 4, 6, 6))).shape == (2, 5, 6, 6)


def test_swiglu_rewrite_narrows_both_producers():
    model = swiglu(seed=63, hidden=10)
    front = front_end(model)
    group = only_group(front)
    keep = np.array([0, 3, 4, 7])
    gram = front.calibrate([group], [random_input(64, MLP_INPUT)])[group.name].gram

    compressed = rewrite(front, [GroupPlan(group, keep, prune_map(gram, keep))])

    assert initializer_shape(compressed, "gate", 1) == (6, 4)
    assert initializer_shape(compressed, "up", 1) == (6, 4)
    assert initializer_shape(compressed, "down", 1) == (4, 6)
    assert run(compressed, random_input(65, MLP_INPUT)).shape == (2, 5, 6)


def test_chained_groups_rewrite():
    model = conv_chain(seed=67)
    front = front_end(model)
    groups, _ = front.find_groups()
    assert [group.tap for group in groups] == ["relu1_out", "relu2_out"]
    feeds = random_input(68, CONV_INPUT)
    stats = front.calibrate(groups, [feeds])
    for group in groups:
        rows = tap_rows(run_tap(model, feeds, group.tap), channels_last=False)
        np.testing.assert_allclose(stats[group.name].gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    keeps = [np.array([0, 2, 3, 5]), np.array([1, 2, 4, 5, 6])]
    plans = [
        GroupPlan(group, keep, prune_map(stats[group.name].gram, keep))
        for group, keep in zip(groups, keeps, strict=True)
    ]

    compressed = rewrite(front, plans)

    assert initializer_shape(compressed, "conv1", 1) == (4, 3, 3, 3)
    assert initializer_shape(compressed, "conv2", 1) == (5, 4, 3, 3)
    assert initializer_shape(compressed, "conv2", 2) == (5,)
    assert initializer_shape(compressed, "conv3", 1) == (5, 5, 1, 1)
    # conv2 absorbs the first map on its input axis and loses rows on its output axis,
    # which matches rebuilding both taps of the original in turn.
    expected_model = model
    for group, plan in zip(groups, plans, strict=True):
        matrix = reconstruction(group.width, plan.keep, plan.consumer_map)
        expected_model = map_tap(expected_model, group.tap, matrix, channels_last=False, rank=4)
    np.testing.assert_allclose(run(compressed, feeds), run(expected_model, feeds), rtol=1e-4, atol=1e-4)


def test_constant_node_scale_becomes_initializer():
    model = conv_scale_relu_conv(seed=66, scale_shape=(1, 6, 1, 1), constant_node=True)
    front = front_end(model)
    group = only_group(front)
    keep = np.array([1, 2, 5])

    compressed = rewrite(front, [GroupPlan(group, keep, slice_map(group.width, keep))])

    assert initializer_shape(compressed, "scale", 1) == (1, 3, 1, 1)
    assert all(node.op_type != "Constant" for node in compressed.graph.node)


# Files ------------------------------------------------------------------------------------


def compress_mlp(front: OnnxFrontEnd, feeds: dict[str, np.ndarray]) -> None:
    group = only_group(front)
    keep = np.array([0, 1, 4, 5, 8])
    gram = front.calibrate([group], [feeds])[group.name].gram
    front.apply([GroupPlan(group, keep, prune_map(gram, keep))])


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_external_data_round_trip(tmp_path):
    model = matmul_mlp(seed=70, activation=silu, hidden=10)
    source = tmp_path / "source"
    source.mkdir()
    source_path = source / "model.onnx"
    # save_model moves the tensors of the proto it is given to external data, so save a copy.
    onnx.save_model(
        copy.deepcopy(model),
        str(source_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    before = file_bytes(source)
    assert set(before) == {"model.onnx", "w.data"}
    feeds = random_input(71, MLP_INPUT)

    front = OnnxFrontEnd.load(source_path, device="cpu")
    compress_mlp(front, feeds)
    written = front.save(tmp_path / "output" / "model.onnx")

    assert file_bytes(source) == before
    assert written == [tmp_path / "output" / "model.onnx"]
    onnx.checker.check_model(str(written[0]), full_check=True)
    in_memory = front_end(model)
    compress_mlp(in_memory, feeds)
    expected = run(ir.to_proto(in_memory.model), feeds)
    np.testing.assert_array_equal(session(str(written[0])).run(None, feeds)[0], expected)


def test_save_refuses_source_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(matmul_mlp(seed=72), str(path))
    before = path.read_bytes()
    front = OnnxFrontEnd.load(path, device="cpu")
    compress_mlp(front, random_input(73, MLP_INPUT))

    with pytest.raises(GrailError, match="is an input file"):
        front.save(path)
    with pytest.raises(GrailError, match="is an input file"):
        save_model(front.model, tmp_path / "." / "model.onnx", overwrite_guard=(path,))

    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.onnx"]


def test_save_refuses_source_external_data(tmp_path):
    """An output path on the source's external data file would corrupt the source's weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(
        conv_bn_relu_conv(), str(folder / "m.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="w.data", size_threshold=0,
    )  # fmt: skip
    before = (folder / "w.data").read_bytes()

    with pytest.raises(GrailError, match="is an input file"):
        OnnxFrontEnd.load(folder / "m.onnx").save(folder / "w.data")
    assert (folder / "w.data").read_bytes() == before
