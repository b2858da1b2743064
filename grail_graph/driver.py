"""One compression job: (model file, data, options) -> (output file, report).

The job is a pure function of its arguments, so batch conversion is a loop over it and
could run one job per worker process without change.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from grail_graph.data import Dataset, ImageOptions, InputSpec, infer_input_specs, load_dataset
from grail_graph.errors import GrailError
from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
from grail_graph.torch_models import is_torch_spec, load_torch_model
from grail_graph.passes import CompressionState, parse_pipeline, print_pipeline, run_pipeline
from grail_graph.text import TextOptions, load_text_datasets

logger = logging.getLogger(__name__)

# Without --eval, this fraction of the calibration samples is held out for validation.
HOLDOUT_FRACTION = 0.125


def tool_version() -> str:
    try:
        return metadata.version("grail-opt")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_pipeline(
    *,
    sparsity: float = 0.5,
    selector: str = "wanda",
    compensation: str = "ridge",
    alpha: float = 1e-3,
    statistics: str = "cross",
    affine: bool = True,
    allocation: str = "uniform",
    budget: str = "params",
    multiple: int = 1,
    seed: int = 0,
    head_sparsity: float = 0.0,
    heads: str = "auto",
    holdout: float = 0.0,
    batch_size: int = 64,
    samples: int = 0,
    validate: bool = True,
    latency_runs: int = 50,
) -> str:
    """Return the canonical pipeline text for the common command-line options.

    The defaults (cross statistics, affine compensation, Wanda, uniform widths,
    alpha = 1e-3) won on the ResNet-56 CIFAR-10 measurements in docs/results.md.
    """
    ridge = compensation == "ridge"
    needs_stats = ridge or selector in ("wanda", "gram") or allocation != "uniform" or budget == "macs"
    parts = ["find-groups"]
    calibrate = f"calibrate{{batch-size={batch_size} samples={samples} statistics=oneshot holdout={holdout!r}}}"
    oneshot = calibrate
    if allocation != "uniform":
        parts += [oneshot, f"allocate{{method={allocation} sparsity={sparsity!r} budget={budget} alpha={alpha!r}}}"]
    if needs_stats and (ridge and statistics != "oneshot"):
        parts.append(f"calibrate{{batch-size={batch_size} samples={samples} statistics={statistics} holdout={holdout!r}}}")
    elif needs_stats and allocation == "uniform":
        parts.append(oneshot)
    parts.append(
        f"select{{method={selector} sparsity={sparsity!r} multiple={multiple} seed={seed} "
        f"head-sparsity={head_sparsity!r} heads={heads}}}"
    )
    fallback = "true" if ridge and holdout > 0 else "false"
    parts.append(
        f"compensate{{method={compensation} alpha={alpha!r} affine={'true' if affine and ridge else 'false'} "
        f"fallback={fallback}}}"
    )
    parts.append("rewrite")
    if validate:
        parts.append(f"validate{{batch-size={batch_size} latency-runs={latency_runs}}}")
    return print_pipeline(parse_pipeline(",".join(parts)))


@dataclass(frozen=True)
class JobOptions:
    """Everything a compression job needs besides the model and output paths."""

    pipeline: str = field(default_factory=default_pipeline)
    calib: Path | None = None
    eval: Path | None = None
    images: ImageOptions = ImageOptions()
    weights: Path | None = None
    """Checkpoint for a `timm:NAME` model; without it the local cache is used."""
    random_weights: bool = False
    device: str = "auto"
    show_progress: bool = False
    verify_each: bool = True
    text: TextOptions = TextOptions()
    """Text files for language models; they replace `calib` / `eval` when given."""


def _tokenizer(options: JobOptions, model_folder: Path | None, model_file: str | None):
    """Load the tokenizer from --tokenizer, else from the `hf:` model's own folder."""
    from grail_graph.hf_models import load_tokenizer

    if options.text.tokenizer is not None:
        return load_tokenizer(options.text.tokenizer)
    if model_folder is None:
        raise GrailError("text data needs a tokenizer", "Pass --tokenizer DIR with the model's tokenizer files.")
    return load_tokenizer(model_folder, model_file)


