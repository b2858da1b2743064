"""Tests of the core extensions: affine and cross-statistics compensation, folding and width allocation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from grail_graph.core import (
    ALLOCATION_METHODS,
    AllocationGroup,
    CrossAccumulator,
    absorb,
    affine_cross_map,
    affine_prune_map,
    affine_reconstruction_error,
    allocate_widths,
    averaging_matrix,
    bias_correction,
    cluster_channels,
    cross_map,
    error_curve,
    flap_scores,
    fold_features,
    fold_map,
    fold_producer,
    kept_width,
    prune_map,
    reconstruction_error,
    relative_reconstruction_error,
    ridge_lambda,
)

WIDTH = 12
ROWS = 400
KEEP = np.array([0, 2, 3, 5, 8, 9, 11])


def correlated_activations(seed: int, rows: int = ROWS, width: int = WIDTH) -> np.ndarray:
    """Return activations (rows, width) whose channels mix a few shared factors."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((rows, width // 2))
    mixing = rng.standard_normal((width // 2, width))
    return factors @ mixing + 0.3 * rng.standard_normal((rows, width))


def offset_activations(seed: int, rows: int = ROWS, width: int = WIDTH) -> np.ndarray:
    """Return correlated activations plus a per-channel offset, like post-ReLU taps."""
    offsets = np.random.default_rng(seed + 1000).uniform(1.0, 4.0, width)
    return correlated_activations(seed, rows, width) + offsets


def consumers_for(seed: int, width: int = WIDTH) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((5, width)), rng.standard_normal((3, width, 3, 3))]


def consumer_matrix(weight: np.ndarray) -> np.ndarray:
    """Reshape a consumer weight (O, H, *rest) to (O * prod(rest), H)."""
    return np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1])


def affine_direct_error(x, consumers, b, c, keep) -> float:
    """Compute sum ||X W^T - (X_P b^T + 1 c^T) W^T||_F^2 from the activations themselves."""
    reconstruction = x[:, keep] @ b.T + c
    total = 0.0
    for weight in consumers:
        matrix = consumer_matrix(weight)
        total += float(np.sum(((x - reconstruction) @ matrix.T) ** 2))
    return total


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    return x.T @ x, x.sum(axis=0), x.shape[0]


# Affine compensation


def test_affine_prune_map_zero_sums_matches_prune_map():
    x = correlated_activations(1)
    gram = x.T @ x

    b, c = affine_prune_map(gram, np.zeros(WIDTH), ROWS, KEEP, alpha=1e-2)

    np.testing.assert_allclose(b, prune_map(gram, KEEP, alpha=1e-2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, 0.0, atol=1e-12)


def test_affine_prune_map_centered_data_matches_prune_map():
    x = correlated_activations(2)
    x -= x.mean(axis=0)
    gram, sums, count = statistics(x)

    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=1e-3)

    np.testing.assert_allclose(b, prune_map(gram, KEEP, alpha=1e-3), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c, 0.0, atol=1e-10)


def test_affine_prune_map_matches_lstsq_with_intercept():
    x = offset_activations(3)
    gram, sums, count = statistics(x)
    design = np.hstack([x[:, KEEP], np.ones((ROWS, 1))])
    solution, *_ = np.linalg.lstsq(design, x, rcond=None)

    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=0.0)

    np.testing.assert_allclose(b, solution[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(c, solution[-1], rtol=1e-8, atol=1e-9)


def test_affine_prune_map_ridge_spares_constant():
    # A stacked lstsq whose ridge rows penalise the weights but not the intercept.
    x = offset_activations(4)
    gram, sums, count = statistics(x)
    alpha = 5e-2
    lam = ridge_lambda(gram[np.ix_(KEEP, KEEP)], alpha)
    size = KEEP.size
    design = np.vstack(
        [
            np.hstack([x[:, KEEP], np.ones((ROWS, 1))]),
            np.hstack([np.sqrt(lam) * np.eye(size), np.zeros((size, 1))]),
        ]
    )
    target = np.vstack([x, np.zeros((size, WIDTH))])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)

    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=alpha)

    np.testing.assert_allclose(b, solution[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(c, solution[-1], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 1e-2])
def test_affine_error_not_worse_than_linear(alpha):
    x = offset_activations(5)
    gram, sums, count = statistics(x)
    consumers = consumers_for(5)

    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=alpha)
    linear = prune_map(gram, KEEP, alpha=alpha)

    affine_error = affine_direct_error(x, consumers, b, c, KEEP)
    linear_error = affine_direct_error(x, consumers, linear, np.zeros(WIDTH), KEEP)
    assert affine_error <= linear_error


