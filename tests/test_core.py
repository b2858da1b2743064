"""Tests of the numpy core: Gram statistics, closed-form maps and selectors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from grail_graph.core import (
    SELECTORS,
    GramAccumulator,
    absorb,
    averaging_matrix,
    fold_map,
    gram_greedy_select,
    kept_width,
    magnitude_scores,
    output_energy_matrix,
    prune_map,
    random_select,
    reconstruction_error,
    relative_reconstruction_error,
    ridge_lambda,
    select_channels,
    slice_map,
    solve_spd,
    top_k,
    wanda_scores,
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


def consumer_matrix(weight: np.ndarray) -> np.ndarray:
    """Reshape a consumer weight (O, H, *rest) to (O * prod(rest), H)."""
    return np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1])


def direct_error(x: np.ndarray, consumers: list[np.ndarray], b: np.ndarray, keep) -> float:
    """Compute sum ||X W^T - X_P (W B)^T||_F^2 from the activations themselves."""
    total = 0.0
    for weight in consumers:
        matrix = consumer_matrix(weight)
        target = x @ matrix.T
        approximation = x[:, keep] @ (matrix @ b).T
        total += float(np.sum((target - approximation) ** 2))
    return total


# Closed-form maps on identity Gram


def test_prune_map_identity_gram_is_slicing():
    b = prune_map(np.eye(WIDTH), KEEP, alpha=0.0)
    np.testing.assert_allclose(b, slice_map(WIDTH, KEEP), atol=1e-12)


def test_fold_map_identity_gram_sums_members():
    labels = np.array([0, 1, 0, 2, 1, 1, 3, 2, 0, 3, 3, 2])
    r = averaging_matrix(labels, 4)
    b = fold_map(np.eye(WIDTH), r, alpha=0.0)
    weight = np.random.default_rng(1).standard_normal((5, WIDTH))

    folded = absorb(weight, b)

    for cluster in range(4):
        expected = weight[:, labels == cluster].sum(axis=1)
        np.testing.assert_allclose(folded[:, cluster], expected, atol=1e-12)


def test_averaging_matrix_rows():
    r = averaging_matrix(np.array([1, 0, 1, 1]), 2)
    np.testing.assert_allclose(r, [[0, 1, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3]])


def test_averaging_matrix_empty_cluster_raises():
    with pytest.raises(ValueError, match="no members"):
        averaging_matrix(np.array([0, 0, 2]), 3)


# Closed-form maps without ridge


def test_prune_map_kept_rows_are_identity():
    x = correlated_activations(2)
    b = prune_map(x.T @ x, KEEP, alpha=0.0)
    np.testing.assert_allclose(b[KEEP, :], np.eye(KEEP.size), atol=1e-9)


def test_prune_map_removed_rows_regress_on_kept():
    x = correlated_activations(3)
    gram = x.T @ x
    removed = np.setdiff1d(np.arange(WIDTH), KEEP)
    weight = np.random.default_rng(3).standard_normal((6, WIDTH))

    compensated = weight @ prune_map(gram, KEEP, alpha=0.0)

    regression = gram[np.ix_(removed, KEEP)] @ np.linalg.inv(gram[np.ix_(KEEP, KEEP)])
    expected = weight[:, KEEP] + weight[:, removed] @ regression
    np.testing.assert_allclose(compensated, expected, rtol=1e-9, atol=1e-9)


# Closed-form maps against a direct least-squares refit


def ridge_refit(x: np.ndarray, matrix: np.ndarray, keep, lam: float) -> np.ndarray:
    """Solve argmin ||X_P W'^T - X W^T||^2 + lam ||W'||^2 as a stacked lstsq, (O, K)."""
    kept_columns = x[:, keep]
    target = x @ matrix.T
    size = kept_columns.shape[1]
    design = np.vstack([kept_columns, np.sqrt(lam) * np.eye(size)])
    stacked_target = np.vstack([target, np.zeros((size, target.shape[1]))])
    solution, *_ = np.linalg.lstsq(design, stacked_target, rcond=None)
    return solution.T


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_absorb_linear_matches_refit(alpha):
    x = correlated_activations(4)
    gram = x.T @ x
    weight = np.random.default_rng(4).standard_normal((7, WIDTH))
    lam = ridge_lambda(gram[np.ix_(KEEP, KEEP)], alpha)

    compensated = absorb(weight, prune_map(gram, KEEP, alpha=alpha))

    np.testing.assert_allclose(
        compensated, ridge_refit(x, weight, KEEP, lam), rtol=1e-7, atol=1e-8
    )


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_absorb_conv_matches_refit(alpha):
    # Rows of X are per-pixel channel vectors. A per-pixel channel map commutes
    # with the spatial convolution, so each kernel tap is refit on its own.
    x = correlated_activations(5)
    gram = x.T @ x
    weight = np.random.default_rng(5).standard_normal((4, WIDTH, 3, 3))
    lam = ridge_lambda(gram[np.ix_(KEEP, KEEP)], alpha)

    compensated = absorb(weight, prune_map(gram, KEEP, alpha=alpha))

    assert compensated.shape == (4, KEEP.size, 3, 3)
    expected = ridge_refit(x, consumer_matrix(weight), KEEP, lam)
    np.testing.assert_allclose(
        consumer_matrix(compensated), expected, rtol=1e-7, atol=1e-8
    )


def test_absorb_keeps_weight_dtype():
    weight = np.ones((2, 3, 5), dtype=np.float32)
    assert absorb(weight, slice_map(3, [0, 2])).dtype == np.float32


def test_prune_map_invariant_to_gram_scale():
    x = correlated_activations(6)
    gram = x.T @ x
    np.testing.assert_allclose(
        prune_map(1e4 * gram, KEEP, alpha=1e-2),
        prune_map(gram, KEEP, alpha=1e-2),
        rtol=1e-10,
        atol=1e-12,
    )


def test_fold_map_invariant_to_gram_scale():
    x = correlated_activations(7)
    gram = x.T @ x
    r = averaging_matrix(np.arange(WIDTH) % 5, 5)
    np.testing.assert_allclose(
        fold_map(1e-3 * gram, r, alpha=1e-2),
        fold_map(gram, r, alpha=1e-2),
        rtol=1e-10,
        atol=1e-12,
    )


def test_prune_map_empty_keep():
    b = prune_map(np.eye(WIDTH), [], alpha=1e-3)
    assert b.shape == (WIDTH, 0)


@pytest.mark.parametrize("keep", [[0, 0, 3], [0, WIDTH], [-1, 2]])
def test_prune_map_invalid_keep_raises(keep):
    with pytest.raises(ValueError, match="keep"):
        prune_map(np.eye(WIDTH), keep)


# Reconstruction error


def consumers_for(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((5, WIDTH)), rng.standard_normal((3, WIDTH, 3, 3))]


def test_reconstruction_error_compensation_beats_slicing():
    x = correlated_activations(8)
    gram = x.T @ x
    consumers = consumers_for(8)

    compensated = reconstruction_error(gram, consumers, prune_map(gram, KEEP, 1e-6), KEEP)
    sliced = reconstruction_error(gram, consumers, slice_map(WIDTH, KEEP), KEEP)

    assert compensated < sliced


def test_reconstruction_error_matches_direct():
    x = correlated_activations(9)
    gram = x.T @ x
    consumers = consumers_for(9)
    # A large ridge term keeps B away from the optimum, so all terms matter.
    b = prune_map(gram, KEEP, alpha=0.5)

    expected = direct_error(x, consumers, b, KEEP)

    assert reconstruction_error(gram, consumers, b, KEEP) == pytest.approx(expected, rel=1e-9)


def test_relative_reconstruction_error_normalises():
    x = correlated_activations(10)
    gram = x.T @ x
    consumers = consumers_for(10)
    b = slice_map(WIDTH, KEEP)
    total = direct_error(x, consumers, np.zeros((WIDTH, KEEP.size)), KEEP)

    relative = relative_reconstruction_error(gram, consumers, b, KEEP)

    assert relative == pytest.approx(direct_error(x, consumers, b, KEEP) / total, rel=1e-9)


def test_relative_reconstruction_error_zero_gram():
    zero = np.zeros((WIDTH, WIDTH))
    b = slice_map(WIDTH, KEEP)
    assert relative_reconstruction_error(zero, consumers_for(11), b, KEEP) == 0.0


def test_output_energy_matrix_sums_consumers():
    consumers = consumers_for(12)
    expected = sum(consumer_matrix(w).T @ consumer_matrix(w) for w in consumers)
    np.testing.assert_allclose(output_energy_matrix(consumers), expected, rtol=1e-12)


# GramAccumulator


def test_gram_accumulator_streaming_matches_full():
    x = correlated_activations(13)
    accumulator = GramAccumulator(WIDTH)
    for batch in np.array_split(x, 7):
        accumulator.add_rows(batch)

    np.testing.assert_allclose(accumulator.gram, x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(accumulator.sums, x.sum(axis=0), rtol=1e-12, atol=1e-10)
    assert accumulator.count == ROWS


def test_gram_accumulator_fp16_accumulates_in_fp32():
    # A plain fp16 product of these 4000 rows has a relative error near 1e-4,
    # about ten times the bound below.
    x16 = correlated_activations(14, rows=4000).astype(np.float16)
    reference = x16.astype(np.float64).T @ x16.astype(np.float64)
    accumulator = GramAccumulator(WIDTH)
    for batch in np.array_split(x16, 4):
        accumulator.add_rows(batch)

    assert accumulator.gram.dtype == np.float64
    scale = np.max(np.abs(reference))
    assert np.max(np.abs(accumulator.gram - reference)) / scale < 1e-5


def test_gram_accumulator_bfloat16_input():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = correlated_activations(15).astype(ml_dtypes.bfloat16)
    reference = x.astype(np.float64).T @ x.astype(np.float64)
    accumulator = GramAccumulator(WIDTH)
    accumulator.add_rows(x)
    np.testing.assert_allclose(accumulator.gram, reference, rtol=1e-5, atol=1e-3)


def test_gram_accumulator_merge_and_partial():
    x = correlated_activations(16)
    first, second = GramAccumulator(WIDTH), GramAccumulator(WIDTH)
    first.add_rows(x[:150])
    second.add_partial(x[150:].T @ x[150:], x[150:].sum(axis=0), ROWS - 150)

    first.merge(second)

    np.testing.assert_allclose(first.gram, x.T @ x, rtol=1e-12, atol=1e-10)
    assert first.count == ROWS


def test_gram_accumulator_mean_and_covariance():
    x = correlated_activations(17)
    accumulator = GramAccumulator(WIDTH)
    accumulator.add_rows(x)

    np.testing.assert_allclose(accumulator.mean(), x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        accumulator.covariance(), np.cov(x, rowvar=False, bias=True), rtol=1e-9, atol=1e-10
    )


def test_gram_accumulator_rejects_nan():
    x = correlated_activations(18)
    x[3, 4] = np.nan
    accumulator = GramAccumulator(WIDTH)

    with pytest.raises(ValueError, match="non-finite"):
        accumulator.add_rows(x)
    assert accumulator.count == 0


def test_gram_accumulator_rejects_wrong_width():
    with pytest.raises(ValueError, match="shape"):
        GramAccumulator(WIDTH).add_rows(np.zeros((4, WIDTH + 1)))


def test_gram_accumulator_rejects_partial_shape():
    with pytest.raises(ValueError, match="gram must have shape"):
        GramAccumulator(WIDTH).add_partial(np.eye(3), np.zeros(WIDTH), 3)


# solve_spd fallbacks


def duplicated_activations(seed: int) -> np.ndarray:
    """Return activations where channel 7 is an exact copy of channel 1."""
    x = correlated_activations(seed)
    x[:, 7] = x[:, 1]
    return x


def test_prune_map_duplicate_channels_finite_and_warns(caplog):
    x = duplicated_activations(19)
    gram = x.T @ x
    keep = np.array([0, 1, 4, 7, 10])
    consumers = consumers_for(19)

    with caplog.at_level(logging.WARNING, logger="grail_graph.core.solve"):
        b = prune_map(gram, keep, alpha=0.0)

    assert np.all(np.isfinite(b))
    assert any("Cholesky" in record.getMessage() for record in caplog.records)
    # Channel 7 carries nothing new, so the fit still matches the one without it.
    without_copy = np.array([0, 1, 4, 10])
    expected = reconstruction_error(gram, consumers, prune_map(gram, without_copy, 0.0), without_copy)
    error = reconstruction_error(gram, consumers, b, keep)
    assert error == pytest.approx(expected, rel=1e-4)


def test_solve_spd_zero_matrix_returns_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="grail_graph.core.solve"):
        solution = solve_spd(np.zeros((3, 3)), np.zeros((3, 2)))

    np.testing.assert_array_equal(solution, np.zeros((3, 2)))
    assert len(caplog.records) == 1


def test_solve_spd_rank_deficient_uses_jitter(caplog):
    # A rank-1 matrix with a consistent right-hand side.
    vector = np.array([1.0, 2.0, -1.0, 0.5])
    matrix = np.outer(vector, vector)
    rhs = matrix @ np.array([0.3, -0.2, 0.1, 0.4])

    with caplog.at_level(logging.WARNING, logger="grail_graph.core.solve"):
        solution = solve_spd(matrix, rhs)

    assert np.all(np.isfinite(solution))
    np.testing.assert_allclose(matrix @ solution, rhs, atol=1e-6)
    assert len(caplog.records) == 1
    assert "jitter" in caplog.records[0].getMessage()


def test_solve_spd_indefinite_uses_pinv(caplog):
    # The eigenvalues are 3 and -1. No jitter up to 1e-4 * mean(diag) makes this
    # positive definite, so the pseudo-inverse drops the negative eigenvalue.
    matrix = np.array([[1.0, 2.0], [2.0, 1.0]])

    with caplog.at_level(logging.WARNING, logger="grail_graph.core.solve"):
        solution = solve_spd(matrix, np.array([3.0, 3.0]))

    np.testing.assert_allclose(solution, [1.0, 1.0], atol=1e-12)
    assert len(caplog.records) == 1
    assert "pseudo-inverse" in caplog.records[0].getMessage()


def test_solve_spd_well_conditioned_no_warning(caplog):
    rng = np.random.default_rng(20)
    factor = rng.standard_normal((6, 6))
    matrix = factor @ factor.T + np.eye(6)
    rhs = rng.standard_normal(6)

    with caplog.at_level(logging.WARNING, logger="grail_graph.core.solve"):
        solution = solve_spd(matrix, rhs)

    np.testing.assert_allclose(matrix @ solution, rhs, atol=1e-10)
    assert caplog.records == []


def test_solve_spd_empty_system():
    assert solve_spd(np.zeros((0, 0)), np.zeros((0, 3))).shape == (0, 3)


# Selectors


def test_magnitude_scores_hand_made():
    producer = np.array([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    bias = np.array([0.0, 0.0, 0.0, 6.0])

    scores = magnitude_scores([producer, bias])

    np.testing.assert_allclose(scores, [5.0, 1.0, np.sqrt(2.0), 6.0])
    np.testing.assert_array_equal(top_k(scores, 2), [0, 3])


def test_wanda_scores_hand_made():
    # Channel 0 has the largest weights and channel 2 the largest activations,
    # but channel 1 has the largest product.
    gram = np.diag([1.0, 16.0, 100.0])
    weight = np.array([[10.0, 3.0, 0.1], [0.0, 4.0, 0.0]])

    scores = wanda_scores(gram, [weight])

    np.testing.assert_allclose(scores, [10.0, 20.0, 1.0])
    np.testing.assert_array_equal(top_k(scores, 1), [1])


def test_top_k_ties_prefer_lower_index():
    np.testing.assert_array_equal(top_k(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 2), [1, 2])


def test_top_k_returns_sorted_indices():
    np.testing.assert_array_equal(top_k(np.array([0.5, 9.0, 0.1, 7.0]), 3), [0, 1, 3])


def correlated_copy_case() -> tuple[np.ndarray, list[np.ndarray]]:
    """Return (G, consumers) where channel 5 copies channel 2 and both dominate Wanda."""
    x = correlated_activations(21)
    x[:, 2] *= 4.0
    x[:, 5] = x[:, 2]
    return x.T @ x, consumers_for(21)


def test_gram_greedy_skips_exact_copy():
    gram, consumers = correlated_copy_case()
    keep = gram_greedy_select(gram, consumers, 6)
    assert not {2, 5} <= set(keep.tolist())


def test_wanda_keeps_both_copies_in_copy_case():
    # The comparison with Wanda is meaningful only if Wanda keeps both copies.
    gram, consumers = correlated_copy_case()
    keep = top_k(wanda_scores(gram, consumers), 6)
    assert {2, 5} <= set(keep.tolist())


def compensated_error(gram: np.ndarray, consumers: list[np.ndarray], keep) -> float:
    return reconstruction_error(gram, consumers, prune_map(gram, keep, 1e-6), keep)


def test_gram_greedy_beats_wanda():
    gram, consumers = correlated_copy_case()
    greedy = compensated_error(gram, consumers, gram_greedy_select(gram, consumers, 6))
    wanda = compensated_error(gram, consumers, top_k(wanda_scores(gram, consumers), 6))
    assert greedy <= wanda


@pytest.mark.parametrize("seed", range(5))
def test_gram_greedy_beats_random(seed):
    gram, consumers = correlated_copy_case()
    greedy = compensated_error(gram, consumers, gram_greedy_select(gram, consumers, 6))
    random = compensated_error(gram, consumers, random_select(WIDTH, 6, seed=seed))
    assert greedy <= random


@pytest.mark.parametrize("seed", range(3))
def test_gram_greedy_equals_brute_force_greedy(seed):
    # Each step must add the channel whose compensated output error is lowest.
    x = correlated_activations(40 + seed)
    gram, consumers = x.T @ x, consumers_for(50 + seed)
    chosen: list[int] = []
    for _ in range(7):
        errors = {
            j: reconstruction_error(gram, consumers, prune_map(gram, sorted([*chosen, j]), 0.0), sorted([*chosen, j]))
            for j in range(WIDTH)
            if j not in chosen
        }
        chosen.append(min(errors, key=errors.get))

    np.testing.assert_array_equal(gram_greedy_select(gram, consumers, 7), sorted(chosen))


def test_gram_greedy_fills_zero_pivots_by_wanda(caplog):
    # Only channels 0 and 1 are active, so after two picks every pivot is zero.
    gram = np.zeros((4, 4))
    gram[:2, :2] = [[2.0, 0.5], [0.5, 1.0]]
    weight = np.array([[1.0, 1.0, 0.1, 3.0]])

    with caplog.at_level(logging.INFO, logger="grail_graph.core.selectors"):
        keep = gram_greedy_select(gram, [weight], 3)

    # Wanda scores of the inactive channels 2 and 3 are both 0, so the tie goes to 2.
    np.testing.assert_array_equal(keep, [0, 1, 2])
    assert len(caplog.records) == 1


def test_gram_greedy_returns_sorted_unique():
    gram, consumers = correlated_copy_case()
    keep = gram_greedy_select(gram, consumers, 9)
    np.testing.assert_array_equal(keep, np.unique(keep))
    assert keep.size == 9


def test_random_select_is_seeded():
    np.testing.assert_array_equal(random_select(20, 5, seed=3), random_select(20, 5, seed=3))


@pytest.mark.parametrize(
    ("width", "sparsity", "multiple", "expected"),
    [
        (10, 0.25, 1, 7),  # 2.5 channels removed rounds half up to 3
        (8, 0.5, 1, 4),
        (7, 0.5, 1, 3),  # 3.5 rounds up to 4 removed
        (10, 0.0, 1, 10),
        (10, 0.99, 1, 1),  # all 10 removed, clamped to keep 1
        (64, 0.3, 8, 48),  # 45 kept rounds to 48
        (64, 0.75, 8, 16),
        (64, 0.99, 8, 8),  # at least one multiple
        (4, 0.5, 8, 2),  # width below the multiple keeps K
    ],
)
def test_kept_width_rounding(width, sparsity, multiple, expected):
    assert kept_width(width, sparsity, multiple) == expected


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_kept_width_invalid_sparsity_raises(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        kept_width(10, sparsity)


def test_select_channels_dispatch():
    gram, consumers = correlated_copy_case()
    producers = [np.random.default_rng(22).standard_normal((WIDTH, 3))]

    np.testing.assert_array_equal(
        select_channels("gram", 6, gram=gram, consumers=consumers),
        gram_greedy_select(gram, consumers, 6),
    )
    np.testing.assert_array_equal(
        select_channels("magnitude", 4, producers=producers),
        top_k(magnitude_scores(producers), 4),
    )
    np.testing.assert_array_equal(
        select_channels("random", 4, gram=gram, seed=2), random_select(WIDTH, 4, seed=2)
    )


def test_select_channels_unknown_method_lists_names():
    with pytest.raises(ValueError, match="magnitude, wanda, gram, random"):
        select_channels("l1", 3, gram=np.eye(4))


@pytest.mark.parametrize("method", ["wanda", "gram", "magnitude", "random"])
def test_select_channels_missing_inputs_raise(method):
    assert method in SELECTORS
    with pytest.raises(ValueError, match="needs"):
        select_channels(method, 2)
