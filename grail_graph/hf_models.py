"""Hugging Face transformers models as `hf:` specs, loaded from local files only.

`hf:DIR` names a folder written by `save_pretrained` (config.json plus weights), or a
folder that contains one GGUF file, or `hf:FILE.gguf`. GGUF weights are dequantised to
float32 on load. Other checkpoints keep their stored dtype, so an fp16 or bf16 model is
compressed and written back in that dtype.

The model is wrapped so that it takes `input_ids` and returns one tensor: the logits of a
causal language model, or the last hidden state of an encoder. That keeps tracing,
calibration and ONNX export the same as for any other module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from grail_graph.data import InputSpec
from grail_graph.errors import GrailError, UnsupportedModelError
from grail_graph.torch_models import TorchModel, _offline_hub

GGUF_SUFFIX = ".gguf"
TOKEN_INPUT = "input_ids"


class TokenModel(nn.Module):
    """A transformers model called with `input_ids` only, returning a single tensor."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids)
        return output.logits if self.causal else output.last_hidden_state


def _locate(path: Path) -> tuple[Path, str | None]:
    """Return (folder, GGUF file name or None) for an `hf:` path."""
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return path.parent, path.name
    if not path.is_dir():
        raise GrailError(f"Hugging Face model folder {str(path)!r} not found", "Pass hf:DIR with a local folder.")
    if (path / "config.json").is_file():
        return path, None
    gguf_files = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
    if len(gguf_files) == 1:
        return path, gguf_files[0]
    if len(gguf_files) > 1:
        raise GrailError(
            f"{str(path)!r} contains {len(gguf_files)} GGUF files ({', '.join(gguf_files)})",
            "Name one of them: hf:DIR/FILE.gguf.",
        )
    raise GrailError(
        f"{str(path)!r} has neither a config.json nor a GGUF file",
        "Pass a folder written by save_pretrained, or a .gguf file.",
    )


def _is_causal(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)


def load_hf(path: Path) -> TorchModel:
    """Load a local transformers model and its tokenizer folder, never reaching the hub."""
    try:
        import transformers
    except ImportError as error:
        raise GrailError("hf: models need the transformers package", "Install grail-opt[hf].") from error
    folder, gguf_file = _locate(Path(path))
    try:
        with _offline_hub():
            config = transformers.AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
            causal = _is_causal(config) or gguf_file is not None
            loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
            dtype = torch.float32 if gguf_file is not None else "auto"
            model = loader.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UnsupportedModelError(
            f"transformers cannot load {str(path)!r} ({type(error).__name__}: {error})",
            "Check that the folder holds a complete model saved with save_pretrained, or a GGUF file.",
        ) from error
    # The key / value cache is an extra output that tracing and calibration do not need.
    model.config.use_cache = False
    wrapped = TokenModel(model.eval(), causal).eval()
    specs = [InputSpec(TOKEN_INPUT, np.dtype(np.int64), (None, None))]
    return TorchModel(wrapped, specs, tokenizer_dir=folder, tokenizer_file=gguf_file)


def load_tokenizer(folder: Path, gguf_file: str | None = None):
    """Load the tokenizer stored in `folder` (or in its GGUF file) without the hub.

    `folder` may also be a .gguf file, or a folder whose only tokenizer is one GGUF file.
    """
    try:
        import transformers
    except ImportError as error:
        raise GrailError("text data needs the transformers package", "Install grail-opt[hf].") from error
    folder = Path(folder)
    if gguf_file is None and (folder.suffix == GGUF_SUFFIX or folder.is_dir()):
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            folder, gguf_file = _locate(folder)
    try:
        with _offline_hub():
            return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as error:
        raise GrailError(
            f"no tokenizer can be loaded from {str(folder)!r} ({type(error).__name__}: {error})",
            "Pass --tokenizer with a folder that holds tokenizer.json or tokenizer_config.json.",
        ) from error