def test_affine_prune_map_empty_keep_returns_mean():
    x = offset_activations(6)
    gram, sums, count = statistics(x)

    b, c = affine_prune_map(gram, sums, count, [], alpha=1e-3)

    assert b.shape == (WIDTH, 0)
    np.testing.assert_allclose(c, x.mean(axis=0), rtol=1e-12)


def test_affine_prune_map_constant_channel_is_exact():
    # Channel 4 is constant, so the intercept reproduces it exactly.
    x = offset_activations(7)
    x[:, 4] = 2.5
    gram, sums, count = statistics(x)

    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=1e-3)

    np.testing.assert_allclose(b[4], 0.0, atol=1e-9)
    assert c[4] == pytest.approx(2.5, rel=1e-9)


@pytest.mark.parametrize("count", [0, -3, 2.5])
def test_affine_prune_map_invalid_count_raises(count):
    with pytest.raises(ValueError, match="count"):
        affine_prune_map(np.eye(WIDTH), np.zeros(WIDTH), count, KEEP)


def test_affine_prune_map_wrong_sums_shape_raises():
    with pytest.raises(ValueError, match=r"sums must have shape \(12,\)"):
        affine_prune_map(np.eye(WIDTH), np.zeros(WIDTH + 1), 10, KEEP)


def test_affine_reconstruction_error_matches_direct():
    x = offset_activations(8)
    gram, sums, count = statistics(x)
    consumers = consumers_for(8)
    # A large ridge term keeps (b, c) away from the optimum, so all terms matter.
    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=0.5)

    error = affine_reconstruction_error(gram, sums, count, consumers, b, c, KEEP)

    assert error == pytest.approx(affine_direct_error(x, consumers, b, c, KEEP), rel=1e-9)


def test_affine_reconstruction_error_zero_offset_matches_linear():
    x = offset_activations(9)
    gram, sums, count = statistics(x)
    consumers = consumers_for(9)
    b = prune_map(gram, KEEP, alpha=1e-3)

    error = affine_reconstruction_error(gram, sums, count, consumers, b, np.zeros(WIDTH), KEEP)

    assert error == pytest.approx(reconstruction_error(gram, consumers, b, KEEP), rel=1e-9)


def test_bias_correction_linear_is_exact():
    x = offset_activations(10)
    gram, sums, count = statistics(x)
    weight = np.random.default_rng(10).standard_normal((6, WIDTH))
    bias = np.random.default_rng(11).standard_normal(6)
    b, c = affine_prune_map(gram, sums, count, KEEP, alpha=1e-3)

    compressed = x[:, KEEP] @ absorb(weight, b).T + bias + bias_correction(weight, c)

    expected = (x[:, KEEP] @ b.T + c) @ weight.T + bias
    np.testing.assert_allclose(compressed, expected, rtol=1e-10, atol=1e-10)


