"""The `grail-opt` command line: compress one or many models (ONNX files or PyTorch specs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from grail_graph.core import SELECTORS
from grail_graph.data import IMAGENET_MEAN, IMAGENET_STD, ImageOptions
from grail_graph.driver import JobOptions, compress_file, default_pipeline
from grail_graph.errors import GrailError
from grail_graph.onnx_frontend.calibration import execution_providers
from grail_graph.passes import describe_passes, parse_pipeline, print_pipeline
from grail_graph.core import ALLOCATION_METHODS
from grail_graph.passes.allocate import BUDGETS
from grail_graph.passes.transform import COMPENSATIONS, FOLD_METHODS, HEAD_MODES, STATISTICS
from grail_graph.report import format_batch_table, format_summary
from grail_graph.text import DEFAULT_CALIBRATION_WINDOWS, TEXT_LAYOUTS, TextOptions
from grail_graph.torch_models import spec_stem

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to option help, unless the help already names the default or X is unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        unset = unset or not action.option_strings
        if unset or "default" in text:
            return text
        value = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
        return f"{text} (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grail-opt",
        formatter_class=_DefaultsHelpFormatter,
        description="Remove hidden channels from ONNX models and compensate the consumers "
        "with a closed-form ridge fit on unlabeled calibration data (GRAIL).",
    )
    parser.add_argument(
        "models", nargs="*", type=Path,
        help="ONNX files, timm:NAME, hf:DIR (a local Hugging Face model folder or .gguf file), "
        "saved nn.Module files (.pt) or exported programs (.pt2)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, help="output model path (one input model)")
    parser.add_argument("--out-dir", type=Path, help="output folder; each model is written as NAME.grail.onnx")
    data = parser.add_argument_group("data")
    data.add_argument("--calib", type=Path, help=".npz keyed by input name, .npy, or a folder of images")
    data.add_argument("--eval", type=Path, help="held-out data in the same formats; .npz may add 'labels', "
                      "image folders with class subfolders give labels. Default: 1/8 of --calib is held out")
    data.add_argument("--image-size", type=int, help="square image side in pixels (default: the model's input size)")
    data.add_argument("--mean", type=_floats, default=IMAGENET_MEAN,
                      help="comma-separated per-channel mean after scaling to [0, 1], ImageNet's by default")
    data.add_argument("--std", type=_floats, default=IMAGENET_STD,
                      help="comma-separated per-channel std after scaling to [0, 1], ImageNet's by default")
    text = parser.add_argument_group("text data (language models)")
    text.add_argument("--calib-text", type=Path, help="UTF-8 text file; calibration windows are drawn at random offsets")
    text.add_argument("--eval-text", type=Path, help="UTF-8 text file scored by perplexity in non-overlapping windows; "
                      "it must differ from --calib-text")
    text.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the folder of an hf: model)")
    text.add_argument("--text-layout", choices=TEXT_LAYOUTS, default="plain",
                      help="wikitext: join lines the standard WikiText way before tokenising")
    text.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    text.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    text.add_argument("--eval-windows", type=int, help="evaluation windows from the start of the text (default: all)")
    torch_group = parser.add_argument_group("PyTorch models")
    torch_group.add_argument("--weights", type=Path, help="checkpoint for a timm:NAME model (default: the local cache)")
    torch_group.add_argument("--random-weights", action="store_true", help="build a timm:NAME model with random weights")
    method = parser.add_argument_group("method")
    method.add_argument("--sparsity", type=float, default=0.5, help="fraction of each group's channels removed, in [0, 1)")
    method.add_argument(
        "--selector", choices=SELECTORS + FOLD_METHODS, default="wanda",
        help="channel selector, or fold-kmeans / fold-pca to merge channels instead of removing them",
    )  # fmt: skip
    method.add_argument("--compensation", choices=COMPENSATIONS, default="ridge",
                        help="ridge: GRAIL closed form; none: plain slicing")
    method.add_argument("--alpha", type=float, default=1e-3, help="ridge strength relative to mean(diag(G))")
    method.add_argument(
        "--statistics", choices=STATISTICS,
        help="oneshot: Grams from the original model; sequential / cross: group by group on the partly "
        "compressed model (cross regresses the original hidden values). Default: cross, or oneshot with "
        "text data",
    )  # fmt: skip
    method.add_argument(
        "--affine", action=argparse.BooleanOptionalAction,
        help="also fit a constant that goes into the consumer bias. Default: on, or off with text data",
    )  # fmt: skip
    method.add_argument(
        "--allocation", choices=ALLOCATION_METHODS, default="uniform",
        help="uniform: the same sparsity in every group; flap / error: one global budget",
    )  # fmt: skip
    method.add_argument("--budget", choices=BUDGETS, default="params", help="what --sparsity counts with --allocation")
    method.add_argument(
        "--heads", type=float, default=0.0,
        help="fraction of the attention heads removed in each attention block, in [0, 1); 0 keeps every head",
    )  # fmt: skip
    method.add_argument(
        "--head-mode", choices=HEAD_MODES, default="auto",
        help="kv: remove whole key/value heads with their query heads; query: remove query heads inside every "
        "key/value group and keep all keys and values; auto: query where key/value heads are shared, else kv",
    )  # fmt: skip
    method.add_argument(
        "--holdout", type=float, default=0.0,
        help="fraction of the calibration samples kept apart to check each group's compensation; a group whose "
        "compensation does not lower its output error on them is sliced instead. 0 checks nothing",
    )  # fmt: skip
    method.add_argument("--multiple", type=int, default=1, help="round kept widths to a multiple of this")
    method.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    method.add_argument(
        "--samples", type=int, default=0,
        help=f"calibration samples to use; 0 uses all, or {DEFAULT_CALIBRATION_WINDOWS} windows of --calib-text",
    )  # fmt: skip
    method.add_argument(
        "--batch-size", type=int,
        help=f"samples per run: default {IMAGE_BATCH_SIZE}, or {TEXT_BATCH_SIZE} token windows with --calib-text / "
        "--eval-text, whose activations are far larger",
    )  # fmt: skip
    method.add_argument("--pipeline", help="pass pipeline text; replaces the method options above")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device")
    run.add_argument("--no-validate", action="store_true", help="skip the comparison in ONNX Runtime")
    run.add_argument("--latency-runs", type=int, default=50, help="timed runs per model; 0 skips timing")
    run.add_argument("--no-verify-each", action="store_true", help="do not run the ONNX checker after each pass")
    run.add_argument("--report", type=Path, help="write the full report as JSON to this file")
    run.add_argument("--list-passes", action="store_true", help="list the passes and their options, then exit")
    run.add_argument("--print-pipeline", action="store_true", help="print the pipeline text, then exit")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")
    run.add_argument("-v", "--verbose", action="store_true", help="log each pass and declined group")
    return parser


# Samples per calibration and validation run. A window of 256 tokens carries 256 rows of
# activations, so text batches are smaller than image batches.
IMAGE_BATCH_SIZE = 64
TEXT_BATCH_SIZE = 8


def _text_or_other(args: argparse.Namespace, given, for_text, otherwise):
    """Return the option value given, else the default of the model family.

    Defaults follow the measurements in docs/: cross statistics with the affine term won
    on the CIFAR-10 ResNets, while on the language models (SmolLM2 perplexity, MiniLM
    STS-B) one-shot statistics without the affine term did as well or better.
    """
    if given is not None:
        return given
    return for_text if args.calib_text or args.eval_text else otherwise


def _batch_size(args: argparse.Namespace) -> int:
    if args.batch_size is not None:
        return args.batch_size
    return TEXT_BATCH_SIZE if args.calib_text or args.eval_text else IMAGE_BATCH_SIZE


def _pipeline_text(args: argparse.Namespace) -> str:
    if args.pipeline:
        return args.pipeline
    return default_pipeline(
        sparsity=args.sparsity,
        selector=args.selector,
        compensation=args.compensation,
        alpha=args.alpha,
        statistics=_text_or_other(args, args.statistics, "oneshot", "cross"),
        affine=_text_or_other(args, args.affine, False, True),
        allocation=args.allocation,
        budget=args.budget,
        multiple=args.multiple,
        seed=args.seed,
        head_sparsity=args.heads,
        heads=args.head_mode,
        holdout=args.holdout,
        batch_size=_batch_size(args),
        samples=args.samples,
        validate=not args.no_validate,
        latency_runs=args.latency_runs,
    )


def _outputs(args: argparse.Namespace) -> list[Path]:
    if args.output is not None and args.out_dir is not None:
        raise GrailError("both -o and --out-dir were given", "Use -o for one model or --out-dir for several.")
    if args.output is not None:
        if len(args.models) != 1:
            raise GrailError(f"-o names one output but {len(args.models)} models were given", "Use --out-dir.")
        if args.output.suffix.lower() != ".onnx" and not args.output.is_dir():
            raise GrailError(
                f"output path {str(args.output)!r} does not end in .onnx, but the output is an ONNX model",
                "Name the output file NAME.onnx.",
            )
        return [args.output]
    if args.out_dir is None:
        raise GrailError("no output path given", "Add -o OUTPUT.onnx, or --out-dir FOLDER for several models.")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise GrailError(f"--out-dir {str(args.out_dir)!r} is a file", "Give a folder path.")
    names = [spec_stem(model) + ".grail.onnx" for model in args.models]
    if len(set(names)) != len(names):
        raise GrailError("two input models have the same file name", "Convert them in separate calls.")
    return [args.out_dir / name for name in names]


def _check_report_path(report: Path | None, models: list[Path], outputs: list[Path]) -> None:
    if report is None:
        return
    if report.is_dir():
        raise GrailError(f"--report {str(report)!r} is a folder", "Give a file name such as report.json.")
    if report.resolve() in {path.resolve() for path in [*models, *outputs]}:
        raise GrailError(
            f"--report {str(report)!r} is also a model or output path", "Choose another file, such as report.json."
        )


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename.

    The temporary file is created with open(), so the report gets the permissions that the
    umask allows instead of the 0600 of `tempfile`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".grail-{os.getpid()}-{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2, default=str)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_options(args: argparse.Namespace) -> None:
    if not 0.0 <= args.sparsity < 1.0:
        raise GrailError(f"--sparsity {args.sparsity} is outside [0, 1)", "Pass a fraction such as 0.3.")
    if args.budget != "params" and args.allocation == "uniform" and not args.pipeline:
        raise GrailError(
            f"--budget {args.budget} applies only to a global allocation",
            "Add --allocation flap or --allocation error, or drop --budget.",
        )
    if not 0.0 <= args.heads < 1.0:
        raise GrailError(f"--heads {args.heads} is outside [0, 1)", "Pass a fraction of heads such as 0.25.")
    if not 0.0 <= args.holdout < 1.0:
        raise GrailError(f"--holdout {args.holdout} is outside [0, 1)", "Pass a fraction such as 0.1, or 0 to check nothing.")
    if args.image_size is not None and args.image_size < 1:
        raise GrailError(f"--image-size {args.image_size} must be a positive number of pixels")
    if len(args.mean) != len(args.std):
        raise GrailError(
            f"--mean has {len(args.mean)} value(s) but --std has {len(args.std)}",
            "Give one mean and one std per input channel, such as --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25.",
        )
    if any(s <= 0 for s in args.std):
        raise GrailError(f"--std {args.std} must be positive")
    if args.samples < 0:
        raise GrailError(f"--samples {args.samples} is negative", "Pass a count such as 128, or 0 for the default.")
    for option, value in (("--seq-len", args.seq_len), ("--eval-seq-len", args.eval_seq_len)):
        if value < 2:
            raise GrailError(f"{option} {value} is too short", "A window needs at least 2 tokens; 256 to 2048 is usual.")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise GrailError(f"--eval-windows {args.eval_windows} must be at least 1", "Omit it to score every window.")
    if not args.models:
        raise GrailError("no model given", "Pass one or more ONNX files, for example: grail-opt model.onnx -o small.onnx")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    outputs = _outputs(args)
    _check_report_path(args.report, args.models, outputs)
    execution_providers(args.device)  # rejects --device cuda without CUDA before any data is read
    options = JobOptions(
        pipeline=_pipeline_text(args),
        calib=args.calib,
        eval=args.eval,
        images=ImageOptions(args.image_size, args.mean, args.std),
        weights=args.weights,
        random_weights=args.random_weights,
        device=args.device,
        show_progress=not args.quiet and sys.stderr.isatty(),
        verify_each=not args.no_verify_each,
        text=TextOptions(
            calib_text=args.calib_text,
            eval_text=args.eval_text,
            tokenizer=args.tokenizer,
            layout=args.text_layout,
            seq_len=args.seq_len,
            samples=args.samples or DEFAULT_CALIBRATION_WINDOWS,
            eval_seq_len=args.eval_seq_len,
            eval_windows=args.eval_windows,
            seed=args.seed,
        ),
    )
    single = len(args.models) == 1
    reports = []
    for model, output in zip(args.models, outputs):
        try:
            report = compress_file(model, output, options)
        except GrailError:
            if single:
                raise
            report = {"model": str(model), "output": None, "error": str(sys.exc_info()[1])}
        except Exception as error:  # one broken model must not stop a batch
            if single:
                raise
            logging.getLogger(__name__).exception("compressing %s failed", model)
            report = {"model": str(model), "output": None, "error": f"{type(error).__name__}: {error}"}
        reports.append(report)
        if not args.quiet and "error" not in report:
            print(format_summary(report))
    if args.report is not None:
        write_json(args.report, reports[0] if single else {"models": reports})
    if not single:
        print(format_batch_table(reports))
    for report in reports:
        if "error" in report and not single:
            # A message that already names the model file needs no prefix.
            prefix = "" if report["model"] in report["error"] else f"{report['model']}: "
            print(f"grail-opt: error: {prefix}{report['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if any("error" in report for report in reports) else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list_passes:
        print(describe_passes())
        return 0
    try:
        if args.print_pipeline:
            print(print_pipeline(parse_pipeline(_pipeline_text(args))))
            return 0
        return run(args)
    except GrailError as error:
        print(f"grail-opt: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
