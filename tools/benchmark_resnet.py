"""Benchmark grail-opt on a pretrained CIFAR-10 ResNet and write the results as Markdown.

The run has three parts:

1. Accuracy: every selector (magnitude, wanda, gram, random) with ridge and without
   compensation, at sparsity 0.3, 0.5 and 0.7. Each model is compressed by
   ``grail_graph.driver.compress_file`` with the pipeline text of ``default_pipeline``,
   which is what ``grail-opt --no-validate`` runs. Calibration uses the 512 protocol
   images and evaluation the 9,488 labelled test images of ``tools.cifar10``.
2. Speed, as ratios of runs measured side by side in this process. The calibrate step is
   compared with one plain ONNX Runtime pass over the same images, and the Gram products
   with numpy's float32 matmul rate. The compressed models' latency and throughput are
   compared with the original's.
3. A Markdown page with the machine facts, the tables and a short reading.

Usage::

    python -m tools.benchmark_resnet --out docs/benchmarks.md [--depth 56] [--work-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from grail_graph.data import Dataset, InputSpec, load_dataset
from grail_graph.driver import JobOptions, compress_file, default_pipeline
from grail_graph.onnx_frontend.calibration import build_calibration_model, execution_providers
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.validation import compare_outputs, measure_latency, model_cost
from tools import cifar10

logger = logging.getLogger("tools.benchmark_resnet")

DEPTHS = (20, 32, 44, 56)
SELECTORS = ("magnitude", "wanda", "gram", "random")
COMPENSATIONS = ("ridge", "none")
SPARSITIES = (0.3, 0.5, 0.7)
ALPHA = 1e-3
BATCH_SIZE = 64

# Top-1 accuracy (%) of the exported ResNet-56 in ONNX Runtime on the 9,488 test images.
EXPECTED_DENSE_ACCURACY = {56: 83.20}

# Top-1 accuracy (%) of ResNet-56 in the GRAIL authors' setup, keyed by
# (selector, compensation, sparsity). These are quoted figures, not measured here.
REFERENCE_ACCURACY = {
    56: {
        ("wanda", "ridge", 0.3): 74.27,
        ("wanda", "none", 0.3): 62.52,
        ("wanda", "ridge", 0.5): 55.11,
        ("wanda", "none", 0.5): 34.45,
        ("magnitude", "ridge", 0.3): 67.06,
        ("magnitude", "ridge", 0.5): 29.32,
    }
}

# Largest accuracy difference, in percentage points, that the reading calls close to a reference.
REFERENCE_TOLERANCE = 1.0

# Op names of the Gram-product MatMuls in ONNX Runtime profiles. ONNX Runtime 1.32 fuses
# the Transpose before each Gram MatMul into a FusedMatMul.
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul"})
SQUARE_MATMUL_SIDE = 1024


@dataclass(frozen=True)
class GridPoint:
    """One compression configuration of the accuracy grid."""

    selector: str
    compensation: str
    sparsity: float
    folded_batchnorm: bool = False
    """Compress the export whose BatchNormalization nodes are folded into the Conv weights."""
    statistics: str = "oneshot"
    """Calibrate statistics: "oneshot" (Grams of the original model) or the product's "sequential" or "cross"."""
    affine: bool = False
    """Also fit a constant into the consumer bias (the product's affine compensation)."""

    @property
    def label(self) -> str:
        suffix = "-folded-bn" if self.folded_batchnorm else ""
        if self.statistics != "oneshot":
            suffix += f"-{self.statistics}"
        if self.affine:
            suffix += "-affine"
        return f"{self.selector}-{self.compensation}-{self.sparsity:g}{suffix}"


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run: the full grid or the reduced --quick grid."""

    selectors: tuple[str, ...]
    sparsities: tuple[float, ...]
    eval_samples: int | None
    """Test images used for accuracy; None uses all 9,488."""
    timing_repeats: int
    """Interleaved repeats of the calibration and inference passes."""
    latency_runs_batch1: int
    latency_runs_batch64: int
    quick: bool
    folded_points: tuple[GridPoint, ...] = ()
    """Extra points on the BatchNorm-folded export, compared only with the reference figures."""
    default_points: tuple[GridPoint, ...] = ()
    """Extra points with the statistics and affine settings that grail-opt uses by default."""


FULL_SETTINGS = Settings(
    SELECTORS,
    SPARSITIES,
    None,
    5,
    200,
    20,
    quick=False,
    folded_points=(
        GridPoint("magnitude", "ridge", 0.3, folded_batchnorm=True),
        GridPoint("magnitude", "ridge", 0.5, folded_batchnorm=True),
    ),
    # Cross statistics calibrate group by group, which takes minutes per point, so only one.
    default_points=(GridPoint("wanda", "ridge", 0.5, statistics="cross", affine=True),),
)
QUICK_SETTINGS = Settings(("wanda",), (0.5,), 1000, 1, 30, 3, quick=True)


def grid_points(selectors: Iterable[str], sparsities: Iterable[float]) -> list[GridPoint]:
    """List every (selector, compensation, sparsity) combination, selector-major."""
    return [
        GridPoint(selector, compensation, sparsity)
        for selector in selectors
        for compensation in COMPENSATIONS
        for sparsity in sparsities
    ]


@dataclass
class AccuracyRow:
    """Measured result of one grid point."""

    point: GridPoint
    accuracy: float
    """Top-1 accuracy in percent."""
    top1_agreement: float
    """Fraction of test images where the compressed and dense models predict the same class."""
    parameters: int
    macs: int
    compress_seconds: float
    calibrate_seconds: float | None
    output: Path
    kept_widths: tuple[tuple[int, int], ...] = ()
    """Distinct (group width, kept channels) pairs of the compressed model."""


@dataclass
class AccuracyResults:
    """Rows of the main grid, of the BatchNorm-folded export and of grail-opt's default settings."""

    grid: list[AccuracyRow]
    folded: list[AccuracyRow]
    defaults: list[AccuracyRow]


@dataclass
class BenchmarkInputs:
    """Files that the benchmark reads: the ONNX exports and the protocol split."""

    model: Path
    calib: Path
    test: Path
    folded_model: Path | None = None
    """Export with every BatchNormalization folded into its Conv, when a grid point needs it."""


@dataclass
class DenseResult:
    """The uncompressed model's accuracy, size and evaluation logits."""

    accuracy: float
    parameters: int
    macs: int
    logits: np.ndarray
    groups: int = 0
    channels: int = 0
    declined: int = 0


