"""PyTorch model specs on the command line: `timm:NAME`, `hf:DIR`, saved modules, exported programs.

torch, timm and transformers are imported only when such a spec is used, so ONNX-only
installs work without them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from grail_graph.data import InputSpec
from grail_graph.errors import GrailError, UnsupportedModelError

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
MODULE_SUFFIXES = (".pt", ".pth")
PROGRAM_SUFFIX = ".pt2"


def is_torch_spec(spec: str | os.PathLike) -> bool:
    text = str(spec)
    return text.startswith((TIMM_PREFIX, HF_PREFIX)) or text.endswith(MODULE_SUFFIXES) or text.endswith(PROGRAM_SUFFIX)


def spec_stem(spec: str | os.PathLike) -> str:
    """Return a file-name stem for a spec: `timm:resnet18` -> `resnet18`, `hf:models/smollm2/` -> `smollm2`."""
    text = str(spec)
    if text.startswith(TIMM_PREFIX):
        return text[len(TIMM_PREFIX) :].replace("/", "_")
    if text.startswith(HF_PREFIX):
        return Path(text[len(HF_PREFIX) :]).resolve().name
    return Path(text).name.split(".")[0]


@dataclass
class TorchModel:
    """A loaded PyTorch model and what is known of its inputs."""

    module: object  # torch.nn.Module
    input_specs: list[InputSpec] | None
    tokenizer_dir: Path | None = None
    """Folder whose tokenizer turns text into the model's input ids (Hugging Face models)."""
    tokenizer_file: str | None = None
    """GGUF file in `tokenizer_dir` that carries the tokenizer, if any."""


@contextlib.contextmanager
def _offline_hub():
    """Keep the Hugging Face hub client offline, so pretrained weights come from the local cache only."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def load_timm(name: str, weights: Path | None = None, random_weights: bool = False) -> TorchModel:
    """Build timm model `name` with weights from `weights`, the local cache, or random ones.

    Random weights are used only when `random_weights` is set; otherwise missing weights
    are an error, so a user never compresses an untrained model by accident.
    """
    try:
        import numpy as np
        import timm
    except ImportError as error:
        raise GrailError("timm models need the timm package", "Install grail-opt[torch] (or `pip install timm`).") from error
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        suggestion = f"Similar names: {', '.join(close)}." if close else "List the names with timm.list_models()."
        raise GrailError(f"timm has no model {name!r}", suggestion)
    if weights is not None and not Path(weights).is_file():
        raise GrailError(f"weights file {str(weights)!r} not found", "Check the path given with --weights.")
    try:
        with _offline_hub():
            if weights is not None:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
            else:
                model = timm.create_model(name, pretrained=not random_weights)
    except (OSError, RuntimeError, ValueError) as error:
        if weights is not None:
            raise GrailError(f"cannot load weights {str(weights)!r} into timm model {name!r}: {error}") from error
        raise GrailError(
            f"pretrained weights for timm model {name!r} are not in the local cache ({type(error).__name__})",
            "Pass a checkpoint with --weights FILE, or --random-weights for an untrained model.",
        ) from error
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return TorchModel(model.eval(), [InputSpec("input", np.dtype(np.float32), (None, channels, height, width))])


def load_torch_model(spec: str, weights: Path | None = None, random_weights: bool = False) -> TorchModel:
    """Load a `timm:NAME` or `hf:DIR` spec, a saved nn.Module (.pt, .pth) or an ExportedProgram (.pt2)."""
    text = str(spec)
    if text.startswith(TIMM_PREFIX):
        return load_timm(text[len(TIMM_PREFIX) :], weights, random_weights)
    if text.startswith(HF_PREFIX):
        from grail_graph.hf_models import load_hf

        return load_hf(Path(text[len(HF_PREFIX) :]))
    import torch

    path = Path(text)
    if not path.is_file():
        raise GrailError(f"model file {text!r} not found", "Check the path.")
    try:
        if text.endswith(PROGRAM_SUFFIX):
            return TorchModel(torch.export.load(str(path)).module(), None)
        # NOTE: a pickled module runs code on load; only pass files you trust.
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling and deserialisation raise many types
        raise UnsupportedModelError(f"{text!r} cannot be loaded as a PyTorch model ({type(error).__name__}: {error})") from error
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(
            f"{text!r} holds a {type(module).__name__}, not an nn.Module",
            "Save the whole module with torch.save(model, path), or an ExportedProgram with torch.export.save.",
        )
    return TorchModel(module.eval(), None)
