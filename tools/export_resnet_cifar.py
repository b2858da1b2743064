"""Export the pretrained akamaster CIFAR-10 ResNets (20/32/44/56) to ONNX.

The weights come from akamaster/pytorch_resnet_cifar10 (BSD-2-Clause,
Copyright (c) 2018 Yerlan Idelbayev) and are read from
``$GRAIL_DATA_DIR/resnet-cifar10-akamaster/resnet{depth}-<hash>.th``.
The network is the CIFAR-10 ResNet of He et al., "Deep Residual Learning
for Image Recognition" (2016), with the parameter-free "option A" shortcut
(see DownsampleShortcut).

Usage::

    python -m tools.export_resnet_cifar --depth 56 -o models/resnet56_cifar10.onnx --verify
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tools import cifar10

WEIGHTS_SUBDIR = "resnet-cifar10-akamaster"
DEPTHS = (20, 32, 44, 56)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM_NAME = "batch"
# Lowest opset that torch 2.14's default exporter produces for these models.
MIN_OPSET = 18


class DownsampleShortcut(nn.Module):
    """Parameter-free shortcut ("option A") for a block that halves the resolution.

    It keeps every second row and column and zero-pads the channels on both
    sides, from ``planes // 2`` to ``planes``.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad_channels = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        subsampled = x[:, :, ::2, ::2]
        return F.pad(subsampled, (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        if stride != 1 or in_planes != planes:
            # Option A only covers halving the size and doubling the width.
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(
                    f"option A shortcut needs stride 2 and planes = 2 * in_planes, "
                    f"got stride {stride}, in_planes {in_planes}, planes {planes}"
                )
            self.shortcut: nn.Module = DownsampleShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 CIFAR images: a 3x3 stem, three stages of width 16/32/64, a linear head.

    Parameter names match the akamaster checkpoints once their ``module.``
    prefix is removed.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_resnet(depth: int) -> CifarResNet:
    """Build an untrained CIFAR ResNet of the given depth (6n + 2, e.g. 20, 32, 44, 56)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
    return CifarResNet(blocks_per_stage=(depth - 2) // 6)


def find_checkpoint(depth: int, root: str | os.PathLike | None = None) -> Path:
    """Return the path of ``resnet{depth}-<hash>.th`` in the weights folder."""
    folder = cifar10.data_dir(root) / WEIGHTS_SUBDIR
    matches = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not matches:
        raise FileNotFoundError(
            f"pretrained ResNet-{depth} not found: no {folder / f'resnet{depth}-*.th'}. "
            f"Set {cifar10.DATA_DIR_ENV} to the folder that contains {WEIGHTS_SUBDIR}/ "
            f"or pass the data root explicitly."
        )
    if len(matches) > 1:
        raise ValueError(f"several ResNet-{depth} checkpoints match in {folder}: {matches}")
    return matches[0]


def load_pretrained(depth: int, root: str | os.PathLike | None = None) -> CifarResNet:
    """Build a ResNet of ``depth``, load its pretrained CIFAR-10 weights and return it in eval mode."""
    path = find_checkpoint(depth, root)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)

    # The checkpoints were saved from nn.DataParallel, hence the prefix.
    state_dict = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    model = build_resnet(depth)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def strip_exporter_metadata(model_proto) -> None:
    """Remove the metadata_props that torch's exporter attaches to the graph, nodes and values.

    They record Python stack traces with absolute source paths and line numbers,
    so without them the file depends only on the weights and the graph.
    """
    graph = model_proto.graph
    del graph.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        del value.metadata_props[:]


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = MIN_OPSET, fold_batchnorm: bool = False) -> None:
    """Export ``model`` to a single self-contained ONNX file with a dynamic batch dimension.

    Input "input" is float32 (batch, 3, 32, 32) and output "logits" is
    (batch, num_classes). By default every BatchNormalization stays a node of its own,
    so the Conv initializers hold the checkpoint's weights. That matters to selectors
    that read weights: folding each BatchNormalization into its Conv scales the rows of
    the consumer weight, which changes Wanda's column norms and the magnitude scores.
    With ``fold_batchnorm``, the onnxscript optimizer (0.7.2) folds them. Constants are
    folded either way, all weights are stored inside the file, and the exporter's
    debugging metadata is removed. The file is written to a temporary name next to
    ``path`` and then renamed.
    """
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    if opset < MIN_OPSET:
        # torch 2.14.1 exports opset 18 and then calls onnx's version converter, which
        # has no Pad adapter from 18 to 17, so the file would stay at 18. The TorchScript
        # exporter (dynamo=False) can write opset 17, but it builds each Pad's pads input
        # from a chain of about 7 extra nodes and 8 Constants.
        raise ValueError(f"opset must be >= {MIN_OPSET} for the torch.export-based exporter, got {opset}")

    path = Path(path)
    model = model.eval()
    # Batch 2, because torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, 3, 32, 32)

    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = cifar10.temporary_path_for(path)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM_NAME)},),
                optimize=fold_batchnorm,
                verbose=False,
            )
        exported_ir = program.model
        if not fold_batchnorm:
            # Folding constants alone removes the exporter's shape plumbing but keeps
            # BatchNormalization, which the full optimizer would fuse into Conv.
            onnxscript.optimizer.fold_constants(exported_ir)
            RemoveUnusedNodesPass()(exported_ir)
        exported = ir.to_proto(exported_ir)
        strip_exporter_metadata(exported)
        onnx.checker.check_model(exported, full_check=True)
        onnx.save(exported, temp_path)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def op_histogram(path: str | os.PathLike) -> Counter:
    """Count the nodes of each op type in the main graph of an ONNX file."""
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def verify(model: nn.Module, onnx_path: Path, root: str | os.PathLike | None = None) -> None:
    """Print the ONNX model's accuracy in ONNX Runtime and its max |logit| difference to torch."""
    import numpy as np
    import onnxruntime as ort

    images, labels = cifar10.load_decoded(root)
    _, test_indices = cifar10.split_indices()

    all_accuracy = cifar10.evaluate_onnx(onnx_path, images, labels)
    test_accuracy = cifar10.evaluate_onnx(onnx_path, images[test_indices], labels[test_indices])
    print(f"ONNX Runtime accuracy, all {len(images)} images: {all_accuracy:.2f}%")
    print(f"ONNX Runtime accuracy, protocol test split ({len(test_indices)} images): {test_accuracy:.2f}%")

    batch = cifar10.preprocess(images[test_indices[:64]])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {INPUT_NAME: batch})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(batch)).numpy()
    max_difference = float(np.abs(onnx_logits - torch_logits).max())
    print(f"max |logit difference| ONNX Runtime vs torch, first 64 test images: {max_difference:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.export_resnet_cifar",
        description="Export a pretrained akamaster CIFAR-10 ResNet to a single ONNX file.",
    )
    parser.add_argument("--depth", type=int, required=True, choices=DEPTHS, help="network depth")
    parser.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    parser.add_argument(
        "--opset", type=int, default=MIN_OPSET, help=f"ONNX opset version, at least {MIN_OPSET} (default: {MIN_OPSET})"
    )
    parser.add_argument(
        "--fold-batchnorm",
        action="store_true",
        help="fold each BatchNormalization into the Conv before it (changes weight-based channel scores)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"data root that contains {WEIGHTS_SUBDIR}/ (default: ${cifar10.DATA_DIR_ENV} or ../shared/data)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after export, print ONNX Runtime accuracy on the CIFAR-10 JPEG test set and the logit difference to torch",
    )
    parser.add_argument(
        "--eval-dir",
        type=Path,
        help="also print ONNX Runtime accuracy on <class_name>/*.jpg images in this folder",
    )
    args = parser.parse_args(argv)

    try:
        checkpoint = find_checkpoint(args.depth, args.data_dir)
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")

    dataset = cifar10.dataset_dir(args.data_dir)
    inputs = [checkpoint, dataset / cifar10.DECODED_NPZ, dataset / cifar10.JPEG_TAR]
    if args.output.resolve() in [path.resolve() for path in inputs]:
        parser.error(f"output {args.output} is an input file. Choose another path.")

    model = load_pretrained(args.depth, args.data_dir)
    export_onnx(model, args.output, opset=args.opset, fold_batchnorm=args.fold_batchnorm)
    histogram = ", ".join(f"{op} {count}" for op, count in sorted(op_histogram(args.output).items()))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB): {histogram}")

    if args.verify:
        verify(model, args.output, args.data_dir)
    if args.eval_dir is not None:
        images, labels = cifar10.read_jpeg_folder(args.eval_dir)
        accuracy = cifar10.evaluate_onnx(args.output, images, labels)
        print(f"ONNX Runtime accuracy, {len(images)} images in {args.eval_dir}: {accuracy:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
