"""Choice of the hidden channels to keep in one group of width H.

Every selector returns the kept channel indices as a sorted int64 array of
shape (K,). The "gram" selector is output-aware: with M = sum W_mat^T W_mat
over the consumers and the Schur complement S = G - G[:, P] G[P, P]^-1 G[P, :]
of the channels P kept so far, adding channel j lowers the closed-form output
error tr(M S) by (S[:, j]^T M S[:, j]) / S[j, j]. It adds the channel with
the largest drop at each step, which is a pivoted Cholesky of G weighted by M.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .solve import _as_gram, output_energy_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "SELECTORS",
    "gram_greedy_select",
    "kept_width",
    "magnitude_scores",
    "random_select",
    "select_channels",
    "select_units",
    "top_k",
    "wanda_scores",
]

SELECTORS: tuple[str, ...] = ("magnitude", "wanda", "gram", "random")

# Pivots at or below this fraction of max(diag(G)) count as numerically zero.
_PIVOT_TOLERANCE = 1e-12


def _check_k(k: int, width: int) -> int:
    if int(k) != k or not 0 <= k <= width:
        raise ValueError(f"k must be an integer in [0, {width}], got {k!r}")
    return int(k)


def kept_width(width: int, sparsity: float, multiple: int = 1) -> int:
    """Compute the number K of channels kept out of width at a given sparsity.

    Rounding rule: floor(sparsity * width + 0.5) channels are removed (round
    half up), and K = width - removed is clamped to [1, width]. If multiple > 1
    and width >= multiple, K is then rounded half up to the nearest multiple
    of `multiple` within [multiple, width]. If width < multiple, K stays as is.
    Raises ValueError unless 0 <= sparsity < 1, width >= 1 and multiple >= 1.
    """
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")

    removed = int(np.floor(sparsity * width + 0.5))
    kept_count = min(max(width - removed, 1), width)
    if multiple == 1 or width < multiple:
        return kept_count

    rounded = int(np.floor(kept_count / multiple + 0.5)) * multiple
    largest = (width // multiple) * multiple
    return min(max(rounded, multiple), largest)


def magnitude_scores(producers: Sequence[np.ndarray]) -> np.ndarray:
    """Score each channel by the L2 norm of its producer rows, shape (H,).

    producers are arrays (H, *rest). The norm runs over all of them together,
    so it is the square root of the summed squares across producers.
    """
    if len(producers) == 0:
        raise ValueError("at least one producer weight is required")
    shapes = [np.shape(weight) for weight in producers]
    if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        raise ValueError(
            f"producer weights must share the leading hidden axis H, got shapes {shapes}"
        )

    width = shapes[0][0]
    squares = np.zeros(width, dtype=np.float64)
    for weight in producers:
        rows = np.asarray(weight, dtype=np.float64).reshape(width, -1)
        squares += np.sum(rows * rows, axis=1)
    return np.sqrt(squares)


def _consumer_column_energy(consumers: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Sum over consumers of ||W[:, j, ...]||^2 for each channel j, shape (H,)."""
    if len(consumers) == 0:
        raise ValueError("at least one consumer weight is required")
    energy = np.zeros(width, dtype=np.float64)
    for weight in consumers:
        weight = np.asarray(weight, dtype=np.float64)
        if weight.ndim < 2 or weight.shape[1] != width:
            raise ValueError(
                f"consumer weight must have shape (O, {width}, *rest), got {weight.shape}"
            )
        columns = np.moveaxis(weight, 1, -1).reshape(-1, width)
        energy += np.sum(columns * columns, axis=0)
    return energy


