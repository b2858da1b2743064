"""Python entry points for PyTorch models: compress a module, export it to ONNX."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from grail_graph.driver import default_pipeline
from grail_graph.fx_frontend.export import export_onnx
from grail_graph.fx_frontend.frontend import FxFrontEnd
from grail_graph.passes import CompressionState, parse_pipeline, print_pipeline, run_pipeline


class TensorBatches:
    """Calibration batches given as tensors, tuples of tensors or dicts of tensors.

    Batches are used as given; the pipeline's batch size does not re-slice them.
    """

    def __init__(self, batches: Iterable) -> None:
        self.items = list(batches)
        if not self.items:
            raise ValueError("calibration_batches is empty")

    @staticmethod
    def _size(batch) -> int:
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            return batch.shape[0]
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        return first.shape[0]

    def __len__(self) -> int:
        return sum(self._size(batch) for batch in self.items)

    def batches(self, batch_size: int):
        return iter(self.items)

    def subset(self, start: int, stop: int | None = None) -> TensorBatches:
        """Return the whole batches that hold samples start..stop (rounded to batches)."""
        chosen, seen = [], 0
        for batch in self.items:
            if seen >= start and (stop is None or seen < stop):
                chosen.append(batch)
            seen += self._size(batch)
        return TensorBatches(chosen)


def compress(
    model: nn.Module,
    calibration_batches: Iterable,
    *,
    sparsity: float = 0.5,
    selector: str = "wanda",
    compensation: str = "ridge",
    alpha: float = 1e-3,
    statistics: str = "cross",
    affine: bool = True,
    multiple: int = 1,
    seed: int = 0,
    head_sparsity: float = 0.0,
    heads: str = "auto",
    holdout: float = 0.0,
    pipeline: str | None = None,
    device: str | torch.device | None = "auto",
    verify_each: bool = True,
    report: dict[str, Any] | None = None,
) -> nn.Module:
    """Return a compressed copy of `model`; the model passed in is not changed.

    The model is traced with torch.fx, every Conv / Linear channel group is found,
    Grams are recorded with forward hooks on `calibration_batches` (on the GPU when
    `device` is "auto" and CUDA is available), and the pipeline selects, compensates
    and rewrites. The defaults match the command line: cross statistics with affine
    compensation; `statistics="oneshot", affine=False` is the method as published.
    `head_sparsity` removes that fraction of the heads of each attention block (`heads`
    chooses kv or query mode), and `holdout` keeps that fraction of the calibration
    batches apart to check each group's compensation. When `report` is a dict, it
    receives the pipeline text, per-pass statistics and the verdict of every candidate
    group.
    """
    batches = TensorBatches(calibration_batches)
    text = pipeline or default_pipeline(
        sparsity=sparsity, selector=selector, compensation=compensation, alpha=alpha,
        statistics=statistics, affine=affine, multiple=multiple, seed=seed, head_sparsity=head_sparsity,
        heads=heads, holdout=holdout, validate=False,
    )  # fmt: skip
    passes = parse_pipeline(text)
    frontend = FxFrontEnd(model, example_inputs=_first_sample(batches.items[0]), device=device)
    state = CompressionState(frontend=frontend, calibration=batches, device=str(frontend.device))
    records = run_pipeline(passes, state, verify_each=verify_each)
    if report is not None:
        report.update(
            pipeline=print_pipeline(passes),
            passes=records,
            groups=[{"name": g.name, "width": g.width, "verdict": state.verdicts.get(g.name)} for g in state.groups],
            declined=[{"candidate": d.candidate, "reason": d.reason} for d in state.declined],
        )
    return frontend.model


def _first_sample(batch):
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[:2]
    if isinstance(batch, dict):
        return {key: value[:2] for key, value in batch.items()}
    return tuple(value[:2] for value in batch)


__all__ = ["TensorBatches", "compress", "export_onnx"]
