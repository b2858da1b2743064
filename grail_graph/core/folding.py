"""Channel folding: cluster similar hidden channels and merge each cluster into one.

Folding replaces the H channels of a group by K cluster channels. Each
producer row of a cluster becomes the mean of its members (``fold_producer``
with the averaging matrix R (K, H) from ``solve.averaging_matrix``), and the
consumer is compensated by ``solve.fold_map``. With G = I and no ridge that
map sums the member columns of the consumer, which is classic weight folding.

Clustering uses scikit-learn, which is imported only inside the functions that
need it, so the rest of the core runs with numpy alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["cluster_channels", "fold_features", "fold_producer"]

# Default upper bound on the PCA dimension of the folding features.
_DEFAULT_PCA_COMPONENTS = 32


def _import_sklearn_module(name: str):
    """Import a scikit-learn submodule, raising ImportError with the install command if missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"channel folding needs scikit-learn ({name} could not be imported). "
            "Install it with `pip install scikit-learn`."
        ) from error


def _zscore_columns(features: np.ndarray) -> np.ndarray:
    """Standardise each column over the rows to mean 0 and std 1. Constant columns become 0."""
    centered = features - features.mean(axis=0)
    std = features.std(axis=0)
    scaled = np.zeros_like(centered)
    # A column that is constant up to rounding has a std far below its magnitude.
    magnitude = np.max(np.abs(features), axis=0)
    varying = std > 1e-12 * np.maximum(magnitude, np.finfo(np.float64).tiny)
    scaled[:, varying] = centered[:, varying] / std[varying]
    return scaled


def _channel_rows(name: str, weight: np.ndarray, axis: int, width: int | None) -> np.ndarray:
    """Move the hidden axis of weight to the front and flatten the rest, (H, -1) float64."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim <= axis:
        raise ValueError(
            f"{name} must have its hidden axis at position {axis}, got shape {weight.shape}"
        )
    if width is not None and weight.shape[axis] != width:
        raise ValueError(
            f"{name} has hidden width {weight.shape[axis]} at axis {axis}, expected {width} "
            f"(shape {weight.shape})"
        )
    if not np.all(np.isfinite(weight)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    rows = np.moveaxis(weight, axis, 0)
    return rows.reshape(rows.shape[0], -1)


def fold_features(
    producers: Sequence[np.ndarray],
    consumers: Sequence[np.ndarray] = (),
    extra: Sequence[np.ndarray] = (),
    pca_components: int | None = None,
) -> np.ndarray:
    """Build a feature vector per hidden channel for clustering, shape (H, F).

    producers are weights (H, *rest), such as a convolution kernel and its
    bias. Their rows are flattened, concatenated and z-scored per column over
    the H channels, and a column that is constant over the channels becomes 0.
    With no consumers, no extra and pca_components None, these are the
    features, so F is the total producer row length.

    consumers are weights (O, H, *rest), whose channel columns are flattened
    to (H, O * prod(rest)). extra are per-channel arrays (H,) or (H, m), such
    as batch-norm parameters. When any of these is given, or pca_components is
    set, every column of the concatenated producer, consumer and extra
    features is z-scored, and scikit-learn PCA (full SVD) reduces them to
    F = min(pca_components, H, number of columns) components. pca_components
    defaults to min(H, 32).
    """
    if len(producers) == 0:
        raise ValueError("at least one producer weight is required")
    first = np.asarray(producers[0])
    if first.ndim == 0:
        raise ValueError("producer weights must have shape (H, *rest), got a scalar")
    width = first.shape[0]
    if pca_components is not None and (
        isinstance(pca_components, bool) or int(pca_components) != pca_components
        or pca_components < 1
    ):
        raise ValueError(
            f"pca_components must be a positive integer or None, got {pca_components!r}"
        )

    producer_rows = [
        _channel_rows(f"producers[{index}]", weight, 0, width)
        for index, weight in enumerate(producers)
    ]
    features = _zscore_columns(np.concatenate(producer_rows, axis=1))
    if len(consumers) == 0 and len(extra) == 0 and pca_components is None:
        return features

    blocks = [features]
    blocks += [
        _channel_rows(f"consumers[{index}]", weight, 1, width)
        for index, weight in enumerate(consumers)
    ]
    blocks += [
        _channel_rows(f"extra[{index}]", values, 0, width) for index, values in enumerate(extra)
    ]
    combined = _zscore_columns(np.concatenate(blocks, axis=1))

    requested = _DEFAULT_PCA_COMPONENTS if pca_components is None else int(pca_components)
    components = min(requested, width, combined.shape[1])
    if not np.any(combined):
        # PCA of all-zero features divides by a zero total variance.
        return np.zeros((width, components), dtype=np.float64)

    decomposition = _import_sklearn_module("sklearn.decomposition")
    pca = decomposition.PCA(n_components=components, svd_solver="full")
    return np.asarray(pca.fit_transform(combined), dtype=np.float64)


def _fill_empty_clusters(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Move channels into empty clusters until every label in [0, k) has a member.

    Each empty cluster takes the member farthest from its centroid in the
    currently largest cluster (lowest index on ties). Requires k <= H.
    """
    labels = labels.copy()
    sizes = np.bincount(labels, minlength=k)
    for empty in np.flatnonzero(sizes == 0):
        largest = int(np.argmax(sizes))
        members = np.flatnonzero(labels == largest)
        centroid = features[members].mean(axis=0)
        distances = np.sum((features[members] - centroid) ** 2, axis=1)
        moved = int(members[np.argmax(distances)])
        labels[moved] = empty
        sizes[largest] -= 1
        sizes[empty] += 1
    return labels


