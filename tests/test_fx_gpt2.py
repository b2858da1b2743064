"""Tests of weights stored (in, out) in the torch.fx front end: GPT-2's Conv1D and `x @ W`.

A tiny random GPT-2 is wrapped in TokenModel, as the `hf:` loader does, and traced with
torch.export, where each Conv1D becomes aten.view, aten.addmm and aten.view. Small custom
modules cover `x @ W` under symbolic_trace and the declined layouts. Removal tests compare
the compressed model with the original model whose removed channels are zeroed at the
consumer's input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from grail_graph.api import compress
from grail_graph.fx_frontend.export import export_onnx
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.fx_frontend.matcher import find_groups
from grail_graph.groups import BIAS, CONSTANT, ChannelGroup, Declined
from grail_graph.hf_models import TokenModel

SEQUENCE = 16
VOCABULARY = 50
LAYERS = 2
INNER = 128  # GPT-2's MLP width, 4 x n_embd


def tiny_gpt2(seed: int = 0) -> TokenModel:
    """Return a two-layer GPT-2 (n_embd 32, 4 heads) that takes input_ids and returns logits."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=VOCABULARY, n_positions=64)
    config.use_cache = False
    return TokenModel(GPT2LMHeadModel(config).eval(), causal=True).eval()


def token_batches(count: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCABULARY, (2, SEQUENCE), generator=generator)} for _ in range(count)]


def example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, SEQUENCE, dtype=torch.long)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)


def mlp(model: TokenModel, layer: int) -> nn.Module:
    return model.model.transformer.h[layer].mlp


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def kept_columns(original: torch.Tensor, narrowed: torch.Tensor) -> list[int]:
    """Return the columns of `original` (in, out) that `narrowed` kept, in order."""
    kept = []
    for column in narrowed.T:
        matches = [index for index in range(original.shape[1]) if torch.equal(original[:, index], column)]
        assert len(matches) == 1, "a narrowed column is not a column of the original weight"
        kept.append(matches[0])
    return kept


def reasons_for(declined: list[Declined], candidate: str) -> list[str]:
    return [item.reason for item in declined if item.candidate == candidate]


@pytest.fixture(scope="module")
def gpt2_front_end() -> FxFrontEnd:
    return FxFrontEnd(tiny_gpt2(), example(), device="cpu")


@pytest.fixture(scope="module")
def compressed_gpt2() -> tuple[TokenModel, TokenModel]:
    """Return the original GPT-2 and a copy compressed to half its MLP width with ridge compensation."""
    model = tiny_gpt2()
    return model, compress(model, token_batches(), sparsity=0.5, compensation="ridge", device="cpu")


# GPT-2 matching ---------------------------------------------------------------------------


def test_gpt2_one_mlp_group_per_layer(gpt2_front_end):
    groups, _ = gpt2_front_end.find_groups()

    assert [group.name for group in groups] == [f"g{layer}:model.transformer.h.{layer}.mlp.c_fc" for layer in range(LAYERS)]
    for layer, group in enumerate(groups):
        prefix = f"model.transformer.h.{layer}.mlp"
        assert group.width == INNER
        assert group.channels_last
        assert [(ref.node, ref.axis) for ref in group.producers] == [(f"{prefix}.c_fc.weight", 1)]
        assert [(ref.node, ref.axis) for ref in group.consumers] == [(f"{prefix}.c_proj.weight", 0)]
        assert [(ref.node, ref.axis, ref.role) for ref in group.narrowed] == [(f"{prefix}.c_fc.bias", 0, BIAS)]
        assert group.width_attributes == ((f"{prefix}.c_fc", "nf"), (f"{prefix}.c_proj", "nx"))


