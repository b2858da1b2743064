"""Measure the border error of affine compensation on zero-padded Conv consumers.

Affine compensation adds the bias correction W c to a consumer, where c is the constant
part of the reconstructed hidden value. A zero-padded convolution reads 0 at padded
positions, not c, so the correction is exact only at output pixels whose receptive field
lies inside the input. This tool compresses a model with grail-opt's `compress_file`, using
one-shot statistics, Wanda selection and ridge compensation with and without affine. It then
compares each compressed consumer Conv with the original one, separately on border pixels
(whose receptive field overlaps the padding) and on interior pixels.

Each compressed consumer reads the kept channels of the original model's hidden value,
so the error is that of its own compensation, without drift from earlier groups.

Usage::

    python -m tools.affine_border                 # ResNet-56, CIFAR-10 JPEG test copy
    python -m tools.affine_border --work-dir out/affine-border --eval-images 1000

In Python, ``border_error_lines()`` runs the ResNet-56 measurement and returns the
Markdown table; ``border_error_lines(results)`` formats results measured before.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from grail_graph.driver import JobOptions, compress_file, default_pipeline
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd

logger = logging.getLogger(__name__)

SPARSITIES = (0.3, 0.5)
ALPHA = 1e-3
CALIBRATION_IMAGES = 256
EVALUATION_IMAGES = 1000
BATCH_SIZE = 100


# Consumers and border masks ---------------------------------------------------------------


@dataclass(frozen=True)
class ConvConsumer:
    """A 2-D Conv consumer: weight (O, H, kh, kw), bias (O,) and its ONNX attributes."""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    """ONNX order: top, left, bottom, right."""
    dilations: tuple[int, int] = (1, 1)

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        """Return the Conv output (N, O, oh, ow) for a hidden value (N, H, h, w).

        The Conv runs in float64 for a float64 `hidden` and in float32 otherwise.
        """
        dtype = np.float64 if hidden.dtype == np.float64 else np.float32
        top, left, bottom, right = self.pads
        padded = F.pad(torch.from_numpy(np.asarray(hidden, dtype=dtype)), (left, right, top, bottom))
        output = F.conv2d(
            padded,
            torch.from_numpy(np.array(self.weight, dtype=dtype)),  # a copy, because ONNX arrays are read-only
            torch.from_numpy(np.array(self.bias, dtype=dtype)),
            stride=self.strides,
            dilation=self.dilations,
        )
        return output.numpy()


def border_mask(height: int, width: int, consumer: ConvConsumer) -> np.ndarray:
    """Return a boolean (oh, ow) mask, True at output pixels whose receptive field reaches the padding."""
    top, left, bottom, right = consumer.pads
    kernel_height, kernel_width = consumer.weight.shape[2:]
    rows = _border_axis(height, kernel_height, consumer.strides[0], top, bottom, consumer.dilations[0])
    columns = _border_axis(width, kernel_width, consumer.strides[1], left, right, consumer.dilations[1])
    return rows[:, None] | columns[None, :]


def _border_axis(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> np.ndarray:
    extent = dilation * (kernel - 1)
    outputs = (size + pad_before + pad_after - extent - 1) // stride + 1
    first = np.arange(outputs) * stride - pad_before
    return (first < 0) | (first + extent > size - 1)


# Error sums -------------------------------------------------------------------------------


@dataclass
class ErrorSums:
    """Squared output errors and squared reference outputs, summed over border and interior pixels."""

    border_error: float = 0.0
    border_reference: float = 0.0
    interior_error: float = 0.0
    interior_reference: float = 0.0
    border_pixels: int = 0
    interior_pixels: int = 0

    def add(self, other: ErrorSums) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def border(self) -> float:
        """Relative error ||y' - y|| / ||y|| over border pixels."""
        return _relative(self.border_error, self.border_reference)

    @property
    def interior(self) -> float:
        """Relative error ||y' - y|| / ||y|| over interior pixels."""
        return _relative(self.interior_error, self.interior_reference)


def _relative(error: float, reference: float) -> float:
    return float(np.sqrt(error / reference)) if reference > 0 else float("nan")


