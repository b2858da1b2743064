"""Gram statistics recorded during ordinary forward passes.

When a group's first consumer is a Conv / Linear module, a forward pre-hook on it sees
the tap. Otherwise (ATen-level graphs from torch.export) the traced graph runs under an
fx Interpreter that reads the tap node's value. Either way the tap is flattened to rows
(one per token or pixel), the partial Gram is formed in float32 (float64 input stays
float64) on the model's device, and it is added to a float64 `GramAccumulator` on the
host. Nothing is changed and no activation is kept after its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx, nn

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.errors import DataError
from grail_graph.groups import ChannelGroup


def _rows(hidden: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    if not group.channels_last:
        hidden = hidden.movedim(1, -1)
    rows = hidden.reshape(-1, group.width)
    return rows if rows.dtype == torch.float64 else rows.float()


def _record(hidden: torch.Tensor, group: ChannelGroup, stats: GramAccumulator) -> None:
    rows = _rows(hidden.detach(), group)
    gram = (rows.T @ rows).double().cpu().numpy()
    sums = rows.sum(dim=0).double().cpu().numpy()
    stats.add_partial(gram, sums, rows.shape[0])


def _make_hook(group: ChannelGroup, stats: GramAccumulator):
    def hook(module: nn.Module, args: tuple) -> None:
        _record(args[0], group, stats)

    return hook


class TapRecorder(fx.Interpreter):
    """Run a traced graph and record the Gram of each tap node as it is computed."""

    def __init__(self, gm: fx.GraphModule, taps: dict[str, list[tuple[ChannelGroup, GramAccumulator]]]) -> None:
        super().__init__(gm)
        self.taps = taps

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        for group, stats in self.taps.get(node.name, ()):
            _record(result, group, stats)
        return result


def _hookable(model: nn.Module, group: ChannelGroup) -> nn.Module | None:
    try:
        module = model.get_submodule(group.consumers[0].node.rpartition(".")[0])
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
    try:
        for group in groups:
            consumer = _hookable(model, group)
            if consumer is None:
                taps.setdefault(group.tap, []).append((group, stats[group.name]))
            else:
                handles.append(consumer.register_forward_pre_hook(_make_hook(group, stats[group.name])))
        runner = _InterpreterModule(TapRecorder(gm, taps)) if taps else model
        with torch.no_grad():
            for index, batch in enumerate(batches):
                try:
                    run_batch(runner, batch, device)
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

    def keep(group: ChannelGroup, hidden: torch.Tensor) -> None:
        rows[group.name] = _rows(hidden.detach(), group)

    try:
        for group in groups:
            consumer = _hookable(model, group)
            if consumer is None:
                taps.setdefault(group.tap, []).append(group)
            else:
                handles.append(consumer.register_forward_pre_hook(lambda m, args, g=group: keep(g, args[0])))
        runner = _InterpreterModule(_RowRecorder(gm, taps, keep)) if taps else model
        run_batch(runner, batch, device)
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
            except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                raise DataError(
                    f"calibration batch {index} with input shape {_shapes(batch)} fails in {type(model).__name__}: {error}",
                    "Pass batches that the model accepts in a plain forward call, batch dimension first.",
                ) from error
            for group in groups:
                current, original = source[group.name], target[group.name]
                gram = (current.T @ current).double().cpu().numpy()
                sums = current.sum(dim=0).double().cpu().numpy()
                stats[group.name].add_partial(gram, sums, current.shape[0])
                cross = (original.T @ current).double().cpu().numpy()
                original_sums = original.sum(dim=0).double().cpu().numpy()
                crosses[group.name].add_partial(cross, gram, original_sums, sums, current.shape[0])
            if progress is not None:
                progress(_batch_size(batch))
    return stats, crosses