def _load_data(
    options: JobOptions, specs: list[InputSpec], tokenizer_source: tuple[Path | None, str | None] = (None, None)
) -> tuple[Dataset | None, Dataset | None, str]:
    """Load calibration and evaluation data; hold out calibration samples only for validate."""
    validates = any(instance.name == "validate" for instance in parse_pipeline(options.pipeline))
    text = options.text
    if text.calib_text is not None and options.calib is not None:
        raise GrailError("both --calib and --calib-text were given", "Pass one source of calibration data.")
    if text.eval_text is not None and options.eval is not None:
        raise GrailError("both --eval and --eval-text were given", "Pass one source of evaluation data.")
    text_calibration = text_evaluation = None
    if text.calib_text is not None or text.eval_text is not None:
        tokenizer = _tokenizer(options, *tokenizer_source)
        text_calibration, text_evaluation = load_text_datasets(text, specs, tokenizer)
    calibration = text_calibration
    if options.calib is not None:
        calibration = load_dataset(options.calib, specs, options.images, "calibration")
    if text_evaluation is not None:
        windows = f"{len(text_evaluation)} windows of {text.eval_seq_len} tokens"
        return calibration, text_evaluation, f"{windows} from {text.eval_text}"
    if options.eval is not None:
        evaluation = load_dataset(options.eval, specs, options.images, "evaluation")
        return calibration, evaluation, f"{len(evaluation)} samples from {options.eval}"
    if calibration is None or not validates:
        return calibration, None, "none"
    holdout = int(len(calibration) * HOLDOUT_FRACTION)
    if holdout == 0:
        return calibration, None, "none"
    kept = len(calibration) - holdout
    note = f"last {holdout} of {len(calibration)} calibration samples, held out from calibration"
    return calibration.subset(0, kept), calibration.subset(kept), note


def _open_onnx(model_path: Path, options: JobOptions):
    frontend = OnnxFrontEnd.load(model_path, options.device)
    specs = [InputSpec(name, dtype, shape) for name, dtype, shape in frontend.input_specs()]
    calibration, evaluation, note = _load_data(options, specs)
    return frontend, calibration, evaluation, note, str(model_path)


def _open_torch(spec: str, options: JobOptions, folder: Path):
    """Load a PyTorch model, its data, and export the uncompressed model as the reference."""
    from grail_graph.fx_frontend.export import export_onnx
    from grail_graph.fx_frontend.frontend import FxFrontEnd

    loaded = load_torch_model(spec, options.weights, options.random_weights)
    source = options.calib or options.eval
    if loaded.input_specs is None and source is None:
        raise GrailError(f"the inputs of {spec} are unknown", "Pass --calib data keyed by input name.")
    specs = loaded.input_specs or infer_input_specs(source, options.images)
    calibration, evaluation, note = _load_data(options, specs, (loaded.tokenizer_dir, loaded.tokenizer_file))
    data = calibration if calibration is not None else evaluation
    if data is None:
        raise GrailError(f"compressing {spec} needs example inputs", "Pass --calib data, or --calib-text for a language model.")
    example = next(data.subset(0, 2).batches(2))
    names = [input_spec.name for input_spec in specs]
    # Dynamic dimensions beyond the batch axis, such as the sequence axis of token ids.
    dynamic = [tuple(axis for axis, size in enumerate(s.shape) if axis > 0 and size is None) for s in specs]
    frontend = FxFrontEnd(loaded.module, example, options.device, input_names=names, dynamic_axes=dynamic)
    reference = folder / "reference.onnx"
    export_onnx(frontend.model, frontend.example_tensors(), reference, input_names=names, dynamic_axes=dynamic)
    return frontend, calibration, evaluation, note, str(reference)


