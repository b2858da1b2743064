"""Token windows, perplexity and the `hf:` command-line path on a tiny random LLaMA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grail_graph.data import InputSpec
from grail_graph.errors import DataError
from grail_graph.text import (
    TextOptions,
    load_text_datasets,
    perplexity,
    random_windows,
    read_text,
    sequential_windows,
    token_inputs,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees".split()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_text_wikitext_layout(tmp_path):
    path = write_lines(tmp_path / "wiki.txt", [" = Title = ", " ", " first line ", " ", " second line "])
    text = read_text(path, "wikitext")
    assert text == " = Title = \n\n\n\n\n first line \n\n\n\n\n second line \n"


def test_read_text_plain_keeps_file(tmp_path):
    path = write_lines(tmp_path / "plain.txt", ["a b", "", "c"])
    assert read_text(path) == "a b\n\nc\n"


@pytest.mark.parametrize("content", ["", "   \n\n"])
def test_read_text_rejects_empty(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        read_text(path)


def test_read_text_rejects_binary(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not UTF-8"):
        read_text(path)


def test_read_text_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "absent.txt")


def test_random_windows_repeat_torch_draws():
    ids = np.arange(1000, dtype=np.int64)
    windows = random_windows(ids, 16, 5, seed=3)
    generator = torch.Generator().manual_seed(3)
    starts = [int(torch.randint(0, 1000 - 16, (1,), generator=generator)) for _ in range(5)]
    assert windows.shape == (5, 16)
    np.testing.assert_array_equal(windows[:, 0], starts)
    np.testing.assert_array_equal(windows[:, 1:] - windows[:, :-1], 1)
    np.testing.assert_array_equal(random_windows(ids, 16, 5, seed=3), windows)


def test_random_windows_text_too_short():
    with pytest.raises(DataError, match="not more than the window length 8"):
        random_windows(np.arange(8), 8, 1)


def test_sequential_windows_cut_from_start():
    windows = sequential_windows(np.arange(10), 3)
    np.testing.assert_array_equal(windows, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    with pytest.raises(DataError, match="enough for 3 windows of 3, not 4"):
        sequential_windows(np.arange(10), 3, 4)


def test_perplexity_of_uniform_logits_is_vocabulary_size():
    windows = np.random.default_rng(0).integers(0, 50, size=(3, 9))
    result = perplexity(lambda ids: np.zeros((*ids.shape, 50), dtype=np.float32), windows, batch_size=2)
    assert result.value == pytest.approx(50.0)
    assert result.tokens == 3 * 8


def test_perplexity_matches_cross_entropy():
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 11, size=(2, 7))
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).reshape(-1, 11).double(), torch.from_numpy(windows[:, 1:]).reshape(-1)
    )
    result = perplexity(lambda ids: logits[: len(ids)] if len(ids) == 2 else None, windows, batch_size=2)
    assert result.mean_nll == pytest.approx(float(expected), rel=1e-12)
    assert result.value == pytest.approx(math.exp(float(expected)))


def test_perplexity_rejects_nan_logits():
    windows = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(DataError, match="NaN or Inf"):
        perplexity(lambda ids: np.full((1, 4, 3), np.nan), windows)


def test_token_inputs_fill_mask_and_segments():
    windows = np.arange(6, dtype=np.int64).reshape(2, 3)
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), (None, None)),
        InputSpec("attention_mask", np.dtype(np.int64), (None, None)),
        InputSpec("token_type_ids", np.dtype(np.int64), (None, None)),
    ]
    arrays = token_inputs(windows, specs, "test text")
    np.testing.assert_array_equal(arrays["input_ids"], windows)
    np.testing.assert_array_equal(arrays["attention_mask"], 1)
    np.testing.assert_array_equal(arrays["token_type_ids"], 0)


def test_token_inputs_reject_float_input():
    specs = [InputSpec("pixel_values", np.dtype(np.float32), (None, 3, 8, 8))]
    with pytest.raises(DataError, match="'pixel_values' cannot be filled"):
        token_inputs(np.zeros((1, 4), dtype=np.int64), specs, "test text")


# A tiny real tokenizer and model, saved the way save_pretrained writes them ----------------


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random two-layer LLaMA with a word-level tokenizer, saved in a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def sentences(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(count)]


def test_text_datasets_same_file_rejected(tmp_path):
    path = write_lines(tmp_path / "corpus.txt", sentences(0, 20))
    options = TextOptions(calib_text=path, eval_text=path)
    with pytest.raises(DataError, match="are the same file"):
        load_text_datasets(options, [InputSpec("input_ids", np.dtype(np.int64), (None, None))], word_tokenizer())


def test_text_datasets_window_shapes(tmp_path):
    calib = write_lines(tmp_path / "calib.txt", sentences(0, 40))
    evaluation = write_lines(tmp_path / "eval.txt", sentences(1, 40))
    options = TextOptions(calib_text=calib, eval_text=evaluation, seq_len=16, samples=10, eval_seq_len=32)
    specs = [InputSpec("input_ids", np.dtype(np.int64), (None, None))]
    calibration, held_out = load_text_datasets(options, specs, word_tokenizer())
    assert calibration.arrays["input_ids"].shape == (10, 16)
    assert held_out.arrays["input_ids"].shape == (480 // 32, 32)
    assert calibration.text and held_out.text


def test_cli_compresses_hf_folder_with_text(tiny_llama, tmp_path):
    from grail_graph.cli import main

    calib = write_lines(tmp_path / "calib.txt", sentences(0, 60))
    evaluation = write_lines(tmp_path / "eval.txt", sentences(1, 30))
    output, report_path = tmp_path / "small.onnx", tmp_path / "report.json"
    code = main([
        f"hf:{tiny_llama}", "--calib-text", str(calib), "--eval-text", str(evaluation), "--seq-len", "16",
        "--samples", "24", "--eval-seq-len", "32", "--sparsity", "0.5", "--statistics", "oneshot",
        "--latency-runs", "0", "-o", str(output), "--report", str(report_path), "-q",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    validation = report["validation"]
    mlp_groups = [group for group in report["groups"] if group["kept"] < group["width"]]
    assert len(mlp_groups) >= 2
    assert validation["samples"] == 360 // 32
    assert validation["perplexity_before"] > 1.0
    assert math.isfinite(validation["perplexity_after"])
    assert validation["after"]["parameters"] < validation["before"]["parameters"]
    assert output.is_file()


def test_cli_text_needs_tokenizer_for_onnx(tmp_path):
    import onnx

    from grail_graph.cli import main
    from tests.onnx_builders import gemm_relu_gemm

    model = tmp_path / "m.onnx"
    onnx.save(gemm_relu_gemm(), str(model))
    calib = write_lines(tmp_path / "calib.txt", sentences(0, 10))
    code = main([str(model), "--calib-text", str(calib), "-o", str(tmp_path / "out.onnx"), "-q"])
    assert code == 2
    assert not (tmp_path / "out.onnx").exists()


def test_text_data_defaults_to_oneshot(capsys):
    from grail_graph.cli import main

    assert main(["--print-pipeline", "--calib-text", "corpus.txt"]) == 0
    text = capsys.readouterr().out
    assert "statistics=oneshot" in text
    assert "affine=false" in text
    assert "batch-size=8" in text


def test_text_data_keeps_explicit_statistics(capsys):
    from grail_graph.cli import main

    assert main(["--print-pipeline", "--calib-text", "corpus.txt", "--statistics", "cross", "--affine"]) == 0
    text = capsys.readouterr().out
    assert "statistics=cross" in text
    assert "affine=true" in text