@dataclass
class SpeedResults:
    """Every timing of the speed section, in seconds unless the name says otherwise."""

    calibration_samples: int = 0
    calibrate_end_to_end: list[float] = field(default_factory=list)
    plain_end_to_end: list[float] = field(default_factory=list)
    calibrate_loop: list[float] = field(default_factory=list)
    plain_loop: list[float] = field(default_factory=list)
    gram_flops: float = 0.0
    gram_matmul_seconds: float = 0.0
    """Median kernel time of the Gram MatMuls per profiled calibration pass."""
    profile_by_op: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Op type -> median kernel seconds per profiled pass (original model, calibration model)."""
    profiled_passes: int = 0
    numpy_same_shape_seconds: float = 0.0
    numpy_square_flops_per_second: float = 0.0
    numpy_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    """(rows, width, products per pass) of the Gram products timed with numpy."""
    latency: list[LatencyResult] = field(default_factory=list)


# Preparation ----------------------------------------------------------------------------


def prepare_inputs(work_dir: Path, depth: int, data_root: Path | None, folded: bool) -> BenchmarkInputs:
    """Export the ResNet and write the protocol .npz files into `work_dir`, reusing existing files.

    With `folded`, a second export has every BatchNormalization folded into its Conv. A file
    that exists is reused as it is, so delete it after changing the data or the exporter.
    """
    inputs = BenchmarkInputs(
        work_dir / f"resnet{depth}.onnx",
        work_dir / "calib.npz",
        work_dir / "test.npz",
        work_dir / f"resnet{depth}-folded-bn.onnx" if folded else None,
    )
    work_dir.mkdir(parents=True, exist_ok=True)

    if inputs.calib.exists() and inputs.test.exists():
        logger.info("reusing %s and %s", inputs.calib, inputs.test)
    else:
        calib_images, _, test_images, test_labels = cifar10.load_split(data_root)
        cifar10.write_npz(inputs.calib, "input", calib_images)
        cifar10.write_npz(inputs.test, "input", test_images, test_labels)
        logger.info("wrote %s (%d images) and %s (%d images)", inputs.calib, len(calib_images), inputs.test, len(test_images))

    export_if_missing(inputs.model, depth, data_root, fold_batchnorm=False)
    if inputs.folded_model is not None:
        export_if_missing(inputs.folded_model, depth, data_root, fold_batchnorm=True)
    return inputs


def export_if_missing(path: Path, depth: int, data_root: Path | None, fold_batchnorm: bool) -> None:
    if path.exists():
        logger.info("reusing %s", path)
        return

    # Imported here because it needs torch, which a rerun on existing files does not.
    from tools import export_resnet_cifar

    model = export_resnet_cifar.load_pretrained(depth, data_root)
    export_resnet_cifar.export_onnx(model, path, fold_batchnorm=fold_batchnorm)
    logger.info("exported ResNet-%d to %s", depth, path)


def load_data(inputs: BenchmarkInputs, eval_samples: int | None) -> tuple[Dataset, Dataset]:
    """Load the calibration and test sets the way the grail-opt CLI does."""
    frontend = OnnxFrontEnd.load(inputs.model, "cpu")
    specs = [InputSpec(name, dtype, shape) for name, dtype, shape in frontend.input_specs()]
    calibration = load_dataset(inputs.calib, specs, role="calibration")
    test = load_dataset(inputs.test, specs, role="evaluation")
    if test.labels is None:
        raise ValueError(f"{inputs.test} has no 'labels' array. Delete it so that it is written again.")
    if eval_samples is not None:
        test = test.subset(0, eval_samples)
    return calibration, test


# Accuracy -------------------------------------------------------------------------------


def evaluate_logits(path: Path, data: Dataset, providers: list[str]) -> np.ndarray:
    """Run `data` through the model at path in ONNX Runtime and return the first output."""
    session = ort.InferenceSession(str(path), providers=providers)
    chunks = [session.run(None, batch)[0] for batch in data.batches(BATCH_SIZE)]
    return np.concatenate(chunks)


def evaluate_dense(inputs: BenchmarkInputs, test: Dataset, providers: list[str]) -> DenseResult:
    logits = evaluate_logits(inputs.model, test, providers)
    accuracy = 100.0 * float((logits.argmax(axis=1) == test.labels).mean())
    cost = model_cost(inputs.model)
    return DenseResult(accuracy, cost["parameters"], cost["macs"], logits)


def compress_and_evaluate(
    point: GridPoint,
    inputs: BenchmarkInputs,
    output: Path,
    test: Dataset,
    dense: DenseResult,
    device: str,
    calibration_samples: int,
) -> tuple[AccuracyRow, dict[str, Any]]:
    """Compress the model for one grid point with compress_file, then evaluate it once.

    The pipeline has no validate pass, because validate evaluates the dense model again
    for every grid point. The compressed model is scored with the same metric function
    (validation.compare_outputs) against dense logits computed once.
    """
    pipeline = default_pipeline(
        sparsity=point.sparsity,
        selector=point.selector,
        compensation=point.compensation,
        alpha=ALPHA,
        statistics=point.statistics,
        affine=point.affine,
        batch_size=BATCH_SIZE,
        validate=False,
    )
    # Without eval data, compress_file holds out the last 1/8 of the calibration images even
    # when the pipeline has no validate pass, so the test set is passed to keep all 512.
    options = JobOptions(pipeline=pipeline, calib=inputs.calib, eval=inputs.test, device=device)

    model = inputs.model
    if point.folded_batchnorm:
        if inputs.folded_model is None:
            raise ValueError(f"grid point {point.label} needs the BatchNorm-folded export, which was not prepared")
        model = inputs.folded_model

    start = time.perf_counter()
    report = compress_file(model, output, options)
    compress_seconds = time.perf_counter() - start
    check_calibration_samples(report, calibration_samples)

    logits = evaluate_logits(output, test, execution_providers(device))
    metrics = compare_outputs(dense.logits, logits, test.labels)
    cost = model_cost(output)
    calibrate_seconds = next((r["seconds"] for r in report["passes"] if r["pass"] == "calibrate"), None)
    row = AccuracyRow(
        point=point,
        accuracy=100.0 * metrics["accuracy_after"],
        top1_agreement=metrics["top1_agreement"],
        parameters=cost["parameters"],
        macs=cost["macs"],
        compress_seconds=compress_seconds,
        calibrate_seconds=calibrate_seconds,
        output=output,
        kept_widths=tuple(sorted({(group["width"], group["kept"]) for group in report["groups"]})),
    )
    return row, report


def check_calibration_samples(report: dict[str, Any], expected: int) -> None:
    """Raise RuntimeError if the calibrate pass of a compress_file report did not use `expected` samples."""
    for record in report["passes"]:
        if record["pass"] == "calibrate" and record["statistics"].get("samples") != expected:
            raise RuntimeError(
                f"the calibrate pass used {record['statistics'].get('samples')} samples instead of {expected}. "
                "Check how compress_file splits the calibration data."
            )


def run_accuracy_grid(
    points: Sequence[GridPoint],
    inputs: BenchmarkInputs,
    output_dir: Path,
    test: Dataset,
    dense: DenseResult,
    device: str,
    calibration_samples: int,
) -> list[AccuracyRow]:
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, point in enumerate(points, start=1):
        start = time.perf_counter()
        output = output_dir / f"{point.label}.onnx"
        row, report = compress_and_evaluate(point, inputs, output, test, dense, device, calibration_samples)
        if dense.groups == 0:
            dense.groups = len(report["groups"])
            dense.channels = sum(group["width"] for group in report["groups"])
            dense.declined = len(report["declined"])
        rows.append(row)
        logger.info(
            "[%d/%d] %s: top-1 %.2f%% (%.1f s)", index, len(points), point.label, row.accuracy, time.perf_counter() - start
        )
    return rows


# Speed: calibration against plain inference ---------------------------------------------


def tap_ranks(frontend: OnnxFrontEnd, groups: Sequence[Any]) -> dict[str, int | None]:
    """Return the rank of each group's tap value, None for channels-last groups.

    build_calibration_model needs the rank to move the channel axis of an NCHW tap last.
    """
    values = {value.name: value for node in frontend.model.graph for value in node.outputs}
    ranks: dict[str, int | None] = {}
    for group in groups:
        shape = values[group.tap].shape
        if not group.channels_last and shape is None:
            raise ValueError(f"tap {group.tap!r} of group {group.name} has no inferred shape")
        ranks[group.name] = None if group.channels_last else len(shape)
    return ranks


def run_pass(session: ort.InferenceSession, data: Dataset) -> None:
    for batch in data.batches(BATCH_SIZE):
        session.run(None, batch)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure_calibration(
    inputs: BenchmarkInputs, calibration: Dataset, device: str, repeats: int, results: SpeedResults, work_dir: Path
) -> Path:
    """Time calibration against plain inference over the calibration set, interleaved.

    The end-to-end figure times `OnnxFrontEnd.calibrate`, which is what the calibrate pass
    runs. It writes the calibration model, creates its session, runs every batch and
    accumulates the Grams. Its counterpart creates a session for the original model and
    runs every batch. The loop-only figures time the batch loops of two sessions created
    beforehand. Stores the timings, the Gram FLOPs and the Gram shapes of one pass in
    `results`, and returns the path of the calibration model.
    """
    providers = execution_providers(device)
    frontend = OnnxFrontEnd.load(inputs.model, device)
    groups, _ = frontend.find_groups()
    results.calibration_samples = len(calibration)

    for _ in range(repeats):
        seconds, _ = timed(lambda: run_pass(ort.InferenceSession(str(inputs.model), providers=providers), calibration))
        results.plain_end_to_end.append(seconds)
        seconds, stats = timed(lambda: frontend.calibrate(groups, calibration.batches(BATCH_SIZE)))
        results.calibrate_end_to_end.append(seconds)

    results.gram_flops = gram_flops((accumulator.count, accumulator.width) for accumulator in stats.values())
    results.numpy_shapes = gram_product_shapes(
        [(accumulator.count // len(calibration), accumulator.width) for accumulator in stats.values()],
        [len(next(iter(batch.values()))) for batch in calibration.batches(BATCH_SIZE)],
    )

    calibration_path, _ = build_calibration_model(frontend.model, groups, tap_ranks(frontend, groups), work_dir)
    plain_session = ort.InferenceSession(str(inputs.model), providers=providers)
    calibration_session = ort.InferenceSession(str(calibration_path), providers=providers)
    run_pass(plain_session, calibration)
    run_pass(calibration_session, calibration)
    for _ in range(repeats):
        results.plain_loop.append(timed(lambda: run_pass(plain_session, calibration))[0])
        results.calibrate_loop.append(timed(lambda: run_pass(calibration_session, calibration))[0])
    return calibration_path


# Speed: Gram products against numpy -----------------------------------------------------


def gram_flops(counts_and_widths: Iterable[tuple[int, int]]) -> float:
    """Return the FLOPs of the Gram products: the sum of 2 * rows * width^2 over the groups."""
    return float(sum(2 * rows * width * width for rows, width in counts_and_widths))


def gram_product_shapes(rows_per_sample_and_widths: Sequence[tuple[int, int]], batch_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """Return (rows, width, count) of the X^T X products that one calibration pass computes.

    Each batch of b samples gives every group one product of a (b * rows_per_sample, width) matrix.
    """
    shapes: Counter[tuple[int, int]] = Counter()
    for rows_per_sample, width in rows_per_sample_and_widths:
        for batch_size in batch_sizes:
            shapes[(batch_size * rows_per_sample, width)] += 1
    return [(rows, width, count) for (rows, width), count in sorted(shapes.items())]


def profiled_session(path: Path, providers: list[str], profile_dir: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / path.stem)
    return ort.InferenceSession(str(path), options, providers=providers)


def kernel_events_by_pass(session: ort.InferenceSession, runs_per_pass: int) -> list[list[dict[str, Any]]]:
    """End profiling and return the kernel-time events of each pass, in order.

    A pass is `runs_per_pass` consecutive session.run calls. Each kernel event belongs to
    the run whose time span contains its start.
    """
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((event for event in events if event.get("cat") == "Session" and event["name"] == "model_run"), key=lambda e: e["ts"])
    passes: list[list[dict[str, Any]]] = [[] for _ in range(len(runs) // runs_per_pass)]
    run_starts = [run["ts"] for run in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run_index = bisect.bisect_right(run_starts, event["ts"]) - 1
        if 0 <= run_index < len(passes) * runs_per_pass:
            passes[run_index // runs_per_pass].append(event)
    return passes


def is_gram_matmul(event: dict[str, Any], widths: set[int]) -> bool:
    """Tell whether a profile event is a Gram product: a MatMul with an (H, H) output, H a group width."""
    if event["args"].get("op_name") not in MATMUL_OPS:
        return False
    outputs = event["args"].get("output_type_shape") or []
    shape = next(iter(outputs[0].values())) if outputs else []
    return len(shape) == 2 and shape[0] == shape[1] and shape[0] in widths


def kernel_seconds_by_op(events: Iterable[dict[str, Any]]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for event in events:
        totals[event["args"]["op_name"]] += event["dur"] * 1e-6
    return totals


def measure_gram_throughput(
    inputs: BenchmarkInputs,
    calibration_path: Path,
    calibration: Dataset,
    device: str,
    repeats: int,
    results: SpeedResults,
    work_dir: Path,
) -> None:
    """Time the Gram products in ONNX Runtime and in numpy, interleaved pass by pass.

    Each repeat runs one profiled pass of the original model, one of the calibration
    model, numpy's float32 X^T X for every Gram product of a pass, and one square
    1024^3 numpy product. The first repeat warms up and is not counted. Stores medians
    over the other repeats.
    """
    providers = execution_providers(device)
    widths = {width for _, width, _ in results.numpy_shapes}
    rng = np.random.default_rng(0)
    matrices = [(rng.standard_normal((rows, width), dtype=np.float32), count) for rows, width, count in results.numpy_shapes]
    side = SQUARE_MATMUL_SIDE
    left = rng.standard_normal((side, side), dtype=np.float32)
    right = rng.standard_normal((side, side), dtype=np.float32)

    def numpy_gram_pass() -> None:
        for matrix, count in matrices:
            for _ in range(count):
                matrix.T @ matrix

    plain_session = profiled_session(inputs.model, providers, work_dir)
    calibration_session = profiled_session(calibration_path, providers, work_dir)
    numpy_seconds, square_seconds = [], []
    for _ in range(repeats + 1):
        run_pass(plain_session, calibration)
        run_pass(calibration_session, calibration)
        numpy_seconds.append(timed(numpy_gram_pass)[0])
        square_seconds.append(timed(lambda: left @ right)[0])

    runs_per_pass = calibration.num_batches(BATCH_SIZE)
    plain_passes = kernel_events_by_pass(plain_session, runs_per_pass)[1:]
    calibration_passes = kernel_events_by_pass(calibration_session, runs_per_pass)[1:]
    gram_seconds = [
        sum(event["dur"] * 1e-6 for event in events if is_gram_matmul(event, widths)) for events in calibration_passes
    ]
    plain_by_op = [kernel_seconds_by_op(events) for events in plain_passes]
    calibration_by_op = [kernel_seconds_by_op(events) for events in calibration_passes]
    operators = sorted(set().union(*plain_by_op, *calibration_by_op))

    results.profiled_passes = repeats
    results.gram_matmul_seconds = statistics.median(gram_seconds)
    results.profile_by_op = {
        op: (statistics.median(t[op] for t in plain_by_op), statistics.median(t[op] for t in calibration_by_op))
        for op in operators
    }
    results.numpy_same_shape_seconds = statistics.median(numpy_seconds[1:])
    results.numpy_square_flops_per_second = 2.0 * side**3 / statistics.median(square_seconds[1:])


# Speed: compressed model latency --------------------------------------------------------


@dataclass
class LatencyResult:
    """Median milliseconds per run of the original and a compressed model, runs interleaved."""

    sparsity: float
    macs: int
    threads: str
    """"default" (ORT's choice, as validation.measure_latency) or "1" (one intra-op thread)."""
    batch1_ms: tuple[float, float]
    batch64_ms: tuple[float, float]


def measure_latency_one_thread(paths: Sequence[Path], sample: dict[str, np.ndarray], providers: list[str], runs: int) -> list[float]:
    """Return the median latency in milliseconds of each model with one intra-op thread, runs interleaved.

    This setting is reported beside ORT's default because a single thread never waits for a
    pool thread that another process has pushed off the CPU.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(path), options, providers=providers) for path in paths]
    for session in sessions:
        for _ in range(3):
            session.run(None, sample)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for index, session in enumerate(sessions):
            times[index].append(1e3 * timed(lambda: session.run(None, sample))[0])
    return [statistics.median(values) for values in times]


def measure_compressed_latency(
    inputs: BenchmarkInputs, rows: Sequence[AccuracyRow], test: Dataset, device: str, settings: Settings
) -> list[LatencyResult]:
    """Time the wanda + ridge model of each sparsity against the original, runs interleaved.

    Every selector gives the same kept widths at a sparsity, so one model per sparsity
    stands for all of them. Each pair is timed with ORT's default session options
    (validation.measure_latency) and with one intra-op thread.
    """
    providers = execution_providers(device)
    single = next(test.subset(0, 1).batches(1))
    batch = next(test.subset(0, BATCH_SIZE).batches(BATCH_SIZE))
    measured = []
    for row in rows:
        if row.point.selector != "wanda" or row.point.compensation != "ridge":
            continue
        paths = [inputs.model, row.output]
        for threads, measure in (("default", measure_latency), ("1", measure_latency_one_thread)):
            result = LatencyResult(
                sparsity=row.point.sparsity,
                macs=row.macs,
                threads=threads,
                batch1_ms=tuple(measure(paths, single, providers, settings.latency_runs_batch1)),
                batch64_ms=tuple(measure(paths, batch, providers, settings.latency_runs_batch64)),
            )
            measured.append(result)
            logger.info(
                "latency at sparsity %g with %s: batch 1 %.3f -> %.3f ms, batch %d %.1f -> %.1f ms",
                row.point.sparsity, THREAD_LABELS[threads], *result.batch1_ms, BATCH_SIZE, *result.batch64_ms,
            )  # fmt: skip
    return measured


# Machine facts --------------------------------------------------------------------------


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, marked when the CPU flags show a hypervisor."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{name} (virtual machine)" if "hypervisor" in flags else name


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
    if not pools:
        return "unknown"
    return ", ".join(f"{pool['internal_api']} {pool.get('version', '')} ({pool['num_threads']} threads)" for pool in pools)


def machine_facts(device: str) -> dict[str, str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu_model(),
        "logical CPUs": f"{os.cpu_count()} ({usable} usable by this process)",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "numpy": f"{np.__version__}, BLAS: {blas_description()}",
        "onnxruntime": f"{ort.__version__}, provider {execution_providers(device)[0]}, default session options",
        "onnx": onnx.__version__,
    }


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


# Report ---------------------------------------------------------------------------------


def page_header(title: str, command: str) -> list[str]:
    """Return the first lines of a generated page: its title and the command that regenerates it."""
    return [f"# {title}", "", "Regenerate with:", "", "```", command, "```", ""]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """Format a Markdown table.

    `align` has one 'l' (left) or 'r' (right) per column. By default the first column is
    left-aligned and the others right-aligned.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError("every row and the alignment need one entry per header")
    separator = ["---:" if side == "r" else "---" for side in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(separator) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def percent_label(sparsity: float) -> str:
    return f"{100 * sparsity:g}%"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def accuracy_table(rows: Sequence[AccuracyRow], sparsities: Sequence[float]) -> str:
    lookup = {(row.point.selector, row.point.compensation, row.point.sparsity): row for row in rows}
    configurations = list(dict.fromkeys((row.point.selector, row.point.compensation) for row in rows))
    table = []
    for selector, compensation in configurations:
        cells = [f"{lookup[(selector, compensation, s)].accuracy:.2f}" for s in sparsities]
        table.append([selector, compensation, *cells])
    return markdown_table(["selector", "compensation", *map(percent_label, sparsities)], table, "ll" + "r" * len(sparsities))


def compensation_gain_table(rows: Sequence[AccuracyRow], sparsities: Sequence[float]) -> str:
    lookup = {(row.point.selector, row.point.compensation, row.point.sparsity): row.accuracy for row in rows}
    selectors = list(dict.fromkeys(row.point.selector for row in rows))
    table = [
        [selector, *(f"{lookup[(selector, 'ridge', s)] - lookup[(selector, 'none', s)]:+.2f}" for s in sparsities)]
        for selector in selectors
    ]
    return markdown_table(["selector", *map(percent_label, sparsities)], table)


def reference_rows(rows: Sequence[AccuracyRow], references: dict[tuple[str, str, float], float]) -> list[list[str]]:
    """Return (configuration, ours, reference, difference) rows for the grid points that have a reference."""
    table = []
    for row in rows:
        key = (row.point.selector, row.point.compensation, row.point.sparsity)
        if key in references:
            reference = references[key]
            label = f"{row.point.selector}, {row.point.compensation}, {percent_label(row.point.sparsity)}"
            if row.point.folded_batchnorm:
                label += ", BatchNorm folded"
            table.append([label, f"{row.accuracy:.2f}", f"{reference:.2f}", f"{row.accuracy - reference:+.2f}"])
    return table


def size_table(rows: Sequence[AccuracyRow], dense: DenseResult, sparsities: Sequence[float]) -> str:
    table = [["0% (dense)", "all", f"{dense.parameters:,}", "100.0%", f"{dense.macs:,}", "100.0%"]]
    for sparsity in sparsities:
        at_sparsity = [row for row in rows if row.point.sparsity == sparsity]
        parameters = sorted({row.parameters for row in at_sparsity})
        macs = sorted({row.macs for row in at_sparsity})
        widths = sorted({row.kept_widths for row in at_sparsity})
        table.append(
            [
                percent_label(sparsity),
                "; ".join(kept_widths_text(pairs) for pairs in widths),
                span(parameters),
                f"{100 * parameters[-1] / dense.parameters:.1f}%",
                span(macs),
                f"{100 * macs[-1] / dense.macs:.1f}%",
            ]
        )
    return markdown_table(["sparsity", "kept channels", "parameters", "of dense", "MACs (batch 1)", "of dense"], table, "ll" + "r" * 4)


def kept_widths_text(pairs: Iterable[tuple[int, int]]) -> str:
    """Write (width, kept) pairs as "11 of 16, 22 of 32"."""
    return ", ".join(f"{kept} of {width}" for width, kept in pairs)


def span(values: Sequence[int]) -> str:
    """Show one value, or the range when the grid points of a sparsity differ."""
    return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,} to {values[-1]:,}"


def calibration_table(speed: SpeedResults, results: AccuracyResults) -> str:
    """Tabulate the interleaved calibration timings, then the calibrate passes of the compress_file reports.

    The report rows are not interleaved with plain inference. They are divided by the
    end-to-end plain median.
    """
    rows = []
    for label, plain, calibrate in (
        ("end to end (session creation included)", speed.plain_end_to_end, speed.calibrate_end_to_end),
        ("batch loop only", speed.plain_loop, speed.calibrate_loop),
    ):
        plain_median, calibrate_median = statistics.median(plain), statistics.median(calibrate)
        rows.append([label, f"{plain_median:.3f}", f"{calibrate_median:.3f}", f"{ratio(calibrate_median, plain_median):.2f}x"])

    plain_median = statistics.median(speed.plain_end_to_end)
    oneshot = [row.calibrate_seconds for row in results.grid if row.calibrate_seconds is not None]
    if oneshot:
        seconds = statistics.median(oneshot)
        label = f"calibrate pass, statistics=oneshot (median of {len(oneshot)} grid reports)"
        rows.append([label, f"{plain_median:.3f}", f"{seconds:.3f}", f"{ratio(seconds, plain_median):.2f}x"])
    for row in results.defaults:
        seconds = row.calibrate_seconds or 0.0
        label = f"calibrate pass, statistics={row.point.statistics} (one report, {row.point.label})"
        rows.append([label, f"{plain_median:.3f}", f"{seconds:.3f}", f"{ratio(seconds, plain_median):.2f}x"])
    return markdown_table(["measurement", "plain inference (s)", "calibration (s)", "calibration / plain"], rows)


def gram_table(speed: SpeedResults) -> str:
    flops = speed.gram_flops
    overhead = statistics.median(speed.calibrate_loop) - statistics.median(speed.plain_loop)
    ort_rate = ratio(flops, speed.gram_matmul_seconds)
    numpy_rate = ratio(flops, speed.numpy_same_shape_seconds)
    rows = [
        ["ORT Gram MatMuls (profiled kernel time)", f"{speed.gram_matmul_seconds:.3f}", f"{ort_rate / 1e9:.1f}", "1.00x"],
        [
            "ORT all added calibration work (loop time difference)",
            f"{overhead:.3f}",
            f"{ratio(flops, overhead) / 1e9:.1f}",
            f"{ratio(ratio(flops, overhead), ort_rate):.2f}x",
        ],
        ["numpy X^T X, same shapes and count", f"{speed.numpy_same_shape_seconds:.3f}", f"{numpy_rate / 1e9:.1f}", f"{ratio(numpy_rate, ort_rate):.2f}x"],
        [
            f"numpy {SQUARE_MATMUL_SIDE}^3 float32 matmul",
            "",
            f"{speed.numpy_square_flops_per_second / 1e9:.1f}",
            f"{ratio(speed.numpy_square_flops_per_second, ort_rate):.2f}x",
        ],
    ]
    return markdown_table(["computation", "time per pass (s)", "GFLOP/s", "rate / ORT Gram rate"], rows)


def profile_table(speed: SpeedResults) -> str:
    added = sorted(
        ((op, plain, calib) for op, (plain, calib) in speed.profile_by_op.items()),
        key=lambda item: item[1] - item[2],
    )
    rows = [[op, f"{1e3 * plain:.1f}", f"{1e3 * calib:.1f}", f"{1e3 * (calib - plain):+.1f}"] for op, plain, calib in added]
    return markdown_table(["op type", "original model (ms)", "calibration model (ms)", "difference (ms)"], rows)


def latency_table(latency: Sequence[LatencyResult], dense: DenseResult) -> str:
    rows = []
    for entry in latency:
        before_1, after_1 = entry.batch1_ms
        before_64, after_64 = entry.batch64_ms
        rows.append(
            [
                percent_label(entry.sparsity),
                entry.threads,
                f"{entry.macs / dense.macs:.2f}",
                f"{before_1:.2f} / {after_1:.2f}",
                f"{ratio(after_1, before_1):.2f}",
                f"{before_64:.1f} / {after_64:.1f}",
                f"{ratio(before_64, after_64):.2f}",
            ]
        )
    headers = [
        "sparsity",
        "intra-op threads",
        "MACs ratio",
        "batch 1 (ms), original / compressed",
        "batch-1 latency ratio",
        f"batch {BATCH_SIZE} (ms), original / compressed",
        f"batch-{BATCH_SIZE} throughput ratio",
    ]
    return markdown_table(headers, rows, "ll" + "r" * 5)


THREAD_LABELS = {"default": "ORT's default intra-op threads", "1": "one intra-op thread"}


def accuracy_bullets(results: AccuracyResults, settings: Settings, dense: DenseResult, depth: int) -> list[str]:
    rows = results.grid
    lookup = {(row.point.selector, row.point.compensation, row.point.sparsity): row.accuracy for row in rows}
    bullets = []
    for sparsity in settings.sparsities:
        gains = {selector: lookup[(selector, "ridge", sparsity)] - lookup[(selector, "none", sparsity)] for selector in settings.selectors}
        at_sparsity = [row for row in rows if row.point.sparsity == sparsity]
        best_accuracy = max(round(row.accuracy, 2) for row in at_sparsity)
        best = [row.point for row in at_sparsity if round(row.accuracy, 2) == best_accuracy]
        best_text = " and ".join(f"{point.selector} with {point.compensation} compensation" for point in best)
        gain_text = ", ".join(f"{selector} {gain:+.2f}" for selector, gain in gains.items())
        bullets.append(
            f"At {percent_label(sparsity)} sparsity, ridge compensation changes top-1 accuracy against plain slicing "
            f"by {gain_text} points. The most accurate {'configurations are' if len(best) > 1 else 'configuration is'} "
            f"{best_text} at {best_accuracy:.2f}% ({best_accuracy - dense.accuracy:+.2f} points from dense)."
        )

    losses = [row.point for row in rows if row.point.compensation == "ridge" and row.accuracy < lookup[(row.point.selector, "none", row.point.sparsity)]]
    if losses:
        listed = ", ".join(f"{point.selector} at {percent_label(point.sparsity)}" for point in losses)
        bullets.append(f"Ridge compensation lowers accuracy for {listed}.")
    else:
        bullets.append("Ridge compensation raises accuracy for every selector at every sparsity measured.")

    references = [] if settings.quick else reference_rows([*rows, *results.folded], REFERENCE_ACCURACY.get(depth, {}))
    if references:
        close = [row for row in references if abs(float(row[3])) <= REFERENCE_TOLERANCE]
        far = [f"{row[0]} ({row[3]})" for row in references if abs(float(row[3])) > REFERENCE_TOLERANCE]
        text = f"{len(close)} of the {len(references)} reference figures are within {REFERENCE_TOLERANCE:g} point of ours."
        if far:
            text += f" Larger differences: {', '.join(far)}."
        bullets.append(text)

    oneshot = {(row.point.selector, row.point.compensation, row.point.sparsity): row for row in rows}
    for row in results.defaults:
        point = row.point
        baseline = oneshot[(point.selector, point.compensation, point.sparsity)]
        bullets.append(
            f"grail-opt's default settings ({point.statistics} statistics, affine) reach {row.accuracy:.2f}% for "
            f"{point.selector} at {percent_label(point.sparsity)} sparsity, {row.accuracy - baseline.accuracy:+.2f} "
            f"points from the one-shot closed form, and their calibrate pass takes "
            f"{ratio(row.calibrate_seconds or 0.0, baseline.calibrate_seconds or 0.0):.0f}x as long."
        )
    return bullets


def thread_setting_bullets(latency: Sequence[LatencyResult]) -> list[str]:
    """Point out where ORT's default threads ran the original model over twice as slow as one thread did."""
    one_thread = {entry.sparsity: entry for entry in latency if entry.threads == "1"}
    slowed = []
    for entry in latency:
        single = one_thread.get(entry.sparsity)
        if entry.threads == "default" and single is not None and entry.batch1_ms[0] > 2 * single.batch1_ms[0]:
            slowed.append(f"{entry.batch1_ms[0]:.2f} against {single.batch1_ms[0]:.2f} ms at {percent_label(entry.sparsity)}")
    if not slowed:
        return []
    return [
        "With ORT's default threads the original model's batch-1 median is more than twice its one-thread median "
        f"({'; '.join(slowed)}). A second thread that slows a run this much points to contention with the other "
        "load on the machine, so the one-thread rows are the steadier comparison in this run."
    ]


def speed_bullets(speed: SpeedResults, dense: DenseResult, rows: Sequence[AccuracyRow]) -> list[str]:
    calibrate_ratio = ratio(statistics.median(speed.calibrate_end_to_end), statistics.median(speed.plain_end_to_end))
    loop_ratio = ratio(statistics.median(speed.calibrate_loop), statistics.median(speed.plain_loop))
    numpy_rate = ratio(speed.gram_flops, speed.numpy_same_shape_seconds)
    ort_rate = ratio(speed.gram_flops, speed.gram_matmul_seconds)
    added = sorted(speed.profile_by_op.items(), key=lambda item: item[1][0] - item[1][1])[:3]
    added_text = ", ".join(f"{op} {1e3 * (calib - plain):+.0f} ms" for op, (plain, calib) in added)
    bullets = [
        f"Calibration costs {calibrate_ratio:.2f}x one plain inference pass over the same images end to end and "
        f"{loop_ratio:.2f}x in the batch loop alone. In the profile, the op types that add the most kernel time "
        f"per pass are {added_text}.",
        f"The Gram MatMuls in ONNX Runtime run at {ratio(ort_rate, numpy_rate):.2f}x numpy's float32 rate for the "
        f"same shapes and {ratio(ort_rate, speed.numpy_square_flops_per_second):.2f}x numpy's "
        f"{SQUARE_MATMUL_SIDE}^3 matmul rate.",
    ]
    for entry in speed.latency:
        before_1, after_1 = entry.batch1_ms
        before_64, after_64 = entry.batch64_ms
        bullets.append(
            f"At {percent_label(entry.sparsity)} sparsity with {THREAD_LABELS[entry.threads]}, the compressed model "
            f"has {entry.macs / dense.macs:.2f}x the MACs, {ratio(after_1, before_1):.2f}x the batch-1 latency and "
            f"{ratio(before_64, after_64):.2f}x the batch-{BATCH_SIZE} throughput of the original."
        )
    bullets += thread_setting_bullets(speed.latency)
    slower = sorted({entry.sparsity for entry in speed.latency if entry.batch1_ms[1] > entry.batch1_ms[0]})
    for sparsity in slower:
        widths = next(row.kept_widths for row in rows if row.point.sparsity == sparsity)
        bullets.append(
            f"At {percent_label(sparsity)} sparsity the compressed model is slower than the original at batch 1 in "
            f"at least one thread setting, although it has fewer MACs. Its groups keep {kept_widths_text(widths)} "
            "channels. `--multiple` rounds kept widths to a multiple of its value."
        )
    return bullets


@dataclass
class RunInfo:
    """Settings and machine facts that the report shows beside the measurements."""

    depth: int
    settings: Settings
    device: str
    command: str
    facts: dict[str, str]
    load_before: str
    load_before_1min: float
    load_after: str = ""
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    section_seconds: dict[str, float] = field(default_factory=dict)


def load_note(info: RunInfo) -> str:
    """State the measurement conditions, and whether other processes shared the CPUs."""
    text = "These are measurements of one run on the machine above, not figures for other hardware."
    if os.cpu_count() and info.load_before_1min > os.cpu_count():
        text += (
            f" The 1-minute load average at the start was {info.load_before_1min:.2f} on {os.cpu_count()} logical "
            "CPUs, so other processes shared the CPUs during this run."
        )
    return text


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural_noun or noun + 's'}"


