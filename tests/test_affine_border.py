"""Tests of tools/affine_border.py on a tiny Conv consumer and a tiny ONNX model built here.

The consumer tests compensate with grail-opt's own numeric core (affine_prune_map,
bias_correction, absorb) on a hidden value whose removed channels are constant, so
affine compensation is exact wherever the receptive field lies inside the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from grail_graph.core import GramAccumulator, absorb, affine_prune_map, bias_correction, prune_map
from tools.affine_border import (
    ConvConsumer,
    border_error_lines,
    border_mask,
    consumer_errors,
    measure_border_error,
    read_consumer,
)

HIDDEN = 4
KEEP = np.array([0, 1])


def hidden_with_constant_channels(seed: int = 0, count: int = 6, size: int = 8) -> np.ndarray:
    """Return (count, 4, size, size): channels 0-1 random, channels 2-3 constant 2.0 and -1.5."""
    rng = np.random.default_rng(seed)
    hidden = np.empty((count, HIDDEN, size, size))
    hidden[:, :2] = rng.normal(size=(count, 2, size, size))
    hidden[:, 2] = 2.0
    hidden[:, 3] = -1.5
    return hidden


def tiny_consumer(seed: int = 1, pads: tuple[int, int, int, int] = (1, 1, 1, 1)) -> ConvConsumer:
    rng = np.random.default_rng(seed)
    return ConvConsumer(rng.normal(size=(3, HIDDEN, 3, 3)), rng.normal(size=3), pads=pads)


def compensate(consumer: ConvConsumer, hidden: np.ndarray, affine: bool) -> ConvConsumer:
    """Compensate `consumer` for keeping channels KEEP of `hidden`, as the compensate pass does with alpha 0."""
    rows = np.moveaxis(hidden, 1, -1).reshape(-1, HIDDEN)
    stats = GramAccumulator(HIDDEN)
    stats.add_partial(rows.T @ rows, rows.sum(axis=0), len(rows))
    if affine:
        mapping, constant = affine_prune_map(stats.gram, stats.sums, stats.count, KEEP, alpha=0.0)
        bias = consumer.bias + bias_correction(consumer.weight, constant)
    else:
        mapping, bias = prune_map(stats.gram, KEEP, alpha=0.0), consumer.bias
    return ConvConsumer(absorb(consumer.weight, mapping), bias, consumer.strides, consumer.pads, consumer.dilations)


# Border mask ------------------------------------------------------------------------------


def test_border_mask_one_pixel_ring():
    mask = border_mask(5, 5, tiny_consumer())

    expected = np.ones((5, 5), dtype=bool)
    expected[1:-1, 1:-1] = False
    np.testing.assert_array_equal(mask, expected)


def test_border_mask_without_padding_is_empty():
    mask = border_mask(6, 6, tiny_consumer(pads=(0, 0, 0, 0)))

    assert mask.shape == (4, 4)
    assert not mask.any()


def test_border_mask_strided_asymmetric():
    consumer = ConvConsumer(np.zeros((1, 1, 3, 3)), np.zeros(1), strides=(2, 2), pads=(1, 0, 1, 0))

    mask = border_mask(6, 6, consumer)

    # Rows: outputs start at input rows -1, 1, 3 (padding 1 at the top and bottom), so only
    # the first row reaches the padding. Columns: no padding, so no border columns.
    assert mask.shape == (3, 2)
    np.testing.assert_array_equal(mask[:, 0], [True, False, False])
    np.testing.assert_array_equal(mask[:, 1], [True, False, False])


# Border and interior errors ---------------------------------------------------------------


def test_affine_error_only_at_border():
    hidden = hidden_with_constant_channels()
    consumer = tiny_consumer()

    sums = consumer_errors(hidden, KEEP, consumer, compensate(consumer, hidden, affine=True))

    assert sums.interior < 1e-9
    assert sums.border > 1e-2
    assert sums.border_pixels == 6 * 28
    assert sums.interior_pixels == 6 * 36


def test_linear_error_also_in_interior():
    hidden = hidden_with_constant_channels()
    consumer = tiny_consumer()

    sums = consumer_errors(hidden, KEEP, consumer, compensate(consumer, hidden, affine=False))

    assert sums.interior > 1e-2
    assert sums.border > 1e-2


def test_affine_exact_without_padding():
    hidden = hidden_with_constant_channels()
    consumer = tiny_consumer(pads=(0, 0, 0, 0))

    sums = consumer_errors(hidden, KEEP, consumer, compensate(consumer, hidden, affine=True))

    assert sums.border_pixels == 0
    assert sums.interior < 1e-9


# Through compress_file on a tiny ONNX model -----------------------------------------------


def conv_relu_conv_model(path: Path) -> None:
    """Write Conv(3 -> 8, 3x3, pad 1) -> Relu -> Conv(8 -> 4, 3x3, pad 1) with seeded weights."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0.5, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, dtype=np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["hidden"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["hidden"], ["relu"], name="relu"),
        helper.make_node("Conv", ["relu", "w2", "b2"], ["output"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_measure_tiny_onnx_model(tmp_path: Path):
    model_path = tmp_path / "tiny.onnx"
    conv_relu_conv_model(model_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", input=rng.normal(size=(64, 3, 8, 8)).astype(np.float32))
    evaluation = rng.normal(size=(20, 3, 8, 8)).astype(np.float32)

    results = measure_border_error(model_path, tmp_path / "calib.npz", evaluation, tmp_path, sparsities=(0.5,))

    assert [(result.sparsity, result.affine) for result in results] == [(0.5, False), (0.5, True)]
    for result in results:
        assert list(result.per_consumer) == ["conv2"]
        assert result.total.border_pixels == 20 * 28
        assert result.total.interior_pixels == 20 * 36
        assert 0 < result.total.interior < 1
        assert 0 < result.total.border < 1
        assert result.calibration_samples == 64
        assert result.evaluation_samples == 20
    compressed = read_consumer(onnx.load(tmp_path / "tiny-0.5-affine.onnx"), "conv2")
    assert compressed.weight.shape == (4, 4, 3, 3)

    lines = border_error_lines(results)
    assert lines[0].startswith("| sparsity | affine | border error | interior error |")
    assert lines[2].startswith("| 0.5 | no |")
    assert lines[3].startswith("| 0.5 | yes |")
    assert any(line.startswith("- At sparsity 0.5, affine compensation changes the border error") for line in lines)
    assert any("Calibration used 64 samples and the errors come from 20 held-out samples." in line for line in lines)


def test_read_consumer_rejects_missing_node(tmp_path: Path):
    model_path = tmp_path / "tiny.onnx"
    conv_relu_conv_model(model_path)

    with pytest.raises(ValueError, match="no Conv node named 'relu'"):
        read_consumer(onnx.load(model_path), "relu")