def split_errors(reference: np.ndarray, compressed: np.ndarray, mask: np.ndarray) -> ErrorSums:
    """Sum the squared errors of `compressed` against `reference` (N, O, oh, ow) on and off `mask` (oh, ow)."""
    reference = reference.astype(np.float64)
    error = ((compressed.astype(np.float64) - reference) ** 2).sum(axis=1)
    energy = (reference**2).sum(axis=1)
    count = reference.shape[0]
    return ErrorSums(
        border_error=float(error[:, mask].sum()),
        border_reference=float(energy[:, mask].sum()),
        interior_error=float(error[:, ~mask].sum()),
        interior_reference=float(energy[:, ~mask].sum()),
        border_pixels=count * int(mask.sum()),
        interior_pixels=count * int((~mask).sum()),
    )


def consumer_errors(
    hidden: np.ndarray,
    keep: np.ndarray,
    original: ConvConsumer,
    compressed: ConvConsumer,
    reference: np.ndarray | None = None,
) -> ErrorSums:
    """Compare `compressed`, reading the kept channels of `hidden` (N, H, h, w), with `original` reading all of them.

    `reference`, when given, is `original.apply(hidden)` computed before.
    """
    if reference is None:
        reference = original.apply(hidden)
    approximation = compressed.apply(hidden[:, keep])
    return split_errors(reference, approximation, border_mask(hidden.shape[2], hidden.shape[3], original))


# ONNX access ------------------------------------------------------------------------------


def read_consumer(model: onnx.ModelProto, node_name: str) -> ConvConsumer:
    """Read a Conv node's weight, bias and attributes from `model`. A missing bias reads as zeros."""
    node = next((node for node in model.graph.node if node.name == node_name), None)
    if node is None or node.op_type != "Conv":
        raise ValueError(f"the model has no Conv node named {node_name!r}")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weight = numpy_helper.to_array(initializers[node.input[1]])
    if weight.ndim != 4:
        raise ValueError(f"Conv {node_name!r} has a {weight.ndim - 2}-D kernel, but only 2-D Convs are measured")
    has_bias = len(node.input) > 2 and node.input[2]
    bias = numpy_helper.to_array(initializers[node.input[2]]) if has_bias else np.zeros(weight.shape[0])
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    if attributes.get("group", 1) != 1:
        raise ValueError(f"Conv {node_name!r} is grouped, but only dense Conv consumers are measured")
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"Conv {node_name!r} uses auto_pad, but only explicit pads are measured")
    return ConvConsumer(
        weight=weight,
        bias=bias,
        strides=tuple(attributes.get("strides", (1, 1))),
        pads=tuple(attributes.get("pads", (0, 0, 0, 0))),
        dilations=tuple(attributes.get("dilations", (1, 1))),
    )


def kept_channels(original: np.ndarray, narrowed: np.ndarray) -> np.ndarray:
    """Return the indices of the rows of a producer weight `original` that `narrowed` kept, in order."""
    flat_original = original.reshape(original.shape[0], -1)
    keep = []
    for row in narrowed.reshape(narrowed.shape[0], -1):
        matches = np.flatnonzero(np.all(flat_original == row, axis=1))
        if len(matches) != 1:
            raise ValueError("a narrowed producer row matches no single row of the original weight")
        keep.append(int(matches[0]))
    return np.array(keep)


def producer_weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(node for node in model.graph.node if node.name == node_name)
    initializer = next(tensor for tensor in model.graph.initializer if tensor.name == node.input[1])
    return numpy_helper.to_array(initializer)


def tap_session(model_path: Path, taps: Sequence[str]) -> ort.InferenceSession:
    """Open `model_path` in ONNX Runtime with every tap value added as a graph output."""
    model = onnx.load(str(model_path))
    outputs = {output.name for output in model.graph.output}
    for tap in taps:
        if tap not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# Measurement ------------------------------------------------------------------------------


@dataclass
class BorderError:
    """Border and interior errors of one compression setting, over all Conv consumers."""

    sparsity: float
    affine: bool
    calibration_samples: int
    """Samples that the calibrate pass used, from the compression report."""
    evaluation_samples: int
    total: ErrorSums = field(default_factory=ErrorSums)
    per_consumer: dict[str, ErrorSums] = field(default_factory=dict)
    """Keyed by consumer Conv node name."""


@dataclass(frozen=True)
class _Setting:
    result: BorderError
    consumers: dict[str, tuple[np.ndarray, ConvConsumer]]
    """Consumer node name -> (kept channels, compressed consumer)."""


