"""Tests of the torch.fx front end on tiny modules built in each test.

Matcher tests check each verdict: the group's width, layout and parameter names, or the
declined candidate and the node its reason names. Rewrite tests compare the compressed
module's outputs with what the plan implies, computed independently here from captured
activations. Every model is seeded and small enough to run on CPU in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grail_graph.api import compress, export_onnx
from grail_graph.errors import DataError, GrailError, UnsupportedModelError
from grail_graph.fx_frontend.export import check_export
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.fx_frontend.matcher import find_groups
from grail_graph.groups import BIAS, CONSTANT, ChannelGroup, Declined, WeightRef

# Models -------------------------------------------------------------------------------------


class ConvBnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))


class ResidualAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


class HiddenOutput(nn.Module):
    """Returns the hidden activation as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        hidden = torch.relu(self.conv1(x))
        return self.conv2(hidden), hidden


class GroupedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1, groups=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

    def __init__(self, channels: int = 4, expanded: int = 12) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, expanded, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expanded)
        self.depthwise = nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False)
        self.bn2 = nn.BatchNorm2d(expanded)
        self.project = nn.Conv2d(expanded, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        hidden = F.relu6(self.bn1(self.expand(x)))
        hidden = F.relu6(self.bn2(self.depthwise(hidden)))
        return x + self.bn3(self.project(hidden))


class Mlp(nn.Module):
    """Transformer MLP applied to (batch, tokens, features)."""

    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGlu(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.gate = nn.Linear(features, hidden, bias=False)
        self.up = nn.Linear(features, hidden, bias=False)
        self.down = nn.Linear(hidden, features, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LayerScaleMlp(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.gamma = nn.Parameter(0.5 + torch.rand(hidden))
        self.fc2 = nn.Linear(hidden, features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)) * self.gamma)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(torch.relu(self.conv1(x)))))


class PooledConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv1(x))))


class ParametricRelu(nn.Module):
    def __init__(self, parameters: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(parameters, init=0.1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.act.weight.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class FunctionalPrelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.slope = nn.Parameter(torch.linspace(-0.5, 0.5, 8))
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.prelu(self.conv1(x), self.slope))


class TokenPrelu(nn.Module):
    """A per-channel PReLU on (batch, tokens, features) scales axis 1, the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.act = nn.PReLU(6)
        self.fc2 = nn.Linear(6, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SqueezeExcite(nn.Module):
    """Conv, then a channel gate computed from the spatial mean of the same hidden value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        hidden = torch.relu(self.conv1(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(hidden.mean((2, 3), keepdim=True)))))
        return self.conv2(hidden * gate)


def read_batch_size(hidden, output):
    return output.view(hidden.size(0), -1)


def unpack_shape_without_channels(hidden, output):
    batch, _channels, height, width = hidden.shape
    return output.reshape(batch, -1, height, width)


def scale_by_channel_count(hidden, output):
    return output * hidden.shape[1]


def view_with_whole_shape(hidden, output):
    return output.view(hidden.size())


class ShapeRead(nn.Module):
    """Conv -> ReLU -> Conv whose output goes through `use(hidden, output)`, which reads the hidden shape."""

    def __init__(self, use) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.use = use

    def forward(self, x):
        hidden = torch.relu(self.conv1(x))
        return self.use(hidden, self.conv2(hidden))


class Scale(nn.Module):
    def __init__(self, factor: float, offset: float = 0.0) -> None:
        super().__init__()
        self.factor = factor
        self.offset = offset

    def forward(self, x):
        return x * self.factor + self.offset


class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


IMAGE_SHAPE = (4, 3, 8, 8)
TOKEN_SHAPE = (4, 6, 8)

# Helpers ------------------------------------------------------------------------------------


