"""Gram statistics recorded during ordinary forward passes.

When a group's first consumer is a Conv / Linear module, a forward pre-hook on it sees
the tap. Otherwise (ATen-level graphs from torch.export) the traced graph runs under an
fx Interpreter that reads the tap node's value. Either way the tap is flattened to rows
(one per token or pixel), the partial Gram is formed in float32 (float64 input stays
float64) on the model's device, and it is added to a float64 `GramAccumulator` on the
host. Nothing is changed and no activation is kept after its batch.

A forward pass ends as soon as every tap of the batch is recorded, because the model's
outputs are never needed. A group early in the graph costs a fraction of a full pass.

A failure while the model runs on a batch is reported as a `DataError` that names the
batch shape. A failure in the recording code itself (a tap whose shape disagrees with
its group, say) is an internal `GrailError` that names the group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import fx, nn

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.errors import DataError, GrailError
from grail_graph.groups import ChannelGroup


def _rows(hidden: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    if not group.channels_last:
        hidden = hidden.movedim(1, -1)
    rows = hidden.reshape(-1, group.width)
    return rows if rows.dtype == torch.float64 else rows.float()


class _RecordingFailure(Exception):
    """A failure of the recording code inside a forward pass, turned into a GrailError outside it.

    The conversion waits until the forward pass has returned, because the fx Interpreter
    appends its own traceback note to the message of any exception that passes through it.
    """

    def __init__(self, group: ChannelGroup, hidden, cause: Exception) -> None:
        super().__init__(group.name)
        self.group = group
        self.shape = _shape(hidden)
        self.cause = cause

    def to_error(self) -> GrailError:
        group = self.group
        return GrailError(
            f"recording the Gram of group {group.name} at `{group.tap}` (width {group.width}) failed on a value "
            f"of shape {self.shape}: {type(self.cause).__name__}: {self.cause}",
            "This is an internal error of grail-opt, not a problem with the calibration data; "
            "please report it with the model and this message.",
        )


class _TapsRecorded(Exception):
    """Raised inside a forward pass to end it once every tap of the batch is recorded."""


class _Countdown:
    """Count recordings within one batch and end the forward pass after the last one.

    `expected` is the number of recordings one forward pass makes, or None when it is not
    known (a hooked module whose calls the traced graph does not show). Then every pass runs
    to the end.
    """

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.remaining = expected

    def start(self) -> None:
        self.remaining = self.expected

    def tick(self) -> None:
        if self.remaining is None:
            return
        self.remaining -= 1
        if self.remaining == 0:
            raise _TapsRecorded


def _expected_recordings(gm: fx.GraphModule, hooked: list[ChannelGroup], tapped: int) -> int | None:
    """Return how many recordings one forward pass makes: one per tap node, one per hooked call.

    A hooked module is called once per call_module node of a symbolic_trace graph. In an
    ATen graph from torch.export the module is gone and its weight is a get_attr node, used
    once per call.
    """
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    weight_uses = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            weight_uses[node.target] += len(node.users)
    total = tapped
    for group in hooked:
        count = calls[_module_path(group)] or weight_uses[group.consumers[0].node]
        if count == 0:
            return None
        total += count
    return total


def _run_until_recorded(runner, batch, device: torch.device, countdown: _Countdown) -> None:
    countdown.start()
    try:
        run_batch(runner, batch, device)
    except _TapsRecorded:
        pass


def _guarded(group: ChannelGroup, hidden, action: Callable[[], None]) -> None:
    """Run `action`, a recording step on `hidden`, and raise any failure of it as _RecordingFailure."""
    try:
        action()
    except Exception as error:  # any failure here is a fault of the recording code, whatever its type
        raise _RecordingFailure(group, hidden, error) from error


def _record(hidden: torch.Tensor, group: ChannelGroup, stats: GramAccumulator) -> None:
    rows = _rows(hidden.detach(), group)
    gram = (rows.T @ rows).double().cpu().numpy()
    sums = rows.sum(dim=0).double().cpu().numpy()
    stats.add_partial(gram, sums, rows.shape[0])


def _make_hook(group: ChannelGroup, stats: GramAccumulator, countdown: _Countdown):
    def hook(module: nn.Module, args: tuple) -> None:
        hidden = args[0] if args else None
        _guarded(group, hidden, lambda: _record(hidden, group, stats))
        countdown.tick()

    return hook


class TapRecorder(fx.Interpreter):
    """Run a traced graph and record the Gram of each tap node as it is computed."""

    def __init__(
        self, gm: fx.GraphModule, taps: dict[str, list[tuple[ChannelGroup, GramAccumulator]]], countdown: _Countdown
    ) -> None:
        super().__init__(gm)
        self.taps = taps
        self.countdown = countdown

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        for group, stats in self.taps.get(node.name, ()):
            _guarded(group, result, lambda: _record(result, group, stats))
            self.countdown.tick()
        return result


def _module_path(group: ChannelGroup) -> str:
    return group.consumers[0].node.rpartition(".")[0]


def _hookable(model: nn.Module, group: ChannelGroup) -> nn.Module | None:
    try:
        module = model.get_submodule(_module_path(group))
    except AttributeError:
        return None
    return module if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None


class _InterpreterModule:
    """Callable adapter so `run_batch` can drive an Interpreter like a module."""

    def __init__(self, recorder: TapRecorder) -> None:
        self.recorder = recorder

    def __call__(self, *args, **kwargs):
        if kwargs:
            args = (*args, *kwargs.values())
        return self.recorder.run(*args)


def _shape(value) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def _shapes(batch) -> str:
    """Describe the shapes of a batch for an error message."""
    if isinstance(batch, dict):
        return ", ".join(f"{key}: {_shape(value)}" for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        return ", ".join(_shape(value) for value in batch)
    return _shape(batch)


def run_batch(model, batch, device: torch.device) -> None:
    """Call the model on one batch: a tensor, a tuple of tensors, or a dict of keyword tensors."""
    if isinstance(batch, dict):
        model(**{key: value.to(device) for key, value in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(value.to(device) for value in batch))
    else:
        model(batch.to(device))


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return next(iter(batch.values() if isinstance(batch, dict) else batch)).shape[0]


def calibrate(
    model: nn.Module,
    gm: fx.GraphModule,
    groups: list[ChannelGroup],
    batches: Iterable,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, GramAccumulator]:
    """Run `batches` through `model` (or its traced graph `gm`) and return one Gram per group."""
    stats = {group.name: GramAccumulator(group.width) for group in groups}
    handles = []
    taps: dict[str, list[tuple[ChannelGroup, GramAccumulator]]] = {}
    hooked = [group for group in groups if _hookable(model, group) is not None]
    countdown = _Countdown(_expected_recordings(gm, hooked, len(groups) - len(hooked)))
    try:
        for group in groups:
            consumer = _hookable(model, group)
            if consumer is None:
                taps.setdefault(group.tap, []).append((group, stats[group.name]))
            else:
                handles.append(consumer.register_forward_pre_hook(_make_hook(group, stats[group.name], countdown)))
        runner = _InterpreterModule(TapRecorder(gm, taps, countdown)) if taps else model
        with torch.no_grad():
            for index, batch in enumerate(batches):
                try:
                    _run_until_recorded(runner, batch, device, countdown)
                except _RecordingFailure as failure:
                    raise failure.to_error() from failure.cause
                except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                    raise DataError(
                        f"calibration batch {index} with input shape {_shapes(batch)} fails in "
                        f"{type(model).__name__}: {error}",
                        "Pass batches that the model accepts in a plain forward call, batch dimension first. "
                        "An exported program also fixes the batch size unless it was exported with a dynamic "
                        "batch dimension.",
                    ) from error
                if progress is not None:
                    progress(_batch_size(batch))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _collect_rows(model: nn.Module, gm: fx.GraphModule, groups: list[ChannelGroup], batch, device) -> dict[str, torch.Tensor]:
    """Run one batch and return each group's tap as (rows, H); the rows live until the next batch."""
    rows: dict[str, torch.Tensor] = {}
    handles = []
    taps: dict[str, list[ChannelGroup]] = {}

    hooked = [group for group in groups if _hookable(model, group) is not None]
    countdown = _Countdown(_expected_recordings(gm, hooked, len(groups) - len(hooked)))

    def keep(group: ChannelGroup, hidden: torch.Tensor) -> None:
        def store() -> None:
            rows[group.name] = _rows(hidden.detach(), group)

        _guarded(group, hidden, store)
        countdown.tick()

    try:
        for group in groups:
            consumer = _hookable(model, group)
            if consumer is None:
                taps.setdefault(group.tap, []).append(group)
            else:
                handles.append(consumer.register_forward_pre_hook(lambda m, args, g=group: keep(g, args[0] if args else None)))
        runner = _InterpreterModule(_RowRecorder(gm, taps, keep)) if taps else model
        _run_until_recorded(runner, batch, device, countdown)
    finally:
        for handle in handles:
            handle.remove()
    return rows