def _compressed_consumers(original: onnx.ModelProto, compressed: onnx.ModelProto, consumers: dict) -> dict:
    """Map each consumer node name to (kept channels, compressed consumer), finding the kept channels by producer rows."""
    result = {}
    for name, (group, _) in consumers.items():
        producer = group.producers[0].node
        keep = kept_channels(producer_weight(original, producer), producer_weight(compressed, producer))
        result[name] = (keep, read_consumer(compressed, name))
    return result


def _compress(model_path: Path, calibration: Path, output: Path, sparsity: float, affine: bool, alpha: float) -> dict:
    pipeline = default_pipeline(
        sparsity=sparsity,
        selector="wanda",
        compensation="ridge",
        alpha=alpha,
        statistics="oneshot",
        affine=affine,
        validate=False,
    )
    return compress_file(model_path, output, JobOptions(pipeline=pipeline, calib=calibration, device="cpu"))


def measure_border_error(
    model_path: Path,
    calibration: Path,
    evaluation: np.ndarray,
    work_dir: Path,
    sparsities: Sequence[float] = SPARSITIES,
    alpha: float = ALPHA,
    batch_size: int = BATCH_SIZE,
) -> list[BorderError]:
    """Compress `model_path` at each sparsity with and without affine, and measure every Conv consumer.

    `calibration` is the .npz (or other data) that `compress_file` reads, `evaluation` a
    float32 array (N, C, H, W) of held-out inputs for the model's only input, and
    compressed models are written to `work_dir`. Groups with channels-last consumers
    (Gemm, MatMul) are skipped, and a Conv consumer that is not 2-D raises ValueError.
    Returns one BorderError per (sparsity, affine), sparsity first.
    """
    original = onnx.load(str(model_path))
    groups, _ = OnnxFrontEnd.load(model_path, "cpu").find_groups()
    groups = [group for group in groups if not group.channels_last]
    consumers = {ref.node: (group, read_consumer(original, ref.node)) for group in groups for ref in group.consumers}

    settings = []
    for sparsity in sparsities:
        for affine in (False, True):
            output = work_dir / f"{model_path.stem}-{sparsity:g}-{'affine' if affine else 'linear'}.onnx"
            report = _compress(model_path, calibration, output, sparsity, affine, alpha)
            calibrate = next(record for record in report["passes"] if record["pass"] == "calibrate")
            result = BorderError(sparsity, affine, calibrate["statistics"]["samples"], len(evaluation))
            settings.append(_Setting(result, _compressed_consumers(original, onnx.load(str(output)), consumers)))

    taps = sorted({group.tap for group, _ in consumers.values()})
    session = tap_session(model_path, taps)
    input_name = session.get_inputs()[0].name
    for start in range(0, len(evaluation), batch_size):
        values = dict(zip(taps, session.run(taps, {input_name: evaluation[start : start + batch_size]})))
        for name, (group, original_consumer) in consumers.items():
            # float32 Convs keep the run within minutes, and the error sums are float64.
            hidden = values[group.tap]
            reference = original_consumer.apply(hidden)
            for setting in settings:
                keep, compressed_consumer = setting.consumers[name]
                sums = consumer_errors(hidden, keep, original_consumer, compressed_consumer, reference)
                setting.result.per_consumer.setdefault(name, ErrorSums()).add(sums)
                setting.result.total.add(sums)
    return [setting.result for setting in settings]


def prepare_resnet56(
    work_dir: Path,
    data_root: Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    evaluation_images: int = EVALUATION_IMAGES,
) -> tuple[Path, Path, np.ndarray]:
    """Export ResNet-56 and its calibration .npz into `work_dir`, and return both with the evaluation inputs.

    Calibration uses the first `calibration_images` of the protocol's calibration split and
    evaluation the first `evaluation_images` of its test split (see tools/cifar10.py). An
    exported model already in `work_dir` is reused.
    """
    from tools import cifar10, export_resnet_cifar

    work_dir.mkdir(parents=True, exist_ok=True)
    model_path = work_dir / "resnet56.onnx"
    if not model_path.exists():
        export_resnet_cifar.export_onnx(export_resnet_cifar.load_pretrained(56, data_root), model_path)
    calibration_x, _, test_x, _ = cifar10.load_split(data_root)
    calibration_path = work_dir / f"calib-{calibration_images}.npz"
    cifar10.write_npz(calibration_path, export_resnet_cifar.INPUT_NAME, calibration_x[:calibration_images])
    return model_path, calibration_path, cifar10.preprocess(test_x[:evaluation_images])


