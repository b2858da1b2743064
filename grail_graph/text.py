"""Token windows from text files, for calibrating and scoring language models.

Calibration draws windows at random offsets of one tokenised text; evaluation cuts a
text into non-overlapping windows from its start. Both tokenise without special tokens
(no BOS / EOS), so a window is a plain slice of the token stream. The two texts must be
different files: calibrating on the evaluation text would inflate every score.

Perplexity protocol: exp of the mean next-token negative log-likelihood over all
predicted positions of the first `windows` windows (each window of length L predicts
its last L - 1 tokens, with no context carried over from the previous window).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grail_graph.errors import DataError

TEXT_LAYOUTS = ("plain", "wikitext")


def read_text(path: str | os.PathLike, layout: str = "plain") -> str:
    """Read a UTF-8 text file; `layout="wikitext"` joins its lines the standard WikiText way.

    The WikiText join (used for the published GPT-2 / LLaMA perplexities) keeps each
    non-blank line with its newline, turns blank lines into empty rows, drops the part
    after the last newline, and joins the rows with blank lines.
    """
    path = Path(path)
    if layout not in TEXT_LAYOUTS:
        raise DataError(f"text layout {layout!r} is not one of {', '.join(TEXT_LAYOUTS)}")
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} not found", "Check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"text file {str(path)!r} is not UTF-8 ({error})", "Convert it to UTF-8.") from error
    if layout == "wikitext":
        rows = [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
        text = "\n\n".join(rows)
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty", "Pass a file with text in it.")
    return text


def tokenize(text: str, tokenizer, source: str) -> np.ndarray:
    """Return the token ids of `text` (int64, 1-D), without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise DataError(f"{source} gives no tokens", "Pass a file with text in it.")
    return ids


def random_windows(ids: np.ndarray, seq_len: int, samples: int, seed: int = 0, source: str = "text") -> np.ndarray:
    """Return `samples` windows of `seq_len` tokens at random start offsets, shape (samples, seq_len).

    Offsets come from `torch.randint(0, len(ids) - seq_len, ...)` with a
    `torch.Generator` seeded with `seed`, one draw per window, so a run is repeatable
    and matches scripts that draw the same way.
    """
    import torch

    if seq_len < 2:
        raise DataError(f"sequence length {seq_len} is too short", "Use --seq-len 2 or more, such as 256.")
    if samples < 1:
        raise DataError(f"{samples} calibration windows requested", "Use --samples 1 or more, such as 128.")
    if len(ids) <= seq_len:
        raise DataError(
            f"{source} has {len(ids)} tokens, not more than the window length {seq_len}",
            "Pass a longer text or a smaller --seq-len.",
        )
    generator = torch.Generator().manual_seed(seed)
    windows = np.empty((samples, seq_len), dtype=np.int64)
    for row in range(samples):
        start = int(torch.randint(0, len(ids) - seq_len, (1,), generator=generator))
        windows[row] = ids[start : start + seq_len]
    return windows


def sequential_windows(ids: np.ndarray, seq_len: int, windows: int | None = None, source: str = "text") -> np.ndarray:
    """Return the first `windows` non-overlapping windows of `seq_len` tokens (all full ones when None)."""
    if seq_len < 2:
        raise DataError(f"sequence length {seq_len} is too short", "Use a window of 2 tokens or more, such as 512.")
    available = len(ids) // seq_len
    if windows is None:
        windows = available
    if available < 1 or windows < 1:
        raise DataError(f"{source} has {len(ids)} tokens, fewer than one window of {seq_len}", "Pass a longer text.")
    if windows > available:
        raise DataError(
            f"{source} has {len(ids)} tokens, enough for {available} windows of {seq_len}, not {windows}",
            f"Ask for at most {available} windows.",
        )
    return ids[: windows * seq_len].reshape(windows, seq_len).copy()


@dataclass(frozen=True)
class Perplexity:
    """Perplexity over a set of windows, with what it was measured on."""

    value: float
    mean_nll: float
    """Mean next-token negative log-likelihood in nats."""
    tokens: int
    """Number of predicted tokens."""
    windows: int
    seq_len: int


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Return the summed next-token negative log-likelihood in nats of windows `ids` (B, L).

    `logits` (B, L, V) at position t score token t + 1. The log-softmax is taken in float64.
    """
    logits = np.asarray(logits[:, :-1], dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    picked = np.take_along_axis(shifted, ids[:, 1:, None], axis=-1)[..., 0]
    return float((log_norm - picked).sum())


def perplexity(logits_of: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, batch_size: int = 4) -> Perplexity:
    """Score token windows with a model given as `logits_of(ids (B, L)) -> logits (B, L, V)`."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = np.asarray(logits_of(batch))
        if not np.isfinite(logits).all():
            raise DataError("the model returned NaN or Inf logits", "Check the model's dtype and weights.")
        total_nll += next_token_nll(logits, batch)
        total_tokens += batch[:, 1:].size
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, len(windows), windows.shape[1])


