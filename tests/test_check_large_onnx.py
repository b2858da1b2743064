"""Tests of the large-model check tool at a small size, with the size limit lowered to match."""

from __future__ import annotations

from pathlib import Path

from tools import check_large_onnx


def test_tool_compresses_model_above_lowered_limit(tmp_path: Path, monkeypatch):
    sizes = {"FEATURES": 16, "HIDDEN": 32, "BLOCKS": 3, "TOKENS": 2, "CALIBRATION_SAMPLES": 16, "EVALUATION_SAMPLES": 8}
    for name, value in sizes.items():
        monkeypatch.setattr(check_large_onnx, name, value)
    monkeypatch.setattr(check_large_onnx, "SPARSITY", 0.25)
    weights = 3 * 2 * 16 * 32 * 4
    monkeypatch.setattr(check_large_onnx, "PROTOBUF_LIMIT_BYTES", weights // 2)
    page = tmp_path / "page.md"

    assert check_large_onnx.main(["--work-dir", str(tmp_path / "work"), "--out", str(page)]) == 0

    text = page.read_text()
    assert "- Groups: 3 found, 3 compressed." in text
    assert "The ONNX checker (full check) passed" in text
    assert (tmp_path / "work" / "large.onnx.data").stat().st_size >= weights
    assert (tmp_path / "work" / "large-small.onnx").exists()


def test_model_is_above_limit_at_full_size():
    weights = check_large_onnx.BLOCKS * 2 * check_large_onnx.FEATURES * check_large_onnx.HIDDEN * 4
    compressed_bytes = weights * (1 - check_large_onnx.SPARSITY)

    assert compressed_bytes > check_large_onnx.PROTOBUF_LIMIT_BYTES
