"""Gram statistics recorded with forward pre-hooks during ordinary forward passes.

Each group's first consumer module gets a hook that flattens its input to rows (one per
token or pixel), forms the partial Gram in float32 (float64 input stays float64) on the
model's device, and adds it to a float64 `GramAccumulator` on the host. Hooks record and
change nothing, and no activation is kept after its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from grail_graph.core import GramAccumulator
from grail_graph.groups import ChannelGroup


def _rows(hidden: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    if not group.channels_last:
        hidden = hidden.movedim(1, -1)
    rows = hidden.reshape(-1, group.width)
    return rows if rows.dtype == torch.float64 else rows.float()


def _make_hook(group: ChannelGroup, stats: GramAccumulator):
    def hook(module: nn.Module, args: tuple) -> None:
        rows = _rows(args[0].detach(), group)
        gram = (rows.T @ rows).double().cpu().numpy()
        sums = rows.sum(dim=0).double().cpu().numpy()
        stats.add_partial(gram, sums, rows.shape[0])

    return hook


def run_batch(model: nn.Module, batch, device: torch.device) -> None:
    """Call the model on one batch: a tensor, a tuple of tensors, or a dict of keyword tensors."""
    if isinstance(batch, dict):
        model(**{key: value.to(device) for key, value in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(value.to(device) for value in batch))
    else:
        model(batch.to(device))


def calibrate(
    model: nn.Module,
    groups: list[ChannelGroup],
    batches: Iterable,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, GramAccumulator]:
    """Run `batches` through `model` and return one Gram per group."""
    stats = {group.name: GramAccumulator(group.width) for group in groups}
    handles = []
    try:
        for group in groups:
            consumer = model.get_submodule(group.consumers[0].node.rpartition(".")[0])
            handles.append(consumer.register_forward_pre_hook(_make_hook(group, stats[group.name])))
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch, device)
                if progress is not None:
                    first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))
                    progress(first.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats
