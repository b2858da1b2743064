"""The reference ResNet-56 figures, reproduced through the command line on the ONNX model.

Protocol: torch.randperm(10000) with seed 0 on the CIFAR-10 JPEG test copy; the first
512 images calibrate and the other 9,488 are scored. Only the BasicBlocks' hidden
channels are compressible (the residual stream is declined by the matcher). The
reference numbers come from the GRAIL authors' setup: Grams from the original model,
alpha = 1e-3, structured Wanda selection.
"""

from __future__ import annotations

import json

import pytest

from grail_graph.cli import main
from tools import cifar10

pytestmark = pytest.mark.real_data

DENSE_ACCURACY = 83.20
# (sparsity, compensation) -> top-1 accuracy in percent.
REFERENCE = {
    (0.3, "ridge"): 74.27,
    (0.3, "none"): 62.52,
    (0.5, "ridge"): 55.11,
    (0.5, "none"): 34.45,
}
TOLERANCE = 0.5


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """Export the pretrained ResNet-56 and write the protocol's calibration and test files."""
    pytest.importorskip("torch", reason="torch is needed to export the pretrained ResNet-56")
    from tools import export_resnet_cifar

    weights = cifar10.data_dir() / export_resnet_cifar.WEIGHTS_SUBDIR
    images = cifar10.dataset_dir() / cifar10.DECODED_NPZ
    if not list(weights.glob("resnet56-*.th")) or not images.exists():
        pytest.skip(f"ResNet-56 weights or CIFAR-10 images not found under {cifar10.data_dir()}; set GRAIL_DATA_DIR")

    folder = tmp_path_factory.mktemp("resnet56")
    model = folder / "resnet56.onnx"
    export_resnet_cifar.export_onnx(export_resnet_cifar.load_pretrained(56), model)
    calib_x, _, test_x, test_y = cifar10.load_split()
    cifar10.write_npz(folder / "calib.npz", "input", calib_x)
    cifar10.write_npz(folder / "test.npz", "input", test_x, labels=test_y)
    return folder


@pytest.mark.parametrize(("sparsity", "compensation"), sorted(REFERENCE))
def test_resnet56_matches_reference(protocol, sparsity, compensation):
    report_path = protocol / f"report-{sparsity}-{compensation}.json"
    argv = [
        str(protocol / "resnet56.onnx"),
        "--calib", str(protocol / "calib.npz"),
        "--eval", str(protocol / "test.npz"),
        "--sparsity", str(sparsity),
        "--selector", "wanda",
        "--compensation", compensation,
        "--alpha", "1e-3",
        "--latency-runs", "0",
        "-o", str(protocol / f"out-{sparsity}-{compensation}.onnx"),
        "--report", str(report_path),
        "--quiet",
    ]  # fmt: skip

    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    validation = report["validation"]
    compressed = [g for g in report["groups"] if g["verdict"].startswith("compressed")]

    assert len(compressed) == 27
    assert 100 * validation["accuracy_before"] == pytest.approx(DENSE_ACCURACY, abs=0.01)
    assert 100 * validation["accuracy_after"] == pytest.approx(REFERENCE[(sparsity, compensation)], abs=TOLERANCE)