def valid_conv2d(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Cross-correlate image (H, height, width) with weight (O, H, kh, kw), no padding."""
    kernel_height, kernel_width = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(
        image, (kernel_height, kernel_width), axis=(1, 2)
    )
    return np.einsum("hyxij,ohij->oyx", windows, weight)


def test_bias_correction_conv_interior_is_exact():
    # A constant offset c per channel passes through a valid convolution as a bias.
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((4, WIDTH, 3, 3))
    c = rng.standard_normal(WIDTH)
    image = rng.standard_normal((WIDTH, 7, 6))

    shifted = valid_conv2d(image + c[:, None, None], weight)

    expected = valid_conv2d(image, weight) + bias_correction(weight, c)[:, None, None]
    np.testing.assert_allclose(shifted, expected, rtol=1e-10, atol=1e-10)


def test_bias_correction_hand_made():
    weight = np.array([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [-1.0, 0.0]]])

    correction = bias_correction(weight, np.array([10.0, 1.0]))

    np.testing.assert_allclose(correction, [37.0, 9.0])


def test_bias_correction_wrong_offset_shape_raises():
    with pytest.raises(ValueError, match="c must have shape"):
        bias_correction(np.ones((3, WIDTH)), np.ones(WIDTH - 1))


# Cross statistics


def test_cross_accumulator_streaming_matches_full():
    target = offset_activations(13)
    source = target[:, KEEP] + 0.1 * np.random.default_rng(13).standard_normal((ROWS, KEEP.size))
    accumulator = CrossAccumulator(WIDTH, KEEP.size)
    for target_batch, source_batch in zip(np.array_split(target, 5), np.array_split(source, 5)):
        accumulator.add_rows(target_batch, source_batch)

    np.testing.assert_allclose(accumulator.cross, target.T @ source, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(accumulator.source_gram, source.T @ source, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(accumulator.target_sums, target.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(accumulator.source_sums, source.sum(axis=0), rtol=1e-12)
    assert accumulator.count == ROWS


def test_cross_accumulator_merge_and_partial():
    target = offset_activations(14)
    source = np.tanh(target[:, :5])
    first, second = CrossAccumulator(WIDTH, 5), CrossAccumulator(WIDTH, 5)
    first.add_rows(target[:100], source[:100])
    second.add_partial(
        target[100:].T @ source[100:],
        source[100:].T @ source[100:],
        target[100:].sum(axis=0),
        source[100:].sum(axis=0),
        ROWS - 100,
    )

    first.merge(second)

    np.testing.assert_allclose(first.cross, target.T @ source, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(first.source_gram, source.T @ source, rtol=1e-12, atol=1e-10)
    assert first.count == ROWS


def test_cross_accumulator_fp16_accumulates_in_float64_totals():
    target = offset_activations(15, rows=2000).astype(np.float16)
    source = target[:, KEEP]
    reference = target.astype(np.float64).T @ source.astype(np.float64)
    accumulator = CrossAccumulator(WIDTH, KEEP.size)
    for target_batch, source_batch in zip(np.array_split(target, 4), np.array_split(source, 4)):
        accumulator.add_rows(target_batch, source_batch)

    assert accumulator.cross.dtype == np.float64
    assert np.max(np.abs(accumulator.cross - reference)) / np.max(np.abs(reference)) < 1e-5


def test_cross_accumulator_row_count_mismatch_raises():
    accumulator = CrossAccumulator(WIDTH, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        accumulator.add_rows(np.zeros((5, WIDTH)), np.zeros((4, 3)))
    assert accumulator.count == 0


def test_cross_accumulator_rejects_nan():
    source = np.ones((4, 3))
    source[1, 2] = np.nan
    accumulator = CrossAccumulator(WIDTH, 3)
    with pytest.raises(ValueError, match="non-finite"):
        accumulator.add_rows(np.zeros((4, WIDTH)), source)
    assert accumulator.count == 0


def test_cross_accumulator_merge_width_mismatch_raises():
    with pytest.raises(ValueError, match="cannot merge"):
        CrossAccumulator(WIDTH, 3).merge(CrossAccumulator(WIDTH, 4))


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_cross_map_kept_rows_source_matches_prune_map(alpha):
    x = correlated_activations(16)
    accumulator = CrossAccumulator(WIDTH, KEEP.size)
    accumulator.add_rows(x, x[:, KEEP])

    b = cross_map(accumulator.cross, accumulator.source_gram, alpha=alpha)

    np.testing.assert_allclose(b, prune_map(x.T @ x, KEEP, alpha=alpha), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_affine_cross_map_matches_affine_prune_map(alpha):
    x = offset_activations(17)
    accumulator = CrossAccumulator(WIDTH, KEEP.size)
    accumulator.add_rows(x, x[:, KEEP])
    gram, sums, count = statistics(x)

    b, c = affine_cross_map(
        accumulator.cross, accumulator.source_gram, accumulator.target_sums,
        accumulator.source_sums, accumulator.count, alpha=alpha,
    )

    expected_b, expected_c = affine_prune_map(gram, sums, count, KEEP, alpha=alpha)
    np.testing.assert_allclose(b, expected_b, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(c, expected_c, rtol=1e-9, atol=1e-9)


def test_cross_map_matches_lstsq_on_perturbed_source():
    target = correlated_activations(18)
    rng = np.random.default_rng(18)
    source = target[:, KEEP] @ rng.standard_normal((KEEP.size, 5)) + 0.2 * rng.standard_normal(
        (ROWS, 5)
    )
    solution, *_ = np.linalg.lstsq(source, target, rcond=None)

    b = cross_map(target.T @ source, source.T @ source, alpha=0.0)

    np.testing.assert_allclose(b, solution.T, rtol=1e-8, atol=1e-9)


def test_affine_cross_map_matches_lstsq_with_intercept():
    target = offset_activations(19)
    source = np.maximum(target[:, :6] - 2.0, 0.0) + 0.05 * target[:, 6:]
    design = np.hstack([source, np.ones((ROWS, 1))])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)

    b, c = affine_cross_map(
        target.T @ source, source.T @ source, target.sum(axis=0), source.sum(axis=0), ROWS,
        alpha=0.0,
    )

    np.testing.assert_allclose(b, solution[:-1].T, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(c, solution[-1], rtol=1e-7, atol=1e-8)


def test_cross_map_shape_mismatch_raises():
    with pytest.raises(ValueError, match="cross must have shape"):
        cross_map(np.zeros((WIDTH, 4)), np.eye(5))


# Folding


def test_fold_features_zscores_producer_columns():
    rng = np.random.default_rng(20)
    weight = rng.standard_normal((WIDTH, 3, 2, 2)) * 5.0 + 1.0
    bias = np.full(WIDTH, 0.7)

    features = fold_features([weight, bias])

    assert features.shape == (WIDTH, 13)
    np.testing.assert_allclose(features.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(features[:, :12].std(axis=0), 1.0, rtol=1e-12)
    # The bias is constant over the channels, so its column carries nothing.
    np.testing.assert_array_equal(features[:, 12], 0.0)


def test_fold_features_with_consumers_and_extra_uses_pca():
    rng = np.random.default_rng(21)
    producer = rng.standard_normal((WIDTH, 8))
    consumer = rng.standard_normal((6, WIDTH, 3, 3))
    batch_norm = rng.standard_normal((WIDTH, 4))

    default = fold_features([producer], [consumer], [batch_norm[:, 0], batch_norm])
    reduced = fold_features([producer], [consumer], [batch_norm], pca_components=3)

    assert default.shape == (WIDTH, WIDTH)
    assert reduced.shape == (WIDTH, 3)
    # PCA scores are centred and sorted by decreasing variance.
    np.testing.assert_allclose(reduced.mean(axis=0), 0.0, atol=1e-10)
    variances = reduced.var(axis=0)
    assert np.all(np.diff(variances) <= 1e-12)


def test_fold_features_pca_caps_at_column_count():
    producer = np.random.default_rng(22).standard_normal((WIDTH, 2))
    features = fold_features([producer], extra=[np.arange(WIDTH, dtype=float)])
    assert features.shape == (WIDTH, 3)


def test_fold_features_mismatched_width_raises():
    with pytest.raises(ValueError, match="hidden width"):
        fold_features([np.ones((WIDTH, 3))], consumers=[np.ones((4, WIDTH + 1))])


def test_core_import_does_not_load_sklearn():
    code = "import sys, grail_graph.core; print('sklearn' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def duplicated_producer(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a producer (12, 5) made of 6 distinct rows, each twice, and the row sources."""
    rng = np.random.default_rng(seed)
    distinct = rng.standard_normal((6, 5)) * 3.0
    sources = rng.permutation(np.repeat(np.arange(6), 2))
    return distinct[sources], sources


def test_cluster_channels_groups_duplicates():
    producer, sources = duplicated_producer(23)

    labels = cluster_channels(fold_features([producer]), 6, seed=0)

    for source in range(6):
        members = np.flatnonzero(sources == source)
        assert labels[members[0]] == labels[members[1]]
    assert np.unique(labels).size == 6


def test_cluster_channels_fills_empty_clusters():
    # Only 6 distinct rows exist, so k-means alone leaves 2 of 8 clusters empty.
    producer, _ = duplicated_producer(24)

    labels = cluster_channels(fold_features([producer]), 8, seed=0)

    np.testing.assert_array_equal(np.bincount(labels, minlength=8) > 0, True)
    averaging_matrix(labels, 8)


def test_cluster_channels_k_equals_width_is_identity():
    features = np.random.default_rng(25).standard_normal((WIDTH, 4))
    labels = cluster_channels(features, WIDTH)
    np.testing.assert_array_equal(np.sort(labels), np.arange(WIDTH))


def test_cluster_channels_is_seeded():
    features = np.random.default_rng(26).standard_normal((40, 3))
    np.testing.assert_array_equal(
        cluster_channels(features, 5, seed=4), cluster_channels(features, 5, seed=4)
    )


@pytest.mark.parametrize("k", [0, WIDTH + 1, 2.5])
def test_cluster_channels_invalid_k_raises(k):
    with pytest.raises(ValueError, match="k must be an integer"):
        cluster_channels(np.zeros((WIDTH, 2)), k)


def test_classic_folding_with_identity_gram():
    producer, sources = duplicated_producer(27)
    bias = np.random.default_rng(27).standard_normal(WIDTH)
    consumer = np.random.default_rng(28).standard_normal((4, WIDTH, 3, 3))
    labels = cluster_channels(fold_features([producer]), 6)
    r = averaging_matrix(labels, 6)

    folded_producer = fold_producer(producer, r)
    folded_bias = fold_producer(bias, r)
    folded_consumer = absorb(consumer, fold_map(np.eye(WIDTH), r, alpha=0.0))

    assert folded_producer.shape == (6, 5)
    for cluster in range(6):
        members = labels == cluster
        np.testing.assert_allclose(folded_producer[cluster], producer[members].mean(axis=0))
        assert folded_bias[cluster] == pytest.approx(bias[members].mean())
        np.testing.assert_allclose(
            folded_consumer[:, cluster], consumer[:, members].sum(axis=1), atol=1e-12
        )


def test_folding_k_equals_width_is_permutation():
    x = correlated_activations(29)
    gram = x.T @ x
    producer = np.random.default_rng(29).standard_normal((WIDTH, 3, 3))
    consumer = np.random.default_rng(30).standard_normal((5, WIDTH))
    # Shuffle labels so that the folded order differs from the original one.
    labels = np.random.default_rng(31).permutation(WIDTH)
    r = averaging_matrix(labels, WIDTH)

    folded_producer = fold_producer(producer, r)
    folded_consumer = absorb(consumer, fold_map(gram, r, alpha=0.0))

    np.testing.assert_array_equal(folded_producer[labels], producer)
    np.testing.assert_allclose(folded_consumer[:, labels], consumer, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        (x @ r.T) @ folded_consumer.T, x @ consumer.T, rtol=1e-8, atol=1e-8
    )


def test_fold_producer_keeps_dtype_and_shape():
    weight = np.ones((4, 2, 3), dtype=np.float32)
    folded = fold_producer(weight, averaging_matrix(np.array([0, 1, 0, 1]), 2))
    assert folded.shape == (2, 2, 3)
    assert folded.dtype == np.float32


def test_fold_producer_wrong_r_shape_raises():
    with pytest.raises(ValueError, match="r must have shape"):
        fold_producer(np.ones((4, 2)), np.ones((2, 5)))


# FLAP scores


def test_flap_scores_hand_made():
    # Channel 0 has values 1, 3 (variance 1), channel 1 is constant 5.
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    weight = np.array([[2.0, 10.0], [0.0, 1.0]])

    scores = flap_scores(x.T @ x, x.sum(axis=0), 2, [weight])

    np.testing.assert_allclose(scores, [4.0, 0.0], atol=1e-12)


def test_flap_scores_match_explicit_variance():
    x = offset_activations(32)
    gram, sums, count = statistics(x)
    consumers = consumers_for(32)
    column_energy = sum(np.sum(consumer_matrix(w) ** 2, axis=0) for w in consumers)

    scores = flap_scores(gram, sums, count, consumers)

    np.testing.assert_allclose(scores, x.var(axis=0) * column_energy, rtol=1e-9)


# Error curves


def fixed_ridge_curve(gram, consumers, order, alpha) -> np.ndarray:
    """Solve each prefix directly, with lam = alpha * mean(diag(G)) over all channels."""
    lam = alpha * np.mean(np.diagonal(gram))
    width = gram.shape[0]
    curve = []
    for size in range(len(order) + 1):
        keep = np.asarray(order[:size], dtype=np.int64)
        system = gram[np.ix_(keep, keep)] + lam * np.eye(size)
        b = np.linalg.lstsq(system, gram[keep, :], rcond=None)[0].T
        curve.append(relative_reconstruction_error(gram, consumers, b.reshape(width, size), keep))
    return np.array(curve)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 5e-2])