def wanda_scores(gram: np.ndarray, consumers: Sequence[np.ndarray]) -> np.ndarray:
    """Score channels by structured Wanda, shape (H,).

    score[j] = sqrt(sum over consumers of ||W[:, j, ...]||^2) * sqrt(max(G[j, j], 0)),
    the consumer column norm times the activation norm.
    """
    gram = _as_gram(gram)
    column_energy = _consumer_column_energy(consumers, gram.shape[0])
    activation_norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    return np.sqrt(column_energy) * activation_norms


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the indices of the k largest scores, sorted ascending, shape (k,).

    Ties go to the lower index. Raises ValueError for NaN scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.any(np.isnan(scores)):
        raise ValueError("scores contain NaN")
    k = _check_k(k, scores.size)
    # A stable sort of the negated scores keeps lower indices first among ties.
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def random_select(width: int, k: int, seed: int = 0) -> np.ndarray:
    """Pick k of width channels uniformly without replacement, sorted, shape (k,)."""
    k = _check_k(k, width)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(width, size=k, replace=False)).astype(np.int64)


def _greedy_pivots(gram: np.ndarray, energy: np.ndarray, k: int) -> list[int]:
    """Run up to k steps of M-weighted pivoted Cholesky on G, both (H, H).

    Step t picks the channel j that maximises S[:, j]^T M S[:, j] / S[j, j], where
    S = G - L L^T is the Schur complement after the t columns of the Cholesky factor L
    chosen so far. S is never formed: with Q = G M L and R = L^T M L,

        S[:, j]^T M S[:, j] = (G M G)[j, j] - 2 Q[j] . L[j] + L[j] R L[j]^T,

    and both per-channel terms grow by one product per new column of L. Each step costs
    O(H t) after the O(H^3) product G M G, instead of the O(H^2) of downdating S and M S.
    Stops early when every remaining pivot is numerically zero.
    """
    width = gram.shape[0]
    energy_gram = energy @ gram
    gram_energy_gram = gram @ energy_gram
    limit = min(k, width)
    factor = np.zeros((width, limit))  # L, one column per chosen channel
    energy_factor = np.zeros((width, limit))  # M L
    cross = np.zeros(width)  # Q[j] . L[j]
    quadratic = np.zeros(width)  # L[j] R L[j]^T
    pivots = np.diagonal(gram).copy()
    base = np.diagonal(gram_energy_gram)
    gram_energy_factor = np.zeros((width, limit))  # Q = G M L
    tolerance = _PIVOT_TOLERANCE * float(np.max(np.diagonal(gram)))
    available = np.ones(width, dtype=bool)
    selected: list[int] = []

    for step in range(limit):
        candidates = np.flatnonzero(available & (pivots > tolerance))
        if candidates.size == 0:
            break
        drops = base[candidates] - 2.0 * cross[candidates] + quadratic[candidates]
        best = int(candidates[np.argmax(drops / pivots[candidates])])
        selected.append(best)
        available[best] = False

        # New column l = S[:, best] / sqrt(S[best, best]), and M l and G M l from the same rows.
        row = factor[best, :step]
        scale = 1.0 / np.sqrt(pivots[best])
        column = (gram[:, best] - factor[:, :step] @ row) * scale
        energy_column = (energy_gram[:, best] - energy_factor[:, :step] @ row) * scale
        gram_energy_column = (gram_energy_gram[:, best] - gram_energy_factor[:, :step] @ row) * scale
        # R grows by r = L^T M l and rho = l^T M l.
        r = factor[:, :step].T @ energy_column
        rho = float(column @ energy_column)
        quadratic += 2.0 * column * (factor[:, :step] @ r) + rho * column**2
        cross += gram_energy_column * column
        pivots -= column**2
        factor[:, step] = column
        energy_factor[:, step] = energy_column
        gram_energy_factor[:, step] = gram_energy_column
    return selected


