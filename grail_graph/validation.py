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
    if latency_runs > 0:
        sample = next(data.subset(0, 1).batches(1))
        before, after = measure_latency([Path(reference), Path(candidate)], sample, providers, latency_runs)
        report["before"]["latency_ms"] = before
        report["after"]["latency_ms"] = after
    return report