def seeded(model_class: type[nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    """Build `model_class` with seeded weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(**kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_batches(shape: tuple[int, ...], count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def match(model: nn.Module) -> tuple[list[ChannelGroup], list[Declined]]:
    return FxFrontEnd(model, device="cpu").find_groups()


def only_group(groups: list[ChannelGroup]) -> ChannelGroup:
    assert len(groups) == 1, f"expected one group, found {[group.name for group in groups]}"
    return groups[0]


def reason_for(declined: list[Declined], candidate: str) -> str:
    reasons = {entry.candidate: entry.reason for entry in declined}
    assert candidate in reasons, f"{candidate} was not declined; declined: {reasons}"
    return reasons[candidate]


def names(refs: tuple[WeightRef, ...]) -> set[str]:
    return {ref.node for ref in refs}


def verdict_counts(groups: list[ChannelGroup], declined: list[Declined]) -> Counter:
    """Count how many verdicts (groups or Declined records) name each producer module."""
    counts = Counter(ref.node.rpartition(".")[0] for group in groups for ref in group.producers)
    counts.update(module for entry in declined for module in entry.candidate.split(", "))
    return counts


def capture_output(module: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run `model` on `batches` and return what `module` (a submodule of it) outputs for each."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(output.detach().clone()))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
    return captured


def tap_rows(activations: list[torch.Tensor], channels_last: bool) -> np.ndarray:
    """Flatten captured tap values to float64 rows (one per token or pixel) of hidden channels."""
    rows = []
    for activation in activations:
        if not channels_last:
            activation = activation.movedim(1, -1)
        rows.append(activation.reshape(-1, activation.shape[-1]).double().numpy())
    return np.concatenate(rows)


def kept_channels(original: torch.Tensor, narrowed: torch.Tensor) -> np.ndarray:
    """Return the indices of the rows of `original` that `narrowed` kept, in order."""
    keep = []
    for row in narrowed:
        matches = torch.nonzero(torch.all(original == row, dim=tuple(range(1, original.ndim)))).flatten()
        assert len(matches) == 1, "a narrowed producer row is not a row of the original weight"
        keep.append(int(matches[0]))
    return np.array(keep)


# Matcher ------------------------------------------------------------------------------------


def test_conv_bn_relu_conv_group():
    group = only_group(match(seeded(ConvBnReluConv))[0])

    assert group.width == 8
    assert not group.channels_last
    assert group.producers == (WeightRef("conv1.weight", 0, 0),)
    assert names(group.narrowed) == {"conv1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert all(ref.axis == 0 for ref in group.narrowed)
    assert group.consumers == (WeightRef("conv2.weight", 0, 1),)


def test_residual_add_declined():
    groups, declined = match(seeded(ResidualAdd))

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "`add`" in reason
    assert "`x`" in reason


def test_hidden_graph_output_declined():
    groups, declined = match(seeded(HiddenOutput))

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "graph output" in reason
    assert "`relu`" in reason


def test_grouped_consumer_declined():
    groups, declined = match(seeded(GroupedConsumer))

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "grouped convolution" in reason
    assert "`conv2`" in reason


def test_inverted_residual_group():
    groups, declined = match(seeded(InvertedResidual))

    group = only_group(groups)
    assert group.width == 12
    assert group.producers == (WeightRef("expand.weight", 0, 0),)
    assert "depthwise.weight" in names(group.narrowed)
    assert {"bn1.weight", "bn2.weight", "bn2.running_var"} <= names(group.narrowed)
    assert group.consumers == (WeightRef("project.weight", 0, 1),)
    assert group.width_attributes == (("depthwise", "groups"),)
    assert "`add`" in reason_for(declined, "project")


def test_inverted_residual_rewrite_updates_groups():
    model = seeded(InvertedResidual)
    batches = random_batches((4, 4, 8, 8))

    compressed = compress(model, batches, sparsity=0.5, device="cpu")

    depthwise = compressed.depthwise
    assert depthwise.weight.shape == (6, 1, 3, 3)
    assert depthwise.groups == 6
    assert depthwise.in_channels == 6
    assert depthwise.out_channels == 6
    assert compressed.bn2.num_features == 6
    assert compressed.project.weight.shape == (4, 6, 1, 1)
    with torch.no_grad():
        assert compressed(batches[0]).shape == (4, 4, 8, 8)


def test_mlp_on_tokens_group():
    group = only_group(match(seeded(Mlp))[0])

    assert group.width == 16
    assert group.channels_last
    assert group.producers == (WeightRef("fc1.weight", 0, 0),)
    assert group.narrowed == (WeightRef("fc1.bias", 0, 0, BIAS),)
    assert group.consumers == (WeightRef("fc2.weight", 0, 1),)


def test_swiglu_one_group_two_producers():
    group = only_group(match(seeded(SwiGlu))[0])

    assert group.width == 16
    assert group.channels_last
    assert names(group.producers) == {"gate.weight", "up.weight"}
    assert group.narrowed == ()
    assert group.consumers == (WeightRef("down.weight", 0, 1),)


def test_swiglu_rewrite_narrows_both_producers():
    compressed = compress(seeded(SwiGlu), random_batches(TOKEN_SHAPE), sparsity=0.5, device="cpu")

    assert compressed.gate.weight.shape == (8, 8)
    assert compressed.up.weight.shape == (8, 8)
    assert compressed.down.weight.shape == (8, 8)


def test_layer_scale_parameter_narrowed():
    group = only_group(match(seeded(LayerScaleMlp))[0])

    assert names(group.narrowed) == {"fc1.bias", "gamma"}
    assert WeightRef("gamma", 0, 0, CONSTANT) in group.narrowed

    compressed = compress(seeded(LayerScaleMlp), random_batches(TOKEN_SHAPE), sparsity=0.5, device="cpu")
    assert compressed.gamma.shape == (8,)
    assert isinstance(compressed.gamma, nn.Parameter)


def test_module_called_twice_declined():
    groups, declined = match(seeded(CalledTwice))

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert "`conv1`" in reason
    assert "called 2 times" in reason


def test_module_called_twice_declined_once():
    _, declined = match(seeded(CalledTwice))

    assert [entry.candidate for entry in declined].count("conv1") == 1


def test_squeeze_excite_producer_declined_once():
    groups, declined = match(seeded(SqueezeExcite))

    counts = verdict_counts(groups, declined)
    assert counts == Counter({"conv1": 1, "fc1": 1, "fc2": 1, "conv2": 1})
    assert "`mean`" in reason_for(declined, "conv1")
    reason = reason_for(declined, "fc2")
    assert "`mul`" in reason
    assert "`conv1` already has a verdict" in reason
    assert only_group(groups).producers == (WeightRef("fc1.weight", 0, 0),)


@pytest.mark.parametrize(
    "model_class",
    [ConvBnReluConv, ResidualAdd, InvertedResidual, SwiGlu, CalledTwice, GroupedConsumer, SqueezeExcite],
)
def test_each_candidate_has_one_verdict(model_class):
    model = seeded(model_class)
    # Every Conv / Linear except a depthwise Conv is a candidate producer.
    candidates = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups != module.out_channels)
    }

    counts = verdict_counts(*match(model))

    assert set(counts) == candidates
    assert all(count == 1 for count in counts.values()), counts


def test_prelu_per_channel_weight_narrowed():
    model = seeded(ParametricRelu)

    compressed = compress(model, random_batches(IMAGE_SHAPE), sparsity=0.5, device="cpu")

    assert compressed.act.weight.shape == (4,)
    keep = kept_channels(model.conv1.weight, compressed.conv1.weight)
    torch.testing.assert_close(compressed.act.weight, model.act.weight[keep])
    with torch.no_grad():
        assert compressed(random_batches(IMAGE_SHAPE, count=1)[0]).shape == (4, 4, 8, 8)


def test_prelu_weight_is_constant_of_group():
    group = only_group(match(seeded(ParametricRelu))[0])

    assert WeightRef("act.weight", 0, 0, CONSTANT) in group.narrowed
    assert group.tap == "act"


def test_single_prelu_weight_not_narrowed():
    model = seeded(ParametricRelu, parameters=1)
    group = only_group(match(model)[0])

    assert "act.weight" not in names(group.narrowed)
    compressed = compress(model, random_batches(IMAGE_SHAPE), sparsity=0.5, device="cpu")
    assert compressed.act.weight.shape == (1,)
    assert compressed.conv2.weight.shape == (4, 4, 1, 1)


def test_functional_prelu_weight_narrowed():
    group = only_group(match(seeded(FunctionalPrelu))[0])

    assert WeightRef("slope", 0, 0, CONSTANT) in group.narrowed


def test_exported_prelu_weight_narrowed():
    model = seeded(ParametricRelu)
    graph = torch.export.export(model, (torch.randn(IMAGE_SHAPE),)).module()

    group = only_group(find_groups(graph, model)[0])

    assert WeightRef("act.weight", 0, 0, CONSTANT) in group.narrowed


def test_token_prelu_per_channel_declined():
    groups, declined = match(seeded(TokenPrelu))

    assert groups == []
    reason = reason_for(declined, "fc1")
    assert "`act`" in reason
    assert "axis 1" in reason


@pytest.mark.parametrize("use", [read_batch_size, unpack_shape_without_channels])
def test_shape_read_without_width_accepted(use):
    model = seeded(ShapeRead, use=use)
    batches = random_batches(IMAGE_SHAPE)

    group = only_group(match(model)[0])
    compressed = compress(model, batches, sparsity=0.5, device="cpu")

    assert group.producers == (WeightRef("conv1.weight", 0, 0),)
    with torch.no_grad():
        assert compressed(batches[0]).shape == model(batches[0]).shape


@pytest.mark.parametrize(("use", "reader"), [(scale_by_channel_count, "`getitem`"), (view_with_whole_shape, "`size`")])
def test_shape_read_of_width_declined(use, reader):
    groups, declined = match(seeded(ShapeRead, use=use))

    assert groups == []
    reason = reason_for(declined, "conv1")
    assert f"shape of hidden value `relu` is read by {reader}" in reason
    assert "mixes or reshapes" not in reason


def test_maxpool_between_convs_accepted():
    group = only_group(match(seeded(PooledConvs))[0])

    assert group.width == 8
    assert group.producers == (WeightRef("conv1.weight", 0, 0),)
    assert group.consumers == (WeightRef("conv2.weight", 0, 1),)


# Rewrite numerics ---------------------------------------------------------------------------


@pytest.mark.parametrize(("model_class", "shape"), [(ConvBnReluConv, IMAGE_SHAPE), (Mlp, TOKEN_SHAPE)])
def test_sparsity_zero_keeps_outputs(model_class, shape):
    model = seeded(model_class)
    batches = random_batches(shape)

    compressed = compress(model, batches, sparsity=0.0, device="cpu")

    with torch.no_grad():
        assert torch.equal(compressed(batches[0]), model(batches[0]))


def test_no_compensation_equals_zeroed_channels():
    model = seeded(Mlp)
    batches = random_batches(TOKEN_SHAPE)

    compressed = compress(model, batches, sparsity=0.5, compensation="none", device="cpu")

    keep = kept_channels(model.fc1.weight, compressed.fc1.weight)
    removed = torch.ones(16, dtype=torch.bool)
    removed[keep] = False
    handle = model.act.register_forward_hook(lambda _module, _args, output: output.masked_fill(removed, 0.0))
    try:
        with torch.no_grad():
            expected = model(batches[0])
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(compressed(batches[0]), expected, rtol=1e-5, atol=1e-5)


def plain_pipeline(affine: bool) -> str:
    """Return a pipeline that solves each group from its own Gram (one-shot) with alpha 0."""
    compensate = f"compensate{{method=ridge alpha=0.0 affine={'true' if affine else 'false'}}}"
    return f"find-groups,calibrate{{statistics=oneshot}},select{{method=wanda sparsity=0.5}},{compensate},rewrite"


def least_squares_refit(model: Mlp, batches: list[torch.Tensor], keep: np.ndarray, intercept: bool):
    """Fit the consumer fc2 to the kept tap channels on the calibration rows by least squares.

    Returns the weight W' (O, K) that minimises ||X W^T - X_P W'^T - 1 d^T|| over the rows X
    of the tap, and the bias b + d (d = 0 without `intercept`).
    """
    rows = tap_rows(capture_output(model.act, model, batches), channels_last=True)
    weight = model.fc2.weight.detach().double().numpy()
    bias = model.fc2.bias.detach().double().numpy()
    design = rows[:, keep]
    if intercept:
        design = np.hstack([design, np.ones((len(rows), 1))])
    solution, *_ = np.linalg.lstsq(design, rows @ weight.T, rcond=None)
    if intercept:
        return solution[:-1].T, bias + solution[-1]
    return solution.T, bias


@pytest.mark.parametrize("affine", [False, True])
def test_ridge_alpha_zero_is_least_squares_refit(affine):
    """With alpha 0 the last layer's weights (and with `affine` its bias) are a least-squares refit."""
    model = seeded(Mlp)
    batches = random_batches(TOKEN_SHAPE)

    compressed = compress(model, batches, pipeline=plain_pipeline(affine), device="cpu")

    keep = kept_channels(model.fc1.weight, compressed.fc1.weight)
    weight, bias = least_squares_refit(model, batches, keep, intercept=affine)
    np.testing.assert_allclose(compressed.fc2.weight.detach().double().numpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(compressed.fc2.bias.detach().double().numpy(), bias, rtol=1e-4, atol=1e-5)

    rows = tap_rows(capture_output(model.act, model, batches), channels_last=True)
    refit = rows[:, keep] @ weight.T + bias
    with torch.no_grad():
        outputs = torch.cat([compressed(batch).reshape(-1, 8) for batch in batches]).double().numpy()
    np.testing.assert_allclose(outputs, refit, rtol=1e-4, atol=1e-4)


def test_compress_leaves_caller_module_unchanged():
    model = seeded(InvertedResidual)
    before = copy.deepcopy(model.state_dict())

    compressed = compress(model, random_batches((4, 4, 8, 8)), sparsity=0.5, device="cpu")

    assert compressed is not model
    assert model.depthwise.groups == 12
    assert model.depthwise.out_channels == 12
    assert model.bn1.num_features == 12
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


@pytest.mark.parametrize(("model_class", "shape"), [(ConvBnReluConv, IMAGE_SHAPE), (SwiGlu, TOKEN_SHAPE)])
def test_rewritten_module_exports_to_onnx(model_class, shape, tmp_path: Path):
    model = seeded(model_class)
    batches = random_batches(shape)
    compressed = compress(model, batches, sparsity=0.5, device="cpu")
    example = random_batches(shape, count=1, seed=7)[0]

    path = export_onnx(compressed, example, tmp_path / "compressed.onnx")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        eager_output = compressed(example).numpy()
    np.testing.assert_allclose(onnx_output, eager_output, rtol=0, atol=1e-4)


def test_export_tolerance_scales_with_outputs(tmp_path: Path):
    """The accepted difference is tolerance * max(1, max |output|), because fp32 error grows with the values."""
    example = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    path = export_onnx(Scale(1000.0), example, tmp_path / "scale.onnx")

    within = check_export(Scale(1000.0, offset=0.05), (example,), path, tolerance=1e-4)
    assert within == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(GrailError, match="differs from PyTorch by 0.5"):
        check_export(Scale(1000.0, offset=0.5), (example,), path, tolerance=1e-4)


# Calibration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_class", "shape", "tap_module"),
    [(ConvBnReluConv, IMAGE_SHAPE, "relu"), (Mlp, TOKEN_SHAPE, "act")],
)
def test_calibration_gram_matches_tap(model_class, shape, tap_module):
    model = seeded(model_class)
    batches = random_batches(shape)
    front = FxFrontEnd(model, device="cpu")
    group = only_group(front.find_groups()[0])

    stats = front.calibrate([group], batches)[group.name]

    rows = tap_rows(capture_output(model.get_submodule(tap_module), model, batches), group.channels_last)
    assert rows.shape[1] == group.width
    assert stats.count == rows.shape[0]
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.sums, rows.sum(axis=0), rtol=1e-5, atol=1e-5)


def calibration_group(front: FxFrontEnd, hooked: bool, width: int | None = None) -> ChannelGroup:
    """Return the only group of `front`, recorded by a consumer hook or (`hooked` False) by the Interpreter.

    A consumer that names no module sends calibration through the fx Interpreter. A
    `width` that differs from the tap's makes the recording code fail on every batch.
    """
    group = only_group(front.find_groups()[0])
    if not hooked:
        group = dataclasses.replace(group, consumers=(WeightRef("missing.weight", 0, 1),))
    if width is not None:
        group = dataclasses.replace(group, width=width)
    return group


def run_calibration(front: FxFrontEnd, group: ChannelGroup, batches, with_reference: bool):
    if with_reference:
        return front.calibrate_with_reference([group], batches)
    return front.calibrate([group], batches)


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("hooked", [True, False])
def test_recording_failure_is_internal_error(hooked, with_reference):
    front = FxFrontEnd(seeded(ConvBnReluConv), device="cpu")
    group = calibration_group(front, hooked, width=5)

    with pytest.raises(GrailError) as caught:
        run_calibration(front, group, random_batches(IMAGE_SHAPE), with_reference)

    assert not isinstance(caught.value, DataError)
    message = str(caught.value)
    assert f"group {group.name} at `relu` (width 5)" in message
    assert "shape (4, 8, 8, 8)" in message
    assert "internal error" in message
    assert "While executing" not in message


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("hooked", [True, False])
def test_model_failure_is_data_error(hooked, with_reference):
    front = FxFrontEnd(seeded(ConvBnReluConv), device="cpu")
    group = calibration_group(front, hooked)
    batches = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)]

    with pytest.raises(DataError, match=r"calibration batch 1 with input shape \(2, 5, 8, 8\)"):
        run_calibration(front, group, batches, with_reference)


