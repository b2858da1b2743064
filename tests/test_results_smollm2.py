"""Tests of the SmolLM2 results tool on a tiny random LLaMA: row labels, latency rows and the page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grail_graph.api import TensorBatches
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.hf_models import TokenModel
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from tools import results_smollm2
from tools.results_smollm2 import ROWS, Store, format_page, latency_section, measure_latency_rows, mlp, with_fallback


def tiny_llama() -> TokenModel:
    """Return a two-layer LLaMA (6 query and 2 key/value heads, MLP width 256) that returns logits."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config.use_cache = False
    return TokenModel(LlamaForCausalLM(config), causal=True).eval()


def test_statistics_rows_calibrate_group_by_group():
    row = mlp(0.2, "wanda", "0", statistics="sequential")

    assert row.label == "MLP 20%, wanda, ridge alpha=0, sequential statistics"
    assert row.passes.startswith("calibrate{statistics=sequential},select{method=wanda sparsity=0.2}")
    fallback = with_fallback(row)
    assert fallback.label == "MLP 20%, wanda, ridge alpha=0, sequential statistics, held-out fallback"
    assert fallback.passes == (
        "calibrate{statistics=sequential holdout=0.125},select{method=wanda sparsity=0.2},"
        "compensate{alpha=0 affine=false fallback=true},rewrite"
    )
    assert len({row.label for row in ROWS}) == len(ROWS)
    for row in ROWS:
        parse_pipeline(row.passes)


def test_latency_rows_time_every_model(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(results_smollm2, "LATENCY_RUNS", 2)
    monkeypatch.setattr(results_smollm2, "LATENCY_ROWS", results_smollm2.LATENCY_ROWS[3:])
    windows = np.random.default_rng(0).integers(0, 64, size=(4, 16))
    base = FxFrontEnd(tiny_llama(), example_inputs=torch.from_numpy(windows[:2]), device="cpu")
    state = CompressionState(frontend=base, calibration=TensorBatches([torch.from_numpy(windows)]), device="cpu")
    run_pipeline(parse_pipeline("find-groups,calibrate"), state, verify_each=False)

    latency = measure_latency_rows(base, state.groups, state.stats, windows, tmp_path)

    rows = latency["rows"]
    assert list(rows) == ["dense", "MLP 20% + heads 33%, widths a multiple of 64"]
    compressed = rows["MLP 20% + heads 33%, widths a multiple of 64"]
    assert compressed["mlp_widths"] == [192]
    assert compressed["parameters"] < rows["dense"]["parameters"]
    assert np.isfinite(compressed["perplexity"])
    for row in rows.values():
        assert row["default_ms"] > 0
        assert row["one_thread_ms"] > 0
    section = "\n".join(latency_section(latency))
    assert "| MLP 20% + heads 33%, widths a multiple of 64 | 192 |" in section


def test_page_lists_statistics_rows_and_latency(tmp_path: Path):
    store = Store(tmp_path / "results.json")
    store.put("dense", {"perplexity": 28.82})
    label = "MLP 20%, wanda, ridge alpha=0, sequential statistics"
    store.put(label, {"perplexity": 37.5, "parameters": 100, "compress_seconds": 60.0})
    fallback = "MLP 20%, wanda, ridge alpha=0, cross statistics, held-out fallback"
    store.put(fallback, {"perplexity": 39.0, "parameters": 100, "compress_seconds": 90.0, "fallbacks": 4, "width": 30 * 1536})
    dense = {"parameters": 200, "default_ms": 10.0, "one_thread_ms": 20.0}
    small = {"parameters": 100, "perplexity": 40.0, "mlp_widths": [64], "default_ms": 5.0, "one_thread_ms": 15.0}
    rounded = {"parameters": 90, "perplexity": 41.0, "mlp_widths": [64], "default_ms": 4.0, "one_thread_ms": 14.0}
    latency_rows = {"dense": dense, "small": {**small, "mlp_widths": [70]}, "small, widths a multiple of 64": rounded}
    store.put("latency", {"runs": 2, "tokens": 16, "rows": latency_rows})
    facts = {"date": "today", "version": "0", "cpus": 2, "processor": "x86_64"}

    page = format_page(store, facts, "python -m tools.results_smollm2 --out page.md", 200)

    assert f"| {label} | 37.50 | 37.31 |" in page
    assert "| small | 70 | 100 | 40.00 | 5 | 0.50 | 15 | 0.75 |" in page
    assert "- small: rounding the MLP width from 70 to 64 changed the time ratio (default threads) from 0.50 to 0.40" in page
    assert "`MLP 20%, wanda, ridge alpha=0, sequential statistics` against the earlier implementation" in page
    assert "- With the held-out fallback, 4 of the 30 MLP groups kept plain slicing" in page

