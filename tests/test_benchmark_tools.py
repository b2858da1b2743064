"""Tests for the pure helpers of tools/benchmark_resnet.py (no model, data or timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import benchmark_resnet as bench


def make_row(selector: str, compensation: str, sparsity: float, accuracy: float) -> bench.AccuracyRow:
    point = bench.GridPoint(selector, compensation, sparsity)
    return bench.AccuracyRow(point, accuracy, 0.9, 100, 1000, 1.0, None, Path(f"{point.label}.onnx"))


def test_grid_points_full_and_quick():
    full = bench.grid_points(bench.FULL_SETTINGS.selectors, bench.FULL_SETTINGS.sparsities)
    quick = bench.grid_points(bench.QUICK_SETTINGS.selectors, bench.QUICK_SETTINGS.sparsities)

    assert len(full) == 4 * 2 * 3
    assert len(set(full)) == len(full)
    assert {point.compensation for point in full} == {"ridge", "none"}
    assert quick == [bench.GridPoint("wanda", "ridge", 0.5), bench.GridPoint("wanda", "none", 0.5)]


def test_grid_point_label():
    assert bench.GridPoint("gram", "none", 0.7).label == "gram-none-0.7"


def test_gram_flops_sums_groups():
    # 2 * rows * H^2 per group
    assert bench.gram_flops([(10, 4), (3, 2)]) == 2 * 10 * 16 + 2 * 3 * 4
    assert bench.gram_flops([]) == 0.0


def test_gram_product_shapes_counts_batches():
    shapes = bench.gram_product_shapes([(1024, 16), (256, 32), (1024, 16)], [64, 64, 8])

    assert shapes == [(2048, 32, 1), (8192, 16, 2), (16384, 32, 2), (65536, 16, 4)]


def test_gram_product_shapes_match_flops():
    rows_and_widths = [(1024, 16), (64, 64)]
    batch_sizes = [64] * 8
    shapes = bench.gram_product_shapes(rows_and_widths, batch_sizes)
    total_rows = [(rows * sum(batch_sizes), width) for rows, width in rows_and_widths]

    assert sum(2 * rows * width**2 * count for rows, width, count in shapes) == bench.gram_flops(total_rows)


def test_markdown_table_alignment():
    table = bench.markdown_table(["name", "value"], [["a", "1"], ["b", "22"]])

    assert table.splitlines() == ["| name | value |", "| --- | ---: |", "| a | 1 |", "| b | 22 |"]


def test_markdown_table_rejects_short_row():
    with pytest.raises(ValueError, match="one entry per header"):
        bench.markdown_table(["name", "value"], [["a"]])


def test_reference_rows_difference():
    rows = [make_row("wanda", "ridge", 0.3, 75.0), make_row("gram", "ridge", 0.3, 70.0)]

    table = bench.reference_rows(rows, {("wanda", "ridge", 0.3): 74.27})

    assert table == [["wanda, ridge, 30%", "75.00", "74.27", "+0.73"]]


def test_compensation_gain_table():
    rows = [make_row("wanda", "ridge", 0.5, 55.0), make_row("wanda", "none", 0.5, 35.5)]

    table = bench.compensation_gain_table(rows, [0.5])

    assert table.splitlines()[-1] == "| wanda | +19.50 |"


def test_is_gram_matmul():
    def event(op: str, shape: list[int]) -> dict:
        return {"args": {"op_name": op, "output_type_shape": [{"float": shape}]}}

    assert bench.is_gram_matmul(event("FusedMatMul", [16, 16]), {16, 32})
    assert bench.is_gram_matmul(event("MatMul", [32, 32]), {16, 32})
    assert not bench.is_gram_matmul(event("MatMul", [64, 64]), {16, 32})
    assert not bench.is_gram_matmul(event("MatMul", [16, 32]), {16, 32})
    assert not bench.is_gram_matmul(event("Conv", [16, 16]), {16})


def test_span_and_plural():
    assert bench.span([1000]) == "1,000"
    assert bench.span([1000, 2000]) == "1,000 to 2,000"
    assert bench.plural(1, "repeat") == "1 repeat"
    assert bench.plural(5, "repeat") == "5 repeats"
    assert bench.plural(2, "pass", "passes") == "2 passes"


def test_write_atomically_replaces_file(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    bench.write_atomically(path, "first\n")
    bench.write_atomically(path, "second\n")

    assert path.read_text() == "second\n"
    assert [entry.name for entry in path.parent.iterdir()] == ["benchmarks.md"]


def test_accuracy_bullets_name_losses_and_references():
    rows = [
        make_row("wanda", "ridge", 0.3, 74.5),
        make_row("wanda", "none", 0.3, 62.5),
        make_row("magnitude", "ridge", 0.3, 60.0),
        make_row("magnitude", "none", 0.3, 61.0),
    ]
    settings = bench.Settings(("wanda", "magnitude"), (0.3,), None, 1, 1, 1, quick=False)
    dense = bench.DenseResult(83.2, 100, 1000, logits=None)

    folded = bench.AccuracyRow(
        bench.GridPoint("magnitude", "ridge", 0.3, folded_batchnorm=True), 67.0, 0.9, 100, 1000, 1.0, None, Path("m.onnx")
    )

    results = bench.AccuracyResults(rows, [folded], [])

    bullets = bench.accuracy_bullets(results, settings, dense, depth=56)

    assert "wanda +12.00, magnitude -1.00" in bullets[0]
    assert "wanda with ridge compensation at 74.50%" in bullets[0]
    assert bullets[1] == "Ridge compensation lowers accuracy for magnitude at 30%."
    assert bullets[2].startswith("3 of the 4 reference figures are within 1 point of ours.")
    assert "magnitude, ridge, 30% (-7.06)" in bullets[2]
    assert "BatchNorm folded" not in bullets[2]


def test_reference_rows_mark_folded_export():
    point = bench.GridPoint("magnitude", "ridge", 0.5, folded_batchnorm=True)
    row = bench.AccuracyRow(point, 29.3, 0.5, 100, 1000, 1.0, None, Path("m.onnx"))

    table = bench.reference_rows([row], {("magnitude", "ridge", 0.5): 29.32})

    assert point.label == "magnitude-ridge-0.5-folded-bn"
    assert table == [["magnitude, ridge, 50%, BatchNorm folded", "29.30", "29.32", "-0.02"]]


def test_grid_point_label_marks_settings():
    point = bench.GridPoint("wanda", "ridge", 0.5, statistics="cross", affine=True)

    assert point.label == "wanda-ridge-0.5-cross-affine"


def test_kept_widths_text():
    assert bench.kept_widths_text([(16, 11), (32, 22)]) == "11 of 16, 22 of 32"
    assert bench.kept_widths_text([]) == ""


def test_thread_setting_bullets_flag_contention():
    latency = [
        bench.LatencyResult(0.5, 60, "default", (10.4, 1.85), (242.2, 199.8)),
        bench.LatencyResult(0.5, 60, "1", (2.18, 1.52), (185.6, 143.4)),
        bench.LatencyResult(0.7, 40, "default", (2.2, 1.4), (82.7, 65.4)),
        bench.LatencyResult(0.7, 40, "1", (1.9, 1.3), (106.4, 76.8)),
    ]

    bullets = bench.thread_setting_bullets(latency)

    assert len(bullets) == 1
    assert "(10.40 against 2.18 ms at 50%)" in bullets[0]
    assert bench.thread_setting_bullets(latency[2:]) == []