def header_section(info: RunInfo, test_size: int) -> list[str]:
    settings = info.settings
    lines = [
        f"# Benchmark: ResNet-{info.depth} on the CIFAR-10 JPEG test copy",
        "",
        f"Measured by `tools/benchmark_resnet.py` on {info.started:%Y-%m-%d %H:%M} UTC. Every number on this page "
        "was measured in that one run on the machine described below. The speed figures are ratios of runs "
        "interleaved in the same process.",
    ]
    if settings.quick:
        lines += [
            "",
            f"**Quick run:** only the {', '.join(settings.selectors)} selector at sparsity "
            f"{', '.join(map(percent_label, settings.sparsities))}, evaluated on the first {test_size:,} test images, "
            "with fewer timing repeats. Its accuracies are not comparable to the full run or to the reference figures.",
        ]
    sections = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in info.section_seconds.items())
    lines += [
        "",
        "## How to regenerate",
        "",
        "```",
        info.command,
        "```",
        "",
        "The tool needs the pretrained akamaster weights and the CIFAR-10 JPEG test copy under the data root "
        "(`GRAIL_DATA_DIR`, see `tools/cifar10.py`). It exports the model with `tools/export_resnet_cifar.py` "
        "and writes the protocol split with `tools/cifar10.py`. With `--work-dir DIR` those files and the "
        "compressed models are kept in DIR and reused by the next run. `--quick` runs a reduced grid as a smoke test.",
        f"This run took {sum(info.section_seconds.values()) / 60:.1f} minutes ({sections}).",
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in info.facts.items()),
        f"- load average (1, 5, 15 min) at start: {info.load_before}; at end: {info.load_after}",
        "",
    ]
    return lines


