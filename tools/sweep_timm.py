"""Run grail_graph.api.compress over timm models with random weights and write a Markdown page.

Each model is created with ``pretrained=False``. The constant initial values that timm gives
norm layers, layer scales and some heads are then replaced with seeded random values,
because near-zero activations would hide a wrong rewrite. The model is compressed
on 16 seeded random images and exported with ``grail_graph.api.export_onnx``, and the sweep
measures the max-abs logit difference between ONNX Runtime and the eager compressed module.
A model that fails at any stage is recorded with the stage and the exception, and the sweep
goes on with the next model.

Usage::

    python -m tools.sweep_timm --out docs/model-zoo.md [--models resnet18,vgg11] [--sparsity 0.3]
        [--pipeline "find-groups,calibrate{statistics=oneshot},select{sparsity=0.3},compensate,rewrite"]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("tools.sweep_timm")

# A small variant of each architecture family, plus the ResNet-50 bottleneck, grouped and wide
# variants, in the order of the page.
DEFAULT_MODELS = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "regnetx_002",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "convnext_atto",
    "densenet121",
    "vgg11",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mixer_b16_224",
)
# Models run below their default input size to keep the sweep short. Only convolutional
# networks with global pooling appear here, because their weights do not depend on the size.
INPUT_SIZE_OVERRIDES = {"wide_resnet50_2": 160}
CALIBRATION_IMAGES = 16
CALIBRATION_BATCH = 8
CHECK_IMAGES = 2
SEED = 0
# Longest shortened decline reason kept on the page, in characters.
REASON_LENGTH = 110


@dataclass
class ModelResult:
    """Measurements of one model, or the stage where it failed and the error."""

    name: str
    input_size: tuple[int, int, int] | None = None
    groups: int | None = None
    compressed_groups: int | None = None
    declined: int | None = None
    declined_reasons: Counter = field(default_factory=Counter)
    parameters_before: int | None = None
    parameters_after: int | None = None
    relative_change: float | None = None
    ort_difference: float | None = None
    ort_within_tolerance: bool | None = None
    max_logit: float | None = None
    compress_seconds: float | None = None
    export_seconds: float | None = None
    total_seconds: float | None = None
    pipeline: str | None = None
    failed_stage: str | None = None
    error: str | None = None


# Model preparation ------------------------------------------------------------------------


def is_norm_layer(module: nn.Module) -> bool:
    """True for BatchNorm, LayerNorm, GroupNorm and timm's own norm classes (LayerNorm2d, RmsNorm)."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def randomize_silenced_weights(model: nn.Module, seed: int) -> int:
    """Replace the constant initial values that timm gives some layers with seeded random values.

    timm initialises some BatchNorm weights to 0, ConvNeXt's layer scales to 1e-6 and the
    MLP-Mixer head to 0, and any of these would hide a wrong rewrite behind near-zero
    outputs. Norm weights, running variances and layer scales (named `gamma`) are drawn
    from U(0.5, 1.5), norm biases and running means from N(0, 0.1^2), and all-zero Conv /
    Linear weights from N(0, 1 / fan_in). Returns the number of tensors changed.
    """
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            norm = is_norm_layer(module)
            dense = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue  # num_batches_tracked
                if name == "gamma" or (norm and name in ("weight", "running_var")):
                    values = 0.5 + torch.rand(tensor.shape, generator=generator)
                elif norm and name in ("bias", "running_mean"):
                    values = 0.1 * torch.randn(tensor.shape, generator=generator)
                elif dense and name == "weight" and not tensor.any():
                    values = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
                else:
                    continue
                tensor.copy_(values.to(tensor.dtype))
                changed += 1
    return changed


def input_size(model: nn.Module, name: str) -> tuple[int, int, int]:
    """Return the (C, H, W) input size: the model's default unless overridden for speed."""
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    side = INPUT_SIZE_OVERRIDES.get(name)
    return (channels, side, side) if side else (channels, height, width)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def shorten_reason(reason: str) -> str:
    """Replace node names and numbers in a decline reason so that equal reasons count together."""
    reason = re.sub(r"`[^`]*`", "`…`", reason)
    reason = re.sub(r"\b\d+\b", "N", reason)
    reason = re.sub(r"\(([^()]*, )+[^()]*\)", "(…)", reason)  # lists of value names
    return reason if len(reason) <= REASON_LENGTH else reason[: REASON_LENGTH - 1] + "…"


def first_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# One model --------------------------------------------------------------------------------


def sweep_model(name: str, sparsity: float, work_dir: Path, pipeline: str | None = None) -> ModelResult:
    """Create, compress, export and check one model. A failure is recorded, not raised."""
    import timm

    from grail_graph.api import compress, export_onnx
    from grail_graph.fx_frontend.export import EXPORT_TOLERANCE, check_export

    result = ModelResult(name)
    started = time.perf_counter()
    stage = "create"
    try:
        torch.manual_seed(SEED)
        model = timm.create_model(name, pretrained=False).eval()
        randomize_silenced_weights(model, SEED)
        result.input_size = input_size(model, name)
        result.parameters_before = count_parameters(model)

        generator = torch.Generator().manual_seed(SEED)
        images = torch.randn((CALIBRATION_IMAGES, *result.input_size), generator=generator)
        batches = list(images.split(CALIBRATION_BATCH))
        check = torch.randn((CHECK_IMAGES, *result.input_size), generator=generator)

        stage = "compress"
        report: dict = {}
        tick = time.perf_counter()
        compressed = compress(model, batches, sparsity=sparsity, pipeline=pipeline, device="cpu", report=report)
        result.compress_seconds = time.perf_counter() - tick
        result.pipeline = report["pipeline"]
        result.groups = len(report["groups"])
        result.compressed_groups = sum(1 for group in report["groups"] if str(group["verdict"]).startswith("compressed"))
        result.declined = len(report["declined"])
        result.declined_reasons = Counter(shorten_reason(entry["reason"]) for entry in report["declined"])
        result.parameters_after = count_parameters(compressed)

        stage = "eager check"
        with torch.no_grad():
            reference = model(check)
            output = compressed(check)
        result.relative_change = float((output - reference).norm() / reference.norm())
        result.max_logit = float(output.abs().max())

        stage = "export"
        path = work_dir / f"{name}.onnx"
        tick = time.perf_counter()
        # The exporter prints its progress to stdout, which would bury the sweep's own log.
        with contextlib.redirect_stdout(io.StringIO()):
            export_onnx(compressed, check, path, tolerance=None)
        result.export_seconds = time.perf_counter() - tick

        stage = "ONNX Runtime check"
        result.ort_difference = check_export(compressed, (check,), path, tolerance=float("inf"))
        result.ort_within_tolerance = result.ort_difference <= EXPORT_TOLERANCE * max(1.0, result.max_logit)
        path.unlink()
    except Exception as error:  # one failing model must not stop the sweep
        result.failed_stage = stage
        result.error = f"{type(error).__name__}: {first_line(error)}"
        logger.warning("%s failed during %s: %s", name, stage, result.error)
        logger.debug("%s", traceback.format_exc())
    result.total_seconds = time.perf_counter() - started
    return result


# Page -------------------------------------------------------------------------------------


def machine_facts() -> list[str]:
    import onnxruntime
    import timm

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- Date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, no GPU used",
        f"- Load average when the page was written (1, 5, 15 min): {', '.join(f'{load:.1f}' for load in os.getloadavg())}. "
        "Other processes on the machine slow the timings down.",
        f"- Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
    ]