def measure_resnet56(
    work_dir: Path | None = None,
    data_root: Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    evaluation_images: int = EVALUATION_IMAGES,
    sparsities: Sequence[float] = SPARSITIES,
) -> list[BorderError]:
    """Run `measure_border_error` on the pretrained ResNet-56 and the CIFAR-10 JPEG test copy.

    Without `work_dir` the exported and compressed models go to a temporary folder.
    """
    with tempfile.TemporaryDirectory(prefix="affine-border-") as temporary:
        folder = Path(work_dir) if work_dir is not None else Path(temporary)
        model_path, calibration, evaluation = prepare_resnet56(folder, data_root, calibration_images, evaluation_images)
        return measure_border_error(model_path, calibration, evaluation, folder, sparsities)


# Report -----------------------------------------------------------------------------------


def border_error_lines(results: Sequence[BorderError] | None = None, **options) -> list[str]:
    """Return Markdown lines: a table of border and interior errors, then bullets on what affine does at the border.

    `results` are BorderError records from `measure_border_error` or `measure_resnet56`.
    Without them, `measure_resnet56(**options)` runs first. With the defaults that took
    about 2 minutes, export included, on two busy CPU cores. Its options are `work_dir`,
    `data_root`, `calibration_images` (256), `evaluation_images` (1000) and `sparsities`
    ((0.3, 0.5)). Errors are relative: ||y' - y|| / ||y|| over the output pixels of all
    Conv consumers together.
    """
    if results is None:
        results = measure_resnet56(**options)
    lines = [
        "| sparsity | affine | border error | interior error | border / interior | consumers with border > interior |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        total = result.total
        worse = sum(sums.border > sums.interior for sums in result.per_consumer.values())
        lines.append(
            f"| {result.sparsity:g} | {'yes' if result.affine else 'no'} | {total.border:.4f} | {total.interior:.4f} "
            f"| {total.border / total.interior:.2f} | {worse} of {len(result.per_consumer)} |"
        )
    lines.append("")
    if results:
        share = results[0].total.border_pixels / (results[0].total.border_pixels + results[0].total.interior_pixels)
        ratios = [result.total.border / result.total.interior for result in results]
        lines.append(
            f"- Border pixels (receptive field overlaps the zero padding) are {100 * share:.1f}% of the outputs, "
            f"and their relative error is {min(ratios):.2f} to {max(ratios):.2f} times the interior error. "
            f"Calibration used {results[0].calibration_samples} samples and the errors "
            f"come from {results[0].evaluation_samples} held-out samples."
        )
    lines += _affine_sentences(results)
    return lines


def _affine_sentences(results: Sequence[BorderError]) -> list[str]:
    by_setting = {(result.sparsity, result.affine): result.total for result in results}
    sentences = []
    for sparsity in sorted({result.sparsity for result in results}):
        linear, affine = by_setting.get((sparsity, False)), by_setting.get((sparsity, True))
        if linear is None or affine is None:
            continue
        sentences.append(
            f"- At sparsity {sparsity:g}, affine compensation changes the border error from {linear.border:.4f} to "
            f"{affine.border:.4f} ({_change(linear.border, affine.border)}) and the interior error from "
            f"{linear.interior:.4f} to {affine.interior:.4f} ({_change(linear.interior, affine.interior)})."
        )
    return sentences


def _change(before: float, after: float) -> str:
    percent = 100.0 * (after - before) / before
    return f"{'+' if percent >= 0 else ''}{percent:.1f}%, {'hurts' if after > before else 'helps'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the exported and compressed models, where an existing export is reused (default: temporary)",
    )
    parser.add_argument("--data-root", type=Path, help="data root (default: GRAIL_DATA_DIR, else ../shared/data)")
    parser.add_argument(
        "--calib-images", type=int, default=CALIBRATION_IMAGES, help="calibration images (default: %(default)s)"
    )
    parser.add_argument("--eval-images", type=int, default=EVALUATION_IMAGES, help="held-out images (default: %(default)s)")
    parser.add_argument(
        "--sparsity", type=float, nargs="+", default=list(SPARSITIES), help="fractions of channels removed (default: 0.3 0.5)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    results = measure_resnet56(args.work_dir, args.data_root, args.calib_images, args.eval_images, args.sparsity)
    print("\n".join(border_error_lines(results)))
    print(f"\n({args.calib_images} calibration images, {args.eval_images} evaluation images, "
          f"{time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
