"""Tests for the CIFAR-10 protocol helper and the pretrained ResNet ONNX export.

Tests marked real_data need the data root (GRAIL_DATA_DIR, default
../shared/data next to the repository) and skip when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools import cifar10

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "resnet20_cifar10.onnx"
BUNDLED_EVAL_DIR = REPO_ROOT / "models" / "cifar10-sample" / "eval"


def require_path(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} not found under {path.parent}; set {cifar10.DATA_DIR_ENV}")
    return path


@pytest.fixture(scope="module")
def decoded_images():
    require_path(cifar10.dataset_dir() / cifar10.DECODED_NPZ)
    return cifar10.load_decoded()


@pytest.fixture(scope="module")
def export_module():
    pytest.importorskip("torch", reason="torch is needed to load the pretrained ResNets")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
    from tools import export_resnet_cifar

    return export_resnet_cifar


def load_model(export_module, depth):
    folder = cifar10.data_dir() / export_module.WEIGHTS_SUBDIR
    if not list(folder.glob(f"resnet{depth}-*.th")):
        pytest.skip(f"resnet{depth}-*.th not found under {folder}; set {cifar10.DATA_DIR_ENV}")
    return export_module.load_pretrained(depth)


@pytest.fixture(scope="module")
def resnet20_export(export_module, tmp_path_factory):
    """Return the pretrained ResNet-20 and the path of its ONNX export."""
    model = load_model(export_module, 20)
    path = tmp_path_factory.mktemp("resnet20") / "resnet20.onnx"
    export_module.export_onnx(model, path)
    return model, path


def test_preprocess_layout_and_values():
    images = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    images[1, :, :, 0] = 255

    result = cifar10.preprocess(images)

    assert result.dtype == np.float32
    assert result.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(result[0, :, 0, 0], -cifar10.MEAN / cifar10.STD, rtol=1e-6)
    np.testing.assert_allclose(result[1, 0], (1 - 0.485) / 0.229, rtol=1e-6)


def test_preprocess_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        cifar10.preprocess(np.zeros((1, 32, 32, 3), dtype=np.float32))


def test_write_npz_round_trip(tmp_path):
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint32).reshape(2, 32, 32, 3).astype(np.uint8)
    path = tmp_path / "sub" / "data.npz"

    cifar10.write_npz(path, "pixel_values", images, labels=[3, 7])

    with np.load(path) as archive:
        assert sorted(archive.files) == ["labels", "pixel_values"]
        np.testing.assert_array_equal(archive["pixel_values"], cifar10.preprocess(images))
        assert archive["labels"].dtype == np.int64
        np.testing.assert_array_equal(archive["labels"], [3, 7])
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"]


def test_tar_member_name_mapping():
    assert cifar10.tar_member_name(0) == "test/airplane/0000.jpg"
    assert cifar10.tar_member_name(1999) == "test/automobile/0999.jpg"
    assert cifar10.tar_member_name(9000) == "test/truck/0000.jpg"
    with pytest.raises(IndexError):
        cifar10.tar_member_name(10_000)


def test_bundled_resnet20_on_sample():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("PIL")
    if not BUNDLED_MODEL.exists() or not BUNDLED_EVAL_DIR.is_dir():
        pytest.skip(f"bundled example not found under {BUNDLED_MODEL.parent}")

    images, labels = cifar10.read_jpeg_folder(BUNDLED_EVAL_DIR)
    accuracy = cifar10.evaluate_onnx(BUNDLED_MODEL, images, labels)

    assert images.shape == (500, 32, 32, 3)
    # 81.80% (409 of 500) measured with ONNX Runtime 1.32 on x86 CPU.
    # The tolerance allows one image to flip on other CPUs.
    assert accuracy == pytest.approx(81.8, abs=0.21)


@pytest.mark.real_data
def test_protocol_split_sizes_and_disjoint(decoded_images):
    pytest.importorskip("torch", reason="the protocol permutation uses torch.randperm")

    calib_indices, test_indices = cifar10.split_indices()
    calib_x, calib_y, test_x, test_y = cifar10.load_split()

    assert len(calib_indices) == 512
    assert len(test_indices) == 9488
    assert not set(calib_indices.tolist()) & set(test_indices.tolist())
    assert sorted(np.concatenate([calib_indices, test_indices]).tolist()) == list(range(10_000))
    assert calib_x.shape == (512, 32, 32, 3)
    assert test_x.shape == (9488, 32, 32, 3)
    assert calib_y.shape == (512,)
    assert test_y.shape == (9488,)
    np.testing.assert_array_equal(test_x[0], decoded_images[0][test_indices[0]])


@pytest.mark.real_data
def test_tar_jpeg_matches_decoded_npz(decoded_images):
    pytest.importorskip("PIL")
    require_path(cifar10.dataset_dir() / cifar10.JPEG_TAR)
    images, labels = decoded_images
    indices = [0, 999, 1000, 4321, 9999]

    for index, data in zip(indices, cifar10.read_jpeg_bytes(indices)):
        np.testing.assert_array_equal(cifar10.decode_jpeg(data), images[index])
        assert labels[index] == index // 1000


@pytest.mark.real_data
def test_resnet20_onnx_matches_torch(resnet20_export, decoded_images):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    model, path = resnet20_export
    # A few images of different classes. Batch size 1 is checked separately below.
    batch = cifar10.preprocess(decoded_images[0][[0, 1500, 3200, 5100, 8700]])

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()

    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    assert not list(path.parent.glob("*.data"))
    np.testing.assert_allclose(session.run(None, {"input": batch})[0], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(session.run(None, {"input": batch[:1]})[0], expected[:1], rtol=0, atol=1e-4)


@pytest.mark.real_data
def test_resnet20_onnx_graph_is_plain(export_module, resnet20_export):
    onnx = pytest.importorskip("onnx")
    _, path = resnet20_export

    exported = onnx.load(str(path))
    histogram = export_module.op_histogram(path)
    initializer_names = {tensor.name for tensor in exported.graph.initializer}

    assert histogram["Conv"] == 19
    assert histogram["Relu"] == 19
    assert histogram["Add"] == 9
    assert histogram["Pad"] == 2
    assert set(histogram) <= {
        "Conv", "BatchNormalization", "Relu", "Add", "Slice", "Pad", "ReduceMean", "Reshape",
        "Gemm", "Constant", "Concat", "Shape", "Squeeze",
    }
    assert "layer1.0.conv1.weight" in initializer_names
    assert "layer1.0.bn1.weight" in initializer_names
    assert histogram["BatchNormalization"] == 19
    assert not [node.name for node in exported.graph.node if node.metadata_props]


@pytest.mark.real_data
def test_resnet56_onnx_test_split_accuracy(export_module, decoded_images, tmp_path):
    pytest.importorskip("onnxruntime")
    model = load_model(export_module, 56)
    path = tmp_path / "resnet56.onnx"
    images, labels = decoded_images
    _, test_indices = cifar10.split_indices()

    export_module.export_onnx(model, path)
    accuracy = cifar10.evaluate_onnx(path, images[test_indices], labels[test_indices])

    # 83.20% measured with ONNX Runtime 1.32 on CPU (7,894 of 9,488 images).
    assert accuracy == pytest.approx(83.20, abs=0.05)


def test_load_pretrained_missing_checkpoint(export_module, tmp_path):
    with pytest.raises(FileNotFoundError, match="GRAIL_DATA_DIR") as error:
        export_module.load_pretrained(20, root=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_build_resnet_rejects_bad_depth(export_module):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        export_module.build_resnet(21)


def test_export_cli_rejects_input_as_output(export_module, tmp_path):
    weights_dir = tmp_path / export_module.WEIGHTS_SUBDIR
    weights_dir.mkdir()
    checkpoint = weights_dir / "resnet20-00000000.th"
    checkpoint.write_bytes(b"not a checkpoint")

    with pytest.raises(SystemExit) as exit_info:
        export_module.main(["--depth", "20", "-o", str(checkpoint), "--data-dir", str(tmp_path)])

    assert exit_info.value.code == 2
    assert checkpoint.read_bytes() == b"not a checkpoint"
