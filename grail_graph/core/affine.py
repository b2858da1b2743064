"""Affine compensation: reconstruct the hidden vector from kept channels plus a constant.

With calibration rows h (H,) and kept channels h_P (K,), the map (b, c) minimises

    sum over rows of ||h - b h_P - c||^2 + lam ||b||_F^2

where lam = alpha * mean(diag(G[P, P])) penalises only b, never the constant c.
Stacking [b, c] gives the normal equations with the augmented Gram

    [[G[P, P] + lam I, s_P], [s_P^T, n]] [b, c]^T = [G[P, :], s^T]^T

where s (H,) are the per-channel sums and n is the row count. A consumer W
(O, H, *rest) then becomes W b (see ``solve.absorb``) plus the bias
``bias_correction(W, c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .solve import (
    _as_gram,
    _as_keep,
    output_energy_matrix,
    ridge_lambda,
    solve_spd,
)

__all__ = [
    "affine_prune_map",
    "affine_reconstruction_error",
    "bias_correction",
]


def _as_count(count: int) -> int:
    """Validate a row count, which must be a positive integer."""
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(
            f"count must be a positive integer (the number of calibration rows), got {count!r}"
        )
    return int(count)


def _as_sums(name: str, sums: np.ndarray, width: int) -> np.ndarray:
    """Validate per-channel sums of shape (width,) and return them as float64."""
    sums = np.asarray(sums, dtype=np.float64)
    if sums.shape != (width,):
        raise ValueError(f"{name} must have shape ({width},), got {sums.shape}")
    if not np.all(np.isfinite(sums)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return sums


def _solve_affine(
    cross: np.ndarray,
    source_gram: np.ndarray,
    target_sums: np.ndarray,
    source_sums: np.ndarray,
    count: int,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the ridge regression of a target (H,) on a source (K,) plus a constant.

    cross is X_target^T X_source (H, K), source_gram is X_source^T X_source
    (K, K), the sums are (H,) and (K,), and count is the number of rows.
    Inputs must already be validated float64 arrays. Returns b (H, K) and c (H,).

    NOTE: eliminating the constant centres the raw sums inside the solve, which
    loses about 2 * log10(|mean| / std) digits per channel. With fp64 sums,
    b and c stay near 1e-5 accurate up to |mean| / std of about 1e4.
    """
    width, size = cross.shape
    lam = ridge_lambda(source_gram, alpha)

    # The constant column is scaled by t, the root-mean-square source activation,
    # so that its diagonal entry n t^2 is on the scale of diag(G). Otherwise
    # n could dwarf diag(G) and the pivot test in solve_spd would drop the weights.
    mean_square = float(np.mean(np.diagonal(source_gram))) / count if size else 0.0
    scale = np.sqrt(mean_square) if mean_square > 0.0 else 1.0

    system = np.empty((size + 1, size + 1), dtype=np.float64)
    system[:size, :size] = source_gram + lam * np.eye(size)
    system[:size, size] = scale * source_sums
    system[size, :size] = scale * source_sums
    system[size, size] = scale * scale * count

    rhs = np.empty((size + 1, width), dtype=np.float64)
    rhs[:size] = cross.T
    rhs[size] = scale * target_sums

    solution = solve_spd(system, rhs)
    return solution[:size].T.copy(), scale * solution[size]


def affine_prune_map(
    gram: np.ndarray,
    sums: np.ndarray,
    count: int,
    keep: Sequence[int] | np.ndarray,
    alpha: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the affine compensation (b, c) with h ~= b @ h[keep] + c.

    gram is the raw Gram G (H, H), sums the per-channel sums (H,), count the
    number of rows n and keep the K kept channels. Returns b (H, K), whose
    column i belongs to keep[i], and c (H,). The ridge term alpha *
    mean(diag(G[P, P])) regularises b only. With K = 0, b is (H, 0) and c is
    the mean activation s / n. If sums is zero, c is zero and b equals
    ``prune_map(gram, keep, alpha)``.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    sums = _as_sums("sums", sums, width)
    count = _as_count(count)
    keep = _as_keep(keep, width)

    return _solve_affine(
        gram[:, keep], gram[np.ix_(keep, keep)], sums, sums[keep], count, alpha
    )


def bias_correction(weight: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Compute the consumer bias that absorbs a constant hidden offset c, shape (O,).

    weight is a consumer (O, H, *rest) and c is (H,). The result is the sum
    over the hidden axis and all kernel positions of W[o, h, ...] * c[h]. Add
    it to the consumer's bias, or use it as the bias if there is none. For a
    linear layer it is exact. For a convolution it is exact at every output
    whose receptive field lies inside the input. Where the field overlaps zero
    padding, the padded taps see 0 instead of c, so this bias over-corrects there.
    """
    weight = np.asarray(weight)
    c = np.asarray(c, dtype=np.float64)
    if weight.ndim < 2:
        raise ValueError(
            f"consumer weight must have shape (O, H, *rest), got {weight.shape}"
        )
    if c.shape != (weight.shape[1],):
        raise ValueError(
            f"c must have shape ({weight.shape[1]},) to match weight {weight.shape}, "
            f"got {c.shape}"
        )
    columns = np.moveaxis(weight.astype(np.float64), 1, -1)
    return (columns.reshape(weight.shape[0], -1, weight.shape[1]) @ c).sum(axis=1)


def affine_reconstruction_error(
    gram: np.ndarray,
    sums: np.ndarray,
    count: int,
    consumers: Sequence[np.ndarray],
    b: np.ndarray,
    c: np.ndarray,
    keep: Sequence[int] | np.ndarray,
) -> float:
    """Compute the calibration output error of an affine compensation from statistics alone.

    The error is the sum over consumers of ||X W_mat^T - (X_P b^T + 1 c^T) W_mat^T||_F^2,
    with W_mat (O * prod(rest), H) as in ``output_energy_matrix``, gram (H, H),
    sums (H,), b (H, K), c (H,) and keep (K,). As in
    ``solve.reconstruction_error``, each kernel tap counts as its own per-pixel
    map, so zero padding is ignored. Rounding can make the expression slightly
    negative, so it is clamped at 0.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    sums = _as_sums("sums", sums, width)
    count = _as_count(count)
    keep = _as_keep(keep, width)
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if b.shape != (width, keep.size):
        raise ValueError(f"b must have shape ({width}, {keep.size}), got {b.shape}")
    if c.shape != (width,):
        raise ValueError(f"c must have shape ({width},), got {c.shape}")
    energy = output_energy_matrix(consumers)
    if energy.shape != gram.shape:
        raise ValueError(
            f"consumers have H = {energy.shape[0]} but gram has H = {width}"
        )

    # With residual r = h - b h_P - c per row and M = sum W_mat^T W_mat, the
    # error is sum over rows of r^T M r, expanded into Gram and sum terms.
    energy_b = energy @ b
    energy_c = energy @ c
    kept_sums = sums[keep]
    total = np.sum(energy * gram.T)
    cross = np.sum(energy_b * gram[keep, :].T)
    quadratic = np.sum((energy_b @ gram[np.ix_(keep, keep)]) * b)
    offset = -2.0 * energy_c @ sums + 2.0 * energy_c @ (b @ kept_sums) + count * (c @ energy_c)
    return max(float(total - 2.0 * cross + quadratic + offset), 0.0)