def test_error_curve_matches_direct_solves(alpha):
    width = 32
    x = correlated_activations(33, width=width)
    gram = x.T @ x
    consumers = consumers_for(33, width=width)
    order = np.random.default_rng(33).permutation(width)

    curve = error_curve(gram, consumers, order, alpha=alpha, widths=range(width + 1))

    expected = fixed_ridge_curve(gram, consumers, order, alpha)
    np.testing.assert_allclose(curve, expected, rtol=1e-8, atol=1e-10)


def test_error_curve_without_ridge_matches_prune_map():
    x = correlated_activations(34)
    gram = x.T @ x
    consumers = consumers_for(34)
    order = np.array([3, 0, 11, 7, 5, 1, 9, 2, 10, 4, 8, 6])

    curve = error_curve(gram, consumers, order, alpha=0.0)

    assert curve.shape == (WIDTH,)
    for size in range(1, WIDTH + 1):
        keep = order[:size]
        expected = relative_reconstruction_error(gram, consumers, prune_map(gram, keep, 0.0), keep)
        assert curve[size - 1] == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_error_curve_endpoints():
    x = correlated_activations(35)
    gram = x.T @ x

    curve = error_curve(gram, consumers_for(35), np.arange(WIDTH), alpha=0.0, widths=[0, WIDTH])

    assert curve[0] == pytest.approx(1.0)
    assert curve[1] == pytest.approx(0.0, abs=1e-10)


