"""The validate pass: compare the compressed model with the original in ONNX Runtime."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from grail_graph.onnx_frontend.calibration import execution_providers
from grail_graph.passes.base import CompressionState, Pass, PassResult, register
from grail_graph.validation import validate


@dataclass(frozen=True)
class ValidateOptions:
    batch_size: int = field(default=64, metadata={"help": "samples per ONNX Runtime run"})
    latency_runs: int = field(default=50, metadata={"help": "timed runs per model at batch size 1; 0 skips timing"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.latency_runs < 0:
            raise ValueError(f"latency-runs must be >= 0, got {self.latency_runs}")


@register
class Validate(Pass):
    name = "validate"
    summary = "Run original and compressed models in ONNX Runtime on held-out data and compare them."
    Options = ValidateOptions

    def run(self, state: CompressionState) -> PassResult:
        state.require("held-out data", state.evaluation is not None, self.name, "Pass --eval, or more --calib samples.")
        state.require("the original model", state.reference_model is not None, self.name, "Load the model from a file.")
        with tempfile.TemporaryDirectory(prefix="grail-validate-") as tmp:
            folder = Path(tmp) if state.scratch is None else state.scratch
            candidate = folder / "compressed.onnx"
            written = state.frontend.save(candidate)
            state.validation = validate(
                state.reference_model,
                candidate,
                state.evaluation,
                providers=execution_providers(state.device),
                batch_size=self.options.batch_size,
                latency_runs=self.options.latency_runs,
                show_progress=state.show_progress,
            )
            state.exported = [] if state.scratch is None else written
        keys = (
            "max_abs_error", "cosine_similarity", "top1_agreement", "accuracy_before", "accuracy_after",
            "perplexity_before", "perplexity_after", "embedding_cosine",
        )  # fmt: skip
        return PassResult(False, {key: state.validation[key] for key in keys if key in state.validation})
