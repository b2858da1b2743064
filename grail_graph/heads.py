"""Head arithmetic shared by the attention matchers and rewrites of both front ends.

An attention-head group keeps whole query heads. In grouped-query attention every
key/value head serves `group_size` consecutive query heads, so the kept query heads also
decide which key/value heads stay. numpy only, so the ONNX front end does not need torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grail_graph.groups import ChannelGroup


@dataclass(frozen=True)
class HeadStructure:
    """The head counts of one attention call: query heads share key/value heads in groups."""

    query_heads: int
    kv_heads: int
    head_size: int

    @property
    def group_size(self) -> int:
        return self.query_heads // self.kv_heads


def structure_of(group: ChannelGroup) -> HeadStructure:
    return HeadStructure(group.width // group.unit, group.kv_heads, group.unit)


def head_channels(heads: np.ndarray, head_size: int) -> np.ndarray:
    """Return the channel indices of whole heads, head-major, shape (len(heads) * head_size,)."""
    heads = np.asarray(heads, dtype=np.int64)
    return (heads[:, None] * head_size + np.arange(head_size)).reshape(-1)


def kept_heads(group: ChannelGroup, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the kept query heads and the key/value heads they read, from kept channels.

    Raises ValueError unless `keep` is a set of whole query heads with the same number of
    query heads in every kept key/value group, the layout that repeated key/value heads
    (repeat_kv, repeat_interleave, Expand + Reshape) can run.
    """
    structure = structure_of(group)
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    heads = np.unique(keep // structure.head_size)
    if not np.array_equal(keep, head_channels(heads, structure.head_size)):
        raise ValueError(f"group {group.name}: the kept channels are not whole heads of {structure.head_size}")
    kv_heads, counts = np.unique(heads // structure.group_size, return_counts=True)
    if len(set(counts.tolist())) > 1:
        raise ValueError(
            f"group {group.name}: key/value heads keep different numbers of query heads ({counts.tolist()}), "
            "which grouped-query attention cannot represent"
        )
    return heads, kv_heads


def kept_structure(group: ChannelGroup, keep: np.ndarray) -> HeadStructure:
    """Return the head counts left after keeping channels `keep` (see `kept_heads`)."""
    heads, kv_heads = kept_heads(group, keep)
    return HeadStructure(len(heads), len(kv_heads), group.unit)
