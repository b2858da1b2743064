"""Streaming second-moment statistics of one activation tap.

A tap is the hidden activation between a producer and its consumers, of width H.
Calibration data arrives in batches of rows X_b (n_b, H), one row per token or
spatial position. The accumulator keeps the raw, unnormalised totals

    G = sum_b X_b^T X_b    (H, H) float64
    s = sum_b 1^T X_b      (H,)   float64
    n = sum_b n_b

from which the GRAIL closed form in ``solve.py`` works. Each partial product is
computed in float32 or float64 and then added to float64 totals, so that
half-precision activations never accumulate in half precision.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GramAccumulator"]

# Extension float types (ml_dtypes, e.g. bfloat16 and float8 variants) report
# dtype kind "V", so they are recognised by name.
_EXTENSION_FLOAT_PREFIXES = ("bfloat", "float8", "float6", "float4")


def _accumulation_dtype(dtype: np.dtype) -> np.dtype:
    """Pick the dtype in which a batch's partial Gram is computed.

    float64 input (and integer or bool input, which float32 could round) uses
    float64. fp16, bf16, fp32 and other floats of at most 4 bytes use float32.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        return np.dtype(np.float64)
    if dtype.kind == "f":
        return np.dtype(np.float32 if dtype.itemsize <= 4 else np.float64)
    if dtype.kind == "V" and dtype.name.startswith(_EXTENSION_FLOAT_PREFIXES):
        return np.dtype(np.float32)
    raise ValueError(
        f"unsupported activation dtype {dtype}. Pass rows of a real float or integer type."
    )


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def _read_only(values: np.ndarray) -> np.ndarray:
    view = values.view()
    view.flags.writeable = False
    return view


class GramAccumulator:
    """Running Gram matrix, per-channel sums and row count of one tap of width H."""

    def __init__(self, width: int) -> None:
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        self._width = int(width)
        self._gram = np.zeros((self._width, self._width), dtype=np.float64)
        self._sums = np.zeros(self._width, dtype=np.float64)
        self._count = 0

    @property
    def width(self) -> int:
        """Hidden width H."""
        return self._width

    @property
    def gram(self) -> np.ndarray:
        """Raw Gram matrix X^T X, (H, H) float64, as a read-only view."""
        return _read_only(self._gram)

    @property
    def sums(self) -> np.ndarray:
        """Per-channel sum of all rows seen, (H,) float64, as a read-only view."""
        return _read_only(self._sums)

    @property
    def count(self) -> int:
        """Number of rows seen."""
        return self._count

    def add_rows(self, rows: np.ndarray) -> None:
        """Add a batch of activation rows, shape (n, H).

        The partial product rows^T rows is computed in float32 for inputs of at
        most 4 bytes (fp16, bf16, fp32) and in float64 otherwise, then added to
        the float64 totals. Raises ValueError on a wrong shape or a non-finite
        value, in which case the totals stay unchanged.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self._width:
            raise ValueError(
                f"rows must have shape (n, {self._width}), got {rows.shape}"
            )
        work = rows.astype(_accumulation_dtype(rows.dtype), copy=False)
        _check_finite("rows", work)

        partial = work.T @ work
        # A float32 product of large activations can overflow to inf.
        _check_finite("partial Gram of rows", partial)

        self._gram += partial
        self._sums += work.sum(axis=0, dtype=np.float64)
        self._count += rows.shape[0]

    def add_partial(self, gram: np.ndarray, sums: np.ndarray, count: int) -> None:
        """Add statistics computed elsewhere: gram (H, H), sums (H,), count rows.

        Both arrays are converted to float64 first. Raises ValueError on a wrong
        shape, a non-finite value or a negative count.
        """
        gram = np.asarray(gram, dtype=np.float64)
        sums = np.asarray(sums, dtype=np.float64)
        if gram.shape != (self._width, self._width):
            raise ValueError(
                f"gram must have shape ({self._width}, {self._width}), got {gram.shape}"
            )
        if sums.shape != (self._width,):
            raise ValueError(f"sums must have shape ({self._width},), got {sums.shape}")
        if int(count) != count or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        _check_finite("gram", gram)
        _check_finite("sums", sums)

        self._gram += gram
        self._sums += sums
        self._count += int(count)

    def merge(self, other: GramAccumulator) -> None:
        """Add the totals of another accumulator of the same width."""
        if not isinstance(other, GramAccumulator):
            raise TypeError(f"expected a GramAccumulator, got {type(other).__name__}")
        if other.width != self._width:
            raise ValueError(
                f"cannot merge an accumulator of width {other.width} "
                f"into one of width {self._width}"
            )
        self.add_partial(other._gram, other._sums, other._count)

    def mean(self) -> np.ndarray:
        """Compute the per-channel mean, (H,) float64. Raises ValueError if no rows were added."""
        if self._count == 0:
            raise ValueError("no rows were added, so the mean is undefined")
        return self._sums / self._count

    def covariance(self) -> np.ndarray:
        """Compute the biased covariance (G - n mu mu^T) / n, (H, H) float64.

        Raises ValueError if no rows were added.
        """
        mu = self.mean()
        return self._gram / self._count - np.outer(mu, mu)