def gram_greedy_select(
    gram: np.ndarray, consumers: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """Select k channels greedily by the drop in output reconstruction error, shape (k,).

    gram is (H, H) and consumers are (O, H, *rest). Channels whose Schur
    pivot is at or below 1e-12 * max(diag(G)) are never picked by the greedy
    step. If all remaining pivots are numerically zero before k channels are
    chosen, the rest are filled by the largest Wanda score. O(H^3) overall.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    k = _check_k(k, width)
    energy = output_energy_matrix(consumers)
    if energy.shape != gram.shape:
        raise ValueError(
            f"consumers have H = {energy.shape[0]} but gram has H = {width}"
        )

    if k == 0:
        return np.zeros(0, dtype=np.int64)

    selected = _greedy_pivots(gram, energy, k)
    missing = k - len(selected)
    if missing > 0:
        logger.info(
            "greedy selection found only %d of %d channels with a non-zero pivot, "
            "so %d are filled by Wanda score",
            len(selected), k, missing,
        )
        scores = wanda_scores(gram, consumers)
        scores[selected] = -np.inf
        selected.extend(top_k(scores, missing).tolist())
    return np.sort(np.asarray(selected, dtype=np.int64))


def _infer_width(
    gram: np.ndarray | None,
    producers: Sequence[np.ndarray],
    consumers: Sequence[np.ndarray],
) -> int:
    if gram is not None:
        return int(np.shape(gram)[0])
    if len(producers):
        return int(np.shape(producers[0])[0])
    if len(consumers):
        return int(np.shape(consumers[0])[1])
    raise ValueError(
        "random selection needs the hidden width: pass gram, producers or consumers"
    )


def select_channels(
    method: str,
    k: int,
    *,
    gram: np.ndarray | None = None,
    producers: Sequence[np.ndarray] = (),
    consumers: Sequence[np.ndarray] = (),
    seed: int = 0,
) -> np.ndarray:
    """Select k channels with the named method, returning sorted indices, shape (k,).

    method is one of SELECTORS. "magnitude" needs producers, "wanda" and
    "gram" need gram and consumers, and "random" needs any one input that
    fixes the width H. Raises ValueError for an unknown method or a missing input.
    """
    if method not in SELECTORS:
        raise ValueError(
            f"unknown selection method {method!r}. Valid methods: {', '.join(SELECTORS)}"
        )
    if method == "random":
        return random_select(_infer_width(gram, producers, consumers), k, seed)
    if method == "magnitude":
        if len(producers) == 0:
            raise ValueError("method 'magnitude' needs producers, but none were given")
        return top_k(magnitude_scores(producers), k)

    if gram is None or len(consumers) == 0:
        raise ValueError(f"method {method!r} needs both gram and consumers")
    if method == "wanda":
        return top_k(wanda_scores(gram, consumers), k)
    return gram_greedy_select(gram, consumers, k)


def _unit_scores(
    method: str,
    gram: np.ndarray | None,
    producers: Sequence[np.ndarray],
    consumers: Sequence[np.ndarray],
    unit: int,
) -> np.ndarray:
    """Sum the per-channel magnitude or Wanda scores over each unit, shape (H // unit,)."""
    if method == "magnitude":
        if len(producers) == 0:
            raise ValueError("method 'magnitude' needs producers, but none were given")
        scores = magnitude_scores(producers)
    else:
        if gram is None or len(consumers) == 0:
            raise ValueError(f"method {method!r} needs both gram and consumers")
        scores = wanda_scores(gram, consumers)
    return scores.reshape(-1, unit).sum(axis=1)


def _greedy_units(
    gram: np.ndarray, consumers: Sequence[np.ndarray], unit: int, capacity: np.ndarray
) -> list[int]:
    """Pick units by block pivoted Cholesky of G weighted by M, at most capacity[b] per block b.

    Adding unit u (channels U) lowers the output error tr(M S) by
    tr(S[U, U]^-1 S[:, U]^T M S[:, U]). Units whose Schur block is numerically zero
    are skipped; the caller fills what is left.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    energy = output_energy_matrix(consumers)
    if energy.shape != gram.shape:
        raise ValueError(f"consumers have H = {energy.shape[0]} but gram has H = {width}")
    units = width // unit
    per_block = units // len(capacity)
    capacity = capacity.copy()
    schur = gram.copy()
    energy_schur = energy @ schur
    tolerance = _PIVOT_TOLERANCE * float(np.max(np.diagonal(gram)))
    available = np.ones(units, dtype=bool)
    selected: list[int] = []
    while np.any(available):
        best, best_gain, best_factor = -1, 0.0, None
        for candidate in np.flatnonzero(available):
            if capacity[candidate // per_block] == 0:
                continue
            channels = slice(candidate * unit, (candidate + 1) * unit)
            block = schur[channels, channels]
            if np.trace(block) <= tolerance * unit:
                continue
            try:
                factor = np.linalg.cholesky(block + tolerance * np.eye(unit))
            except np.linalg.LinAlgError:
                continue
            # tr(B^-1 C^T M C) with C = S[:, U] and M C = (M S)[:, U].
            solved = np.linalg.solve(factor, energy_schur[:, channels].T @ schur[:, channels])
            gain = float(np.trace(np.linalg.solve(factor, solved.T)))
            if gain > best_gain:
                best, best_gain, best_factor = candidate, gain, factor
        if best < 0:
            break
        channels = slice(best * unit, (best + 1) * unit)
        column = np.linalg.solve(best_factor, schur[:, channels].T).T
        energy_column = np.linalg.solve(best_factor, energy_schur[:, channels].T).T
        schur -= column @ column.T
        energy_schur -= energy_column @ column.T
        available[best] = False
        capacity[best // per_block] -= 1
        selected.append(int(best))
    return selected


def select_units(
    method: str,
    units_per_block: int,
    unit: int,
    *,
    blocks: int = 1,
    gram: np.ndarray | None = None,
    producers: Sequence[np.ndarray] = (),
    consumers: Sequence[np.ndarray] = (),
    seed: int = 0,
) -> np.ndarray:
    """Select whole units of `unit` consecutive channels, returning sorted channel indices.

    The H channels form H // unit units, and the units form `blocks` equal runs of
    consecutive units. Every block keeps `units_per_block` units, so the result has
    shape (blocks * units_per_block * unit,). "magnitude" and "wanda" score a unit by
    the sum of its channels' scores, "gram" extends the greedy selector to blocks of
    channels, and "random" draws units. Attention heads are units of head-size channels,
    and the query heads that share one key/value head are a block.
    """
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}. Valid methods: {', '.join(SELECTORS)}")
    width = _infer_width(gram, producers, consumers)
    if unit < 1 or blocks < 1 or width % (unit * blocks):
        raise ValueError(f"width {width} is not a whole number of {blocks} blocks of units of {unit} channels")
    units = width // unit
    per_block = units // blocks
    _check_k(units_per_block, per_block)

    if method == "random":
        rng = np.random.default_rng(seed)
        chosen = [block * per_block + rng.choice(per_block, units_per_block, replace=False) for block in range(blocks)]
        kept = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    elif method == "gram":
        if gram is None or len(consumers) == 0:
            raise ValueError("method 'gram' needs both gram and consumers")
        capacity = np.full(blocks, units_per_block)
        kept = np.asarray(_greedy_units(gram, consumers, unit, capacity), dtype=np.int64)
        if len(kept) < blocks * units_per_block:
            # Blocks whose remaining units are numerically zero are filled by Wanda score.
            scores = _unit_scores("wanda", gram, producers, consumers, unit)
            scores[kept] = -np.inf
            kept = np.concatenate([kept, _top_per_block(scores, per_block, units_per_block, kept)])
    else:
        scores = _unit_scores(method, gram, producers, consumers, unit)
        kept = _top_per_block(scores, per_block, units_per_block, np.zeros(0, dtype=np.int64))
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    return (kept[:, None] * unit + np.arange(unit)).reshape(-1)


def _top_per_block(scores: np.ndarray, per_block: int, units_per_block: int, taken: np.ndarray) -> np.ndarray:
    """Return the best units of each block until it holds units_per_block, counting `taken`."""
    chosen = []
    for start in range(0, len(scores), per_block):
        missing = units_per_block - int(np.sum((taken >= start) & (taken < start + per_block)))
        if missing > 0:
            chosen.append(start + top_k(scores[start : start + per_block], missing))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
