"""Per-group kept widths under one global compression budget.

A model has several channel groups, and removing a channel of group g saves
cost_per_channel[g] parameters or MACs. ``allocate_widths`` spreads a budget,
given as a fraction of the total channel cost, over the groups:

- "uniform" applies the same sparsity to every group (``kept_width``).
- "flap" standardises each group's FLAP fluctuation scores and removes the
  globally lowest channels, following FLAP (An et al., AAAI 2024).
- "error" removes channels greedily where the closed-form reconstruction
  error (``error_curve``) grows least per unit of cost.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .affine import _as_count, _as_sums
from .selectors import _consumer_column_energy, kept_width
from .solve import _as_gram, _as_keep, output_energy_matrix, ridge_lambda

__all__ = [
    "ALLOCATION_METHODS",
    "AllocationGroup",
    "allocate_widths",
    "error_curve",
    "flap_scores",
]

ALLOCATION_METHODS: tuple[str, ...] = ("uniform", "flap", "error")

# A Schur pivot at or below this fraction of max(diag(G)) means that the
# channel is a linear combination of the channels kept before it.
_PIVOT_TOLERANCE = 1e-12

# Relative slack on the cost budget, so that rounding in the running cost sum
# does not remove one channel too many.
_BUDGET_TOLERANCE = 1e-12


def flap_scores(
    gram: np.ndarray, sums: np.ndarray, count: int, consumers: Sequence[np.ndarray]
) -> np.ndarray:
    """Compute the FLAP fluctuation score of each channel, shape (H,).

    score[j] = Var(x_j) * sum over consumers of ||W[:, j, ...]||^2, where the
    biased variance over the n calibration rows, G[j, j] / n - (s[j] / n)^2,
    comes from gram (H, H), sums (H,) and count n. Consumers are (O, H, *rest),
    and the squared norm runs over all outputs and kernel positions.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    sums = _as_sums("sums", sums, width)
    count = _as_count(count)
    mean = sums / count
    # Rounding can make the variance of a constant channel slightly negative.
    variance = np.maximum(np.diagonal(gram) / count - mean * mean, 0.0)
    return variance * _consumer_column_energy(consumers, width)


def _as_widths(widths: Sequence[int] | np.ndarray | None, maximum: int) -> np.ndarray:
    if widths is None:
        return np.arange(1, maximum + 1, dtype=np.int64)
    widths = np.asarray(widths)
    if widths.size == 0:
        return np.zeros(0, dtype=np.int64)
    if widths.ndim != 1 or widths.dtype.kind not in "iu":
        raise ValueError(
            f"widths must be a 1-D array of integers, got dtype {widths.dtype} "
            f"and shape {widths.shape}"
        )
    invalid = widths[(widths < 0) | (widths > maximum)]
    if invalid.size:
        raise ValueError(f"widths must lie in [0, {maximum}], got {invalid.tolist()}")
    return widths.astype(np.int64)


