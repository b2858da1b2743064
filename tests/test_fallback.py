"""Held-out fallback from compensation to plain slicing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from grail_graph.core import HeldOutMoments, affine_prune_map, compensation_gain, prune_map, slice_map, variable_output_error
from grail_graph.data import Dataset
from grail_graph.errors import GrailError
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from tests.onnx_builders import gemm_relu_gemm


def brute_force_error(weight, target, source, b, c):
    """Sum over rows of ||W (h - B x_P - c)||^2, computed directly."""
    residual = target - source @ b.T - (0.0 if c is None else c)
    return float(np.sum((residual @ weight.T) ** 2))


@pytest.mark.parametrize("affine", [False, True])
def test_variable_error_matches_direct_sum(affine):
    rng = np.random.default_rng(0)
    rows, width, kept, outputs = 50, 7, 4, 5
    target = rng.normal(size=(rows, width)) + 0.5
    source = target[:, :kept] + 0.1 * rng.normal(size=(rows, kept))
    weight = rng.normal(size=(outputs, width))
    b = rng.normal(size=(width, kept))
    c = rng.normal(size=width) if affine else None
    moments = HeldOutMoments(target.T @ source, source.T @ source, target.sum(0), source.sum(0), rows)
    constant = float(np.trace(weight.T @ weight @ (target.T @ target)))

    value = variable_output_error(weight.T @ weight, moments, b, c)

    assert value + constant == pytest.approx(brute_force_error(weight, target, source, b, c), rel=1e-10)


def test_gain_positive_for_in_sample_ridge():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    gram, keep = hidden.T @ hidden, np.array([0, 2, 5])
    moments = HeldOutMoments(gram[:, keep], gram[np.ix_(keep, keep)], hidden.sum(0), hidden.sum(0)[keep], 400)
    consumers = [rng.normal(size=(3, 8))]

    gain = compensation_gain(consumers, moments, prune_map(gram, keep, 0.0), None, slice_map(8, keep))

    assert gain > 0.0


def test_gain_negative_for_wrong_map():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(300, 6))
    gram, keep = hidden.T @ hidden, np.array([1, 3])
    moments = HeldOutMoments(gram[:, keep], gram[np.ix_(keep, keep)], hidden.sum(0), hidden.sum(0)[keep], 300)
    wrong = slice_map(6, keep) + 3.0 * rng.normal(size=(6, 2))

    assert compensation_gain([np.eye(6)], moments, wrong, None, slice_map(6, keep)) < 0.0


def test_affine_gain_counts_constant():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(500, 5)) + np.array([0.0, 0.0, 4.0, 4.0, 4.0])
    gram, sums, keep = hidden.T @ hidden, hidden.sum(0), np.array([0, 1])
    b, c = affine_prune_map(gram, sums, 500, keep, 0.0)
    moments = HeldOutMoments(gram[:, keep], gram[np.ix_(keep, keep)], sums, sums[keep], 500)

    assert compensation_gain([np.eye(5)], moments, b, c, slice_map(5, keep)) > 0.0


# The pass pipeline on a real ONNX Runtime model -------------------------------------------------


def run_gemm_pipeline(tmp_path, text: str, inputs: np.ndarray) -> CompressionState:
    model_path = tmp_path / "gemm.onnx"
    onnx.save(gemm_relu_gemm(hidden=10), str(model_path))
    frontend = OnnxFrontEnd.load(model_path, "cpu")
    name = frontend.input_specs()[0][0]
    state = CompressionState(frontend=frontend, calibration=Dataset({name: inputs}, None, "test"), device="cpu")
    run_pipeline(parse_pipeline(text), state)
    return state


def gemm_inputs(rows: int, seed: int) -> np.ndarray:
    model = gemm_relu_gemm(hidden=10)
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)


def test_pipeline_keeps_helpful_compensation(tmp_path):
    text = (
        "find-groups,calibrate{holdout=0.25},select{method=wanda sparsity=0.5},"
        "compensate{alpha=0.001 fallback=true},rewrite"
    )
    state = run_gemm_pipeline(tmp_path, text, gemm_inputs(400, 0))
    group = state.groups[0].name

    assert state.heldout_stats[group].count == 100
    assert state.stats[group].count == 300
    assert "fell back" not in state.verdicts[group]


def test_pipeline_falls_back_when_overfitted(tmp_path):
    # Four fitting rows for five kept channels and no ridge: the solution fits those rows
    # and nothing else, so the 299 held-out rows judge it worse than slicing.
    text = (
        "find-groups,calibrate{holdout=0.99},select{method=magnitude sparsity=0.5},"
        "compensate{alpha=0 fallback=true},rewrite"
    )
    state = run_gemm_pipeline(tmp_path, text, gemm_inputs(303, 1))
    group = state.groups[0].name

    assert state.stats[group].count == 4
    assert "compensation fell back to slicing" in state.verdicts[group]
    np.testing.assert_array_equal(state.plans[group].consumer_map, slice_map(10, state.keeps[group]))


def test_fallback_without_holdout_rejected(tmp_path):
    text = "find-groups,calibrate,select{method=wanda sparsity=0.5},compensate{fallback=true},rewrite"
    with pytest.raises(GrailError, match="holdout"):
        run_gemm_pipeline(tmp_path, text, gemm_inputs(64, 0))


def test_groupwise_pipeline_frees_statistics(tmp_path):
    text = "find-groups,calibrate{statistics=cross holdout=0.25},select{sparsity=0.5},compensate{fallback=true},rewrite"
    state = run_gemm_pipeline(tmp_path, text, gemm_inputs(200, 0))

    assert state.verdicts[state.groups[0].name].startswith("compressed")
    assert state.stats == {}
    assert state.crosses == {}
    assert state.heldout_stats == {}
    assert state.heldout_crosses == {}
