"""The interface that every front end implements, so that each pass is written once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from grail_graph.core import GramAccumulator
from grail_graph.groups import ChannelGroup, Declined

Batch = Mapping[str, np.ndarray]


@dataclass
class GroupPlan:
    """The kept channels of one group and the map its consumers absorb.

    `keep` holds sorted indices, shape (K,). `consumer_map` is B, shape (H, K): every
    consumer weight W in canonical (O, H, ...) orientation becomes W B. With affine
    compensation, `consumer_bias` is c and every consumer bias b becomes b + W c (summed
    over kernel positions, which is exact for a convolution only away from zero padding).
    """

    group: ChannelGroup
    keep: np.ndarray
    consumer_map: np.ndarray
    consumer_bias: np.ndarray | None = None
    """Constant c, shape (H,), with h ~= B h_P + c; each consumer's bias grows by W c."""
    producer_map: np.ndarray | None = None
    """Averaging matrix R, shape (K, H), when the group is folded instead of pruned."""
    statistics: dict[str, float] = field(default_factory=dict)


class FrontEnd(Protocol):
    """A model in its own graph library, seen through the operations the passes need.

    Weights cross this boundary in one canonical orientation: producers as (H, ...) with
    the hidden channel first, consumers as (O, H, ...) with the hidden channel second.
    """

    def find_groups(self) -> tuple[list[ChannelGroup], list[Declined]]: ...

    def producer_weights(self, group: ChannelGroup) -> list[np.ndarray]: ...

    def consumer_weights(self, group: ChannelGroup) -> list[np.ndarray]: ...

    def calibrate(
        self,
        groups: list[ChannelGroup],
        batches: Iterable[Batch],
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, GramAccumulator]: ...

    def apply(self, plans: list[GroupPlan]) -> None: ...

    def verify(self) -> None: ...
