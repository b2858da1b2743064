"""Run two peer compression tools on the CIFAR-10 ResNets with grail-opt's protocol.

* Torch-Pruning 1.6.1 (PyTorch): structured pruning of the output channels of each
  BasicBlock's conv1, so only the hidden channels between conv1 and conv2 are removed
  and the residual stream keeps its width, as in grail-opt. Channels are ranked by one
  of Torch-Pruning's importance criteria and the lowest are removed. The kept width of
  every block is ``grail_graph.core.kept_width``, the rule grail-opt uses. There is no
  fine-tuning and no other weight update.
* onnxsim 0.8.1 (ONNX): ``onnxsim.simplify`` folds every BatchNormalization into its
  Conv, then ``apply_structured_pruning`` (L2 norm of the filters) or
  ``apply_structured_wanda_pruning`` (filter norm times activation norm) removes
  channels, then ``apply_pruning_finetune`` runs the package's closed-form ridge refit.

Both tools are optional. ``peer_versions`` reports which are installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from grail_graph.core import kept_width

logger = logging.getLogger(__name__)

TORCH_PRUNING_VERSION = "1.6.1"
ONNXSIM_VERSION = "0.8.1"
TORCH_PRUNING_IMPORTANCES = ("magnitude", "taylor", "bn-scale")
ONNXSIM_METHODS = ("l2", "wanda")
GRADIENT_BATCH_SIZE = 128


@dataclass
class PeerModel:
    """A model written by a peer tool, with what the tool did to it."""

    path: Path
    kept_channels: int
    """Hidden channels kept over all pruned blocks."""
    total_channels: int
    notes: list[str] = field(default_factory=list)


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def peer_versions() -> dict[str, str | None]:
    """Return the installed versions of the peer packages, None where one is missing."""
    return {"torch-pruning": installed_version("torch-pruning"), "onnxsim": installed_version("onnxsim")}


# Torch-Pruning ---------------------------------------------------------------------------


def torch_pruning_importance(name: str):
    """Return the Torch-Pruning importance object for one of TORCH_PRUNING_IMPORTANCES."""
    import torch_pruning as tp

    if name == "magnitude":
        # Group L2 norm over conv1's filter, bn1's scale and conv2's input slice.
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise ValueError(f"importance {name!r} is not one of {', '.join(TORCH_PRUNING_IMPORTANCES)}")


def accumulate_gradients(model, images: np.ndarray, labels: np.ndarray) -> None:
    """Backpropagate the summed cross-entropy of (images, labels) into the weights' .grad.

    `images` are preprocessed float32 (N, 3, H, W). The model stays in eval mode, so
    BatchNormalization uses its running statistics, as at inference.
    """
    import torch

    model.eval()
    model.zero_grad(set_to_none=True)
    for start in range(0, len(images), GRADIENT_BATCH_SIZE):
        batch = torch.from_numpy(images[start : start + GRADIENT_BATCH_SIZE])
        target = torch.from_numpy(labels[start : start + GRADIENT_BATCH_SIZE].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(model(batch), target, reduction="sum")
        loss.backward()


def prune_blocks_torch_pruning(
    model,
    importance_name: str,
    sparsity: float,
    calibration_images: np.ndarray | None = None,
    calibration_labels: np.ndarray | None = None,
) -> tuple[int, int]:
    """Remove the lowest-ranked hidden channels of every BasicBlock in place.

    Each block's conv1 output channels (with bn1 and conv2's input channels, which
    Torch-Pruning's dependency graph adds to the same group) keep
    ``kept_width(width, sparsity)`` channels. The Taylor importance needs gradients, so
    it needs the calibration images and their labels. Returns (kept, total) channels.
    """
    import torch
    import torch_pruning as tp

    from tools.export_resnet_cifar import BasicBlock

    if importance_name == "taylor":
        if calibration_images is None or calibration_labels is None:
            raise ValueError("the Taylor importance needs calibration images and labels")
        accumulate_gradients(model, calibration_images, calibration_labels)

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(2, 3, 32, 32))
    importance = torch_pruning_importance(importance_name)
    kept_total, width_total = 0, 0
    blocks = [module for module in model.modules() if isinstance(module, BasicBlock)]
    for block in blocks:
        width = block.conv1.out_channels
        keep = kept_width(width, sparsity)
        group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=list(range(width)))
        with torch.no_grad():
            scores = importance(group)
        if scores is None:
            raise RuntimeError(f"Torch-Pruning's {importance_name} importance returned no scores for {block}")
        # Lowest scores first; a stable sort keeps ties in channel order.
        order = torch.argsort(scores.detach().cpu(), stable=True)
        removed = sorted(int(index) for index in order[: width - keep])
        if removed:
            group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=removed)
            if not graph.check_pruning_group(group):
                raise RuntimeError(f"Torch-Pruning rejected the pruning group of {block.conv1}")
            group.prune()
        kept_total += block.conv1.out_channels
        width_total += width
    model.zero_grad(set_to_none=True)
    return kept_total, width_total


def torch_pruning_model(
    depth: int,
    importance_name: str,
    sparsity: float,
    output: Path,
    calibration_images: np.ndarray,
    calibration_labels: np.ndarray,
    data_root: Path | None = None,
) -> PeerModel:
    """Prune the pretrained ResNet with Torch-Pruning and export it to ONNX at `output`."""
    from tools import export_resnet_cifar

    model = export_resnet_cifar.load_pretrained(depth, data_root)
    kept, total = prune_blocks_torch_pruning(model, importance_name, sparsity, calibration_images, calibration_labels)
    export_resnet_cifar.export_onnx(model.eval(), output)
    notes = []
    if importance_name == "taylor":
        notes.append("Taylor scores use gradients of the cross-entropy on the calibration images and their labels")
    return PeerModel(output, kept, total, notes)


# onnxsim ---------------------------------------------------------------------------------


def changed_initializers(before, after) -> list[str]:
    """Return the names of initializers that differ in shape or value between two ONNX models."""
    from onnx import numpy_helper

    old = {tensor.name: numpy_helper.to_array(tensor) for tensor in before.graph.initializer}
    new = {tensor.name: numpy_helper.to_array(tensor) for tensor in after.graph.initializer}
    names = sorted(set(old) | set(new))
    return [
        name
        for name in names
        if name not in old or name not in new or old[name].shape != new[name].shape or not np.array_equal(old[name], new[name])
    ]


def pruned_conv_channels(before, after) -> tuple[int, int, int]:
    """Return (kept, total) output channels of the Convs that pruning narrowed, and their number."""
    old = {tensor.name: tuple(tensor.dims) for tensor in before.graph.initializer}
    new = {tensor.name: tuple(tensor.dims) for tensor in after.graph.initializer}
    kept, total, layers = 0, 0, 0
    for node in after.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in old and name in new and new[name][0] < old[name][0]:
            kept += new[name][0]
            total += old[name][0]
            layers += 1
    return kept, total, layers


def onnxsim_model(
    model_path: Path,
    method: str,
    sparsity: float,
    output: Path,
    calibration_batches: list[dict[str, np.ndarray]],
) -> PeerModel:
    """Prune an ONNX model with onnxsim and apply its refit, writing the result to `output`.

    `calibration_batches` are {input name: float32 array} dicts. The Wanda ranking and
    the refit read them, but the L2 ranking does not.
    """
    import onnx
    import onnxsim

    from tools.cifar10 import temporary_path_for

    if method not in ONNXSIM_METHODS:
        raise ValueError(f"onnxsim method {method!r} is not one of {', '.join(ONNXSIM_METHODS)}")

    simplified, check_passed = onnxsim.simplify(onnx.load(str(model_path)))
    if not check_passed:
        raise RuntimeError(f"onnxsim.simplify could not verify its output for {model_path}")
    if method == "l2":
        pruned = onnxsim.apply_structured_pruning(simplified, sparsity=sparsity)
    else:
        pruned = onnxsim.apply_structured_wanda_pruning(simplified, calibration_data=calibration_batches, sparsity=sparsity)
    refit = onnxsim.apply_pruning_finetune(simplified, pruned, calibration_data=calibration_batches)

    notes = []
    refit_changes = changed_initializers(pruned, refit)
    if refit_changes:
        notes.append(f"the refit changed {len(refit_changes)} initializers")
    else:
        notes.append("the refit (apply_pruning_finetune) left every weight unchanged")
    pruned_names = changed_initializers(simplified, pruned)
    kept, total, layers = pruned_conv_channels(simplified, refit)
    notes.append(f"pruning changed {len(pruned_names)} initializers and narrowed the output channels of {layers} Convs")

    output.parent.mkdir(parents=True, exist_ok=True)
    temp_path = temporary_path_for(output)
    try:
        onnx.save(refit, str(temp_path))
        temp_path.replace(output)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return PeerModel(output, kept, total, notes)
