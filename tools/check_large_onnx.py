"""Compress an ONNX model above the 2 GiB protobuf limit from the command line, and check the result.

A protobuf message cannot exceed 2 GiB, so such a model keeps its weights in an external
data file, and every step that hands the model to ONNX Runtime or the ONNX checker must do
so through files. This tool builds a model of residual MLP blocks whose random weights
exceed the limit. It runs `grail-opt` on it, with calibration, compression and validation
in ONNX Runtime. Then it checks the written model, still above the limit, with the ONNX
checker and against the source model's outputs.

Usage::

    python -m tools.check_large_onnx --work-dir out/large --out docs/large-model.md

The model, its data and the output need about 7 GB of disk in the work folder; the run
needs about 16 GB of memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from grail_graph.cli import main as grail_main
from grail_graph.driver import tool_version
from grail_graph.onnx_frontend.model_io import PROTOBUF_LIMIT_BYTES
from tools.benchmark_resnet import markdown_table, page_header, write_atomically

logger = logging.getLogger("tools.check_large_onnx")

FEATURES = 4096
HIDDEN = 4096
BLOCKS = 17
TOKENS = 8
CALIBRATION_SAMPLES = 128
EVALUATION_SAMPLES = 32
SPARSITY = 0.02


def build_model(path: Path, seed: int = 0) -> int:
    """Write a model of BLOCKS residual blocks x + W2 relu(W1 x) to `path` with external data.

    Returns the bytes of weights. Weights are scaled by 1/sqrt(fan-in), so activations keep
    their scale through the blocks.
    """
    rng = np.random.default_rng(seed)
    batch = ir.SymbolicDim("batch")
    x = ir.Value(name="input", shape=ir.Shape([batch, TOKENS, FEATURES]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, initializers = [], []
    current = x
    for block in range(BLOCKS):
        weights = []
        for name, shape in ((f"block{block}.fc1", (FEATURES, HIDDEN)), (f"block{block}.fc2", (HIDDEN, FEATURES))):
            array = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)
            value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
            weights.append(value)
            initializers.append(value)
        fc1 = ir.node("MatMul", [current, weights[0]], outputs=[ir.Value(name=f"block{block}.hidden")])
        relu = ir.node("Relu", fc1.outputs, outputs=[ir.Value(name=f"block{block}.active")])
        fc2 = ir.node("MatMul", [relu.outputs[0], weights[1]], outputs=[ir.Value(name=f"block{block}.update")])
        add = ir.node("Add", [current, fc2.outputs[0]], outputs=[ir.Value(name=f"block{block}.out")])
        nodes += [fc1, relu, fc2, add]
        current = add.outputs[0]
    current.name = "output"
    current.shape = ir.Shape([batch, TOKENS, FEATURES])
    current.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="large")
    model = ir.Model(graph, ir_version=9, producer_name="tools.check_large_onnx")
    ir.save(model, path, external_data=path.name + ".data")
    return sum(value.const_value.nbytes for value in initializers)


def write_data(folder: Path, seed: int = 1) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    calibration = folder / "calib.npz"
    evaluation = folder / "eval.npz"
    np.savez(calibration, input=rng.standard_normal((CALIBRATION_SAMPLES, TOKENS, FEATURES), dtype=np.float32))
    np.savez(evaluation, input=rng.standard_normal((EVALUATION_SAMPLES, TOKENS, FEATURES), dtype=np.float32))
    return calibration, evaluation


def file_bytes(path: Path) -> int:
    return sum(part.stat().st_size for part in (path, path.with_name(path.name + ".data")) if part.exists())


def check_output(source: Path, output: Path, evaluation: Path) -> dict:
    """Run the ONNX checker on `output` and compare its outputs with the source's on the evaluation data."""
    onnx.checker.check_model(str(output), full_check=True)
    inputs = {"input": np.load(evaluation)["input"][:4]}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    before = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    after = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    cosine = float(np.sum(before * after) / (np.linalg.norm(before) * np.linalg.norm(after)))
    return {"checker": "passed", "cosine_first_4": cosine, "finite": bool(np.isfinite(after).all())}