def test_error_curve_duplicate_channel_adds_nothing():
    x = correlated_activations(36)
    x[:, 7] = x[:, 1]
    gram = x.T @ x
    order = np.array([1, 7, 0, 2, 3, 4, 5, 6, 8, 9, 10, 11])

    curve = error_curve(gram, consumers_for(36), order, alpha=0.0, widths=range(WIDTH + 1))

    assert np.all(np.isfinite(curve))
    assert curve[2] == pytest.approx(curve[1], rel=1e-9)
    assert curve[-1] == pytest.approx(0.0, abs=1e-9)


def test_error_curve_partial_order_and_unsorted_widths():
    x = correlated_activations(37)
    gram = x.T @ x
    consumers = consumers_for(37)
    order = np.array([4, 9, 0])

    curve = error_curve(gram, consumers, order, alpha=1e-3, widths=[3, 1, 2])

    expected = fixed_ridge_curve(gram, consumers, order, 1e-3)
    np.testing.assert_allclose(curve, expected[[3, 1, 2]], rtol=1e-9)


def test_error_curve_large_width_matches_direct_solves():
    width = 160
    rng = np.random.default_rng(38)
    x = rng.standard_normal((600, 40)) @ rng.standard_normal((40, width))
    x += 0.05 * rng.standard_normal((600, width))
    gram = x.T @ x
    consumers = [rng.standard_normal((20, width))]
    order = rng.permutation(width)
    widths = [1, 20, 39, 40, 41, 100, width]

    curve = error_curve(gram, consumers, order, alpha=1e-3, widths=widths)

    lam = 1e-3 * np.mean(np.diagonal(gram))
    for value, size in zip(curve, widths):
        keep = order[:size]
        system = gram[np.ix_(keep, keep)] + lam * np.eye(size)
        b = np.linalg.solve(system, gram[keep, :]).T
        expected = relative_reconstruction_error(gram, consumers, b, keep)
        assert value == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("order", "widths", "match"),
    [([0, 0, 1], None, "order indices must be unique"), ([0, 1], [3], "widths must lie")],
)
def test_error_curve_invalid_inputs_raise(order, widths, match):
    with pytest.raises(ValueError, match=match):
        error_curve(np.eye(WIDTH), consumers_for(39), order, widths=widths)


