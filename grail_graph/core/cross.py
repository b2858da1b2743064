"""Cross statistics for compensation from a compressed prefix.

When the layers before a tap are already compressed, the consumer receives source
activations X_source (n, K) from the compressed network but should reproduce
the target activations X_target (n, H) of the original one. The ridge map
b (H, K) with h_target ~= b h_source then needs only

    cross = X_target^T X_source    (H, K)
    G_src = X_source^T X_source    (K, K)

    b = cross (G_src + lam I)^-1,  lam = alpha * mean(diag(G_src)).

When the source rows are the target rows restricted to the kept channels P,
cross = G[:, P] and G_src = G[P, P], so b equals ``prune_map(G, P, alpha)``.
"""

from __future__ import annotations

import numpy as np

from .affine import _as_count, _as_sums, _solve_affine
from .gram import _accumulation_dtype, _check_finite, _read_only
from .solve import _as_gram, ridge_lambda, solve_spd

__all__ = ["CrossAccumulator", "affine_cross_map", "cross_map"]


def _check_width(name: str, width: int) -> int:
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"{name} must be a positive integer, got {width!r}")
    return int(width)


class CrossAccumulator:
    """Running cross product X_target^T X_source, source Gram, sums of both and row count.

    target_width is H, the width of the original tap, and source_width is K,
    the width of the compressed one. All totals are float64.
    """

    def __init__(self, target_width: int, source_width: int) -> None:
        self._target_width = _check_width("target_width", target_width)
        self._source_width = _check_width("source_width", source_width)
        self._cross = np.zeros((self._target_width, self._source_width), dtype=np.float64)
        self._source_gram = np.zeros(
            (self._source_width, self._source_width), dtype=np.float64
        )
        self._target_sums = np.zeros(self._target_width, dtype=np.float64)
        self._source_sums = np.zeros(self._source_width, dtype=np.float64)
        self._count = 0

    @property
    def target_width(self) -> int:
        """Width H of the original (target) tap."""
        return self._target_width

    @property
    def source_width(self) -> int:
        """Width K of the compressed (source) tap."""
        return self._source_width

    @property
    def cross(self) -> np.ndarray:
        """Cross product X_target^T X_source, (H, K) float64, as a read-only view."""
        return _read_only(self._cross)

    @property
    def source_gram(self) -> np.ndarray:
        """Source Gram matrix X_source^T X_source, (K, K) float64, as a read-only view."""
        return _read_only(self._source_gram)

    @property
    def target_sums(self) -> np.ndarray:
        """Per-channel sum of the target rows, (H,) float64, as a read-only view."""
        return _read_only(self._target_sums)

    @property
    def source_sums(self) -> np.ndarray:
        """Per-channel sum of the source rows, (K,) float64, as a read-only view."""
        return _read_only(self._source_sums)

    @property
    def count(self) -> int:
        """Number of row pairs seen."""
        return self._count

    def add_rows(self, target_rows: np.ndarray, source_rows: np.ndarray) -> None:
        """Add a batch of paired rows: target_rows (n, H) and source_rows (n, K).

        Row i of both arrays must come from the same token or pixel. The
        products are computed in float32 when both inputs have at most 4 bytes
        per value (fp16, bf16, fp32) and in float64 otherwise, then added to
        the float64 totals. Raises ValueError on a wrong shape, a row count
        mismatch or a non-finite value, in which case the totals stay unchanged.
        """
        target_rows = np.asarray(target_rows)
        source_rows = np.asarray(source_rows)
        if target_rows.ndim != 2 or target_rows.shape[1] != self._target_width:
            raise ValueError(
                f"target_rows must have shape (n, {self._target_width}), "
                f"got {target_rows.shape}"
            )
        if source_rows.ndim != 2 or source_rows.shape[1] != self._source_width:
            raise ValueError(
                f"source_rows must have shape (n, {self._source_width}), "
                f"got {source_rows.shape}"
            )
        if target_rows.shape[0] != source_rows.shape[0]:
            raise ValueError(
                f"target_rows and source_rows must have the same number of rows, "
                f"got {target_rows.shape[0]} and {source_rows.shape[0]}"
            )

        dtype = np.promote_types(
            _accumulation_dtype(target_rows.dtype), _accumulation_dtype(source_rows.dtype)
        )
        target = target_rows.astype(dtype, copy=False)
        source = source_rows.astype(dtype, copy=False)
        _check_finite("target_rows", target)
        _check_finite("source_rows", source)

        cross = target.T @ source
        source_gram = source.T @ source
        # A float32 product of large activations can overflow to inf.
        _check_finite("partial cross product of rows", cross)
        _check_finite("partial Gram of source_rows", source_gram)

        self._cross += cross
        self._source_gram += source_gram
        self._target_sums += target.sum(axis=0, dtype=np.float64)
        self._source_sums += source.sum(axis=0, dtype=np.float64)
        self._count += target_rows.shape[0]

    def add_partial(
        self,
        cross: np.ndarray,
        source_gram: np.ndarray,
        target_sums: np.ndarray,
        source_sums: np.ndarray,
        count: int,
    ) -> None:
        """Add statistics computed elsewhere from count row pairs.

        cross is (H, K), source_gram (K, K), target_sums (H,) and source_sums
        (K,). All are converted to float64 first. Raises ValueError on a wrong
        shape, a non-finite value or a negative count, in which case the totals
        stay unchanged.
        """
        height, width = self._target_width, self._source_width
        cross = np.asarray(cross, dtype=np.float64)
        source_gram = np.asarray(source_gram, dtype=np.float64)
        if cross.shape != (height, width):
            raise ValueError(f"cross must have shape ({height}, {width}), got {cross.shape}")
        if source_gram.shape != (width, width):
            raise ValueError(
                f"source_gram must have shape ({width}, {width}), got {source_gram.shape}"
            )
        _check_finite("cross", cross)
        _check_finite("source_gram", source_gram)
        target_sums = _as_sums("target_sums", target_sums, height)
        source_sums = _as_sums("source_sums", source_sums, width)
        if isinstance(count, bool) or int(count) != count or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")

        self._cross += cross
        self._source_gram += source_gram
        self._target_sums += target_sums
        self._source_sums += source_sums
        self._count += int(count)

    def merge(self, other: CrossAccumulator) -> None:
        """Add the totals of another accumulator with the same target and source widths."""
        if not isinstance(other, CrossAccumulator):
            raise TypeError(f"expected a CrossAccumulator, got {type(other).__name__}")
        if (other.target_width, other.source_width) != (self._target_width, self._source_width):
            raise ValueError(
                f"cannot merge an accumulator of widths (H={other.target_width}, "
                f"K={other.source_width}) into one of widths (H={self._target_width}, "
                f"K={self._source_width})"
            )
        self.add_partial(
            other._cross, other._source_gram, other._target_sums, other._source_sums,
            other._count,
        )