def setup_section(info: RunInfo, dense: DenseResult, test_size: int) -> list[str]:
    # A CIFAR ResNet of depth 6n + 2 has 3n residual blocks.
    blocks = (info.depth - 2) // 2
    block_note = " (one per residual block, between its two convolutions)" if dense.groups == blocks else ""
    return [
        "## Setup",
        "",
        f"- Model: ResNet-{info.depth} exported to ONNX opset 18 with every BatchNormalization kept as a node. "
        f"grail-opt finds {dense.groups} channel groups with {dense.channels:,} channels in all{block_note} and "
        f"declines {dense.declined} other candidates, with the reasons listed in the `compress_file` report.",
        f"- Calibration: the 512 calibration images of the protocol split. Evaluation: {test_size:,} labelled test "
        "images of the same split (`tools/cifar10.py`), top-1 accuracy in ONNX Runtime.",
        f"- Each cell is one `compress_file` call with the pipeline text of `default_pipeline` (alpha = {ALPHA:g}, "
        f"batch size {BATCH_SIZE}, one-shot statistics, no affine term), for example `{example_pipeline()}`. That "
        "is what `grail-opt --calib calib.npz --eval test.npz --statistics oneshot --no-affine --no-validate` runs. The test file is passed because "
        "without it `compress_file` holds out the last 64 calibration images. The validate pass is left out "
        "because it evaluates the dense model again for every cell. Each compressed model is scored with the same "
        "metric function against dense logits computed once.",
        "- The random selector uses seed 0, one draw per cell.",
        "",
    ]


