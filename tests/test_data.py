"""Tests of the calibration and evaluation data readers in grail_graph.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grail_graph.data import IMAGENET_MEAN, IMAGENET_STD, Dataset, ImageOptions, InputSpec, load_dataset
from grail_graph.errors import DataError

FLOAT32 = np.dtype(np.float32)
IMAGE_SPEC = InputSpec("input", FLOAT32, (None, 3, 8, 8))
DYNAMIC_SPEC = InputSpec("input", FLOAT32, (None, 3, None, None))
NHWC_SPEC = InputSpec("input", FLOAT32, (None, 8, 8, 3))
TWO_INPUTS = [InputSpec("image", FLOAT32, (None, 3, 4, 4)), InputSpec("mask", np.dtype(np.int64), (None, 4))]


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def normalized(rgb: tuple[int, int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def data_error(path: Path, specs: list[InputSpec], options: ImageOptions | None = None) -> str:
    with pytest.raises(DataError) as caught:
        load_dataset(path, specs, options)
    return str(caught.value)


# Arrays ---------------------------------------------------------------------------------------


def test_npz_reads_arrays_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((5, 3, 4, 4))
    mask = rng.integers(0, 2, (5, 4)).astype(np.int32)
    np.savez(tmp_path / "data.npz", image=image, mask=mask, labels=np.arange(5, dtype=np.int16))

    dataset = load_dataset(tmp_path / "data.npz", TWO_INPUTS)

    assert len(dataset) == 5
    assert dataset.arrays["image"].dtype == np.float32
    np.testing.assert_allclose(dataset.arrays["image"], image.astype(np.float32))
    assert dataset.arrays["mask"].dtype == np.int64
    np.testing.assert_array_equal(dataset.arrays["mask"], mask)
    assert dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.labels, np.arange(5))
    assert dataset.source == str(tmp_path / "data.npz")


def test_npz_without_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", input=np.zeros((2, 3, 8, 8), np.float32))

    assert load_dataset(tmp_path / "data.npz", [IMAGE_SPEC]).labels is None


def test_npy_reads_single_input(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 8 * 8, dtype=np.float64).reshape(2, 3, 8, 8) / 7.0
    np.save(tmp_path / "data.npy", array)

    dataset = load_dataset(tmp_path / "data.npy", [IMAGE_SPEC])

    assert dataset.labels is None
    assert dataset.arrays["input"].dtype == np.float32
    np.testing.assert_array_equal(dataset.arrays["input"], array.astype(np.float32))


def test_integer_data_for_float_input_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "pixels.npy", np.zeros((2, 3, 8, 8), np.uint8))

    with pytest.raises(DataError, match=r"integer dtype uint8, but the model expects float32") as caught:
        load_dataset(tmp_path / "pixels.npy", [IMAGE_SPEC])

    assert "divided by 255" in str(caught.value)


def test_npy_rejects_two_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "data.npy", np.zeros((2, 3, 4, 4), np.float32))

    message = data_error(tmp_path / "data.npy", TWO_INPUTS)

    assert "['image', 'mask']" in message
    assert "Use an .npz file keyed by input name" in message


def test_dynamic_batch_accepts_any_count(tmp_path: Path) -> None:
    np.save(tmp_path / "data.npy", np.zeros((13, 3, 8, 8), np.float32))

    assert len(load_dataset(tmp_path / "data.npy", [IMAGE_SPEC])) == 13


@pytest.mark.parametrize(
    "arrays, fragments",
    [
        ({"data": np.zeros((2, 3, 8, 8), np.float32)}, ["['data']", "['input']", "missing: ['input']"]),
        ({"input": np.zeros((2, 3, 16, 16), np.float32)}, ["(2, 3, 16, 16)", "(N, 3, 8, 8)"]),
        ({"input": np.zeros((3, 8, 8), np.float32)}, ["(3, 8, 8)", "rank 4"]),
        ({"input": np.full((2, 3, 8, 8), "a")}, ["dtype <U1", "float32"]),
        ({"input": np.zeros((2, 3, 8, 8), np.complex64)}, ["dtype complex64", "float32"]),
        ({"input": np.zeros((0, 3, 8, 8), np.float32)}, ["non-zero number of samples", "[0]"]),
    ],
)
def test_npz_mismatch_is_rejected(tmp_path: Path, arrays: dict, fragments: list[str]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)

    message = data_error(tmp_path / "bad.npz", [IMAGE_SPEC])

    assert "bad.npz" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(tmp_path: Path, value: float) -> None:
    array = np.zeros((3, 3, 8, 8), np.float32)
    array[1, 2, 3, 4] = value
    np.save(tmp_path / "bad.npy", array)

    message = data_error(tmp_path / "bad.npy", [IMAGE_SPEC])

    assert "1 NaN or Inf values" in message
    assert "(1, 2, 3, 4)" in message


def test_unequal_sample_counts_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", image=np.zeros((3, 3, 4, 4)), mask=np.zeros((2, 4), np.int64))

    assert "got [2, 3]" in data_error(tmp_path / "bad.npz", TWO_INPUTS)


def test_float_for_integer_input_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 3, 4, 4)), mask=np.zeros((2, 4), np.float32))

    assert "input 'mask' has dtype float32, but the model expects int64" in data_error(tmp_path / "bad.npz", TWO_INPUTS)


@pytest.mark.parametrize(
    "labels, fragment",
    [
        (np.zeros(3, np.int64), "'labels' has shape (3,), expected (2,)"),
        (np.zeros(2, np.float32), "'labels' must be a 1-D integer array, got float32"),
        (np.zeros((2, 1), np.int64), "got int64 (2, 1)"),
    ],
)
def test_bad_labels_are_rejected(tmp_path: Path, labels: np.ndarray, fragment: str) -> None:
    np.savez(tmp_path / "bad.npz", input=np.zeros((2, 3, 8, 8), np.float32), labels=labels)

    assert fragment in data_error(tmp_path / "bad.npz", [IMAGE_SPEC])


@pytest.mark.parametrize("name, content", [("bad.npz", b""), ("bad.npz", b"PK\x03\x04junk"), ("bad.npy", b"")])
def test_unreadable_array_file_is_rejected(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)

    message = data_error(tmp_path / name, [IMAGE_SPEC])

    assert f"is not a readable {Path(name).suffix} file" in message


def test_truncated_npz_is_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "full.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    (tmp_path / "bad.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:200])

    assert "is not a readable .npz file" in data_error(tmp_path / "bad.npz", [IMAGE_SPEC])


def test_pickled_npy_is_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.array([None, 1], dtype=object), allow_pickle=True)

    assert "is not a readable .npy file" in data_error(tmp_path / "bad.npy", [IMAGE_SPEC])


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    message = data_error(tmp_path / "absent.npz", [IMAGE_SPEC])

    assert "absent.npz" in message
    assert "not found" in message


def test_unknown_suffix_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")

    message = data_error(tmp_path / "data.csv", [IMAGE_SPEC])

    assert "unknown format" in message
    assert ".npz" in message


# Image folders ------------------------------------------------------------------------------


def test_flat_image_folder_has_no_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png", (255, 0, 0))
    write_image(tmp_path / "a.png", (0, 255, 0))

    dataset = load_dataset(tmp_path, [IMAGE_SPEC])

    assert dataset.labels is None
    assert dataset.arrays["input"].shape == (2, 3, 8, 8)
    assert dataset.arrays["input"].dtype == np.float32
    # Files are read in sorted order, so a.png (green) comes first.
    np.testing.assert_allclose(dataset.arrays["input"][0, :, 0, 0], normalized((0, 255, 0)), rtol=1e-6)


def test_class_folders_give_sorted_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "dog" / "1.png", (10, 10, 10))
    write_image(tmp_path / "cat" / "1.png", (20, 20, 20))
    write_image(tmp_path / "cat" / "2.png", (30, 30, 30))
    write_image(tmp_path / "emu" / "1.png", (40, 40, 40))

    dataset = load_dataset(tmp_path, [IMAGE_SPEC])

    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 2])
    red = [normalized((value, value, value))[0] for value in (20, 30, 10, 40)]
    np.testing.assert_allclose(dataset.arrays["input"][:, 0, 0, 0], red, rtol=1e-6)


def test_mixed_folder_has_no_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "1.png", (0, 0, 0))
    write_image(tmp_path / "loose.png", (0, 0, 0))

    assert load_dataset(tmp_path, [IMAGE_SPEC]).labels is None


def test_nested_folders_have_no_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "tabby" / "1.png", (0, 0, 0))
    write_image(tmp_path / "dog" / "1.png", (0, 0, 0))

    assert load_dataset(tmp_path, [IMAGE_SPEC]).labels is None


def test_mean_and_std_are_applied(tmp_path: Path) -> None:
    rgb = (255, 51, 102)
    write_image(tmp_path / "a.png", rgb)
    options = ImageOptions(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))

    pixels = load_dataset(tmp_path, [IMAGE_SPEC], options).arrays["input"][0]

    expected = np.array([(1.0 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.4 / 2.0], np.float32)
    np.testing.assert_allclose(pixels[:, 3, 5], expected, rtol=1e-5)
    assert np.ptp(pixels.reshape(3, -1), axis=1).max() == 0.0


def test_image_is_resized_to_model_size(tmp_path: Path) -> None:
    write_image(tmp_path / "large.png", (0, 0, 255), size=(20, 30))

    dataset = load_dataset(tmp_path, [IMAGE_SPEC])

    assert dataset.arrays["input"].shape == (1, 3, 8, 8)
    np.testing.assert_allclose(dataset.arrays["input"][0, :, 4, 4], normalized((0, 0, 255)), rtol=1e-6)


def test_image_size_overrides_dynamic_dims(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (1, 2, 3), size=(9, 9))
    write_image(tmp_path / "b.png", (1, 2, 3), size=(40, 20))

    dataset = load_dataset(tmp_path, [DYNAMIC_SPEC], ImageOptions(size=16))

    assert dataset.arrays["input"].shape == (2, 3, 16, 16)


def test_image_size_must_match_static_dims(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (1, 2, 3))

    message = data_error(tmp_path, [IMAGE_SPEC], ImageOptions(size=16))

    assert "(1, 3, 16, 16)" in message
    assert "(N, 3, 8, 8)" in message


def test_dynamic_dims_need_image_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (1, 2, 3))

    message = data_error(tmp_path, [DYNAMIC_SPEC])

    assert "input 'input' has no fixed square image size" in message
    assert "--image-size" in message


def test_non_square_input_needs_image_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (1, 2, 3))

    assert "--image-size" in data_error(tmp_path, [InputSpec("input", FLOAT32, (None, 3, 8, 16))])


def test_channels_last_input_gets_nhwc(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (255, 0, 0))

    array = load_dataset(tmp_path, [NHWC_SPEC]).arrays["input"]

    assert array.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(array[0, 2, 2], normalized((255, 0, 0)), rtol=1e-6)


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 8), (128, 128, 128, 7)).save(tmp_path / "rgba.png")

    array = load_dataset(tmp_path, [IMAGE_SPEC]).arrays["input"]

    assert array.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(array[0], array[1])


def test_non_image_files_are_ignored(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (0, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")

    assert len(load_dataset(tmp_path, [IMAGE_SPEC])) == 1


def test_unreadable_image_is_rejected(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (0, 0, 0))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")

    message = data_error(tmp_path, [IMAGE_SPEC])

    assert "broken.jpg" in message
    assert "cannot be read" in message
    assert "Remove or replace the file" in message


def test_empty_folder_is_rejected(tmp_path: Path) -> None:
    message = data_error(tmp_path, [IMAGE_SPEC])

    assert "contains no images" in message
    assert ".png" in message


@pytest.mark.parametrize(
    "specs, fragment",
    [
        ([InputSpec("tokens", np.dtype(np.int64), (None, 16))], "input 'tokens' is int64 (N, 16)"),
        (TWO_INPUTS, "this one has 2 inputs"),
    ],
)
def test_image_folder_needs_one_image_input(tmp_path: Path, specs: list[InputSpec], fragment: str) -> None:
    write_image(tmp_path / "a.png", (0, 0, 0))

    assert fragment in data_error(tmp_path, specs)


# Dataset --------------------------------------------------------------------------------------


def test_dataset_batches_and_subset() -> None:
    dataset = Dataset({"input": np.arange(10.0).reshape(10, 1)}, np.arange(10), "memory")

    batches = list(dataset.batches(4))
    tail = dataset.subset(7)

    assert [batch["input"].shape[0] for batch in batches] == [4, 4, 2]
    assert dataset.num_batches(4) == 3
    assert len(tail) == 3
    np.testing.assert_array_equal(tail.labels, [7, 8, 9])
    assert len(dataset.subset(2, 5)) == 3
