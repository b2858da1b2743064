"""Tests of attention-head groups in the ONNX front end.

Tiny LLaMA (grouped-query, rotary) and BERT (multi-head, biases) models are exported with
the helpers of tests/test_onnx_transformers.py. Removal tests compare the rewritten model in
ONNX Runtime with the original model whose removed heads are zeroed at the output
projection's input. A small hand-built graph covers a declined layout.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from grail_graph.core import slice_map
from grail_graph.frontend import GroupPlan
from grail_graph.groups import BIAS, KEY_VALUE
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.onnx_frontend.matcher import constant_array
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from tests.onnx_builders import run
from tests.test_onnx_transformers import build_transformer, export_transformer, parameter_count, token_batch

HEAD_SIZE = 16  # hidden size 64 over 4 query heads in build_transformer
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return {kind: export_transformer(build_transformer(kind), folder / f"{kind}.onnx") for kind in ("llama", "bert")}


def load(path) -> OnnxFrontEnd:
    return OnnxFrontEnd.load(path, device="cpu")


def head_groups(front: OnnxFrontEnd):
    groups, declined = front.find_groups(heads=True)
    return [group for group in groups if group.kv_heads], declined


def nodes_of(front: OnnxFrontEnd) -> dict[str, ir.Node]:
    return {node.name: node for node in front.model.graph}


# Matching ----------------------------------------------------------------------------------


def test_llama_head_groups_found(exported):
    front = load(exported["llama"])
    groups, declined = head_groups(front)
    nodes = nodes_of(front)

    assert len(groups) == 2
    for group in groups:
        assert group.width == 64
        assert group.unit == HEAD_SIZE
        assert group.kv_heads == 2
        assert group.channels_last
        assert len(group.producers) == 1
        assert len(group.consumers) == 1
        assert [ref.role for ref in group.narrowed] == [KEY_VALUE, KEY_VALUE]
        assert all(constant_array(nodes[ref.node].inputs[1]).shape == (64, 32) for ref in group.narrowed)
        assert constant_array(nodes[group.consumers[0].node].inputs[1]).shape == (64, 64)
        assert group.consumers[0].axis == 0  # MatMul weights are (in, out)
        assert nodes[group.consumers[0].node].inputs[0].name == group.tap
    projections = {ref.node for group in groups for ref in (*group.producers, *group.narrowed)}
    assert not projections & {name for entry in declined for name in entry.candidate.split(", ")}
    assert not [entry for entry in declined if entry.candidate.startswith("attention")]


def test_bert_head_groups_found(exported):
    front = load(exported["bert"])
    groups, declined = head_groups(front)
    nodes = nodes_of(front)

    assert len(groups) == 2
    for group in groups:
        assert group.width == 64
        assert group.unit == HEAD_SIZE
        assert group.kv_heads == 4
        roles = [ref.role for ref in group.narrowed]
        assert roles == [BIAS, KEY_VALUE, KEY_VALUE, KEY_VALUE, KEY_VALUE]
        biases = [nodes[ref.node] for ref in group.narrowed if ref.axis == 0 and nodes[ref.node].op_type == "Add"]
        assert len(biases) == 3
        assert nodes[group.consumers[0].node].inputs[0].name == group.tap
    assert not [entry for entry in declined if entry.candidate.startswith("attention")]


# Rewriting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_kept_all_heads_identical(exported, kind):
    front = load(exported[kind])
    groups, _ = head_groups(front)
    plans = [GroupPlan(group, np.arange(group.width), slice_map(group.width, np.arange(group.width))) for group in groups]
    batch = token_batch(3)

    front.apply(plans)
    front.verify()

    assert np.abs(run(ir.to_proto(front.model), batch) - run(str(exported[kind]), batch)).max() <= TOLERANCE


def compress_heads(front: OnnxFrontEnd, heads: str) -> CompressionState:
    """Remove half the heads of every attention-head group by magnitude, without compensation."""
    state = CompressionState(frontend=front, calibration=None, device="cpu")
    state.groups, state.declined = head_groups(front)
    text = f"select{{method=magnitude head-sparsity=0.5 heads={heads}}},compensate{{method=none}},rewrite"
    run_pipeline(parse_pipeline(text), state, verify_each=False)
    return state


def zeroed_heads_reference(path, state: CompressionState) -> ir.Model:
    """Return the original model with every removed head's output projection rows set to zero."""
    reference = load(path)
    nodes = nodes_of(reference)
    for plan in state.plans.values():
        mask = np.zeros(plan.group.width, dtype=np.float32)
        mask[np.asarray(plan.keep)] = 1.0
        for ref in plan.group.consumers:
            weight = nodes[ref.node].inputs[ref.input]
            array = constant_array(weight)
            shape = [1] * array.ndim
            shape[ref.axis] = -1
            weight.const_value = ir.tensor(array * mask.reshape(shape), name=weight.name)
    return reference.model