def defaults_section(results: AccuracyResults) -> list[str]:
    if not results.defaults:
        return []
    oneshot = {(row.point.selector, row.point.compensation, row.point.sparsity): row for row in results.grid}
    table = []
    for row in results.defaults:
        point = row.point
        baseline = oneshot[(point.selector, point.compensation, point.sparsity)]
        table.append(
            [
                f"{point.selector}, {point.compensation}, {percent_label(point.sparsity)}",
                f"{baseline.accuracy:.2f}",
                f"{row.accuracy:.2f}",
                f"{row.accuracy - baseline.accuracy:+.2f}",
                f"{baseline.calibrate_seconds:.1f} / {row.calibrate_seconds:.1f}",
            ]
        )
    headers = [
        "selector, compensation, sparsity",
        "oneshot (%)",
        f"{results.defaults[0].point.statistics} + affine (%)",
        "difference",
        "calibrate pass (s), oneshot / default",
    ]
    return [
        "### grail-opt's default statistics",
        "",
        "The grid above uses the GRAIL closed form: Grams of the original model (`statistics=oneshot`) and no "
        "constant term (`affine=false`). grail-opt's defaults are "
        f"`statistics={results.defaults[0].point.statistics}` and `affine=true`, which calibrate group by group on "
        "the partly compressed model and also fit a constant into the consumer bias. Calibrate pass times come "
        "from the `compress_file` reports of this run.",
        "",
        markdown_table(headers, table),
        "",
    ]