def test_gpt2_canonical_weights_follow_axes(gpt2_front_end):
    """Producer weights cross the interface as (H, in) and consumer weights as (out, H)."""
    group = gpt2_front_end.find_groups()[0][0]
    layer = mlp(gpt2_front_end.model, 0)

    (producer,) = gpt2_front_end.producer_weights(group)
    (consumer,) = gpt2_front_end.consumer_weights(group)

    np.testing.assert_array_equal(producer, layer.c_fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(consumer, layer.c_proj.weight.detach().numpy().T)


def test_gpt2_fused_attention_declined(gpt2_front_end):
    _, declined = gpt2_front_end.find_groups()

    for layer in range(LAYERS):
        reasons = reasons_for(declined, f"model.transformer.h.{layer}.attn.c_attn")
        assert len(reasons) == 2
        assert any("splits the channels into parts" in reason for reason in reasons)
        assert any("fused query, key and value projection" in reason for reason in reasons)
        assert any("come from one fused projection" in reason for reason in reasons)


def test_gpt2_residual_producers_declined(gpt2_front_end):
    _, declined = gpt2_front_end.find_groups()

    for layer in range(LAYERS):
        for name in ("attn.c_proj", "mlp.c_proj"):
            (reason,) = reasons_for(declined, f"model.transformer.h.{layer}.{name}")
            assert "combines the hidden value" in reason


# GPT-2 rewrite ----------------------------------------------------------------------------


def test_gpt2_keep_all_gives_identical_logits():
    model = tiny_gpt2()
    batches = token_batches()

    compressed = compress(model, batches, sparsity=0.0, compensation="none", device="cpu")

    assert torch.equal(logits(compressed, batches[0]), logits(model, batches[0]))


def test_gpt2_no_compensation_equals_zeroed_channels():
    model = tiny_gpt2()
    batches = token_batches()

    compressed = compress(model, batches, sparsity=0.5, compensation="none", device="cpu")

    handles = []
    for layer in range(LAYERS):
        keep = kept_columns(mlp(model, layer).c_fc.weight, mlp(compressed, layer).c_fc.weight)
        assert len(keep) == INNER // 2
        mask = torch.zeros(INNER)
        mask[keep] = 1.0
        hook = mlp(model, layer).c_proj.register_forward_pre_hook(lambda _module, args, mask=mask: (args[0] * mask,))
        handles.append(hook)
    try:
        expected = logits(model, batches[0])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits(compressed, batches[0]), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_ridge_runs_in_eager_mode(compressed_gpt2):
    model, compressed = compressed_gpt2
    batch = token_batches(count=1, seed=5)[0]

    output = logits(compressed, batch)

    assert output.shape == (2, SEQUENCE, VOCABULARY)
    assert torch.isfinite(output).all()
    assert parameter_count(compressed) < parameter_count(model)
    for layer in range(LAYERS):
        block = mlp(compressed, layer)
        assert block.c_fc.weight.shape == (32, INNER // 2)
        assert block.c_fc.bias.shape == (INNER // 2,)
        assert block.c_proj.weight.shape == (INNER // 2, 32)
        assert block.c_fc.nf == INNER // 2
        assert block.c_proj.nx == INNER // 2


def test_gpt2_ridge_result_traces_again(compressed_gpt2):
    _, compressed = compressed_gpt2

    groups, _ = FxFrontEnd(compressed, example(), device="cpu").find_groups()

    assert [group.width for group in groups] == [INNER // 2] * LAYERS


def test_gpt2_ridge_result_exports_to_onnx(compressed_gpt2, tmp_path: Path):
    _, compressed = compressed_gpt2
    (tokens,) = token_batches(count=1, seed=6)[0].values()

    path = export_onnx(compressed, (tokens,), tmp_path / "gpt2.onnx", input_names=["input_ids"], dynamic_axes=[(1,)])

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shorter = tokens[:, : SEQUENCE // 2]
    for batch in (tokens, shorter):
        (onnx_output,) = session.run(None, {"input_ids": batch.numpy()})
        eager_output = logits(compressed, {"input_ids": batch}).numpy()
        np.testing.assert_allclose(onnx_output, eager_output, rtol=0, atol=1e-4)


# Custom modules with weights stored (in, out) ---------------------------------------------


class TransposedLinear(nn.Module):
    """A linear layer with its weight stored (in, out), applied as `x @ weight + bias`."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        self.weight = nn.Parameter(torch.randn(in_size, out_size) / in_size**0.5)
        self.bias = nn.Parameter(torch.randn(out_size) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class TransposedMlp(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.up = TransposedLinear(features, hidden)
        self.down = TransposedLinear(hidden, features)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class MatrixProductMlp(nn.Module):
    """An MLP on (rows, features) written with torch.addmm and torch.mm."""

    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.up_weight = nn.Parameter(torch.randn(features, hidden))
        self.up_bias = nn.Parameter(torch.randn(hidden))
        self.down_weight = nn.Parameter(torch.randn(hidden, features))

    def forward(self, x):
        return torch.mm(torch.relu(torch.addmm(self.up_bias, x, self.up_weight)), self.down_weight)


class ReshapedMlp(nn.Module):
    """An MLP whose hidden value goes through `view(shape)` between producer and consumer."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(self.shape[-1], 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).view(self.shape))


class FlattenedMlp(nn.Module):
    """An MLP whose hidden value is flattened to (rows, H) with a size read from the value."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        hidden = torch.relu(self.up(x))
        return self.down(hidden.reshape(-1, hidden.shape[-1]))


TOKENS = (2, 5, 8)


def seeded(model_class: type[nn.Module], *args) -> nn.Module:
    torch.manual_seed(0)
    return model_class(*args).eval()


def token_inputs(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*TOKENS, generator=generator) for _ in range(count)]


def match(model: nn.Module, example=None) -> tuple[list[ChannelGroup], list[Declined]]:
    return FxFrontEnd(model, example, device="cpu").find_groups()


def test_transposed_matmul_group():
    model = seeded(TransposedMlp)

    groups, declined = find_groups(torch.fx.symbolic_trace(model), model)

    (group,) = groups
    assert group.width == 16
    assert [(ref.node, ref.axis) for ref in group.producers] == [("up.weight", 1)]
    assert [(ref.node, ref.axis) for ref in group.consumers] == [("down.weight", 0)]
    assert [(ref.node, ref.axis, ref.role) for ref in group.narrowed] == [("up.bias", 0, CONSTANT)]
    assert group.width_attributes == (("down", "in_size"), ("up", "out_size"))
    assert [item.candidate for item in declined] == ["down"]


def test_transposed_matmul_rewrite_equals_zeroed_channels():
    model = seeded(TransposedMlp)
    batches = token_inputs()

    compressed = compress(model, batches, sparsity=0.5, compensation="none", device="cpu")

    keep = kept_columns(model.up.weight, compressed.up.weight)
    assert compressed.up.out_size == 8
    assert compressed.down.in_size == 8
    assert compressed.down.weight.shape == (8, 8)
    mask = torch.zeros(16)
    mask[keep] = 1.0
    with torch.no_grad():
        expected = model.down(torch.relu(model.up(batches[0])) * mask)
        torch.testing.assert_close(compressed(batches[0]), expected, rtol=1e-5, atol=1e-5)


def test_addmm_and_mm_group_compresses():
    model = seeded(MatrixProductMlp)
    batches = [torch.randn(10, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]

    (group,), _ = match(model)
    # The root module has no `bias` to take an affine correction, so the fit is linear only.
    compressed = compress(model, batches, sparsity=0.5, affine=False, device="cpu")

    assert [(ref.node, ref.axis) for ref in group.producers] == [("up_weight", 1)]
    assert [(ref.node, ref.axis) for ref in group.consumers] == [("down_weight", 0)]
    assert [(ref.node, ref.role) for ref in group.narrowed] == [("up_bias", BIAS)]
    assert group.width_attributes == ()
    assert compressed.up_weight.shape == (8, 8)
    assert compressed.up_bias.shape == (8,)
    assert compressed.down_weight.shape == (8, 8)
    assert compressed(batches[0]).shape == (10, 8)


def test_square_transposed_weight_declined():
    model = seeded(TransposedMlp, 8, 8)

    groups, declined = find_groups(torch.fx.symbolic_trace(model), model)

    assert groups == []
    reasons = [item.reason for item in declined if item.candidate == "up"]
    assert reasons == [
        "`up` has a square weight (8 x 8) and the integer attributes in_size, out_size equal to 8, "
        "so its output and input sizes cannot be told apart"
    ]


def test_reshape_keeping_hidden_axis_accepted():
    model = seeded(FlattenedMlp)
    exported = torch.export.export(model, (torch.randn(*TOKENS),)).module()

    (group,), _ = find_groups(exported, model)

    assert group.width == 16
    assert [ref.node for ref in group.consumers] == ["down.weight"]


def test_reshape_moving_hidden_axis_declined():
    """Under torch.export the recorded shapes show that (2, 5, 16) -> (10, 2, 8) splits the hidden axis."""
    model = seeded(ReshapedMlp, (10, 2, 8))
    exported = torch.export.export(model, (torch.randn(*TOKENS),)).module()

    groups, declined = find_groups(exported, model)

    assert groups == []
    (reason,) = [item.reason for item in declined if item.candidate == "up"]
    assert "reshapes hidden value" in reason
    assert "from (2, 5, 16) to (10, 2, 8), which moves the hidden axis" in reason


def test_reshape_with_literal_width_declined():
    """symbolic_trace keeps `view(10, 16)`, whose literal 16 would be wrong after narrowing."""
    model = seeded(ReshapedMlp, (10, 16))
    traced = torch.fx.symbolic_trace(model)
    torch.fx.passes.shape_prop.ShapeProp(traced).propagate(torch.randn(*TOKENS))

    groups, declined = find_groups(traced, model)

    assert groups == []
    (reason,) = [item.reason for item in declined if item.candidate == "up"]
    assert "has the hidden width 16 as a literal in its shape argument" in reason


def test_reshape_without_shapes_declined():
    groups, declined = find_groups(torch.fx.symbolic_trace(seeded(ReshapedMlp, (10, 16))))

    assert groups == []
    (reason,) = [item.reason for item in declined if item.candidate == "up"]
    assert "records no static shapes" in reason
