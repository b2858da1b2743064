"""Measure grail-opt's design choices on the pretrained CIFAR-10 ResNets and write docs/results.md.

Every grail-opt model is compressed by ``grail_graph.driver.compress_file`` on the ONNX
export, with a pipeline text as the command line's ``--pipeline`` takes it. The tables:

1. every selector with ridge compensation and without, at several sparsities, on each depth;
2. statistics modes (oneshot, sequential, cross), each with and without affine compensation;
3. width allocation (uniform, flap, error) under one parameter budget;
4. the ridge strength alpha;
5. the number of calibration images, scored on one fixed held-out set;
6. folding (fold-kmeans, fold-pca) in place of pruning;
7. the peers Torch-Pruning and onnxsim on the same protocol (see tools/peers.py).

Usage::

    python -m tools.results_resnet --out docs/results.md [--quick] [--depths 20,32,44,56] [--work-dir DIR]

The plots go to a folder named after the output file without its suffix (docs/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grail_graph.data import Dataset, InputSpec, load_dataset
from grail_graph.driver import JobOptions, compress_file, tool_version
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.validation import compare_outputs, model_cost
from tools import affine_border, benchmark_resnet, cifar10, peers
from tools.benchmark_resnet import markdown_table, write_atomically

logger = logging.getLogger("tools.results_resnet")

DEPTHS = (20, 32, 44, 56)
PROTOCOL_DEPTH = 56
SELECTORS = ("magnitude", "wanda", "gram", "random")
STATISTICS_MODES = ("oneshot", "sequential", "cross")
ALLOCATIONS = ("uniform", "flap", "error")
FOLD_METHODS = ("fold-kmeans", "fold-pca")
ALPHA = 1e-3
PROVIDERS = ["CPUExecutionProvider"]

# The calibration-size ablation takes the first N images of the protocol permutation
# and scores every N on the permutation's images HELDOUT_START..9999.
HELDOUT_START = 2560

# compress_file holds out part of the calibration data unless it gets evaluation data, even
# without a validate pass. It gets this many test images, which it loads but never runs.
PLACEHOLDER_IMAGES = 8

# Top-1 accuracy (%) of the ResNet-56 ONNX export on the 9,488 test images.
EXPECTED_DENSE_ACCURACY = {56: 83.20}

# ResNet-56 accuracy (%) at sparsity 0.3 and 0.5 with Wanda and alpha = 1e-3, from an
# earlier grail-opt run on this protocol, keyed by (statistics, affine). A rerun must
# give the same numbers, so the page flags every difference.
EARLIER_STATISTICS = {
    ("oneshot", False): {0.3: 74.27, 0.5: 55.11},
    ("oneshot", True): {0.3: 75.38, 0.5: 55.44},
    ("sequential", False): {0.3: 71.89, 0.5: 44.46},
    ("cross", False): {0.3: 78.48, 0.5: 67.70},
    ("cross", True): {0.3: 78.91, 0.5: 69.08},
}

# ResNet-56 accuracy (%) of the peers at sparsity 0.3 and 0.5 from an earlier measurement
# on this protocol, keyed by the labels of the peer table.
EARLIER_PEERS = {
    "Torch-Pruning, taylor": {0.3: 63.6, 0.5: 36.3},
    "onnxsim, wanda + refit": {0.3: 60.0, 0.5: 32.0},
}

# Largest differences, in percentage points, that still count as reproducing a number
# printed with two decimals (the statistics) or with one decimal (the peers).
REPRODUCE_TOLERANCE = 0.005
PEER_TOLERANCE = 0.05


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the full set of tables or the reduced --quick set."""

    sparsities: tuple[float, ...]
    """Sparsities of the selector grid on the protocol depth."""
    depth_sparsities: tuple[float, ...]
    """Sparsities of the selector grid on the other depths."""
    selectors: tuple[str, ...]
    statistics_sparsities: tuple[float, ...]
    allocation_sparsity: float
    alphas: tuple[float, ...]
    alpha_sparsities: tuple[float, ...]
    calibration_sizes: tuple[int, ...]
    calibration_columns: tuple[tuple[str, float], ...]
    """(compensation, sparsity) pairs of the calibration-size table."""
    comparison_sparsities: tuple[float, ...]
    """Sparsities of the folding and peer tables."""
    eval_samples: int | None
    """Test images scored per model; None scores all of them."""
    quick: bool


