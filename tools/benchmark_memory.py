"""Measure the memory and time of one group's statistics and solve at LLM widths.

For a hidden width H (1536 is SmolLM2-135M's MLP, 11008 a 7B LLaMA's), the script streams
activation rows into a `GramAccumulator`, solves the ridge map for K = (1 - sparsity) H
kept channels with `prune_map`, and computes the closed-form relative error, the steps
the compensate pass runs for one group. Peak memory is traced with `tracemalloc`, which
numpy reports its buffers to, so the numbers count array memory and not the interpreter.
Groups are processed one at a time, so this is the extra memory a whole model needs.

Usage::

    python -m tools.benchmark_memory --out docs/benchmark-memory.md [--widths 1536,11008]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grail_graph.core import GramAccumulator, kept_width, prune_map, relative_reconstruction_error, wanda_scores, top_k
from tools.benchmark_resnet import markdown_table, page_header, write_atomically

SPARSITY = 0.2
ROWS_PER_BATCH = 2048
BATCHES = 16
OUTPUTS_PER_WIDTH = 0.375
"""Consumer rows per hidden channel: a LLaMA down projection maps 11008 to 4096."""


@dataclass(frozen=True)
class Measurement:
    width: int
    kept: int
    rows: int
    accumulate_seconds: float
    accumulate_peak_bytes: int
    solve_seconds: float
    solve_peak_bytes: int


def traced(step):
    """Run `step()` and return (result, seconds, peak traced bytes above the start)."""
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def measure(width: int, seed: int = 0) -> Measurement:
    rng = np.random.default_rng(seed)
    # Correlated activations, so the solve works on a realistic, ill-conditioned Gram.
    mixing = rng.normal(size=(64, width)).astype(np.float32)

    def accumulate() -> GramAccumulator:
        stats = GramAccumulator(width)
        for _ in range(BATCHES):
            rows = rng.normal(size=(ROWS_PER_BATCH, 64)).astype(np.float32) @ mixing
            rows += 0.1 * rng.normal(size=rows.shape).astype(np.float32)
            stats.add_rows(rows)
        return stats

    stats, accumulate_seconds, accumulate_peak = traced(accumulate)
    consumer = rng.normal(size=(int(width * OUTPUTS_PER_WIDTH), width))
    kept = kept_width(width, SPARSITY)

    def solve() -> float:
        keep = top_k(wanda_scores(stats.gram, [consumer]), kept)
        b = prune_map(stats.gram, keep, 1e-3)
        return relative_reconstruction_error(stats.gram, [consumer], b, keep)

    _, solve_seconds, solve_peak = traced(solve)
    return Measurement(width, kept, stats.count, accumulate_seconds, accumulate_peak, solve_seconds, solve_peak)


def format_page(measurements: list[Measurement], command: str) -> str:
    mib = 1024 * 1024
    rows = [
        [
            f"{m.width:,}",
            f"{m.kept:,}",
            f"{m.rows:,}",
            f"{m.width * m.width * 8 / mib:,.0f} MiB",
            f"{m.accumulate_peak_bytes / mib:,.0f} MiB",
            f"{m.accumulate_seconds:.1f} s",
            f"{m.solve_peak_bytes / mib:,.0f} MiB",
            f"{m.solve_seconds:.1f} s",
        ]
        for m in measurements
    ]
    return "\n".join([
        *page_header("Memory and time of one group at language-model widths", command),
        f"Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), numpy {np.__version__}. Times depend on the other load "
        "on the machine.",
        "",
        f"Each row streams {BATCHES} batches of {ROWS_PER_BATCH} float32 activation rows into a GramAccumulator "
        "(float32 partial products, float64 totals), then selects by Wanda, solves the ridge map for "
        f"K = (1 - {SPARSITY}) H and computes the closed-form relative error: the work of the calibrate and "
        "compensate passes for one group. Peak memory is what tracemalloc traced above the start of each step "
        "(numpy buffers included). With sequential or cross statistics grail-opt calibrates, solves and rewrites "
        "one group at a time and frees its statistics before the next, so the peak is one group's. One-shot "
        "statistics record every group in one calibration run and hold all their Grams until compensation: "
        "a 7B model with 32 MLP groups of width 11,008 holds 32 Grams.",
        "",
        markdown_table(
            ["H", "K", "rows", "Gram (float64)", "accumulate peak", "accumulate time", "select + solve + error peak", "select + solve + error time"], rows
        ),
        "",
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown page to write")
    parser.add_argument("--widths", default="1536,11008", help="comma-separated hidden widths H")
    args = parser.parse_args(argv)
    widths = [int(part) for part in args.widths.split(",")]
    measurements = []
    for width in widths:
        measurements.append(measure(width))
        print(measurements[-1], flush=True)
    command = f"python -m tools.benchmark_memory --out {args.out} --widths {args.widths}"
    write_atomically(args.out, format_page(measurements, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