def _check_order(passes) -> None:
    """Reject a pipeline that would write the model unchanged because a pass comes too late."""
    names = [instance.name for instance in passes]
    for earlier, later in (("find-groups", "select"), ("find-groups", "rewrite"), ("select", "rewrite")):
        if later in names and (earlier not in names or names.index(earlier) > names.index(later)):
            raise GrailError(
                f"pass '{later}' runs before any '{earlier}' in the pipeline {','.join(names)}",
                f"Put '{earlier}' before '{later}', as in `grail-opt --print-pipeline`.",
            )
    if "rewrite" not in names:
        raise GrailError(
            f"the pipeline {','.join(names)} has no 'rewrite' pass, so the written model would be unchanged",
            "End the pipeline with 'rewrite' (and optionally 'validate').",
        )


def compress_file(model_spec: str | Path, output_path: str | Path, options: JobOptions) -> dict[str, Any]:
    """Compress one model, write the result atomically and return the report.

    `model_spec` is an ONNX file, `timm:NAME`, a saved nn.Module (.pt) or an exported
    program (.pt2); PyTorch models are written as ONNX.
    """
    output_path = Path(output_path)
    torch_model = is_torch_spec(model_spec)
    if not torch_model and output_path.resolve() == Path(model_spec).resolve():
        raise GrailError(f"output path {str(output_path)!r} is the input model", "Choose another path with -o.")
    if output_path.is_dir():
        raise GrailError(f"output path {str(output_path)!r} is a folder", "Give a file name such as small.onnx.")
    passes = parse_pipeline(options.pipeline)
    _check_order(passes)
    with tempfile.TemporaryDirectory(prefix="grail-job-") as folder:
        if torch_model:
            opened = _open_torch(str(model_spec), options, Path(folder))
        else:
            opened = _open_onnx(Path(model_spec), options)
        frontend, calibration, evaluation, evaluation_note, reference = opened
        pipeline_text = print_pipeline(passes)
        frontend.set_metadata("grail_opt.pipeline", pipeline_text)
        frontend.set_metadata("grail_opt.version", tool_version())
        state = CompressionState(
            frontend=frontend,
            calibration=calibration,
            evaluation=evaluation,
            reference_model=reference,
            device=options.device,
            show_progress=options.show_progress,
            scratch=Path(folder),
        )
        records = run_pipeline(passes, state, verify_each=options.verify_each)
        if not state.groups:
            reasons = "; ".join(f"{d.candidate}: {d.reason}" for d in state.declined) or "no Conv, Gemm or MatMul with constant weights"
            raise GrailError(
                f"{model_spec} has no compressible channel group ({reasons})",
                "Nothing was written. grail-opt narrows hidden channels between a Conv, Gemm or MatMul "
                "and the Conv, Gemm or MatMul that reads them.",
            )
        written = _write_output(frontend, state.exported if torch_model else [], output_path)
    return {
        "model": str(model_spec),
        "output": str(output_path),
        "files": [str(path) for path in written],
        "version": tool_version(),
        "pipeline": pipeline_text,
        "evaluation_data": evaluation_note,
        "passes": records,
        "groups": [_group_record(state, group) for group in state.groups],
        "declined": [
            {"candidate": d.candidate, "verdict": state.verdicts.get(d.candidate), "reason": d.reason}
            for d in state.declined
        ],
        "validation": state.validation,
    }


def _write_output(frontend, exported: list[Path], output_path: Path) -> list[Path]:
    """Write the compressed model to `output_path` and return the files written.

    The ONNX export of a PyTorch model takes about a minute for SmolLM2-135M on two cores,
    so a single file that the validate pass exported from the final model is copied instead
    of exporting again. As in `save_model`, the copy goes to a temporary folder beside the
    output and is renamed into place.
    """
    if len(exported) != 1:
        return frontend.save(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=".grail-tmp-") as folder:
        temporary = Path(folder) / output_path.name
        shutil.copyfile(exported[0], temporary)
        os.replace(temporary, output_path)
    return [output_path]


def _group_record(state: CompressionState, group) -> dict[str, Any]:
    plan = state.plans.get(group.name)
    record = {
        "name": group.name,
        "width": group.width,
        "kept": group.width if plan is None else len(plan.keep),
        "verdict": state.verdicts.get(group.name, "found"),
        "producers": [ref.node for ref in group.producers],
        "consumers": [ref.node for ref in group.consumers],
    }
    if plan is not None:
        record.update(plan.statistics)
    return record