def format_page(result: dict, command: str) -> str:
    report = result["report"]
    limit = PROTOBUF_LIMIT_BYTES
    rows = [
        ["source model", f"{result['source_bytes'] / 2**30:.2f} GiB", f"{result['source_bytes'] / limit:.2f}"],
        ["compressed model", f"{result['output_bytes'] / 2**30:.2f} GiB", f"{result['output_bytes'] / limit:.2f}"],
    ]
    validation = report["validation"]
    groups = report["groups"]
    compressed = sum(group["kept"] < group["width"] for group in groups)
    lines = [
        *page_header("An ONNX model above the 2 GiB protobuf limit", command),
        f"Run of {result['date']} with grail-opt {result['version']} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), onnxruntime {ort.__version__}, onnx {onnx.__version__}.",
        "",
        "## Setup",
        "",
        f"- Model: {BLOCKS} residual blocks x + W2 relu(W1 x) with {FEATURES} features and {HIDDEN} hidden "
        f"channels, random weights scaled by 1/sqrt(fan-in), float32, written with an external data file. "
        f"Input shape (batch, {TOKENS}, {FEATURES}).",
        f"- Data: {CALIBRATION_SAMPLES} calibration and {EVALUATION_SAMPLES} evaluation samples of standard "
        "normal noise.",
        f"- Command: `grail-opt` with `--sparsity {SPARSITY} --statistics oneshot --no-affine`, validation "
        "included. The sparsity is low so that the output also stays above the limit.",
        "",
        "## Result",
        "",
        markdown_table(["file", "size (model + data)", "size / 2 GiB"], rows),
        "",
        f"- Groups: {len(groups)} found, {compressed} compressed. Validation in ONNX Runtime: cosine similarity "
        f"{validation['cosine_similarity']:.6f}, max abs error {validation['max_abs_error']:.3g}. Random weights "
        f"and noise inputs leave nothing redundant to remove, and {CALIBRATION_SAMPLES * TOKENS:,} calibration "
        f"rows are fewer than the {HIDDEN:,} channels, so these figures check the plumbing, not the method.",
        f"- The ONNX checker (full check) passed on the written model, and its outputs on 4 evaluation samples "
        f"have cosine {result['check']['cosine_first_4']:.6f} to the source model's.",
        f"- Wall time {result['seconds'] / 60:.1f} min, peak resident memory {result['peak_rss_bytes'] / 2**30:.1f} GiB "
        "(the whole process, model building included).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.check_large_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("out/large"), help="folder for the model, data and output")
    parser.add_argument("--out", type=Path, required=True, help="Markdown page to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    source = args.work_dir / "large.onnx"
    if not source.exists():
        build_model(source)
    source_bytes = file_bytes(source)
    if source_bytes <= PROTOBUF_LIMIT_BYTES:
        raise SystemExit(f"the model has {source_bytes} bytes, not above the protobuf limit {PROTOBUF_LIMIT_BYTES}")
    logger.info("model: %.2f GiB", source_bytes / 2**30)
    calibration, evaluation = write_data(args.work_dir)

    output = args.work_dir / "large-small.onnx"
    report_path = args.work_dir / "report.json"
    code = grail_main([
        str(source), "--calib", str(calibration), "--eval", str(evaluation), "--sparsity", str(SPARSITY),
        "--statistics", "oneshot", "--no-affine", "--latency-runs", "0", "-o", str(output),
        "--report", str(report_path), "--quiet",
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(f"grail-opt exited with {code}")
    report = json.loads(report_path.read_text())
    output_bytes = file_bytes(output)
    check = check_output(source, output, evaluation)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": tool_version(),
        "source_bytes": source_bytes,
        "output_bytes": output_bytes,
        "report": report,
        "check": check,
        "seconds": time.perf_counter() - start,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_atomically(args.out, format_page(result, f"python -m tools.check_large_onnx --out {args.out}"))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