def accuracy_section(info: RunInfo, dense: DenseResult, results: AccuracyResults) -> list[str]:
    rows = results.grid
    sparsities = info.settings.sparsities
    expected = EXPECTED_DENSE_ACCURACY.get(info.depth)
    expected_text = f" (expected {expected:.2f}% on all 9,488 test images)" if expected is not None else ""
    lines = [
        "## Accuracy",
        "",
        f"Dense top-1 accuracy: **{dense.accuracy:.2f}%**{expected_text}.",
        "",
        "Top-1 accuracy (%) after removing the given fraction of each group's channels:",
        "",
        accuracy_table(rows, sparsities),
        "",
        "Accuracy gained by ridge compensation over plain slicing (ridge minus none, percentage points):",
        "",
        compensation_gain_table(rows, sparsities),
        "",
    ]
    lines += defaults_section(results)
    table = reference_rows([*rows, *results.folded], REFERENCE_ACCURACY.get(info.depth, {}))
    if table and not info.settings.quick:
        lines += [
            "### Against the reference figures",
            "",
            "Reference: top-1 accuracy (%) of the GRAIL authors' setup (Tang et al., \"GRAIL: Post-hoc Compensation "
            "by Linear Reconstruction for Compressed Networks\", CPAL 2026), quoted and not re-run here. Difference "
            "is ours minus reference, in percentage points. Rows marked `BatchNorm folded` compress the export made "
            "with `--fold-batchnorm`, where each BatchNormalization is folded into its Conv. That scales the "
            "producer rows, so the magnitude selector keeps other channels. The other rows use the main export.",
            "",
            markdown_table(["selector, compensation, sparsity", "ours", "reference", "difference"], table),
            "",
        ]
    lines += [
        "### Model size",
        "",
        "Parameters count the float initializers. MACs count Conv, Gemm and MatMul at batch size 1 "
        "(`grail_graph.validation.model_cost`).",
        "",
        size_table(rows, dense, sparsities),
        "",
    ]
    return lines