def format_count(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def format_number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_row(result: ModelResult) -> str:
    size = "–" if result.input_size is None else str(result.input_size[1])
    reduction = "–"
    if result.parameters_after is not None:
        reduction = f"{100 * (1 - result.parameters_after / result.parameters_before):.1f}%"
    groups = "–" if result.groups is None else f"{result.groups} ({result.compressed_groups} narrowed)"
    if result.error is not None:
        status = f"failed in {result.failed_stage}"
    else:
        status = "ok" if result.ort_within_tolerance else "ORT mismatch"
    seconds = "–"
    if result.export_seconds is not None:
        seconds = f"{result.compress_seconds:.0f} + {result.export_seconds:.0f}"
    return (
        f"| {result.name} | {size} | {groups} | {format_number(result.declined, 'd')} "
        f"| {format_count(result.parameters_before)} | {format_count(result.parameters_after)} | {reduction} "
        f"| {format_number(result.relative_change, '.3f')} | {format_number(result.ort_difference, '.2e')} "
        f"| {format_number(result.max_logit, '.3g')} | {seconds} | {format_number(result.total_seconds, '.0f')} "
        f"| {status} |"
    )


def render_page(results: Sequence[ModelResult], command: str) -> str:
    pipelines = sorted({result.pipeline for result in results if result.pipeline}) or ["no pipeline (every model failed)"]
    lines = [
        "# Model zoo sweep",
        "",
        "grail-opt's PyTorch path (`grail_graph.api.compress`, then `export_onnx`) run over timm "
        "models with random weights. The sweep shows which layers each architecture exposes as "
        "channel groups, why the others are declined, and whether the compressed module exports to "
        "ONNX and matches ONNX Runtime. With random weights the output change says nothing about "
        "accuracy. It only shows that the rewritten module computes finite outputs of the expected "
        "scale.",
        "",
        "Generated by:",
        "",
        "```",
        command,
        "```",
        "",
        "## Setup",
        "",
        *machine_facts(),
        f"- Models: `timm.create_model(name, pretrained=False)` with torch seed {SEED}. Every norm "
        "layer's weight and running variance and every layer scale (`gamma`) is then drawn from "
        "U(0.5, 1.5), every norm bias and running mean from N(0, 0.1²), and every all-zero Conv or "
        "Linear weight from N(0, 1/fan_in). timm initialises some BatchNorm weights to 0, ConvNeXt's "
        "layer scales to 1e-6 and the MLP-Mixer head to 0, which would hide a wrong rewrite.",
        f"- Calibration: {CALIBRATION_IMAGES} images drawn from N(0, 1) in batches of "
        f"{CALIBRATION_BATCH}, at the model's default input size unless the table says otherwise.",
        "- Compression: `grail_graph.api.compress(model, batches, ..., device=\"cpu\")` ran the pipeline "
        + ", ".join(f"`{text}`" for text in pipelines)
        + ".",
        f"- Checks on {CHECK_IMAGES} further random images: the relative output change "
        "‖y_compressed − y‖ / ‖y‖ against the original model, and the max-abs logit difference "
        "between ONNX Runtime (CPU) and the eager compressed module, with the max |logit| for scale. "
        "Status `ok` means that difference is at most 1e-4 × max(1, max |logit|), the bound "
        "`export_onnx` enforces.",
        "- Time: the whole model in seconds, and separately `compress` + `export_onnx`.",
        "",
        "## Results",
        "",
        "| Model | Input | Groups | Declined | Params before | Params after | Reduction "
        "| Output change | ORT max abs diff | Max abs logit | Compress + export (s) | Time (s) | Status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *(table_row(result) for result in results),
        "",
    ]
    failures = [result for result in results if result.error is not None]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- **{result.name}** ({result.failed_stage}): `{result.error}`" for result in failures]
        lines.append("")
    lines += ["## Declined candidates", "", "Node names are shown as `…` and numbers as N.", ""]
    totals: Counter = Counter()
    for result in results:
        totals.update(result.declined_reasons)
    lines += ["| Reason | Count | Models |", "|---|---:|---|"]
    for reason, count in totals.most_common():
        models = ", ".join(result.name for result in results if reason in result.declined_reasons)
        escaped = reason.replace("|", "\\|")
        lines.append(f"| {escaped} | {count} | {models} |")
    lines.append("")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


# Command line -----------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.sweep_timm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown page to write")
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma-separated timm model names (default: the 15 families)"
    )
    parser.add_argument("--sparsity", type=float, default=0.3, help="fraction of each group's channels removed (default 0.3)")
    parser.add_argument(
        "--pipeline",
        help="pipeline text passed to compress(), which then ignores --sparsity (default: compress's own pipeline)",
    )
    arguments = parser.parse_args(argv)
    if not 0.0 <= arguments.sparsity < 1.0:
        parser.error(f"--sparsity must lie in [0, 1), got {arguments.sparsity}")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    # Only the sweep's own progress is logged at INFO. The exporter's passes log every step.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    arguments = parse_arguments(argv)
    names = [name.strip() for name in arguments.models.split(",") if name.strip()]
    command = "python -m tools.sweep_timm " + " ".join(sys.argv[1:] if argv is None else argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="grail-sweep-") as work_dir:
        for name in names:
            logger.info("model %s: start", name)
            result = sweep_model(name, arguments.sparsity, Path(work_dir), arguments.pipeline)
            logger.info("model %s: %s in %.0f s", name, "ok" if result.error is None else "failed", result.total_seconds)
            results.append(result)
            # Rewrite the page after every model so that an interrupted sweep keeps its rows.
            write_atomically(arguments.out, render_page(results, command))
    failed = sum(result.error is not None for result in results)
    logger.info("wrote %s: %d models, %d failed", arguments.out, len(results), failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