class SharedConsumer(nn.Module):
    """An MLP whose second layer runs twice, on the hidden value and on twice the hidden value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden) + self.fc2(2.0 * hidden)


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("hooked", [True, False])
def test_calibration_stops_after_last_tap(hooked, with_reference):
    model = seeded(Mlp)
    front = FxFrontEnd(model, device="cpu")
    group = calibration_group(front, hooked)
    consumer_runs = []
    front.model.fc2.register_forward_hook(lambda *_: consumer_runs.append(1))
    front.reference.fc2.register_forward_hook(lambda *_: consumer_runs.append(1))
    batches = random_batches(TOKEN_SHAPE)

    stats = run_calibration(front, group, batches, with_reference)
    if with_reference:
        stats = stats[0]

    assert consumer_runs == []
    rows = tap_rows(capture_output(model.act, model, batches), group.channels_last)
    np.testing.assert_allclose(stats[group.name].gram, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_calibration_records_every_call_of_a_shared_consumer():
    model = seeded(SharedConsumer)
    front = FxFrontEnd(model, device="cpu")
    group = only_group(FxFrontEnd(seeded(Mlp), device="cpu").find_groups()[0])
    batches = random_batches(TOKEN_SHAPE)

    stats = front.calibrate([group], batches)[group.name]

    rows = tap_rows(capture_output(model.act, model, batches), group.channels_last)
    both = np.concatenate([rows, 2.0 * rows])
    assert stats.count == both.shape[0]
    np.testing.assert_allclose(stats.gram, both.T @ both, rtol=1e-5, atol=1e-4)


# Bad input ----------------------------------------------------------------------------------


def test_untraceable_model_rejected():
    with pytest.raises(UnsupportedModelError, match="DataDependentBranch cannot be traced"):
        compress(seeded(DataDependentBranch), random_batches((2, 4)), device="cpu")


def test_calibration_batch_of_wrong_shape_rejected():
    batches = [torch.randn(2, 5, 8, 8)]

    with pytest.raises(DataError, match=r"calibration batch 0 with input shape \(2, 5, 8, 8\)"):
        compress(seeded(ConvBnReluConv), batches, device="cpu")


def test_second_calibration_batch_of_wrong_shape_rejected():
    batches = [torch.randn(2, 6, 8), torch.randn(2, 6, 7)]

    with pytest.raises(DataError, match=r"calibration batch 1 with input shape \(2, 6, 7\)"):
        compress(seeded(Mlp), batches, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_rejected():
    with pytest.raises(GrailError, match="CUDA is not available"):
        compress(seeded(Mlp), random_batches(TOKEN_SHAPE), device="cuda")