def speed_section(info: RunInfo, dense: DenseResult, speed: SpeedResults, results: AccuracyResults) -> list[str]:
    settings = info.settings
    shapes = ", ".join(f"{count} x ({rows}, {width})" for rows, width, count in speed.numpy_shapes)
    return [
        "## Speed",
        "",
        f"### Calibration against one plain inference pass ({speed.calibration_samples} images, batch {BATCH_SIZE})",
        "",
        f"Medians over {plural(settings.timing_repeats, 'interleaved repeat')}.",
        "",
        calibration_table(speed, results),
        "",
        "### Gram products",
        "",
        f"One calibration pass computes {speed.gram_flops / 1e9:.2f} GFLOP of Gram products "
        "(the sum over groups of 2 * rows * H^2, one row per image and pixel). The ORT rate comes from the "
        "kernel times of the Gram MatMuls in profiled passes. numpy computes X^T X in float32 for the same "
        f"(rows, H) shapes and counts: {shapes}. Each figure is the median over "
        f"{plural(speed.profiled_passes, 'repeat')}, and each repeat runs the ORT passes and the numpy products "
        "one after the other. The second ORT row divides the same FLOPs by the unprofiled loop-time difference "
        "from the table above, which also covers the transposes and per-channel sums. The two ORT rows come from "
        "different runs, with and without profiling, so they can disagree by more than the sums' cost.",
        "",
        gram_table(speed),
        "",
        f"Median kernel time per pass and op type over {plural(speed.profiled_passes, 'profiled pass', 'profiled passes')} of each "
        "model, where a pass runs every calibration batch once. Rows are sorted by the time that calibration adds. "
        "Profiling adds overhead of its own, so compare these times with each other rather than with the unprofiled "
        "passes above.",
        "",
        profile_table(speed),
        "",
        "### Compressed model latency",
        "",
        "The wanda + ridge model of each sparsity against the original, the two models alternating: "
        f"{settings.latency_runs_batch1} runs at batch 1 and {settings.latency_runs_batch64} runs at batch "
        f"{BATCH_SIZE}, medians. Rows with default threads use `validation.measure_latency` (ORT's default session "
        "options). Rows with one thread set `intra_op_num_threads=1`. All selectors give the same kept widths, so "
        "the other compressed models have the same shapes. A latency ratio below 1 and a throughput ratio above 1 "
        "mean that the compressed model is faster.",
        "",
        latency_table(speed.latency, dense),
        "",
    ]


