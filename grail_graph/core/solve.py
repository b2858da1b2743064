"""Closed-form consumer compensation for removed or merged hidden channels.

Notation: a hidden tap of width H has calibration activations X (n, H) and the
raw Gram matrix G = X^T X (H, H). A consumer weight W has canonical shape
(O, H, *rest). Keeping the channels P (K of them) and reconstructing the full
activation as X ~ X_P B^T gives the ridge least-squares map

    B = G[:, P] (G[P, P] + lam I)^-1                      (H, K)

with lam = alpha * mean(diag(G[P, P])). The compensated consumer is W B,
contracted over the H axis. Merging channels with an averaging matrix R (K, H)
instead of selecting them gives

    B = G R^T (R G R^T + lam I)^-1                        (H, K)

with lam = alpha * mean(diag(R G R^T)). Because lam scales with G, scaling G by
a positive constant leaves B unchanged. All solves run in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)

__all__ = [
    "absorb",
    "averaging_matrix",
    "fold_map",
    "output_energy_matrix",
    "prune_map",
    "reconstruction_error",
    "relative_reconstruction_error",
    "ridge_lambda",
    "slice_map",
    "solve_spd",
]

# Jitter factors, relative to mean(|diag(a)|), tried in order after a failed Cholesky.
_JITTER_FACTORS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
_MIN_ABSOLUTE_JITTER = 1e-12


def _as_gram(gram: np.ndarray) -> np.ndarray:
    """Validate a Gram matrix and return it as float64, shape (H, H)."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square 2-D matrix, got shape {gram.shape}")
    if not np.all(np.isfinite(gram)):
        raise ValueError("gram contains non-finite values (NaN or inf)")
    return gram


def _as_keep(
    keep: Sequence[int] | np.ndarray, width: int, name: str = "keep"
) -> np.ndarray:
    """Validate unique channel indices for width H and return them as int64, shape (K,).

    name is the argument name used in error messages.
    """
    keep = np.asarray(keep)
    if keep.size == 0:
        return np.zeros(0, dtype=np.int64)
    if keep.ndim != 1 or keep.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a 1-D array of integer indices, got dtype {keep.dtype} "
            f"and shape {keep.shape}"
        )
    keep = keep.astype(np.int64)
    out_of_range = keep[(keep < 0) | (keep >= width)]
    if out_of_range.size:
        raise ValueError(
            f"{name} indices must lie in [0, {width}), got {out_of_range.tolist()}"
        )
    if np.unique(keep).size != keep.size:
        raise ValueError(f"{name} indices must be unique, got {keep.tolist()}")
    return keep


def _consumer_matrix(weight: np.ndarray) -> np.ndarray:
    """Reshape a consumer weight (O, H, *rest) to float64 (O * prod(rest), H)."""
    weight = np.asarray(weight)
    if weight.ndim < 2:
        raise ValueError(
            f"consumer weight must have shape (O, H, *rest), got {weight.shape}"
        )
    width = weight.shape[1]
    return np.moveaxis(weight, 1, -1).reshape(-1, width).astype(np.float64)


def ridge_lambda(gram_kept: np.ndarray, alpha: float) -> float:
    """Compute the ridge term alpha * mean(diag(gram_kept)) for a (K, K) Gram block.

    Returns 0.0 for K = 0. Raises ValueError for a negative or non-finite alpha.
    """
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite value >= 0, got {alpha!r}")
    diagonal = np.diagonal(np.asarray(gram_kept, dtype=np.float64))
    if diagonal.size == 0:
        return 0.0
    return float(alpha * diagonal.mean())