def error_curve(
    gram: np.ndarray,
    consumers: Sequence[np.ndarray],
    order: Sequence[int] | np.ndarray,
    alpha: float = 1e-3,
    widths: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Compute the relative compensated output error when keeping order[:K], shape (len(widths),).

    gram is (H, H), consumers are (O, H, *rest) and order ranks channels from
    most to least important (unique indices, possibly fewer than H). For
    each K in widths (default 1 .. len(order)), the value is

        reconstruction_error(G, consumers, B_K, order[:K]) / tr(M G)

    with B_K = G[:, P] (G[P, P] + lam I)^-1 and P = order[:K]. Pass
    widths=range(H + 1) to get the form that AllocationGroup.error_curve expects.
    Returns zeros when tr(M G) is 0.

    lam = alpha * mean(diag(G)) over all H channels is held fixed for every K,
    so one Cholesky factor of G[P, P] + lam I grows by a row per channel and
    the whole curve costs O(H^3) instead of O(H^4). ``prune_map`` instead
    takes lam from the kept channels only, so for alpha > 0 the values differ
    slightly from that map's error. A channel whose Schur pivot is at or
    below 1e-12 * max(diag(G)) is a linear combination of the channels before
    it. It gets a zero column in B_K, as with a pseudo-inverse, so adding it
    leaves the error unchanged.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    order = _as_keep(order, width, name="order")
    widths = _as_widths(widths, order.size)
    lam = ridge_lambda(gram, alpha)
    energy = output_energy_matrix(consumers)
    if energy.shape != gram.shape:
        raise ValueError(f"consumers have H = {energy.shape[0]} but gram has H = {width}")

    total = float(np.sum(energy * gram.T))
    if widths.size == 0 or total <= 0.0:
        return np.zeros(widths.size, dtype=np.float64)
    errors = _error_by_prefix(gram, energy, order[: int(widths.max())], lam) / total
    return np.maximum(errors[widths], 0.0)


def _error_by_prefix(
    gram: np.ndarray, energy: np.ndarray, order: np.ndarray, lam: float
) -> np.ndarray:
    """Compute the absolute error for K = 0 .. len(order) kept channels, shape (len(order) + 1,).

    With A = G[P, P] + lam I = L L^T, C = G[:, P], Z = C L^-T and B = C A^-1 = Z L^-1,
    the error tr(M G) - 2 tr(M B G[P, :]) + tr(M B G[P, P] B^T) simplifies to

        tr(M G) - tr(Z^T M Z) - lam tr(L^-T Z^T M Z L^-1)

    because G[P, P] = A - lam I. Adding a channel appends one row to L, one
    row to L^-1 and one column to Z and leaves the rest unchanged, so both
    traces update in O(H K + K^2 + H^2) per channel.
    """
    width = gram.shape[0]
    steps = order.size
    energy_total = float(np.sum(energy * gram.T))
    tolerance = _PIVOT_TOLERANCE * float(np.max(np.diagonal(gram)))

    # Row i of z_rows is column i of Z, so that the active block is contiguous.
    z_rows = np.zeros((steps, width), dtype=np.float64)
    inverse_factor = np.zeros((steps, steps), dtype=np.float64)
    active = np.zeros(steps, dtype=np.int64)
    size = 0
    schur_energy = 0.0
    ridge_energy = 0.0

    errors = np.empty(steps + 1, dtype=np.float64)
    errors[0] = energy_total
    for step, channel in enumerate(order):
        inverse_block = inverse_factor[:size, :size]
        coupling = gram[active[:size], channel]
        projected = inverse_block @ coupling
        pivot_squared = gram[channel, channel] + lam - projected @ projected
        if pivot_squared <= tolerance:
            errors[step + 1] = errors[step]
            continue

        # New row of L is [projected, pivot], and new row of L^-1 is
        # [-solved / pivot, 1 / pivot] with solved = A^-1 G[P, channel].
        pivot = np.sqrt(pivot_squared)
        solved = inverse_block.T @ projected
        column = (gram[:, channel] - z_rows[:size].T @ projected) / pivot
        energy_column = energy @ column
        column_energy = float(column @ energy_column)
        coupling_energy = z_rows[:size] @ energy_column
        new_row_product = -(inverse_block @ solved) / pivot

        schur_energy += column_energy
        ridge_energy += (
            2.0 * float(coupling_energy @ new_row_product)
            + column_energy * (float(solved @ solved) + 1.0) / pivot_squared
        )
        z_rows[size] = column
        inverse_factor[size, :size] = -solved / pivot
        inverse_factor[size, size] = 1.0 / pivot
        active[size] = channel
        size += 1
        errors[step + 1] = energy_total - schur_energy - lam * ridge_energy
    return errors


@dataclass
class AllocationGroup:
    """Compression inputs of one channel group for ``allocate_widths``.

    width is H. cost_per_channel is the parameter or MAC count saved by
    removing one channel (default 1, which makes the budget a channel count).
    scores (H,) are FLAP scores, needed by the "flap" method. error_curve
    (H + 1,) contains the relative error at K = 0 .. H kept channels, needed by
    the "error" method. error_scale converts that curve to an absolute error,
    so pass the group's output energy tr(M G). min_width is the smallest
    allowed kept width, in [1, H].
    """

    width: int
    cost_per_channel: float = 1.0
    scores: np.ndarray | None = None
    error_curve: np.ndarray | None = None
    min_width: int = 1
    error_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or int(self.width) != self.width or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")
        self.width = int(self.width)
        if not np.isfinite(self.cost_per_channel) or self.cost_per_channel <= 0:
            raise ValueError(
                f"cost_per_channel must be a finite value > 0, got {self.cost_per_channel!r}"
            )
        if (
            isinstance(self.min_width, bool) or int(self.min_width) != self.min_width
            or not 1 <= self.min_width <= self.width
        ):
            raise ValueError(
                f"min_width must be an integer in [1, {self.width}], got {self.min_width!r}"
            )
        self.min_width = int(self.min_width)
        if not np.isfinite(self.error_scale) or self.error_scale < 0:
            raise ValueError(f"error_scale must be a finite value >= 0, got {self.error_scale!r}")
        if self.scores is not None:
            self.scores = self._as_vector("scores", self.scores, self.width)
        if self.error_curve is not None:
            self.error_curve = self._as_vector("error_curve", self.error_curve, self.width + 1)

    @staticmethod
    def _as_vector(name: str, values: np.ndarray, size: int) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        return values


def _standardise(scores: np.ndarray) -> np.ndarray:
    """Subtract the mean and divide by the std. A group of equal scores becomes all 0."""
    std = scores.std()
    if std <= 0.0:
        return np.zeros_like(scores)
    return (scores - scores.mean()) / std


def _allocate_flap(groups: Sequence[AllocationGroup], target: float, slack: float) -> list[int]:
    missing = [index for index, group in enumerate(groups) if group.scores is None]
    if missing:
        raise ValueError(f"method 'flap' needs scores for every group, missing for groups {missing}")

    standardised = np.concatenate([_standardise(group.scores) for group in groups])
    owners = np.concatenate(
        [np.full(group.width, index) for index, group in enumerate(groups)]
    )
    kept_widths = [group.width for group in groups]
    removed = 0.0
    # The stable sort breaks ties by group order, then by channel index.
    for position in np.argsort(standardised, kind="stable"):
        if removed >= target - slack:
            break
        owner = int(owners[position])
        if kept_widths[owner] > groups[owner].min_width:
            kept_widths[owner] -= 1
            removed += groups[owner].cost_per_channel
    return kept_widths


def _allocate_by_error(
    groups: Sequence[AllocationGroup], target: float, slack: float
) -> list[int]:
    missing = [index for index, group in enumerate(groups) if group.error_curve is None]
    if missing:
        raise ValueError(
            f"method 'error' needs error_curve for every group, missing for groups {missing}"
        )

    def marginal_cost(index: int, width: int) -> float:
        group = groups[index]
        increase = group.error_curve[width - 1] - group.error_curve[width]
        return group.error_scale * increase / group.cost_per_channel

    kept_widths = [group.width for group in groups]
    # One heap entry per group, for the removal of its next channel. Ties go to
    # the lower group index.
    heap = [
        (marginal_cost(index, group.width), index)
        for index, group in enumerate(groups)
        if group.width > group.min_width
    ]
    heapq.heapify(heap)
    removed = 0.0
    # NOTE: greedy removal is optimal only for convex error curves. A curve that
    # rises steeply for the first removed channel and then flattens can end up
    # pruned less than an exact knapsack solution would prune it.
    while heap and removed < target - slack:
        _, index = heapq.heappop(heap)
        kept_widths[index] -= 1
        removed += groups[index].cost_per_channel
        if kept_widths[index] > groups[index].min_width:
            heapq.heappush(heap, (marginal_cost(index, kept_widths[index]), index))
    return kept_widths


def allocate_widths(
    groups: Sequence[AllocationGroup], budget_fraction: float, method: str
) -> list[int]:
    """Choose the kept width of every group so that a fraction of the total cost is removed.

    The total cost is the sum of width * cost_per_channel over the groups.
    "flap" and "error" remove one channel at a time until the removed cost
    reaches budget_fraction of the total, so they overshoot it by less than
    one channel's cost, and they never go below min_width. "uniform" returns
    max(kept_width(H, budget_fraction), min_width) per group, whose removed
    cost can miss the budget by the rounding of each group. Returns the kept
    widths in the order of groups. Raises ValueError for an unknown method,
    a budget_fraction outside [0, 1), missing scores or curves, or a budget
    larger than the cost removable above the min_width of every group.
    """
    if method not in ALLOCATION_METHODS:
        raise ValueError(
            f"unknown allocation method {method!r}. "
            f"Valid methods: {', '.join(ALLOCATION_METHODS)}"
        )
    if len(groups) == 0:
        raise ValueError("at least one group is required")
    for index, group in enumerate(groups):
        if not isinstance(group, AllocationGroup):
            raise TypeError(
                f"groups[{index}] must be an AllocationGroup, got {type(group).__name__}"
            )
    if not 0.0 <= budget_fraction < 1.0:
        raise ValueError(f"budget_fraction must lie in [0, 1), got {budget_fraction!r}")

    if method == "uniform":
        return [max(kept_width(group.width, budget_fraction), group.min_width) for group in groups]

    total = sum(group.width * group.cost_per_channel for group in groups)
    target = budget_fraction * total
    removable = sum((group.width - group.min_width) * group.cost_per_channel for group in groups)
    slack = _BUDGET_TOLERANCE * total
    if target > removable + slack:
        raise ValueError(
            f"budget_fraction {budget_fraction} needs a removed cost of {target:.6g}, but the "
            f"min_width of the groups allows at most {removable:.6g} "
            f"(fraction {removable / total:.4f}). Lower the budget or the min_width values."
        )

    if method == "flap":
        return _allocate_flap(groups, target, slack)
    return _allocate_by_error(groups, target, slack)