FULL_SETTINGS = Settings(
    sparsities=(0.3, 0.5, 0.7),
    depth_sparsities=(0.3, 0.5),
    selectors=SELECTORS,
    statistics_sparsities=(0.3, 0.5),
    allocation_sparsity=0.5,
    alphas=(0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    alpha_sparsities=(0.3, 0.5),
    calibration_sizes=(32, 64, 128, 256, 512, 1024, 2048),
    calibration_columns=(("ridge", 0.3), ("ridge", 0.5), ("none", 0.5)),
    comparison_sparsities=(0.3, 0.5),
    eval_samples=None,
    quick=False,
)
QUICK_SETTINGS = Settings(
    sparsities=(0.5,),
    depth_sparsities=(0.5,),
    selectors=("magnitude", "wanda"),
    statistics_sparsities=(0.5,),
    allocation_sparsity=0.5,
    alphas=(0.0, 1e-3, 1e-1),
    alpha_sparsities=(0.5,),
    calibration_sizes=(32, 128, 512),
    calibration_columns=(("ridge", 0.5), ("none", 0.5)),
    comparison_sparsities=(0.5,),
    eval_samples=1000,
    quick=True,
)


# Pipelines -------------------------------------------------------------------------------


def grail_pipeline(
    sparsity: float,
    selector: str = "wanda",
    compensation: str = "ridge",
    alpha: float = ALPHA,
    statistics: str = "oneshot",
    affine: bool = False,
) -> str:
    """Return the pipeline text of one uniform-width configuration, without a validate pass.

    The published GRAIL recipe is the default: one-shot statistics, Wanda, ridge
    compensation with alpha = 1e-3 and no affine term.
    """
    if compensation == "none":
        compensate = "compensate{method=none}"
    else:
        compensate = f"compensate{{alpha={alpha!r} affine={str(affine).lower()}}}"
    return (
        f"find-groups,calibrate{{statistics={statistics}}},"
        f"select{{method={selector} sparsity={sparsity!r}}},{compensate},rewrite"
    )


def allocation_pipeline(method: str, sparsity: float, statistics: str, affine: bool) -> str:
    """Return the pipeline text that spreads one parameter budget over the groups with `method`.

    The widths always come from one-shot statistics. With cross statistics a second
    calibrate pass records the Grams for the compensation.
    """
    parts = [
        "find-groups",
        "calibrate{statistics=oneshot}",
        f"allocate{{method={method} sparsity={sparsity!r} budget=params}}",
    ]
    if statistics != "oneshot":
        parts.append(f"calibrate{{statistics={statistics}}}")
    parts += [
        f"select{{method=wanda sparsity={sparsity!r}}}",
        f"compensate{{alpha={ALPHA!r} affine={str(affine).lower()}}}",
        "rewrite",
    ]
    return ",".join(parts)


# Data ------------------------------------------------------------------------------------


@dataclass
class DataFiles:
    """The .npz files of the protocol split and of the calibration-size ablation."""

    calib: Path
    test: Path
    heldout: Path
    calibration_sizes: dict[int, Path]
    placeholder_eval: Path
    """A few test images that compress_file loads as its evaluation data (see Runner.grail)."""


def prepare_data(work_dir: Path, settings: Settings, depth: int, data_root: Path | None) -> DataFiles:
    """Write the protocol split and the calibration-size files into `work_dir`, reusing existing ones."""
    # The benchmark's prepare_inputs writes calib.npz and test.npz and exports ResNet-`depth`.
    inputs = benchmark_resnet.prepare_inputs(work_dir, depth, data_root, folded=False)
    sizes = {size: work_dir / f"calib-first-{size}.npz" for size in settings.calibration_sizes}
    heldout = work_dir / f"heldout-from-{HELDOUT_START}.npz"
    placeholder = work_dir / "placeholder-eval.npz"
    missing = [path for path in [heldout, placeholder, *sizes.values()] if not path.exists()]
    if missing:
        images, labels = cifar10.load_decoded(data_root)
        permutation = np.concatenate(cifar10.split_indices())
        for size, path in sizes.items():
            if size > HELDOUT_START:
                raise ValueError(f"calibration size {size} overlaps the held-out images from index {HELDOUT_START}")
            if not path.exists():
                cifar10.write_npz(path, "input", images[permutation[:size]])
        if not heldout.exists():
            rest = permutation[HELDOUT_START:]
            cifar10.write_npz(heldout, "input", images[rest], labels[rest])
        if not placeholder.exists():
            last = permutation[-PLACEHOLDER_IMAGES:]
            cifar10.write_npz(placeholder, "input", images[last], labels[last])
        logger.info("wrote the calibration-size files to %s", work_dir)
    return DataFiles(inputs.calib, inputs.test, heldout, sizes, placeholder)


def export_model(work_dir: Path, depth: int, data_root: Path | None) -> Path:
    path = work_dir / f"resnet{depth}.onnx"
    benchmark_resnet.export_if_missing(path, depth, data_root, fold_batchnorm=False)
    return path


# Runs ------------------------------------------------------------------------------------


@dataclass
class Result:
    """One compressed model and its score on the evaluation set."""

    accuracy: float
    """Top-1 accuracy in percent."""
    top1_agreement: float
    """Fraction of images where the compressed and the dense model predict the same class."""
    parameters: int
    macs: int
    kept_channels: int
    total_channels: int
    compress_seconds: float
    evaluate_seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Dense:
    accuracy: float
    logits: np.ndarray
    parameters: int
    macs: int


class Runner:
    """Compress and evaluate models, running each distinct job once per process.

    With `resume`, results stored in the work folder by an earlier run with the same
    grail-opt version are reused, so an interrupted run continues where it stopped.
    """

    def __init__(self, work_dir: Path, settings: Settings, resume: bool, data_root: Path | None, placeholder_eval: Path):
        self.work_dir = work_dir
        self.placeholder_eval = placeholder_eval
        self.settings = settings
        self.data_root = data_root
        self.cache_path = work_dir / "results-cache.json"
        self.cache: dict[str, dict[str, Any]] = {}
        if resume and self.cache_path.exists():
            self.cache = json.loads(self.cache_path.read_text())
            logger.info("resuming with %d stored results from %s", len(self.cache), self.cache_path)
        self.datasets: dict[Path, Dataset] = {}
        self.dense: dict[tuple[int, Path], Dense] = {}
        self.scratch = work_dir / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.stored_keys = set(self.cache)
        self.reused_keys: set[str] = set()
        self.runs = 0
        self.section = ""
        self.section_model_seconds: dict[str, float] = {}
        """Compress and evaluate seconds of each section's models, counting a model shared by sections once."""
        self.counted_keys: set[str] = set()

    def dataset(self, path: Path, model: Path, evaluation: bool) -> Dataset:
        if path not in self.datasets:
            frontend = OnnxFrontEnd.load(model, "cpu")
            specs = [InputSpec(name, dtype, shape) for name, dtype, shape in frontend.input_specs()]
            data = load_dataset(path, specs, role="evaluation" if evaluation else "calibration")
            if evaluation and self.settings.eval_samples is not None:
                data = data.subset(0, self.settings.eval_samples)
            self.datasets[path] = data
        return self.datasets[path]

    def dense_result(self, model: Path, depth: int, evaluation: Path) -> Dense:
        key = (depth, evaluation)
        if key not in self.dense:
            data = self.dataset(evaluation, model, evaluation=True)
            logits = benchmark_resnet.evaluate_logits(model, data, PROVIDERS)
            cost = model_cost(model)
            accuracy = 100.0 * float((logits.argmax(axis=1) == data.labels).mean())
            self.dense[key] = Dense(accuracy, logits, cost["parameters"], cost["macs"])
            logger.info("ResNet-%d dense top-1 %.2f%% on %d images of %s", depth, accuracy, len(data), evaluation.name)
        return self.dense[key]

    def _cached(self, key: str, compute: Callable[[], Result]) -> Result:
        if key in self.cache:
            return Result(**self.cache[key])
        result = compute()
        self.cache[key] = asdict(result)
        write_atomically(self.cache_path, json.dumps(self.cache, indent=1))
        return result

    def _score(self, path: Path, model: Path, depth: int, evaluation: Path) -> tuple[dict[str, Any], dict[str, int], float]:
        dense = self.dense_result(model, depth, evaluation)
        data = self.dataset(evaluation, model, evaluation=True)
        start = time.perf_counter()
        logits = benchmark_resnet.evaluate_logits(path, data, PROVIDERS)
        seconds = time.perf_counter() - start
        return compare_outputs(dense.logits, logits, data.labels), model_cost(path), seconds

    def grail(self, model: Path, depth: int, pipeline: str, calib: Path, evaluation: Path) -> Result:
        """Compress `model` with `pipeline` through compress_file and score it on `evaluation`."""
        key = json.dumps(["grail", tool_version(), model.name, calib.name, evaluation.name, self.settings.eval_samples, pipeline])

        def compute() -> Result:
            output = self.scratch / "grail.onnx"
            options = JobOptions(pipeline=pipeline, calib=calib, eval=self.placeholder_eval, device="cpu")
            start = time.perf_counter()
            report = compress_file(model, output, options)
            compress_seconds = time.perf_counter() - start
            calibration_samples = len(self.dataset(calib, model, evaluation=False))
            benchmark_resnet.check_calibration_samples(report, calibration_samples)
            metrics, cost, evaluate_seconds = self._score(output, model, depth, evaluation)
            groups = report["groups"]
            notes = sorted({group["verdict"].split(":")[0] for group in groups})
            return Result(
                accuracy=100.0 * metrics["accuracy_after"],
                top1_agreement=metrics["top1_agreement"],
                parameters=cost["parameters"],
                macs=cost["macs"],
                kept_channels=sum(group["kept"] for group in groups),
                total_channels=sum(group["width"] for group in groups),
                compress_seconds=compress_seconds,
                evaluate_seconds=evaluate_seconds,
                notes=[f"{sum(group['verdict'].startswith(note) for group in groups)} groups {note}" for note in notes],
            )

        return self._run(key, compute, f"ResNet-{depth} {pipeline}")

    def peer(self, label: str, model: Path, depth: int, sparsity: float, evaluation: Path, build: Callable[[Path], peers.PeerModel]) -> Result:
        """Build a peer's model with `build(output_path)` and score it on `evaluation`."""
        key = json.dumps(["peer", peers.peer_versions(), label, model.name, evaluation.name, self.settings.eval_samples, sparsity])

        def compute() -> Result:
            output = self.scratch / "peer.onnx"
            start = time.perf_counter()
            built = build(output)
            compress_seconds = time.perf_counter() - start
            metrics, cost, evaluate_seconds = self._score(output, model, depth, evaluation)
            return Result(
                accuracy=100.0 * metrics["accuracy_after"],
                top1_agreement=metrics["top1_agreement"],
                parameters=cost["parameters"],
                macs=cost["macs"],
                kept_channels=built.kept_channels,
                total_channels=built.total_channels,
                compress_seconds=compress_seconds,
                evaluate_seconds=evaluate_seconds,
                notes=built.notes,
            )

        return self._run(key, compute, f"ResNet-{depth} {label} at {sparsity:g}")

    def _run(self, key: str, compute: Callable[[], Result], description: str) -> Result:
        cached = key in self.cache
        start = time.perf_counter()
        result = self._cached(key, compute)
        if key in self.stored_keys:
            self.reused_keys.add(key)
        elif not cached:
            self.runs += 1
        if key not in self.counted_keys:
            self.counted_keys.add(key)
            seconds = result.compress_seconds + result.evaluate_seconds
            self.section_model_seconds[self.section] = self.section_model_seconds.get(self.section, 0.0) + seconds
        logger.info(
            "%s%s: top-1 %.2f%% (%.1f s)", "stored " if cached else "", description, result.accuracy, time.perf_counter() - start
        )
        return result


# Sections --------------------------------------------------------------------------------


@dataclass
class Measurements:
    """Everything the page reports."""

    protocol_depth: int
    dense: dict[int, Dense] = field(default_factory=dict)
    selector_grid: dict[int, dict[tuple[str, str, float], Result]] = field(default_factory=dict)
    statistics: dict[tuple[str, bool, float], Result] = field(default_factory=dict)
    allocation: dict[tuple[str, str, bool], Result] = field(default_factory=dict)
    alphas: dict[tuple[float, float], Result] = field(default_factory=dict)
    alpha_baseline: dict[float, Result] = field(default_factory=dict)
    calibration_sizes: dict[tuple[int, str, float], Result] = field(default_factory=dict)
    heldout_dense: float = float("nan")
    heldout_size: int = 0
    folding: dict[tuple[str, str, float], Result] = field(default_factory=dict)
    folding_available: bool = False
    peer_results: dict[tuple[str, float], Result] = field(default_factory=dict)
    peer_status: dict[str, str] = field(default_factory=dict)
    section_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each section in this process."""
    section_model_seconds: dict[str, float] = field(default_factory=dict)
    """Compress and evaluate time of each section's models, including results reused with --resume."""
    test_size: int = 0
    border_lines: list[str] = field(default_factory=list)
    """Markdown lines from tools.affine_border, empty when that measurement was not run."""

    @property
    def comparable_to_earlier(self) -> bool:
        """Whether the earlier numbers apply: ResNet-56 scored on the whole test set."""
        return self.protocol_depth == PROTOCOL_DEPTH and self.test_size == cifar10.NUM_IMAGES - cifar10.NUM_CALIB


def run_selector_grid(runner: Runner, data: DataFiles, depth: int, model: Path, sparsities: Sequence[float]) -> dict:
    grid = {}
    for selector in runner.settings.selectors:
        for compensation in ("ridge", "none"):
            for sparsity in sparsities:
                pipeline = grail_pipeline(sparsity, selector, compensation)
                grid[(selector, compensation, sparsity)] = runner.grail(model, depth, pipeline, data.calib, data.test)
    return grid


def run_statistics(runner: Runner, data: DataFiles, depth: int, model: Path) -> dict:
    results = {}
    for statistics in STATISTICS_MODES:
        for affine in (False, True):
            for sparsity in runner.settings.statistics_sparsities:
                pipeline = grail_pipeline(sparsity, statistics=statistics, affine=affine)
                results[(statistics, affine, sparsity)] = runner.grail(model, depth, pipeline, data.calib, data.test)
    return results


ALLOCATION_VARIANTS = (("oneshot", False), ("oneshot", True), ("cross", True))


def run_allocation(runner: Runner, data: DataFiles, depth: int, model: Path) -> dict:
    results = {}
    sparsity = runner.settings.allocation_sparsity
    for statistics, affine in ALLOCATION_VARIANTS:
        for method in ALLOCATIONS:
            pipeline = allocation_pipeline(method, sparsity, statistics, affine)
            results[(method, statistics, affine)] = runner.grail(model, depth, pipeline, data.calib, data.test)
    return results


def run_alphas(runner: Runner, data: DataFiles, depth: int, model: Path) -> tuple[dict, dict]:
    results, baseline = {}, {}
    for sparsity in runner.settings.alpha_sparsities:
        for alpha in runner.settings.alphas:
            pipeline = grail_pipeline(sparsity, alpha=alpha)
            results[(alpha, sparsity)] = runner.grail(model, depth, pipeline, data.calib, data.test)
        pipeline = grail_pipeline(sparsity, compensation="none")
        baseline[sparsity] = runner.grail(model, depth, pipeline, data.calib, data.test)
    return results, baseline


def run_calibration_sizes(runner: Runner, data: DataFiles, depth: int, model: Path) -> dict:
    results = {}
    for size, calib in data.calibration_sizes.items():
        for compensation, sparsity in runner.settings.calibration_columns:
            pipeline = grail_pipeline(sparsity, compensation=compensation)
            results[(size, compensation, sparsity)] = runner.grail(model, depth, pipeline, calib, data.heldout)
    return results


def folding_available() -> bool:
    """Return whether this grail-opt's select pass accepts the folding methods."""
    from grail_graph.passes import parse_pipeline

    try:
        parse_pipeline(f"select{{method={FOLD_METHODS[0]}}}")
    except (ValueError, TypeError) as error:
        logger.warning("folding is not available: %s", error)
        return False
    return True


def run_folding(runner: Runner, data: DataFiles, depth: int, model: Path) -> dict:
    results = {}
    for method in (*FOLD_METHODS, "wanda"):
        for compensation in ("ridge", "none"):
            for sparsity in runner.settings.comparison_sparsities:
                pipeline = grail_pipeline(sparsity, method, compensation)
                results[(method, compensation, sparsity)] = runner.grail(model, depth, pipeline, data.calib, data.test)
    return results


def calibration_arrays(data: DataFiles, runner: Runner, model: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the protocol's 512 calibration images (preprocessed) and their labels."""
    calib = runner.dataset(data.calib, model, evaluation=False)
    calib_indices, _ = cifar10.split_indices()
    _, labels = cifar10.load_decoded(runner.data_root)
    return calib.arrays["input"], labels[calib_indices].astype(np.int64)


TORCH_PRUNING_LABEL = "Torch-Pruning, {importance}"
ONNXSIM_LABEL = "onnxsim, {method} + refit"


def run_peers(runner: Runner, data: DataFiles, depth: int, model: Path, measurements: Measurements) -> dict:
    """Run the peers that are installed and record why the others were skipped."""
    versions = peers.peer_versions()
    results = {}
    images, labels = calibration_arrays(data, runner, model)

    if versions["torch-pruning"] is None:
        measurements.peer_status["Torch-Pruning"] = f"not installed (pip install torch-pruning=={peers.TORCH_PRUNING_VERSION})"
    else:
        measurements.peer_status["Torch-Pruning"] = f"version {versions['torch-pruning']}"
        for importance in peers.TORCH_PRUNING_IMPORTANCES:
            label = TORCH_PRUNING_LABEL.format(importance=importance)
            for sparsity in runner.settings.comparison_sparsities:

                def build(output: Path, importance=importance, sparsity=sparsity) -> peers.PeerModel:
                    return peers.torch_pruning_model(depth, importance, sparsity, output, images, labels, runner.data_root)

                results[(label, sparsity)] = runner.peer(label, model, depth, sparsity, data.test, build)

    if versions["onnxsim"] is None:
        measurements.peer_status["onnxsim"] = f"not installed (pip install onnxsim=={peers.ONNXSIM_VERSION})"
    else:
        measurements.peer_status["onnxsim"] = f"version {versions['onnxsim']}"
        batches = [{"input": images[start : start + 64]} for start in range(0, len(images), 64)]
        for method in peers.ONNXSIM_METHODS:
            label = ONNXSIM_LABEL.format(method=method)
            for sparsity in runner.settings.comparison_sparsities:

                def build(output: Path, method=method, sparsity=sparsity) -> peers.PeerModel:
                    return peers.onnxsim_model(model, method, sparsity, output, batches)

                results[(label, sparsity)] = runner.peer(label, model, depth, sparsity, data.test, build)
    return results


def timed_section(runner: Runner, measurements: Measurements, name: str, function: Callable[[], Any]) -> Any:
    runner.section = name
    start = time.perf_counter()
    value = function()
    measurements.section_seconds[name] = measurements.section_seconds.get(name, 0.0) + time.perf_counter() - start
    measurements.section_model_seconds = dict(runner.section_model_seconds)
    return value


def protocol_depth_of(depths: Sequence[int]) -> int:
    """Return the depth that every table uses: ResNet-56 if listed, else the deepest listed."""
    return PROTOCOL_DEPTH if PROTOCOL_DEPTH in depths else max(depths)


def measure(runner: Runner, data: DataFiles, depths: Sequence[int]) -> Measurements:
    """Run every table on the protocol depth, then the selector grid on the other depths."""
    settings = runner.settings
    protocol_depth = protocol_depth_of(depths)
    measurements = Measurements(protocol_depth)
    model = export_model(runner.work_dir, protocol_depth, runner.data_root)
    measurements.dense[protocol_depth] = runner.dense_result(model, protocol_depth, data.test)
    measurements.test_size = len(runner.dataset(data.test, model, evaluation=True))
    dense = measurements.dense[protocol_depth]
    expected = EXPECTED_DENSE_ACCURACY.get(protocol_depth)
    if expected is not None and settings.eval_samples is None and abs(dense.accuracy - expected) > REPRODUCE_TOLERANCE:
        logger.warning("dense accuracy %.2f%% differs from the expected %.2f%%", dense.accuracy, expected)

    def section(name: str, function: Callable[[], Any]) -> Any:
        return timed_section(runner, measurements, name, function)

    measurements.selector_grid[protocol_depth] = section(
        "selectors", lambda: run_selector_grid(runner, data, protocol_depth, model, settings.sparsities)
    )
    measurements.statistics = section("statistics", lambda: run_statistics(runner, data, protocol_depth, model))
    measurements.allocation = section("allocation", lambda: run_allocation(runner, data, protocol_depth, model))
    measurements.alphas, measurements.alpha_baseline = section("ridge", lambda: run_alphas(runner, data, protocol_depth, model))
    measurements.calibration_sizes = section(
        "calibration size", lambda: run_calibration_sizes(runner, data, protocol_depth, model)
    )
    heldout_dense = runner.dense_result(model, protocol_depth, data.heldout)
    measurements.heldout_dense = heldout_dense.accuracy
    measurements.heldout_size = len(runner.dataset(data.heldout, model, evaluation=True))
    measurements.folding_available = folding_available()
    if measurements.folding_available:
        measurements.folding = section("folding", lambda: run_folding(runner, data, protocol_depth, model))
    measurements.peer_results = section("peers", lambda: run_peers(runner, data, protocol_depth, model, measurements))

    for depth in sorted(set(depths) - {protocol_depth}):
        depth_model = export_model(runner.work_dir, depth, runner.data_root)
        measurements.dense[depth] = runner.dense_result(depth_model, depth, data.test)
        measurements.selector_grid[depth] = section(
            "other depths", lambda: run_selector_grid(runner, data, depth, depth_model, settings.depth_sparsities)
        )
    return measurements


# Plots -----------------------------------------------------------------------------------


def save_figure(figure, path: Path) -> None:
    """Save a matplotlib figure as PNG to a temporary file next to `path`, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = cifar10.temporary_path_for(path)
    try:
        figure.savefig(temp_path, format="png", dpi=110, bbox_inches="tight")
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def plot_selectors(measurements: Measurements, sparsities: Sequence[float], path: Path) -> None:
    import matplotlib.pyplot as plt

    depth = measurements.protocol_depth
    grid = measurements.selector_grid[depth]
    selectors = list(dict.fromkeys(key[0] for key in grid))
    dense = measurements.dense[depth].accuracy
    columns = min(len(selectors), 2)
    rows = math.ceil(len(selectors) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), sharey=True, squeeze=False)
    x = [0.0, *sparsities]
    for axis, selector in zip(axes.flat, selectors):
        for compensation, style in (("ridge", "o-"), ("none", "s--")):
            y = [dense, *(grid[(selector, compensation, s)].accuracy for s in sparsities)]
            axis.plot(x, y, style, label=f"{compensation} compensation" if compensation == "ridge" else "no compensation")
        axis.set_title(selector)
        axis.set_xlabel("sparsity (fraction of hidden channels removed)")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in list(axes.flat)[len(selectors) :]:
        axis.set_visible(False)
    figure.suptitle(f"ResNet-{depth}, CIFAR-10 JPEG test split: accuracy vs sparsity (one-shot statistics)")
    save_figure(figure, path)
    plt.close(figure)


def plot_calibration_sizes(measurements: Measurements, settings: Settings, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    sizes = list(settings.calibration_sizes)
    for compensation, sparsity in settings.calibration_columns:
        y = [measurements.calibration_sizes[(size, compensation, sparsity)].accuracy for size in sizes]
        style = "o-" if compensation == "ridge" else "s--"
        axis.plot(sizes, y, style, label=f"{compensation}, sparsity {sparsity:g}")
    axis.axhline(measurements.heldout_dense, color="gray", linestyle=":", label="dense")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.set_xlabel("calibration images")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(f"ResNet-{measurements.protocol_depth}: calibration-set size ({measurements.heldout_size} held-out images)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def plot_alphas(measurements: Measurements, settings: Settings, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    alphas = list(settings.alphas)
    positive = [alpha for alpha in alphas if alpha > 0]
    # alpha = 0 has no place on a log axis, so it is drawn one decade below the smallest alpha.
    zero_position = min(positive) / 10 if positive else 1e-6
    x = [alpha if alpha > 0 else zero_position for alpha in alphas]
    for sparsity in settings.alpha_sparsities:
        y = [measurements.alphas[(alpha, sparsity)].accuracy for alpha in alphas]
        line = axis.plot(x, y, "o-", label=f"ridge, sparsity {sparsity:g}")[0]
        axis.axhline(measurements.alpha_baseline[sparsity].accuracy, color=line.get_color(), linestyle="--", alpha=0.6,
                     label=f"no compensation, sparsity {sparsity:g}")  # fmt: skip
    axis.set_xscale("log")
    axis.set_xticks(x, ["0" if alpha == 0 else f"{alpha:g}" for alpha in alphas])
    axis.set_xlabel("alpha (ridge strength relative to mean(diag(G[P, P])))")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(f"ResNet-{measurements.protocol_depth}: ridge strength (one-shot, Wanda)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def plot_statistics(measurements: Measurements, settings: Settings, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    modes = [(statistics, affine) for statistics in STATISTICS_MODES for affine in (False, True)]
    sparsities = list(settings.statistics_sparsities)
    width = 0.8 / len(sparsities)
    positions = np.arange(len(modes))
    for index, sparsity in enumerate(sparsities):
        values = [measurements.statistics[(statistics, affine, sparsity)].accuracy for statistics, affine in modes]
        axis.bar(positions + (index - (len(sparsities) - 1) / 2) * width, values, width, label=f"sparsity {sparsity:g}")
    axis.set_xticks(positions, [statistics + (" + affine" if affine else "") for statistics, affine in modes], rotation=20)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(f"ResNet-{measurements.protocol_depth}: statistics modes (Wanda, alpha 1e-3)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend()
    save_figure(figure, path)
    plt.close(figure)


def write_plots(measurements: Measurements, settings: Settings, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    depth = measurements.protocol_depth
    paths = {
        "selectors": folder / f"selectors-resnet{depth}.png",
        "calibration": folder / "calibration-size.png",
        "ridge": folder / "ridge-alpha.png",
        "statistics": folder / "statistics-modes.png",
    }
    plot_selectors(measurements, settings.sparsities, paths["selectors"])
    plot_calibration_sizes(measurements, settings, paths["calibration"])
    plot_alphas(measurements, settings, paths["ridge"])
    plot_statistics(measurements, settings, paths["statistics"])
    return paths


# Page ------------------------------------------------------------------------------------


def percent(sparsity: float) -> str:
    return f"{100 * sparsity:g}%"


def points(value: float) -> str:
    return f"{value:+.2f}"


def selector_table(grid: dict, sparsities: Sequence[float]) -> str:
    selectors = list(dict.fromkeys(key[0] for key in grid))
    rows = []
    for selector in selectors:
        for compensation in ("ridge", "none"):
            cells = [f"{grid[(selector, compensation, s)].accuracy:.2f}" for s in sparsities]
            rows.append([selector, compensation, *cells])
        gains = [points(grid[(selector, "ridge", s)].accuracy - grid[(selector, "none", s)].accuracy) for s in sparsities]
        rows.append([selector, "gain of ridge", *gains])
    return markdown_table(["selector", "compensation", *map(percent, sparsities)], rows, "ll" + "r" * len(sparsities))


def depth_table(measurements: Measurements, sparsities: Sequence[float]) -> str:
    depths = sorted(measurements.selector_grid)
    headers = ["selector", "compensation"] + [f"ResNet-{d} {percent(s)}" for d in depths for s in sparsities]
    rows = [["dense", "", *(f"{measurements.dense[d].accuracy:.2f}" for d in depths for _ in sparsities)]]
    grid_keys = measurements.selector_grid[depths[0]]
    selectors = list(dict.fromkeys(key[0] for key in grid_keys))
    for selector in selectors:
        for compensation in ("ridge", "none"):
            cells = [f"{measurements.selector_grid[d][(selector, compensation, s)].accuracy:.2f}" for d in depths for s in sparsities]
            rows.append([selector, compensation, *cells])
    return markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2))


def earlier_cell(value: float, earlier: float | None, tolerance: float, decimals: int) -> str:
    if earlier is None:
        return "-"
    difference = value - earlier
    mark = "" if abs(difference) <= tolerance else f" (differs by {difference:+.2f})"
    return f"{earlier:.{decimals}f}{mark}"


def statistics_table(measurements: Measurements, sparsities: Sequence[float]) -> str:
    earlier_columns = sparsities if measurements.comparable_to_earlier else ()
    headers = ["statistics", "affine", *map(percent, sparsities), *(f"earlier run {percent(s)}" for s in earlier_columns), "compress time"]
    rows = []
    for statistics in STATISTICS_MODES:
        for affine in (False, True):
            results = [measurements.statistics[(statistics, affine, s)] for s in sparsities]
            earlier = EARLIER_STATISTICS.get((statistics, affine), {})
            seconds = max(result.compress_seconds for result in results)
            earlier_cells = [
                earlier_cell(measurements.statistics[(statistics, affine, s)].accuracy, earlier.get(s), REPRODUCE_TOLERANCE, 2)
                for s in earlier_columns
            ]
            rows.append(
                [
                    statistics,
                    "yes" if affine else "no",
                    *(f"{result.accuracy:.2f}" for result in results),
                    *earlier_cells,
                    f"{seconds:.0f} s",
                ]
            )
    return markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2))


def statistics_mismatches(measurements: Measurements) -> list[str]:
    mismatches = []
    for (statistics, affine), values in EARLIER_STATISTICS.items():
        for sparsity, earlier in values.items():
            result = measurements.statistics.get((statistics, affine, sparsity))
            if result is not None and abs(result.accuracy - earlier) > REPRODUCE_TOLERANCE:
                label = statistics + (" + affine" if affine else "")
                mismatches.append(f"{label} at {percent(sparsity)}: {result.accuracy:.2f} against {earlier:.2f}")
    return mismatches


def allocation_table(measurements: Measurements) -> str:
    headers = ["allocation", *(s + (" + affine" if a else "") for s, a in ALLOCATION_VARIANTS), "kept channels", "parameters", "MACs"]
    rows = []
    for method in ALLOCATIONS:
        results = [measurements.allocation[(method, s, a)] for s, a in ALLOCATION_VARIANTS]
        last = results[-1]
        rows.append(
            [
                method,
                *(f"{result.accuracy:.2f}" for result in results),
                f"{last.kept_channels} / {last.total_channels}",
                f"{last.parameters:,}",
                f"{last.macs / 1e6:.1f} M",
            ]
        )
    return markdown_table(headers, rows)


def alpha_table(measurements: Measurements, settings: Settings) -> str:
    sparsities = settings.alpha_sparsities
    rows = [
        ["0" if alpha == 0 else f"{alpha:g}", *(f"{measurements.alphas[(alpha, s)].accuracy:.2f}" for s in sparsities)]
        for alpha in settings.alphas
    ]
    rows.append(["no compensation", *(f"{measurements.alpha_baseline[s].accuracy:.2f}" for s in sparsities)])
    return markdown_table(["alpha", *map(percent, sparsities)], rows)


def calibration_table(measurements: Measurements, settings: Settings) -> str:
    columns = settings.calibration_columns
    headers = ["calibration images", *(f"{c} {percent(s)}" for c, s in columns), "compress time"]
    rows = []
    for size in settings.calibration_sizes:
        results = [measurements.calibration_sizes[(size, c, s)] for c, s in columns]
        seconds = max(result.compress_seconds for result in results)
        rows.append([str(size), *(f"{result.accuracy:.2f}" for result in results), f"{seconds:.1f} s"])
    rows.append(["dense", *(f"{measurements.heldout_dense:.2f}" for _ in columns), ""])
    return markdown_table(headers, rows)


def folding_table(measurements: Measurements, sparsities: Sequence[float]) -> str:
    headers = ["selector", "compensation", *map(percent, sparsities), "groups"]
    rows = []
    for method in (*FOLD_METHODS, "wanda"):
        for compensation in ("ridge", "none"):
            results = [measurements.folding[(method, compensation, s)] for s in sparsities]
            rows.append([method, compensation, *(f"{r.accuracy:.2f}" for r in results), "; ".join(results[-1].notes)])
    return markdown_table(headers, rows, "ll" + "r" * len(sparsities) + "l")


def peer_table(measurements: Measurements, sparsities: Sequence[float]) -> str:
    depth = measurements.protocol_depth
    grid = measurements.selector_grid[depth]
    own = [
        ("grail-opt, wanda, no compensation", lambda s: grid.get(("wanda", "none", s))),
        ("grail-opt, published recipe (one-shot, wanda, ridge)", lambda s: measurements.statistics.get(("oneshot", False, s))),
        ("grail-opt, CLI default (cross + affine)", lambda s: measurements.statistics.get(("cross", True, s))),
    ]
    earlier_columns = sparsities if measurements.comparable_to_earlier else ()
    headers = [
        "method",
        *map(percent, sparsities),
        *(f"earlier run {percent(s)}" for s in earlier_columns),
        f"MACs at {percent(sparsities[-1])}",
        "kept channels",
        "labels",
    ]
    rows = []
    for label, lookup in own:
        results = [lookup(s) for s in sparsities]
        if any(result is None for result in results):
            continue
        cells = [f"{r.accuracy:.2f}" for r in results] + ["-" for _ in earlier_columns]
        last = results[-1]
        rows.append([label, *cells, f"{last.macs / 1e6:.1f} M", f"{last.kept_channels} / {last.total_channels}", "no"])
    labels = list(dict.fromkeys(label for label, _ in measurements.peer_results))
    for label in labels:
        results = [measurements.peer_results[(label, s)] for s in sparsities]
        earlier = EARLIER_PEERS.get(label, {})
        cells = [f"{r.accuracy:.2f}" for r in results]
        cells += [earlier_cell(measurements.peer_results[(label, s)].accuracy, earlier.get(s), PEER_TOLERANCE, 1) for s in earlier_columns]
        uses_labels = "yes (512 calibration images)" if "taylor" in label else "no"
        last = results[-1]
        rows.append([label, *cells, f"{last.macs / 1e6:.1f} M", f"{last.kept_channels} / {last.total_channels}", uses_labels])
    return markdown_table(headers, rows, "l" + "r" * (len(headers) - 2) + "l")


def best(items: dict[Any, float]) -> tuple[Any, float]:
    key = max(items, key=items.get)
    return key, items[key]


def tied_best(items: dict[Any, float]) -> tuple[list[Any], float]:
    """Return every key with the maximum value, in insertion order, and that value.

    Accuracies are counts of correct images over one test set, so equal counts give
    exactly equal floats.
    """
    value = max(items.values())
    return [key for key, item in items.items() if item == value], value


def join_words(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def defaults_section(measurements: Measurements, settings: Settings) -> list[str]:
    """State which choices won and what each contributes over the published recipe."""
    sparsities = settings.statistics_sparsities
    stats = measurements.statistics
    base = {s: stats[("oneshot", False, s)].accuracy for s in sparsities}

    def gains(key: tuple[str, bool]) -> str:
        return " / ".join(
            f"{stats[(key[0], key[1], s)].accuracy:.2f} ({points(stats[(key[0], key[1], s)].accuracy - base[s])})" for s in sparsities
        )

    sparsity_text = " / ".join(percent(s) for s in sparsities)
    lines = [
        "## Defaults",
        "",
        "The command line's default pipeline is cross statistics, affine compensation, Wanda, uniform widths and "
        "alpha = 1e-3. The published recipe is one-shot statistics, Wanda, uniform widths and alpha = 1e-3 without "
        f"the affine term. On ResNet-{measurements.protocol_depth} the published recipe scores "
        f"{' / '.join(f'{base[s]:.2f}' for s in sparsities)} at {sparsity_text}. Each change below is measured on its "
        "own against that recipe, in percentage points:",
        "",
        f"- affine term alone (one-shot + affine): {gains(('oneshot', True))}",
        f"- cross statistics alone: {gains(('cross', False))}",
        f"- both (cross + affine, the CLI default): {gains(('cross', True))}",
        f"- sequential statistics, for comparison: {gains(('sequential', False))}",
    ]
    lines += allocation_gain_lines(measurements, settings)

    modes = [(m, a) for m in STATISTICS_MODES for a in (False, True)]
    winner, _ = best({key: stats[(key[0], key[1], sparsities[-1])].accuracy for key in modes})
    winner_text = winner[0] + (" + affine" if winner[1] else "")
    everywhere = all(
        stats[(winner[0], winner[1], s)].accuracy >= max(stats[(m, a, s)].accuracy for m, a in modes) for s in sparsities
    )
    affine_on_cross = " / ".join(
        points(stats[("cross", True, s)].accuracy - stats[("cross", False, s)].accuracy) for s in sparsities
    )
    lines += [
        "",
        "Each default against its alternatives:",
        "",
        f"- Statistics: {winner_text} is best at {percent(sparsities[-1])}"
        + (" and at every sparsity of the table." if everywhere else ", but not at every sparsity of the table.")
        + f" On top of cross statistics, the affine term changes the accuracy by {affine_on_cross} points at {sparsity_text}.",
    ]

    sparsity = settings.allocation_sparsity
    allocation = measurements.allocation
    for statistics, affine in ALLOCATION_VARIANTS:
        label = statistics + (" + affine" if affine else "")
        values = {method: allocation[(method, statistics, affine)].accuracy for method in ALLOCATIONS}
        method, value = best(values)
        uniform = values["uniform"]
        if method == "uniform":
            text = f"uniform is best ({uniform:.2f}; " + ", ".join(f"{m} {values[m]:.2f}" for m in ALLOCATIONS if m != "uniform") + ")"
        else:
            text = f"{method} beats uniform by {points(value - uniform)} ({value:.2f} against {uniform:.2f})"
        lines.append(f"- Allocation at {percent(sparsity)} with {label}: {text}.")

    for s in settings.alpha_sparsities:
        alphas = {alpha: measurements.alphas[(alpha, s)].accuracy for alpha in settings.alphas}
        winners, value = tied_best(alphas)
        default = alphas.get(ALPHA)
        if default is None:
            continue
        names = join_words([f"{alpha:g}" for alpha in winners])
        verb = "is" if len(winners) == 1 else "are"
        if ALPHA in winners:
            lines.append(f"- Ridge strength at {percent(s)} (one-shot): alpha = {names} {verb} best ({default:.2f}).")
        else:
            lines.append(
                f"- Ridge strength at {percent(s)} (one-shot): alpha = {names} {verb} best with {value:.2f}, "
                f"{points(value - default)} over alpha = 1e-3 ({default:.2f})."
            )

    grid = measurements.selector_grid[measurements.protocol_depth]
    for s in settings.sparsities:
        selectors = {selector: grid[(selector, "ridge", s)].accuracy for selector in settings.selectors}
        winners, value = tied_best(selectors)
        names = join_words(winners)
        verb = "is" if len(winners) == 1 else "are"
        if "wanda" in winners:
            lines.append(f"- Selector at {percent(s)} (one-shot, ridge): {names} {verb} best ({value:.2f}).")
        else:
            lines.append(
                f"- Selector at {percent(s)} (one-shot, ridge): {names} {verb} best with {value:.2f}, "
                f"{points(value - selectors['wanda'])} over wanda ({selectors['wanda']:.2f})."
            )
    return lines


def allocation_gain_lines(measurements: Measurements, settings: Settings) -> list[str]:
    """List the best non-uniform allocation's accuracy against the published recipe at the allocation sparsity."""
    sparsity = settings.allocation_sparsity
    base = measurements.statistics.get(("oneshot", False, sparsity))
    if base is None:
        return []
    lines = []
    for statistics, affine in ALLOCATION_VARIANTS:
        label = statistics + (" + affine" if affine else "")
        values = {m: measurements.allocation[(m, statistics, affine)].accuracy for m in ALLOCATIONS if m != "uniform"}
        method, value = best(values)
        lines.append(
            f"- best non-uniform allocation ({method}) with {label} at {percent(sparsity)}: "
            f"{value:.2f} ({points(value - base.accuracy)})"
        )
    return lines


@dataclass
class PageInfo:
    command: str
    facts: dict[str, str]
    load_before: str
    load_after: str
    started: datetime.datetime
    total_seconds: float
    runs: int
    reused: int
    models: int
    model_seconds: float
    versions: dict[str, str | None]


def method_lines(settings: Settings) -> list[str]:
    example = grail_pipeline(0.5)
    return [
        "## Method",
        "",
        "- Data: the CIFAR-10 test set as JPEG (quality about 75), so accuracies are about 10 points below "
        "lossless CIFAR-10 figures. `torch.randperm(10000)` with seed 0 orders the images. The first 512 are the "
        "calibration set and the other 9,488 the test set (`tools/cifar10.py`). The calibration-size ablation "
        f"calibrates on the first N images and scores every N on the images from position {HELDOUT_START} to the end.",
        "- Models: the pretrained akamaster CIFAR-10 ResNets exported to ONNX with BatchNormalization kept "
        "(`tools/export_resnet_cifar.py`). grail-opt compresses the hidden channels of every BasicBlock (conv1 "
        "output, conv2 input). The residual stream keeps its width.",
        "- Every grail-opt model is made by `grail_graph.driver.compress_file` with a `--pipeline` text, for example "
        f"`{example}`. In place of a `validate` pass, each written model is run once in ONNX Runtime and compared "
        "with the dense logits, which are computed once per depth, by `grail_graph.validation.compare_outputs`, the "
        "function that the validate pass calls.",
        "- Allocation runs use `find-groups,calibrate{statistics=oneshot},allocate{method=M sparsity=S budget=params},"
        "[calibrate{statistics=cross},]select{method=wanda sparsity=S},compensate{alpha=0.001 affine=A},rewrite`.",
        "- Accuracy is top-1 in percent on the test set"
        + (f" (the first {settings.eval_samples} images in this --quick run)." if settings.eval_samples else "."),
    ]


def header_lines(measurements: Measurements, settings: Settings, info: PageInfo) -> list[str]:
    depth = measurements.protocol_depth
    dense = measurements.dense[depth]
    reused = f", and reused {info.reused} results stored in the work folder by an earlier run (--resume)" if info.reused else ""
    peer_versions = ", ".join(f"{name} {status}" for name, status in measurements.peer_status.items()) or "not run"
    return [
        "# Results on the pretrained CIFAR-10 ResNets",
        "",
        "What each design choice of grail-opt is worth on the pretrained CIFAR-10 ResNets, and how two peer tools do "
        "on the same protocol. Speed measurements are in [benchmarks.md](benchmarks.md).",
        "",
        "Regenerate this page and its plots with:",
        "",
        "```",
        info.command,
        "```",
        "",
        f"Run of {info.started:%Y-%m-%d %H:%M} UTC with grail-opt {info.versions['grail-opt']}. It took "
        f"{info.total_seconds / 60:.1f} minutes and compressed and scored {info.runs} models{reused}. Compressing and "
        f"scoring all {info.models} models took {info.model_seconds / 60:.1f} minutes as measured. The section table "
        "at the end splits this up.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in info.facts.items()),
        f"- load average (1, 5, 15 min) at the start: {info.load_before}, and at the end: {info.load_after}",
        f"- peers: {peer_versions}",
        "",
        "All numbers on this page come from the run above. Times depend on the other load on the machine.",
        "",
        *method_lines(settings),
        "",
        f"Dense ResNet-{depth}: {dense.accuracy:.2f}% on {measurements.test_size:,} test images, "
        f"{dense.parameters:,} parameters, {dense.macs / 1e6:.1f} M MACs.",
        "",
    ]


def time_lines(measurements: Measurements) -> list[str]:
    rows = [
        [name, f"{seconds / 60:.1f} min", f"{measurements.section_model_seconds.get(name, 0.0) / 60:.1f} min"]
        for name, seconds in measurements.section_seconds.items()
    ]
    return [
        "",
        "## Time per section",
        "",
        "Wall time of each section in this run, and the compress plus evaluate time of the section's models as "
        "they were measured. The latter includes results reused with --resume, and a model shared by two sections "
        "counts in the first.",
        "",
        markdown_table(["section", "wall time", "models' compress + evaluate time"], rows),
    ]


def format_page(measurements: Measurements, settings: Settings, info: PageInfo, plots: dict[str, Path], page_dir: Path) -> str:
    lines = header_lines(measurements, settings, info)
    lines += selector_section(measurements, settings, plots, page_dir)
    lines += statistics_section(measurements, settings, plots, page_dir)
    lines += allocation_section(measurements, settings)
    lines += alpha_section(measurements, settings, plots, page_dir)
    lines += calibration_section(measurements, settings, plots, page_dir)
    lines += folding_section(measurements, settings)
    lines += peer_section(measurements, settings)
    lines += border_section(measurements)
    lines += defaults_section(measurements, settings)
    lines += time_lines(measurements)
    return "\n".join(lines) + "\n"


def image(plots: dict[str, Path], name: str, page_dir: Path, alt: str) -> str:
    return f"![{alt}]({plots[name].relative_to(page_dir).as_posix()})"


def selector_section(measurements: Measurements, settings: Settings, plots: dict[str, Path], page_dir: Path) -> list[str]:
    depth = measurements.protocol_depth
    lines = [
        f"## 1. Selectors with and without compensation (ResNet-{depth})",
        "",
        "One-shot statistics, alpha = 1e-3, no affine term. Columns are the fraction of hidden channels removed.",
        "",
        selector_table(measurements.selector_grid[depth], settings.sparsities),
        "",
        image(plots, "selectors", page_dir, "accuracy vs sparsity per selector"),
        "",
    ]
    if len(measurements.selector_grid) > 1:
        lines += [
            "### All depths",
            "",
            depth_table(measurements, settings.depth_sparsities),
            "",
        ]
    return lines


def statistics_section(measurements: Measurements, settings: Settings, plots: dict[str, Path], page_dir: Path) -> list[str]:
    lines = [
        f"## 2. Statistics modes (ResNet-{measurements.protocol_depth})",
        "",
        "Wanda, ridge with alpha = 1e-3, uniform widths. One-shot takes every Gram from the original model. "
        "Sequential and cross calibrate group by group on the model with the earlier groups already compressed, "
        "and cross regresses the original model's hidden values on the compressed model's. The last columns "
        "show an earlier grail-opt run on the same protocol where it applies. The compress time is the slower of the "
        "sparsities.",
        "",
        statistics_table(measurements, settings.statistics_sparsities),
        "",
    ]
    mismatches = statistics_mismatches(measurements)
    if not measurements.comparable_to_earlier:
        lines.append(f"The earlier numbers are for ResNet-{PROTOCOL_DEPTH} on the whole test set, so this run is not compared with them.")
    elif mismatches:
        lines.append("This run does not reproduce the earlier numbers: " + "; ".join(mismatches) + ".")
    else:
        lines.append("Every earlier number is reproduced to two decimals.")
    lines += ["", image(plots, "statistics", page_dir, "accuracy per statistics mode"), ""]
    return lines


def allocation_section(measurements: Measurements, settings: Settings) -> list[str]:
    return [
        f"## 3. Width allocation at {percent(settings.allocation_sparsity)} (ResNet-{measurements.protocol_depth})",
        "",
        "One parameter budget: the allocate pass removes the given fraction of the groups' parameters and chooses "
        "each group's kept width from one-shot statistics. uniform cuts every group by the same fraction, flap "
        "ranks channels across groups by a fluctuation score, and error uses each group's reconstruction-error "
        "curve. Kept channels, parameters and MACs are those of the cross + affine model.",
        "",
        allocation_table(measurements),
        "",
    ]


def alpha_section(measurements: Measurements, settings: Settings, plots: dict[str, Path], page_dir: Path) -> list[str]:
    return [
        f"## 4. Ridge strength (ResNet-{measurements.protocol_depth})",
        "",
        "One-shot statistics, Wanda, no affine term. lam = alpha * mean(diag(G[P, P])).",
        "",
        alpha_table(measurements, settings),
        "",
        image(plots, "ridge", page_dir, "accuracy vs alpha"),
        "",
    ]


def calibration_section(measurements: Measurements, settings: Settings, plots: dict[str, Path], page_dir: Path) -> list[str]:
    return [
        f"## 5. Calibration-set size (ResNet-{measurements.protocol_depth})",
        "",
        "One-shot statistics, Wanda, alpha = 1e-3, no affine term. Calibration uses the first N images of the "
        f"protocol permutation. Every row is scored on the same {measurements.heldout_size:,} images (positions "
        f"{HELDOUT_START} to the end), so the dense accuracy differs from the 9,488-image test set. The compress time "
        "is the slowest compress_file call of the row.",
        "",
        calibration_table(measurements, settings),
        "",
        image(plots, "calibration", page_dir, "accuracy vs calibration-set size"),
        "",
    ]


def folding_section(measurements: Measurements, settings: Settings) -> list[str]:
    lines = [f"## 6. Folding (ResNet-{measurements.protocol_depth})", ""]
    if not measurements.folding_available:
        return lines + ["This grail-opt has no select{method=fold-kmeans} or fold-pca, so the table is missing.", ""]
    return lines + [
        "Folding merges each group's channels into K clusters (k-means on the producer weights, or on producer, "
        "consumer and BatchNorm features for fold-pca) in place of dropping channels. With ridge compensation the "
        "consumer map is solved from the one-shot Gram, and without it the consumer columns of each cluster are "
        "summed. Wanda pruning is repeated for comparison. The last column counts the groups by verdict at the "
        "highest sparsity. Merging is exact only for the producer's linear part: a cluster's producers are "
        "averaged before the ReLU, so the merged channel is ReLU(mean of pre-activations), not the mean of the "
        "members' activations. That approximation grows with the spread inside each cluster, which is why folding "
        "falls further behind pruning at 50% than at 30%.",
        "",
        folding_table(measurements, settings.comparison_sparsities),
        "",
    ]


def border_section(measurements: Measurements) -> list[str]:
    if not measurements.border_lines:
        return []
    return [
        f"## 8. Affine compensation at zero-padded borders (ResNet-{measurements.protocol_depth})",
        "",
        "The affine term adds W c to the consumer's bias, where c is the part of the removed channels that the kept "
        "ones cannot explain, on average. A 3x3 convolution with zero padding reads zeros, not c, where its window "
        "reaches past the image edge, so there the added bias is wrong by the padded taps' share of W c. "
        "`tools/affine_border.py` feeds each compressed consumer the original model's hidden values (so no error "
        "comes from earlier layers) and splits its relative output error into border outputs (window touches the "
        "padding) and interior outputs. One-shot statistics, Wanda, alpha = 1e-3, 256 calibration and 1,000 "
        "held-out images.",
        "",
        *measurements.border_lines,
        "",
        "So the affine term trades a little border accuracy for interior accuracy. It still wins end to end (section "
        "2), because interior outputs are the large majority on 32x32 inputs, and their share grows with the image "
        "size. An exact border correction would need a per-position bias map, which no standard Conv node carries.",
        "",
    ]


def peer_section(measurements: Measurements, settings: Settings) -> list[str]:
    sparsities = settings.comparison_sparsities
    lines = [
        f"## 7. Peers on the same protocol (ResNet-{measurements.protocol_depth})",
        "",
        "Every peer removes the same hidden channels (each BasicBlock's conv1 output) and nothing else, with no "
        "fine-tuning, and is scored on the same test images. `tools/peers.py` runs them.",
        "",
        "- Torch-Pruning (PyTorch): its dependency graph groups conv1's output channels with bn1 and conv2's input "
        "channels. Each block keeps the same number of channels as in grail-opt, and the lowest-scored channels "
        "are removed with `group.prune()`. Importances: `GroupMagnitudeImportance(p=2)` (magnitude), "
        "`GroupTaylorImportance` (taylor) and `BNScaleImportance` (bn-scale). Taylor multiplies each weight by its "
        "gradient, so it needs labels: the gradients are those of the summed cross-entropy on the 512 "
        "calibration images with their labels. grail-opt never reads labels.",
        "- onnxsim 0.8.1 (ONNX): `onnxsim.simplify` folds BatchNormalization into the Convs. "
        "`apply_structured_pruning` (filter L2 norm) or `apply_structured_wanda_pruning` (filter norm times "
        "activation norm on the 512 calibration images) then removes the same fraction of each chain's channels. "
        "On these graphs both prune only the conv1 -> conv2 chains and leave the residual stream's width alone, "
        "which the kept-channel column and the notes below confirm. The refit step is `apply_pruning_finetune`, a "
        "closed-form ridge refit that, by its documentation, covers MatMul and Gemm layers only and no Conv. "
        "The notes below say what it changed in this run.",
        "",
        peer_table(measurements, sparsities),
        "",
    ]
    notes = sorted({f"{label}: {'; '.join(result.notes)}" for (label, _), result in measurements.peer_results.items() if result.notes})
    if notes:
        lines += ["Notes from the peer runs:", "", *(f"- {note}" for note in notes), ""]
    skipped = [f"{name} {status}" for name, status in measurements.peer_status.items() if status.startswith("not installed")]
    if skipped:
        lines += ["Skipped: " + "; ".join(skipped) + ".", ""]
    return lines


# Command line ----------------------------------------------------------------------------


def parse_depths(text: str) -> list[int]:
    try:
        depths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths must be comma-separated integers, got {text!r}") from None
    unknown = [depth for depth in depths if depth not in DEPTHS]
    if not depths or unknown:
        raise argparse.ArgumentTypeError(f"--depths must list some of {', '.join(map(str, DEPTHS))}, got {text!r}")
    return depths


def regenerate_command(args: argparse.Namespace) -> str:
    parts = ["python -m tools.results_resnet", f"--out {args.out}"]
    if args.quick:
        parts.append("--quick")
    if args.depths != list(DEPTHS):
        parts.append(f"--depths {','.join(map(str, args.depths))}")
    return " ".join(parts)


def run(args: argparse.Namespace, work_dir: Path) -> str:
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    load_before = benchmark_resnet.load_average()
    data = prepare_data(work_dir, settings, protocol_depth_of(args.depths), args.data_dir)
    runner = Runner(work_dir, settings, args.resume, args.data_dir, data.placeholder_eval)
    measurements = measure(runner, data, args.depths)
    if measurements.protocol_depth == PROTOCOL_DEPTH and not args.quick:
        section_start = time.perf_counter()
        measurements.border_lines = affine_border.border_error_lines(work_dir=work_dir / "affine-border", data_root=args.data_dir)
        measurements.section_seconds["affine border"] = time.perf_counter() - section_start
    plot_dir = args.out.parent / args.out.stem
    plots = write_plots(measurements, settings, plot_dir)
    versions = {"grail-opt": tool_version(), **peers.peer_versions()}
    info = PageInfo(
        command=regenerate_command(args),
        facts=benchmark_resnet.machine_facts("cpu"),
        load_before=load_before,
        load_after=benchmark_resnet.load_average(),
        started=started,
        total_seconds=time.perf_counter() - start,
        runs=runner.runs,
        reused=len(runner.reused_keys),
        models=len(runner.counted_keys),
        model_seconds=sum(measurements.section_model_seconds.values()),
        versions=versions,
    )
    return format_page(measurements, settings, info, plots, args.out.parent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.results_resnet",
        description="Measure grail-opt's selectors, statistics modes, allocation, ridge strength, calibration-set "
        "size and folding, and two peer tools, on the pretrained CIFAR-10 ResNets; write a Markdown page and plots.",
    )
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write, e.g. docs/results.md. The plots go to docs/results/")
    parser.add_argument(
        "--depths",
        type=parse_depths,
        default=None,
        help="comma-separated ResNet depths for the selector grid (default: 20,32,44,56; 20 with --quick). "
        "The other tables use ResNet-56, or the deepest listed depth without 56",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the ONNX exports, the .npz files and the stored results. Existing exports and .npz files "
        "are reused. Default: a temporary folder, removed at the end",
    )
    parser.add_argument("--resume", action="store_true", help="reuse the results stored in --work-dir by an earlier run of the same grail-opt version")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"data root with the weights and the CIFAR-10 JPEG copy (default: ${cifar10.DATA_DIR_ENV} or ../shared/data)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: sparsity 0.5 only, two selectors, three alphas and calibration sizes, 1,000 test images",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.depths is None:
        args.depths = [20] if args.quick else list(DEPTHS)
    if args.resume and args.work_dir is None:
        parser.error("--resume needs --work-dir, the folder that holds the stored results")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    benchmark_resnet.logger.setLevel(logging.INFO)

    started = time.perf_counter()
    if args.work_dir is not None:
        page = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="grail-results-") as folder:
            page = run(args, Path(folder))
    write_atomically(args.out, page)
    logger.info("wrote %s in %.1f minutes", args.out, (time.perf_counter() - started) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