# Width allocation


def removed_cost(groups: list[AllocationGroup], widths: list[int]) -> float:
    return sum((g.width - k) * g.cost_per_channel for g, k in zip(groups, widths))


def mixed_groups() -> list[AllocationGroup]:
    """Return four groups with different widths, costs, scores and error curves."""
    rng = np.random.default_rng(40)
    groups = []
    for width, cost, min_width in [(16, 3.0, 2), (32, 1.0, 4), (8, 7.5, 1), (24, 2.0, 20)]:
        curve = np.concatenate([np.sort(rng.uniform(0.0, 1.0, width))[::-1], [0.0]])
        curve[0] = 1.0
        groups.append(
            AllocationGroup(
                width=width,
                cost_per_channel=cost,
                scores=rng.gamma(2.0, 1.0, width),
                error_curve=curve,
                min_width=min_width,
                error_scale=rng.uniform(0.5, 2.0),
            )
        )
    return groups


@pytest.mark.parametrize("method", ["flap", "error"])
@pytest.mark.parametrize("budget", [0.0, 0.1, 0.37, 0.6])
def test_allocate_widths_meets_budget(method, budget):
    groups = mixed_groups()
    total = sum(g.width * g.cost_per_channel for g in groups)
    largest_cost = max(g.cost_per_channel for g in groups)

    widths = allocate_widths(groups, budget, method)

    removed = removed_cost(groups, widths)
    assert removed >= budget * total - 1e-9 * total
    assert removed < budget * total + largest_cost
    for group, width in zip(groups, widths):
        assert group.min_width <= width <= group.width


