"""Compare an original and a compressed ONNX model in ONNX Runtime.

Numerics are measured on held-out inputs; cost is parameters, multiply-accumulates
(MACs, at batch size 1), file size and ORT latency, the two models timed alternately in
one process so the ratio is fair.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from grail_graph.data import Dataset
from grail_graph.text import next_token_nll

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _session(path: str | Path, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


def _outputs(session: ort.InferenceSession, data: Dataset, batch_size: int, show_progress: bool) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = []
    batches = tqdm(data.batches(batch_size), total=data.num_batches(batch_size), desc="validate", disable=not show_progress)
    for batch in batches:
        chunks.append(session.run(None, batch))
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Return error metrics of `candidate` against `reference`, both (N, ...) arrays."""
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    cand = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    diff = cand - ref
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.divide((ref * cand).sum(axis=1), norms, out=np.ones(len(ref)), where=norms > 0)
    metrics: dict[str, Any] = {
        "max_abs_error": float(np.abs(diff).max()),
        "relative_error": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        "cosine_similarity": float(cosine.mean()),
    }
    if reference.ndim == 2 and reference.shape[1] > 1:
        top_ref, top_cand = reference.argmax(axis=1), candidate.argmax(axis=1)
        metrics["top1_agreement"] = float((top_ref == top_cand).mean())
        if labels is not None:
            metrics["accuracy_before"] = float((top_ref == labels).mean())
            metrics["accuracy_after"] = float((top_cand == labels).mean())
    return metrics


def model_cost(path: str | Path) -> dict[str, int]:
    """Return parameter count, MACs at batch size 1 and bytes on disk of a model file."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    files = {path} | {
        path.parent / entry.value
        for t in model.graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    return {"parameters": params, "macs": count_macs(model), "file_bytes": sum(f.stat().st_size for f in files)}


def count_macs(model: onnx.ModelProto) -> int:
    """Count multiply-accumulates of Conv, Gemm and MatMul with dynamic dimensions set to 1."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if node.op_type == "Conv":
            weight = shapes.get(node.input[1])
            total += int(np.prod(out)) * int(np.prod(weight[1:])) if weight else 0
        else:
            a = shapes.get(node.input[0])
            trans_a = any(att.name == "transA" and att.i for att in node.attribute)
            reduced = (a[-2] if trans_a else a[-1]) if a else 0
            total += int(np.prod(out)) * reduced
    return total


def measure_latency(paths: list[Path], sample: dict[str, np.ndarray], providers: list[str], runs: int) -> list[float]:
    """Return the median latency in milliseconds of each model, runs interleaved."""
    sessions = [_session(path, providers) for path in paths]
    for session in sessions:
        for _ in range(3):
            session.run(None, sample)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, sample)
            times[index].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


# Largest logits block held per model while scoring token windows, in bytes.
TOKEN_BATCH_BYTES = 1 << 28


def validate_tokens(reference: ort.InferenceSession, candidate: ort.InferenceSession, data: Dataset) -> dict[str, Any]:
    """Compare two language models on token windows, one block of windows at a time.

    When every token id indexes the last axis of the first output, that output is read as
    next-token logits. The report then gives the perplexity of both models: exp of the mean
    negative log-likelihood over all predicted positions, each window scored on its own.
    Otherwise the output is a sequence of hidden states, and the report gives the cosine
    similarity of their mean over positions, per window, as a sentence embedding.
    """
    ids_name = next(name for name, array in data.arrays.items() if name not in ("attention_mask", "token_type_ids"))
    ids = data.arrays[ids_name]
    first = reference.run(None, next(data.subset(0, 1).batches(1)))[0]
    batch_size = max(1, TOKEN_BATCH_BYTES // max(first.nbytes, 1))
    logits = first.ndim == 3 and int(ids.max()) < first.shape[-1]

    totals = {"nll_before": 0.0, "nll_after": 0.0, "agree": 0, "positions": 0, "max_abs": 0.0, "diff2": 0.0, "ref2": 0.0}
    cosines = []
    for start in range(0, len(data), batch_size):
        batch = next(data.subset(start, start + batch_size).batches(batch_size))
        before = reference.run(None, batch)[0].astype(np.float64)
        after = candidate.run(None, batch)[0].astype(np.float64)
        diff = after - before
        totals["max_abs"] = max(totals["max_abs"], float(np.abs(diff).max()))
        totals["diff2"] += float((diff**2).sum())
        totals["ref2"] += float((before**2).sum())
        if logits:
            window_ids = batch[ids_name]
            totals["nll_before"] += next_token_nll(before, window_ids)
            totals["nll_after"] += next_token_nll(after, window_ids)
            totals["agree"] += int((before.argmax(-1) == after.argmax(-1)).sum())
            totals["positions"] += before.shape[0] * before.shape[1]
        else:
            pooled_before, pooled_after = before.mean(axis=1), after.mean(axis=1)
            norms = np.linalg.norm(pooled_before, axis=-1) * np.linalg.norm(pooled_after, axis=-1)
            cosines.extend(((pooled_before * pooled_after).sum(-1) / np.maximum(norms, 1e-30)).tolist())

    report: dict[str, Any] = {
        "samples": len(data),
        "max_abs_error": totals["max_abs"],
        "relative_error": float(np.sqrt(totals["diff2"] / max(totals["ref2"], 1e-30))),
    }
    if logits:
        predicted = len(data) * (ids.shape[1] - 1)
        report["perplexity_before"] = float(np.exp(totals["nll_before"] / predicted))
        report["perplexity_after"] = float(np.exp(totals["nll_after"] / predicted))
        report["top1_agreement"] = totals["agree"] / totals["positions"]
        report["tokens_scored"] = predicted
    else:
        report["embedding_cosine"] = float(np.mean(cosines))
    return report


def validate(
    reference: str | Path,
    candidate: str | Path,
    data: Dataset,
    *,
    providers: list[str],
    batch_size: int = 64,
    latency_runs: int = 50,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Compare two models on `data`; return numerics, cost and latency for both."""
    if data.text:
        report = validate_tokens(_session(reference, providers), _session(candidate, providers), data)
        report["before"] = model_cost(reference)
        report["after"] = model_cost(candidate)
        _add_latency(report, reference, candidate, data, providers, latency_runs)
        return report
    ref_outputs = _outputs(_session(reference, providers), data, batch_size, show_progress)
    cand_outputs = _outputs(_session(candidate, providers), data, batch_size, show_progress)
    report: dict[str, Any] = {"samples": len(data)}
    report.update(compare_outputs(ref_outputs[0], cand_outputs[0], data.labels))
    if len(ref_outputs) > 1:
        report["max_abs_error_all_outputs"] = max(
            float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(ref_outputs, cand_outputs)
        )
    report["before"] = model_cost(reference)
    report["after"] = model_cost(candidate)
    _add_latency(report, reference, candidate, data, providers, latency_runs)
    return report


def _add_latency(report: dict[str, Any], reference, candidate, data: Dataset, providers: list[str], runs: int) -> None:
    if runs > 0:
        sample = next(data.subset(0, 1).batches(1))
        before, after = measure_latency([Path(reference), Path(candidate)], sample, providers, runs)
        report["before"]["latency_ms"] = before
        report["after"]["latency_ms"] = after