def _cholesky_solve(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a x = rhs through a Cholesky factor, a (K, K), rhs (K, ...).

    Raises np.linalg.LinAlgError when a is not numerically positive definite,
    including when the smallest pivot squared is below K * eps * max(diag(a)).
    Rounding lets Cholesky succeed on some singular matrices, and the solve
    would then amplify that rounding noise.
    """
    factor = np.linalg.cholesky(a)
    min_pivot_squared = np.min(np.diagonal(factor)) ** 2
    tolerance = a.shape[0] * np.finfo(np.float64).eps * np.max(np.diagonal(a))
    if min_pivot_squared <= tolerance:
        raise np.linalg.LinAlgError("matrix is numerically singular")
    # Two triangular solves; np.linalg.solve would factor the triangle again (LU).
    return scipy.linalg.cho_solve((factor, True), rhs, check_finite=False)


def _pinv_solve(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a x = rhs with the eigendecomposition pseudo-inverse of symmetric a (K, K).

    Eigenvalues at or below K * eps * max(|eigenvalue|) are dropped. This
    includes the small negative ones that rounding produces for a PSD matrix.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(a)
    threshold = a.shape[0] * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
    significant = eigenvalues > threshold
    basis = eigenvectors[:, significant]
    projected = basis.T @ rhs.reshape(a.shape[0], -1)
    solution = basis @ (projected / eigenvalues[significant, None])
    return solution.reshape(rhs.shape)


def solve_spd(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a x = rhs for symmetric positive semi-definite a (K, K), rhs (K,) or (K, M).

    Returns x with the shape of rhs, in float64. Tries a plain Cholesky solve,
    then Cholesky of a + jitter I with jitter from 1e-10 up to 1e-4 times
    mean(|diag(a)|) (at least 1e-12), then the eigendecomposition
    pseudo-inverse. Each fallback logs a warning.
    """
    a = _as_gram(a)
    rhs = np.asarray(rhs, dtype=np.float64)
    size = a.shape[0]
    if rhs.ndim not in (1, 2) or rhs.shape[0] != size:
        raise ValueError(
            f"rhs must have shape ({size},) or ({size}, M), got {rhs.shape}"
        )
    if not np.all(np.isfinite(rhs)):
        raise ValueError("rhs contains non-finite values (NaN or inf)")
    if size == 0:
        return np.zeros(rhs.shape, dtype=np.float64)

    try:
        return _cholesky_solve(a, rhs)
    except np.linalg.LinAlgError:
        pass

    scale = float(np.mean(np.abs(np.diagonal(a))))
    identity = np.eye(size)
    for factor in _JITTER_FACTORS:
        jitter = max(factor * scale, _MIN_ABSOLUTE_JITTER)
        try:
            solution = _cholesky_solve(a + jitter * identity, rhs)
        except np.linalg.LinAlgError:
            continue
        logger.warning(
            "Cholesky of a %dx%d matrix failed, so it was solved with diagonal jitter %.3g",
            size, size, jitter,
        )
        return solution

    logger.warning(
        "Cholesky of a %dx%d matrix failed even with jitter %.3g, "
        "so the eigendecomposition pseudo-inverse is used",
        size, size, max(_JITTER_FACTORS[-1] * scale, _MIN_ABSOLUTE_JITTER),
    )
    return _pinv_solve(a, rhs)


def prune_map(
    gram: np.ndarray, keep: Sequence[int] | np.ndarray, alpha: float = 1e-3
) -> np.ndarray:
    """Compute B = G[:, P] (G[P, P] + lam I)^-1, shape (H, K), for kept channels P.

    gram is (H, H) and keep contains K unique indices in [0, H). Column i of B
    belongs to keep[i]. K = 0 returns an (H, 0) array.
    """
    gram = _as_gram(gram)
    width = gram.shape[0]
    keep = _as_keep(keep, width)
    if keep.size == 0:
        return np.zeros((width, 0), dtype=np.float64)

    kept_block = gram[np.ix_(keep, keep)]
    lam = ridge_lambda(kept_block, alpha)
    system = kept_block + lam * np.eye(keep.size)
    # B^T = (G[P, P] + lam I)^-1 G[P, :] because the system matrix is symmetric.
    return solve_spd(system, gram[:, keep].T).T


def slice_map(width: int, keep: Sequence[int] | np.ndarray) -> np.ndarray:
    """Build the 0/1 selection matrix (H, K) with B[keep[i], i] = 1 (no compensation)."""
    keep = _as_keep(keep, width)
    selection = np.zeros((width, keep.size), dtype=np.float64)
    selection[keep, np.arange(keep.size)] = 1.0
    return selection


def averaging_matrix(labels: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Build R (K, H) whose row c averages the channels with label c.

    labels has length H with integer values in [0, K). R[c, j] = 1/|c| when
    labels[j] == c. Raises ValueError if a cluster has no members.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} "
            f"and shape {labels.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"labels must lie in [0, {k}), got values from {labels.min()} to {labels.max()}"
        )

    sizes = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        raise ValueError(f"clusters {empty.tolist()} have no members")

    averaging = np.zeros((k, labels.size), dtype=np.float64)
    averaging[labels, np.arange(labels.size)] = 1.0 / sizes[labels]
    return averaging