def _as_cross_pair(cross: np.ndarray, source_gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate cross (H, K) against source_gram (K, K) and return both as float64."""
    source_gram = _as_gram(source_gram)
    cross = np.asarray(cross, dtype=np.float64)
    if cross.ndim != 2 or cross.shape[1] != source_gram.shape[0]:
        raise ValueError(
            f"cross must have shape (H, {source_gram.shape[0]}) to match source_gram "
            f"{source_gram.shape}, got {cross.shape}"
        )
    if not np.all(np.isfinite(cross)):
        raise ValueError("cross contains non-finite values (NaN or inf)")
    return cross, source_gram


def cross_map(
    cross: np.ndarray, source_gram: np.ndarray, alpha: float = 1e-3
) -> np.ndarray:
    """Compute b = cross (G_src + lam I)^-1, shape (H, K), with lam = alpha * mean(diag(G_src)).

    cross is X_target^T X_source (H, K) and source_gram is X_source^T X_source
    (K, K). K = 0 returns an (H, 0) array.
    """
    cross, source_gram = _as_cross_pair(cross, source_gram)
    size = source_gram.shape[0]
    if size == 0:
        return np.zeros((cross.shape[0], 0), dtype=np.float64)

    lam = ridge_lambda(source_gram, alpha)
    system = source_gram + lam * np.eye(size)
    # b^T = (G_src + lam I)^-1 cross^T because the system matrix is symmetric.
    return solve_spd(system, cross.T).T


def affine_cross_map(
    cross: np.ndarray,
    source_gram: np.ndarray,
    target_sums: np.ndarray,
    source_sums: np.ndarray,
    count: int,
    alpha: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the affine map (b, c) with h_target ~= b @ h_source + c.

    cross is (H, K), source_gram (K, K), target_sums (H,), source_sums (K,)
    and count the number of row pairs. Returns b (H, K) and c (H,). The ridge
    term alpha * mean(diag(G_src)) regularises b only, as in
    ``affine_prune_map``, which this equals when the source rows are the
    target rows restricted to the kept channels.
    """
    cross, source_gram = _as_cross_pair(cross, source_gram)
    target_sums = _as_sums("target_sums", target_sums, cross.shape[0])
    source_sums = _as_sums("source_sums", source_sums, source_gram.shape[0])
    count = _as_count(count)
    return _solve_affine(cross, source_gram, target_sums, source_sums, count, alpha)