def format_report(info: RunInfo, dense: DenseResult, results: AccuracyResults, speed: SpeedResults, test_size: int) -> str:
    lines = [
        *header_section(info, test_size),
        *setup_section(info, dense, test_size),
        *accuracy_section(info, dense, results),
        *speed_section(info, dense, speed, results),
        "## Reading",
        "",
        *(f"- {bullet}" for bullet in accuracy_bullets(results, info.settings, dense, info.depth)),
        *(f"- {bullet}" for bullet in speed_bullets(speed, dense, results.grid)),
        f"- {load_note(info)}",
        "",
    ]
    return "\n".join(lines)


def example_pipeline() -> str:
    return default_pipeline(
        sparsity=0.5,
        selector="wanda",
        compensation="ridge",
        alpha=ALPHA,
        statistics="oneshot",
        affine=False,
        batch_size=BATCH_SIZE,
        validate=False,
    )


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = cifar10.temporary_path_for(path)
    try:
        with open(temp_path, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


# Command line ---------------------------------------------------------------------------


def regenerate_command(args: argparse.Namespace) -> str:
    parts = ["python -m tools.benchmark_resnet", f"--out {args.out}", f"--depth {args.depth}"]
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def run_benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    info = RunInfo(
        args.depth,
        settings,
        args.device,
        regenerate_command(args),
        machine_facts(args.device),
        load_average(),
        os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
    )
    providers = execution_providers(args.device)

    start = time.perf_counter()
    inputs = prepare_inputs(work_dir, args.depth, args.data_dir, folded=bool(settings.folded_points))
    calibration, test = load_data(inputs, settings.eval_samples)
    info.section_seconds["preparation"] = time.perf_counter() - start

    start = time.perf_counter()
    dense = evaluate_dense(inputs, test, providers)
    logger.info("dense top-1 accuracy %.2f%% on %d images", dense.accuracy, len(test))
    expected = EXPECTED_DENSE_ACCURACY.get(args.depth)
    if expected is not None and settings.eval_samples is None and abs(dense.accuracy - expected) > 0.005:
        logger.warning("dense accuracy %.2f%% differs from the expected %.2f%%", dense.accuracy, expected)
    points = grid_points(settings.selectors, settings.sparsities)
    rows = run_accuracy_grid(points, inputs, work_dir / "compressed", test, dense, args.device, len(calibration))
    folded_rows = run_accuracy_grid(
        settings.folded_points, inputs, work_dir / "compressed", test, dense, args.device, len(calibration)
    )
    default_rows = run_accuracy_grid(
        settings.default_points, inputs, work_dir / "compressed", test, dense, args.device, len(calibration)
    )
    info.section_seconds["accuracy grid"] = time.perf_counter() - start

    start = time.perf_counter()
    speed = SpeedResults()
    speed_dir = work_dir / "speed"
    speed_dir.mkdir(exist_ok=True)
    calibration_path = measure_calibration(inputs, calibration, args.device, settings.timing_repeats, speed, speed_dir)
    measure_gram_throughput(inputs, calibration_path, calibration, args.device, settings.timing_repeats, speed, speed_dir)
    speed.latency = measure_compressed_latency(inputs, rows, test, args.device, settings)
    info.section_seconds["speed"] = time.perf_counter() - start
    info.load_after = load_average()
    return format_report(info, dense, AccuracyResults(rows, folded_rows, default_rows), speed, len(test))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.benchmark_resnet",
        description="Measure grail-opt accuracy and speed on a pretrained CIFAR-10 ResNet and write a Markdown report.",
    )
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write, e.g. docs/benchmarks.md")
    parser.add_argument("--depth", type=int, choices=DEPTHS, default=56, help="ResNet depth (default: 56)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the ONNX export, the .npz split and the compressed models. Existing files are reused. "
        "Default: a temporary folder, removed at the end",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"data root with the weights and the CIFAR-10 JPEG copy (default: ${cifar10.DATA_DIR_ENV} or ../shared/data)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="ONNX Runtime device (default: cpu, the processor that the numpy comparison runs on)",
    )
    parser.add_argument("--quick", action="store_true", help="reduced grid (wanda, sparsity 0.5, 1,000 test images) as a smoke test")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    if args.work_dir is not None:
        report = run_benchmark(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="grail-benchmark-") as folder:
            report = run_benchmark(args, Path(folder))
    write_atomically(args.out, report)
    logger.info("wrote %s in %.1f minutes", args.out, (time.perf_counter() - started) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