def cluster_channels(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster H channels into k groups with k-means, returning labels (H,) in [0, k).

    features is (H, F), for example from ``fold_features``. Uses scikit-learn
    KMeans(n_clusters=k, n_init=10, random_state=seed). Every cluster gets at
    least one channel: when the features have fewer than k distinct rows,
    k-means leaves clusters empty, and each empty one then takes the farthest
    member of the largest cluster. k = H returns the labels 0 .. H-1 without
    running k-means. Raises ValueError unless 1 <= k <= H.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must have shape (H, F) with H >= 1, got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain non-finite values (NaN or inf)")
    width = features.shape[0]
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= width:
        raise ValueError(f"k must be an integer in [1, {width}], got {k!r}")
    k = int(k)
    if k == width:
        return np.arange(width, dtype=np.int64)

    cluster = _import_sklearn_module("sklearn.cluster")
    exceptions = _import_sklearn_module("sklearn.exceptions")
    kmeans = cluster.KMeans(n_clusters=k, n_init=10, random_state=seed)
    with warnings.catch_warnings():
        # KMeans warns when there are fewer distinct points than clusters, and
        # the empty clusters are filled below.
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        labels = np.asarray(kmeans.fit_predict(features), dtype=np.int64)

    empty = int(np.sum(np.bincount(labels, minlength=k) == 0))
    if empty:
        logger.info(
            "k-means left %d of %d clusters empty, so each takes one channel "
            "from the largest cluster",
            empty, k,
        )
        labels = _fill_empty_clusters(features, labels, k)
    return labels


def fold_producer(weight: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Merge the rows of a producer weight (H, *rest) into (K, *rest) as r @ weight.

    r is the averaging matrix (K, H) from ``solve.averaging_matrix``, so each
    folded row is the mean of its cluster's rows. This applies to biases (H,)
    and batch-norm parameters as well. The product is computed in float64 and
    returned in the weight's dtype.
    """
    weight = np.asarray(weight)
    r = np.asarray(r, dtype=np.float64)
    if weight.ndim < 1:
        raise ValueError("producer weight must have shape (H, *rest), got a scalar")
    if r.ndim != 2 or r.shape[1] != weight.shape[0]:
        raise ValueError(
            f"r must have shape (K, {weight.shape[0]}) to match weight {weight.shape}, "
            f"got {r.shape}"
        )
    rows = weight.astype(np.float64).reshape(weight.shape[0], -1)
    folded = r @ rows
    return folded.reshape((r.shape[0],) + weight.shape[1:]).astype(weight.dtype)


def fold_linear_chain(
    r: np.ndarray,
    producers: Sequence[np.ndarray],
    biases: Sequence[np.ndarray | None],
    batchnorm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    eps: float = 1e-5,
) -> tuple[list[np.ndarray], list[np.ndarray | None], tuple[np.ndarray, ...] | None]:
    """Merge the channels of producer -> [BatchNorm] pre-activations with averaging matrix r.

    Folding replaces each cluster's pre-activations p_h by their average sum_h r[c, h] p_h,
    the approximation folding makes (the activation of an average is not the average of
    activations). A BatchNorm p = a (z - mean) + beta with a = scale / sqrt(var + eps) is
    linear, so it is folded into the producers first: rows become r (a W), biases r (a b),
    and the merged BatchNorm is the identity except for its bias r (beta - a mean).

    producers: canonical (H, ...) weights; biases: (H,) or None per producer (a bias of
    shape (H, 1) also works); batchnorm: (scale, bias, mean, var), each (H,).
    Returns the merged producers (K, ...), biases and BatchNorm tensors (K,), in the
    input dtypes.
    """
    r = np.asarray(r, dtype=np.float64)
    width = r.shape[1]
    if batchnorm is None:
        factor = np.ones(width)
    else:
        scale, shift, mean, var = (np.asarray(t, dtype=np.float64).reshape(width) for t in batchnorm)
        factor = scale / np.sqrt(var + eps)
    merged_producers = []
    for weight in producers:
        scaled = weight.astype(np.float64) * factor.reshape((width,) + (1,) * (weight.ndim - 1))
        merged_producers.append(fold_producer(scaled, r).astype(weight.dtype))
    merged_biases: list[np.ndarray | None] = []
    for bias in biases:
        if bias is None:
            merged_biases.append(None)
            continue
        scaled = bias.astype(np.float64) * factor.reshape((width,) + (1,) * (bias.ndim - 1))
        merged_biases.append(fold_producer(scaled, r).astype(bias.dtype))
    if batchnorm is None:
        return merged_producers, merged_biases, None
    k = r.shape[0]
    dtype = np.asarray(batchnorm[0]).dtype
    merged_shift = fold_producer(shift - factor * mean, r)
    merged = (np.ones(k, dtype), merged_shift.astype(dtype), np.zeros(k, dtype), np.full(k, 1.0 - eps, dtype))
    return merged_producers, merged_biases, merged
