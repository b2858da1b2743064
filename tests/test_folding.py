"""Folding: merged producer chains, the classic-folding identity, and both front ends."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from grail_graph.core import averaging_matrix, fold_linear_chain, fold_map
from grail_graph.data import Dataset
from grail_graph.frontend import GroupPlan
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from tests.onnx_builders import CONV_INPUT, ModelBuilder, conv_bn_relu_conv, inverted_residual, map_tap, run

LABELS = np.array([0, 0, 1, 2, 2, 3])


def conv_bn_conv(seed: int = 0, hidden: int = 6) -> onnx.ModelProto:
    """Build x -> conv1 (with bias) -> bn -> conv2: linear, so folding is exact up to its map."""
    b = ModelBuilder(seed)
    h = b.node("Conv", ["x", b.weight("w1", [hidden, 3, 3, 3]), b.weight("b1", [hidden])], "conv1", pads=[1, 1, 1, 1])
    h = b.batch_norm("bn", h, hidden)
    y = b.node("Conv", [h, b.weight("w2", [5, hidden, 3, 3]), b.weight("b2", [5])], "conv2", pads=[1, 1, 1, 1])
    return b.build({"x": CONV_INPUT}, [y])


def classic_map(r: np.ndarray) -> np.ndarray:
    return (r > 0).T.astype(np.float64)


def test_fold_linear_chain_merges_batchnorm():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((6, 4)), rng.standard_normal(6)
    scale, shift, mean, var = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.5, 1.5, 6)
    r = averaging_matrix(LABELS, 4)
    x = rng.standard_normal((10, 4))

    (merged,), (merged_bias,), (new_scale, new_shift, new_mean, new_var) = fold_linear_chain(
        r, [weight], [bias], (scale, shift, mean, var), eps=1e-5
    )

    pre = (x @ weight.T + bias - mean) * scale / np.sqrt(var + 1e-5) + shift
    folded = (x @ merged.T + merged_bias - new_mean) * new_scale / np.sqrt(new_var + 1e-5) + new_shift
    np.testing.assert_allclose(folded, pre @ r.T, rtol=1e-10, atol=1e-10)


def test_fold_map_with_identity_gram_is_classic_folding():
    r = averaging_matrix(LABELS, 4)

    np.testing.assert_allclose(fold_map(np.eye(6), r, alpha=0.0), classic_map(r), atol=1e-12)


def test_onnx_fold_rewrite_applies_b_r():
    model = conv_bn_conv()
    frontend = OnnxFrontEnd(ir.from_proto(model))
    (group,), _ = frontend.find_groups()
    r = averaging_matrix(LABELS, 4)
    b = classic_map(r)
    x = np.random.default_rng(1).standard_normal(CONV_INPUT).astype(np.float32)

    frontend.apply([GroupPlan(group, np.arange(4), b, producer_map=r)])
    folded = ir.to_proto(frontend.model)

    onnx.checker.check_model(folded, full_check=True)
    expected = run(map_tap(model, "bn_out", (b @ r).T, channels_last=False, rank=4), {"x": x})
    np.testing.assert_allclose(run(folded, {"x": x}), expected, rtol=1e-4, atol=1e-4)


class ConvBnConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


def test_fx_fold_rewrite_applies_b_r():
    torch.manual_seed(0)
    model = ConvBnConv().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    frontend = FxFrontEnd(model, x, "cpu")
    (group,), _ = frontend.find_groups()
    r = averaging_matrix(LABELS, 4)
    b = classic_map(r)

    frontend.apply([GroupPlan(group, np.arange(4), b, producer_map=r)])

    with torch.no_grad():
        hidden = model.bn(model.conv1(x))
        mapped = torch.einsum("nchw,dc->ndhw", hidden, torch.from_numpy(b @ r).float())
        expected = model.conv2(mapped)
        actual = frontend.model(x)
    assert frontend.model.conv1.out_channels == 4
    assert frontend.model.bn.num_features == 4
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _fold_pipeline(
    model: onnx.ModelProto, method: str, compensation: str = "ridge", input_shape=CONV_INPUT
) -> CompressionState:
    frontend = OnnxFrontEnd(ir.from_proto(model))
    x = np.random.default_rng(2).standard_normal((16, *input_shape[1:])).astype(np.float32)
    state = CompressionState(frontend=frontend, calibration=Dataset({"x": x}, None, "test"))
    text = f"find-groups,calibrate,select{{method={method} sparsity=0.5}},compensate{{method={compensation}}},rewrite"
    run_pipeline(parse_pipeline(text), state)
    return state


@pytest.mark.parametrize("method", ["fold-kmeans", "fold-pca"])
def test_fold_pipeline_runs(method):
    state = _fold_pipeline(conv_bn_relu_conv(hidden=8), method)

    (group,) = state.groups
    assert state.verdicts[group.name] == "folded: 8 -> 4 channels"
    onnx.checker.check_model(ir.to_proto(state.frontend.model), full_check=True)


def test_fold_compensation_beats_classic_folding():
    model = conv_bn_relu_conv(hidden=8)
    x = np.random.default_rng(2).standard_normal((16, *CONV_INPUT[1:])).astype(np.float32)
    reference = run(model, {"x": x})

    errors = {}
    for compensation in ("ridge", "none"):
        state = _fold_pipeline(model, "fold-kmeans", compensation)
        errors[compensation] = np.linalg.norm(run(ir.to_proto(state.frontend.model), {"x": x}) - reference)

    assert errors["ridge"] < errors["none"]


def test_fold_declines_depthwise_group_and_prunes():
    state = _fold_pipeline(inverted_residual(hidden=8), "fold-kmeans", input_shape=(2, 4, 6, 6))

    (group,) = state.groups
    assert state.verdicts[group.name].startswith("compressed: 8 -> 4 channels (pruned with wanda instead of folded")