@pytest.mark.parametrize("method", ["flap", "error"])
def test_allocate_widths_min_width_binds(method):
    # Group 0 is the cheapest to prune by both criteria, but only down to 5 channels.
    width = 10
    free = AllocationGroup(
        width=width,
        scores=np.linspace(0.0, 1.0, width),
        error_curve=np.zeros(width + 1),
        min_width=5,
    )
    costly = AllocationGroup(
        width=width,
        scores=np.concatenate([[0.0], np.full(width - 1, 1.0)]),
        error_curve=np.linspace(1.0, 0.0, width + 1),
    )

    widths = allocate_widths([free, costly], 0.4, method)

    assert widths == [5, 7]


def test_allocate_widths_uniform_matches_kept_width():
    groups = [AllocationGroup(width=w) for w in (10, 7, 64, 3)]
    widths = allocate_widths(groups, 0.25, "uniform")
    assert widths == [kept_width(w, 0.25) for w in (10, 7, 64, 3)]


def test_allocate_widths_uniform_respects_min_width():
    groups = [AllocationGroup(width=10, min_width=6), AllocationGroup(width=10)]
    assert allocate_widths(groups, 0.5, "uniform") == [6, 5]


def redundant_and_full_rank_groups() -> tuple[list[AllocationGroup], list[np.ndarray]]:
    """Return a group whose 16 channels span 2 factors and a full-rank group of 16."""
    width = 16
    rng = np.random.default_rng(41)
    redundant = rng.standard_normal((500, 2)) @ rng.standard_normal((2, width))
    redundant += 0.01 * rng.standard_normal((500, width))
    full_rank = rng.standard_normal((500, width))
    groups, curves = [], []
    for x in (redundant, full_rank):
        gram = x.T @ x
        consumers = [rng.standard_normal((8, width))]
        curve = error_curve(gram, consumers, np.arange(width), widths=range(width + 1))
        energy = float(np.sum(consumers[0].T @ consumers[0] * gram))
        groups.append(AllocationGroup(width=width, error_curve=curve, error_scale=energy))
        curves.append(curve * energy)
    return groups, curves


