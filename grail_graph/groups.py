"""The channel-group record that crosses from a front end to the passes.

A group is a hidden dimension of width H. Producers write it (their output-channel axis),
channel-wise ops carry it (their per-channel tensors are narrowed with it), and consumers
read it (their input-channel axis). The record names weights by (node, input index, axis)
so it holds no object of either graph library.
"""

from __future__ import annotations

from dataclasses import dataclass


# Roles of narrowed tensors; folding needs to know which tensor is which.
BIAS = "bias"
BN_ROLES = ("bn_scale", "bn_bias", "bn_mean", "bn_var")
DEPTHWISE = "depthwise"
CONSTANT = "constant"
# Key and value projection rows (and their biases) of an attention-head group. They are
# indexed by key/value head, so they are narrowed to the heads that the kept query heads use.
KEY_VALUE = "key_value"


@dataclass(frozen=True)
class WeightRef:
    """One weight tensor of a group: input `input` of node `node`, hidden axis `axis`.

    `role` says what a narrowed tensor is: a producer `bias`, one of the BatchNorm
    tensors in BN_ROLES, a `depthwise` convolution's weight or bias, a per-channel
    `constant`, or a `key_value` projection weight or bias. Producer and consumer weights
    leave it empty.
    """

    node: str
    input: int
    axis: int
    role: str = ""


@dataclass(frozen=True)
class ChannelGroup:
    """A compressible hidden dimension and every tensor that changes with it."""

    name: str
    width: int
    tap: str
    """Value that all consumers read; its Gram is recorded during calibration."""
    channels_last: bool
    """True when the hidden axis is the last one (Linear/MatMul), False for NCHW (Conv)."""
    producers: tuple[WeightRef, ...]
    narrowed: tuple[WeightRef, ...]
    """Biases, BatchNorm tensors, per-channel constants and depthwise weights."""
    consumers: tuple[WeightRef, ...]
    width_attributes: tuple[tuple[str, str], ...] = ()
    """(node, attribute) pairs set to the kept width, such as a depthwise Conv's `group`."""
    values: tuple[str, ...] = ()
    """Hidden values whose shapes change when the group is narrowed."""
    unit: int = 1
    """Channels per selectable unit: 1, or the head size for an attention-head group."""
    kv_heads: int = 0
    """Key/value heads of an attention-head group (0 otherwise). Query head j reads key/value
    head j // (width // unit // kv_heads), the grouped-query layout of repeat_interleave."""


@dataclass(frozen=True)
class Declined:
    """A candidate that was not compressed, with the reason."""

    candidate: str
    reason: str