def torch_logits(model, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a Hugging Face causal LM (or any module returning `.logits` or a tensor) for `perplexity`."""
    import torch

    def logits_of(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            output = model(input_ids=torch.from_numpy(ids).to(device))
        if hasattr(output, "logits"):
            output = output.logits
        elif isinstance(output, tuple):
            output = output[0]
        logits = output
        return logits.float().cpu().numpy()

    return logits_of


def onnx_logits(path: str | os.PathLike, providers: Iterable[str] = ("CPUExecutionProvider",)) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap an ONNX causal LM whose first output is the logits for `perplexity`.

    An `attention_mask` input, when the model declares one, is fed as all ones.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    names = [item.name for item in session.get_inputs()]
    output = session.get_outputs()[0].name

    def logits_of(ids: np.ndarray) -> np.ndarray:
        feed = {names[0]: ids}
        if "attention_mask" in names[1:]:
            feed["attention_mask"] = np.ones_like(ids)
        return session.run([output], feed)[0]

    return logits_of


# Command-line text data ----------------------------------------------------------------

DEFAULT_CALIBRATION_WINDOWS = 128


@dataclass(frozen=True)
class TextOptions:
    """Text files for calibration and evaluation, and the token windows cut from them."""

    calib_text: Path | None = None
    eval_text: Path | None = None
    tokenizer: Path | None = None
    """Tokenizer folder; by default the folder of an `hf:` model."""
    layout: str = "plain"
    seq_len: int = 256
    """Tokens per calibration window."""
    samples: int = DEFAULT_CALIBRATION_WINDOWS
    """Calibration windows drawn at random offsets."""
    eval_seq_len: int = 512
    eval_windows: int | None = None
    """Evaluation windows from the start of the text; None takes every full window."""
    seed: int = 0


def token_inputs(windows: np.ndarray, specs, source: str) -> dict[str, np.ndarray]:
    """Build the model's inputs for token windows: ids, plus an all-ones mask and zero segment ids.

    `specs` are the model's InputSpecs. The first integer input takes the ids; an input
    named attention_mask gets ones and token_type_ids gets zeros. Any other input is an
    error, because text alone cannot fill it.
    """
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name == "attention_mask":
            arrays[spec.name] = np.ones_like(windows)
        elif spec.name == "token_type_ids":
            arrays[spec.name] = np.zeros_like(windows)
        elif not arrays and np.issubdtype(spec.dtype, np.integer):
            arrays[spec.name] = windows
        else:
            raise DataError(
                f"model input {spec.name!r} cannot be filled from {source}",
                "Text data fills one integer input with token ids, plus attention_mask and token_type_ids; "
                "pass the other inputs as an .npz file with --calib instead.",
            )
    if not any(array is windows for array in arrays.values()):
        raise DataError(f"the model has no integer input for the token ids of {source}", "Pass --calib data instead.")
    return arrays


def load_text_datasets(options: TextOptions, specs, tokenizer) -> tuple[object | None, object | None]:
    """Return (calibration, evaluation) token-window Datasets for the files in `options`."""
    from grail_graph.data import Dataset

    if options.calib_text is not None and options.eval_text is not None:
        if Path(options.calib_text).resolve() == Path(options.eval_text).resolve():
            raise DataError(
                f"--calib-text and --eval-text are the same file {str(options.calib_text)!r}",
                "Calibrate on a different text than the one scored, such as the validation split.",
            )
    calibration = evaluation = None
    if options.calib_text is not None:
        source = f"calibration text {str(options.calib_text)!r}"
        ids = tokenize(read_text(options.calib_text, options.layout), tokenizer, source)
        windows = random_windows(ids, options.seq_len, options.samples, options.seed, source)
        calibration = Dataset(token_inputs(windows, specs, source), None, str(options.calib_text), text=True)
    if options.eval_text is not None:
        source = f"evaluation text {str(options.eval_text)!r}"
        ids = tokenize(read_text(options.eval_text, options.layout), tokenizer, source)
        windows = sequential_windows(ids, options.eval_seq_len, options.eval_windows, source)
        evaluation = Dataset(token_inputs(windows, specs, source), None, str(options.eval_text), text=True)
    return calibration, evaluation