def test_allocate_widths_error_beats_uniform():
    groups, curves = redundant_and_full_rank_groups()

    by_error = allocate_widths(groups, 0.5, "error")
    uniform = allocate_widths(groups, 0.5, "uniform")

    error_total = sum(curve[k] for curve, k in zip(curves, by_error))
    uniform_total = sum(curve[k] for curve, k in zip(curves, uniform))
    assert sum(by_error) == sum(uniform)
    assert by_error[0] < by_error[1]
    assert error_total < 0.5 * uniform_total


def test_allocate_widths_flap_standardises_per_group():
    # Group 0 has the larger raw scores, but one outlier pushes its other nine
    # channels to a standardised score of -1/3. Group 1 has one low outlier at
    # -3 and nine channels at +1/3. FLAP removes the outlier of group 1, then
    # seven of the nine low channels of group 0.
    high_outlier = 1000.0 * np.array([100.0] + [1.0] * 9)
    low_outlier = np.array([1.0] + [100.0] * 9)
    groups = [
        AllocationGroup(width=10, scores=high_outlier),
        AllocationGroup(width=10, scores=low_outlier),
    ]

    widths = allocate_widths(groups, 0.4, "flap")

    assert widths == [3, 9]


def test_allocate_widths_flap_ties_by_group():
    groups = [AllocationGroup(width=4, scores=np.ones(4)), AllocationGroup(width=4, scores=np.ones(4))]
    assert allocate_widths(groups, 0.5, "flap") == [1, 3]


def test_allocate_widths_infeasible_budget_raises():
    groups = [AllocationGroup(width=10, min_width=8, scores=np.arange(10.0))]
    with pytest.raises(ValueError, match="allows at most"):
        allocate_widths(groups, 0.5, "flap")


def test_allocate_widths_unknown_method_lists_names():
    assert ALLOCATION_METHODS == ("uniform", "flap", "error")
    with pytest.raises(ValueError, match="uniform, flap, error"):
        allocate_widths([AllocationGroup(width=4)], 0.5, "hessian")


@pytest.mark.parametrize(("method", "field"), [("flap", "scores"), ("error", "error_curve")])
def test_allocate_widths_missing_inputs_raise(method, field):
    with pytest.raises(ValueError, match=field):
        allocate_widths([AllocationGroup(width=4)], 0.5, method)


@pytest.mark.parametrize("budget", [1.0, -0.2, float("nan")])
def test_allocate_widths_invalid_budget_raises(budget):
    with pytest.raises(ValueError, match="budget_fraction"):
        allocate_widths([AllocationGroup(width=4)], budget, "uniform")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"width": 4, "cost_per_channel": 0.0}, "cost_per_channel"),
        ({"width": 4, "min_width": 5}, "min_width"),
        ({"width": 4, "min_width": 0}, "min_width"),
        ({"width": 4, "scores": np.ones(3)}, r"scores must have shape \(4,\)"),
        ({"width": 4, "error_curve": np.ones(4)}, r"error_curve must have shape \(5,\)"),
        ({"width": 4, "error_scale": -1.0}, "error_scale"),
    ],
)
def test_allocation_group_validates_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllocationGroup(**kwargs)