class _RowRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, taps: dict[str, list[ChannelGroup]], keep) -> None:
        super().__init__(gm)
        self.taps = taps
        self.keep = keep

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        for group in self.taps.get(node.name, ()):
            self.keep(group, result)
        return result


def _add_cross(
    current: torch.Tensor, original: torch.Tensor, stats: GramAccumulator, cross_stats: CrossAccumulator
) -> None:
    """Add one batch's rows of the current (n, K) and original (n, H) taps to the accumulators."""
    gram = (current.T @ current).double().cpu().numpy()
    sums = current.sum(dim=0).double().cpu().numpy()
    stats.add_partial(gram, sums, current.shape[0])
    cross = (original.T @ current).double().cpu().numpy()
    original_sums = original.sum(dim=0).double().cpu().numpy()
    cross_stats.add_partial(cross, gram, original_sums, sums, current.shape[0])


def calibrate_with_reference(
    model: nn.Module,
    gm: fx.GraphModule,
    reference: nn.Module,
    reference_gm: fx.GraphModule,
    groups: list[ChannelGroup],
    batches: Iterable,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, GramAccumulator], dict[str, CrossAccumulator]]:
    """Return Grams of `model` at each tap and cross products reference^T current.

    Both models see the same batch; the reference's taps are held for that batch only.
    """
    stats = {group.name: GramAccumulator(group.width) for group in groups}
    crosses = {group.name: CrossAccumulator(group.width, group.width) for group in groups}
    with torch.no_grad():
        for index, batch in enumerate(batches):
            try:
                target = _collect_rows(reference, reference_gm, groups, batch, device)
                source = _collect_rows(model, gm, groups, batch, device)
            except _RecordingFailure as failure:
                raise failure.to_error() from failure.cause
            except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                raise DataError(
                    f"calibration batch {index} with input shape {_shapes(batch)} fails in {type(model).__name__}: {error}",
                    "Pass batches that the model accepts in a plain forward call, batch dimension first.",
                ) from error
            try:
                for group in groups:
                    current, original = source[group.name], target[group.name]
                    accumulate = partial(_add_cross, current, original, stats[group.name], crosses[group.name])
                    _guarded(group, current, accumulate)
            except _RecordingFailure as failure:
                raise failure.to_error() from failure.cause
            if progress is not None:
                progress(_batch_size(batch))
    return stats, crosses
