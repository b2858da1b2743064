"""The allocate pass: spread one compression budget over all groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grail_graph.core import (
    ALLOCATION_METHODS,
    AllocationGroup,
    allocate_widths,
    error_curve,
    flap_scores,
    output_energy_matrix,
    wanda_scores,
)
from grail_graph.passes.base import CompressionState, Pass, PassResult, register

BUDGETS = ("params", "macs")


@dataclass(frozen=True)
class AllocateOptions:
    method: str = field(default="error", metadata={"help": f"allocation: {', '.join(ALLOCATION_METHODS)}"})
    sparsity: float = field(default=0.5, metadata={"help": "fraction of the groups' budget removed, in [0, 1)"})
    budget: str = field(default="params", metadata={"help": "what the fraction counts: params or macs"})
    alpha: float = field(default=1e-3, metadata={"help": "ridge strength used for the error curves"})

    def __post_init__(self) -> None:
        if self.method not in ALLOCATION_METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(ALLOCATION_METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r} is not one of {', '.join(BUDGETS)}")


def channel_cost(producers: list[np.ndarray], consumers: list[np.ndarray], positions: float, budget: str) -> float:
    """Return the parameters (or MACs per sample) that one hidden channel costs.

    A channel owns one row of every producer and one column of every consumer. For MACs,
    each weight is used once per output position; `positions` is the number of rows per
    sample at the tap, and producers are assumed to run at the same resolution.
    """
    weights = sum(int(np.prod(p.shape[1:])) for p in producers)
    weights += sum(c.shape[0] * int(np.prod(c.shape[2:])) for c in consumers)
    return float(weights if budget == "params" else weights * positions)


@register
class Allocate(Pass):
    name = "allocate"
    summary = "Choose every group's kept width under one parameter or MAC budget."
    Options = AllocateOptions

    def run(self, state: CompressionState) -> PassResult:
        options = self.options
        needs_stats = options.method != "uniform" or options.budget == "macs"
        state.require(
            "Gram statistics", not needs_stats or bool(state.stats) or not state.groups, self.name,
            "Run 'calibrate' before 'allocate'.",
        )  # fmt: skip
        samples = len(state.calibration) if state.calibration is not None else 1
        records = [self._describe(state, group, samples) for group in state.groups]
        if not records:
            return PassResult(False, {"groups": 0})
        widths = allocate_widths(records, options.sparsity, options.method)
        state.widths = {group.name: width for group, width in zip(state.groups, widths)}
        kept = sum(w * r.cost_per_channel for w, r in zip(widths, records))
        total = sum(r.width * r.cost_per_channel for r in records)
        return PassResult(False, {"method": options.method, "budget_removed": 1.0 - kept / total, "widths": widths})

    def _describe(self, state: CompressionState, group, samples: int) -> AllocationGroup:
        producers = state.frontend.producer_weights(group)
        consumers = state.frontend.consumer_weights(group)
        stats = state.stats.get(group.name)
        positions = stats.count / max(samples, 1) if stats is not None else 1.0
        cost = channel_cost(producers, consumers, positions, self.options.budget)
        # A floor of a tenth of the width keeps a global allocation from emptying a group,
        # which the error curves of late layers otherwise invite.
        floor = max(1, round(0.1 * group.width))
        if self.options.method == "flap":
            scores = flap_scores(stats.gram, stats.sums, stats.count, consumers)
            return AllocationGroup(group.width, cost, scores=scores, min_width=floor)
        if self.options.method == "error":
            order = np.argsort(-wanda_scores(stats.gram, consumers), kind="stable")
            curve = error_curve(stats.gram, consumers, order, self.options.alpha, widths=np.arange(group.width + 1))
            energy = float(np.trace(output_energy_matrix(consumers) @ stats.gram))
            return AllocationGroup(group.width, cost, error_curve=curve, error_scale=energy, min_width=floor)
        return AllocationGroup(group.width, cost, min_width=floor)