def fold_map(gram: np.ndarray, r: np.ndarray, alpha: float = 1e-3) -> np.ndarray:
    """Compute B = G R^T (R G R^T + lam I)^-1, shape (H, K), for merge matrix R (K, H)."""
    gram = _as_gram(gram)
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != gram.shape[0]:
        raise ValueError(
            f"r must have shape (K, {gram.shape[0]}), got {r.shape}"
        )
    if r.shape[0] == 0:
        return np.zeros((gram.shape[0], 0), dtype=np.float64)

    cross = gram @ r.T
    reduced = r @ cross
    lam = ridge_lambda(reduced, alpha)
    system = reduced + lam * np.eye(r.shape[0])
    return solve_spd(system, cross.T).T


def absorb(weight: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Contract a consumer weight (O, H, *rest) with B (H, K) into (O, K, *rest).

    The product is computed in float64 and returned in the weight's dtype.
    """
    weight = np.asarray(weight)
    b = np.asarray(b, dtype=np.float64)
    if weight.ndim < 2:
        raise ValueError(
            f"consumer weight must have shape (O, H, *rest), got {weight.shape}"
        )
    if b.ndim != 2 or b.shape[0] != weight.shape[1]:
        raise ValueError(
            f"b must have shape ({weight.shape[1]}, K) to match weight {weight.shape}, "
            f"got {b.shape}"
        )
    contracted = np.tensordot(weight.astype(np.float64), b, axes=([1], [0]))
    # tensordot puts the K axis last, so move it back to position 1.
    return np.moveaxis(contracted, -1, 1).astype(weight.dtype)


def output_energy_matrix(consumers: Sequence[np.ndarray]) -> np.ndarray:
    """Compute M = sum over consumers of W_mat^T W_mat, (H, H) float64.

    W_mat is the consumer (O, H, *rest) reshaped to (O * prod(rest), H).
    Raises ValueError for no consumers or consumers of different H.
    """
    if len(consumers) == 0:
        raise ValueError("at least one consumer weight is required")
    matrices = [_consumer_matrix(weight) for weight in consumers]
    widths = sorted({matrix.shape[1] for matrix in matrices})
    if len(widths) != 1:
        raise ValueError(f"consumer weights disagree on the hidden width H: {widths}")

    energy = np.zeros((widths[0], widths[0]), dtype=np.float64)
    for matrix in matrices:
        energy += matrix.T @ matrix
    return energy


def reconstruction_error(
    gram: np.ndarray,
    consumers: Sequence[np.ndarray],
    b: np.ndarray,
    keep: Sequence[int] | np.ndarray,
) -> float:
    """Compute the calibration output error of compensated consumers from G alone.

    The error is the sum over consumers of ||X W_mat^T - X_P (W_mat B)^T||_F^2
    with W_mat (O * prod(rest), H) as in output_energy_matrix, b (H, K) and
    keep (K,). For a conv consumer this treats each kernel tap as its own
    per-pixel linear map. With M = sum W_mat^T W_mat it equals

        tr(M G) - 2 tr(M B G[P, :]) + tr(M B G[P, P] B^T).

    Rounding can make the expression slightly negative, so it is clamped at 0.
    """
    gram = _as_gram(gram)
    keep = _as_keep(keep, gram.shape[0])
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (gram.shape[0], keep.size):
        raise ValueError(
            f"b must have shape ({gram.shape[0]}, {keep.size}), got {b.shape}"
        )
    energy = output_energy_matrix(consumers)
    if energy.shape != gram.shape:
        raise ValueError(
            f"consumers have H = {energy.shape[0]} but gram has H = {gram.shape[0]}"
        )

    energy_b = energy @ b
    total = np.sum(energy * gram.T)
    cross = np.sum(energy_b * gram[keep, :].T)
    kept_block = gram[np.ix_(keep, keep)]
    quadratic = np.sum((energy_b @ kept_block) * b)
    return max(float(total - 2.0 * cross + quadratic), 0.0)


def relative_reconstruction_error(
    gram: np.ndarray,
    consumers: Sequence[np.ndarray],
    b: np.ndarray,
    keep: Sequence[int] | np.ndarray,
) -> float:
    """Compute reconstruction_error divided by tr(M G), the uncompressed output energy.

    Returns 0.0 when tr(M G) is 0.
    """
    gram = _as_gram(gram)
    total = float(np.sum(output_energy_matrix(consumers) * gram.T))
    if total <= 0.0:
        return 0.0
    return reconstruction_error(gram, consumers, b, keep) / total