@pytest.mark.parametrize(("kind", "heads", "query_heads", "kv_heads"), [
    ("llama", "kv", 2, 1),
    ("llama", "query", 2, 2),
    ("bert", "kv", 2, 2),
])  # fmt: skip
def test_removed_heads_match_zeroed(exported, kind, heads, query_heads, kv_heads):
    front = load(exported[kind])
    before = parameter_count(front.model)
    batch = token_batch(5, batch=3, seq=11)  # another batch and sequence size than the export

    state = compress_heads(front, heads)
    front.verify()
    onnx.checker.check_model(ir.to_proto(front.model), full_check=True)

    nodes = nodes_of(front)
    for plan in state.plans.values():
        group = plan.group
        assert len(plan.keep) == query_heads * HEAD_SIZE
        assert constant_array(nodes[group.producers[0].node].inputs[1]).shape == (64, query_heads * HEAD_SIZE)
        for ref in group.narrowed:
            assert constant_array(nodes[ref.node].inputs[ref.input]).shape[ref.axis] == kv_heads * HEAD_SIZE
        assert constant_array(nodes[group.consumers[0].node].inputs[1]).shape == (query_heads * HEAD_SIZE, 64)
    outputs = run(ir.to_proto(front.model), batch)
    expected = run(ir.to_proto(zeroed_heads_reference(exported[kind], state)), batch)
    assert np.abs(outputs - expected).max() <= TOLERANCE
    assert parameter_count(front.model) < before


# Declined layouts ---------------------------------------------------------------------------


def two_head_attention(per_head_bias: bool) -> onnx.ModelProto:
    """Build x (1, 3, 8) -> two-head attention with constant Reshape targets -> output projection.

    `per_head_bias` adds a (1, 2, 1, 1) constant to the scores, which differs per head.
    """
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((8, 8)).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    initializers = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    initializers += [
        numpy_helper.from_array(np.array([0, 0, 2, 4], dtype=np.int64), "split"),
        numpy_helper.from_array(np.array([0, 0, 8], dtype=np.int64), "merge"),
        numpy_helper.from_array(np.array([0.5, -0.5], dtype=np.float32).reshape(1, 2, 1, 1), "head_bias"),
    ]
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_proj"], name=f"{name}_proj"),
            helper.make_node("Reshape", [f"{name}_proj", "split"], [f"{name}_heads"], name=f"{name}_split"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="scores"),
    ]
    scores = "scores"
    if per_head_bias:
        nodes.append(helper.make_node("Add", ["scores", "head_bias"], ["biased"], name="head_bias_add"))
        scores = "biased"
    nodes += [
        helper.make_node("Softmax", [scores], ["probabilities"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probabilities", "v_t"], ["context"], name="context"),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3], name="context_t"),
        helper.make_node("Reshape", ["context_t", "merge"], ["merged"], name="merge"),
        helper.make_node("MatMul", ["merged", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes, "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_constant_head_counts_rewritten():
    model = two_head_attention(per_head_bias=False)
    front = OnnxFrontEnd(ir.from_proto(model))
    groups, _ = head_groups(front)
    assert [group.kv_heads for group in groups] == [2]
    group = groups[0]
    keep = np.arange(4, 8)  # the second head
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 8)).astype(np.float32)}

    front.apply([GroupPlan(group, keep, slice_map(group.width, keep))])
    front.verify()

    reference = load_zeroed(model, first_head_rows=4)
    assert np.abs(run(ir.to_proto(front.model), x) - run(reference, x)).max() <= TOLERANCE


def load_zeroed(model: onnx.ModelProto, first_head_rows: int) -> onnx.ModelProto:
    """Return a copy of `model` whose output projection reads zeros for the first head."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, tensor in enumerate(copy.graph.initializer):
        if tensor.name == "wo":
            array = numpy_helper.to_array(tensor).copy()
            array[:first_head_rows] = 0.0
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, "wo"))
    return copy


def test_per_head_score_bias_declined():
    front = OnnxFrontEnd(ir.from_proto(two_head_attention(per_head_bias=True)))
    groups, declined = head_groups(front)

    assert groups == []
    reasons = {entry.candidate: entry.reason for entry in declined}
    assert "q_proj, k_proj, v_proj" in reasons
    assert "head_bias_add" in reasons["q_proj, k_proj, v_proj"]
    assert "differs per head" in reasons["q_proj, k_proj, v_proj"]
