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
        "--statistics", "oneshot",
        "--no-affine",
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


def _run_passes(frontend, calibration, sparsity):
    from grail_graph.driver import default_pipeline
    from grail_graph.passes import CompressionState, parse_pipeline, run_pipeline

    state = CompressionState(frontend=frontend, calibration=calibration)
    text = default_pipeline(sparsity=sparsity, statistics="oneshot", affine=False, validate=False)
    run_pipeline(parse_pipeline(text), state)
    return state


def test_fx_and_onnx_paths_agree(protocol):
    """The fx front end keeps the same channels as the ONNX front end and exports faithfully."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from grail_graph.data import Dataset
    from grail_graph.fx_frontend.export import check_export
    from grail_graph.fx_frontend.frontend import FxFrontEnd
    from grail_graph.onnx_frontend.frontend import OnnxFrontEnd
    from tools import export_resnet_cifar

    with np.load(protocol / "calib.npz") as archive:
        calibration = Dataset({"input": archive["input"]}, None, "calib.npz")
    with np.load(protocol / "test.npz") as archive:
        test_x, test_y = archive["input"][:2000], archive["labels"][:2000]

    onnx_state = _run_passes(OnnxFrontEnd.load(protocol / "resnet56.onnx", "cpu"), calibration, 0.5)
    fx_frontend = FxFrontEnd(export_resnet_cifar.load_pretrained(56), calibration.arrays["input"][:2], "cpu")
    fx_state = _run_passes(fx_frontend, calibration, 0.5)

    onnx_keeps = [onnx_state.keeps[group.name] for group in onnx_state.groups]
    fx_keeps = [fx_state.keeps[group.name] for group in fx_state.groups]
    assert len(fx_keeps) == len(onnx_keeps) == 27
    for onnx_keep, fx_keep in zip(onnx_keeps, fx_keeps):
        np.testing.assert_array_equal(fx_keep, onnx_keep)

    onnx_path = protocol / "parity-onnx.onnx"
    fx_path = protocol / "parity-fx.onnx"
    onnx_state.frontend.save(onnx_path)
    fx_frontend.save(fx_path)
    export_difference = check_export(fx_frontend.model, (torch.from_numpy(test_x[:64]),), fx_path, tolerance=1e-4)
    assert export_difference < 1e-4

    predictions = []
    for path in (onnx_path, fx_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        predictions.append(session.run(None, {session.get_inputs()[0].name: test_x})[0].argmax(axis=1))
    accuracy_onnx = float((predictions[0] == test_y).mean())
    accuracy_fx = float((predictions[1] == test_y).mean())
    assert accuracy_fx == pytest.approx(accuracy_onnx, abs=0.002)
