"""CIFAR-10 evaluation protocol for the JPEG copy of the CIFAR-10 test set.

The data root is GRAIL_DATA_DIR, or ``../shared/data`` next to the repository
root when the variable is unset. Inside it, ``cifar10-test-jpeg/`` contains

* ``cifar10_test_jpeg_decoded.npz``: ``x`` uint8 (10000, 32, 32, 3) RGB HWC and
  ``y`` uint8 labels, decoded with Pillow in class-major, file-name order;
* ``cifar10_test_jpeg.tar``: the original JPEG bytes, members
  ``test/<class>/<NNNN>.jpg``, so npz index ``i`` is member
  ``test/{CLASSES[i // 1000]}/{i % 1000:04d}.jpg``.

These images are JPEG-compressed (quality about 75, 4:2:0 chroma), so models
score about 10 points lower on them than on the lossless CIFAR-10 test set.
Compare a model before and after compression on the same split. Do not quote
the numbers as CIFAR-10 test accuracy.

Protocol: ``torch.randperm(10000, generator=torch.Generator().manual_seed(0))``
shuffles the 10,000 indices. The first 512 indices form the calibration set
and the other 9,488 the test set.

Only ``load_split`` and ``split_indices`` need torch. ``evaluate_onnx`` needs
onnxruntime and ``read_jpeg_folder`` needs Pillow.

Usage::

    python -m tools.cifar10 --out-dir out/cifar10
    python -m tools.cifar10 --sample-dir models/cifar10-sample
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "GRAIL_DATA_DIR"
DATASET_SUBDIR = "cifar10-test-jpeg"
DECODED_NPZ = "cifar10_test_jpeg_decoded.npz"
JPEG_TAR = "cifar10_test_jpeg.tar"

# Standard CIFAR-10 label order, which is also the alphabetical folder order.
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGES_PER_CLASS = 1000
NUM_IMAGES = 10_000
NUM_CALIB = 512
SPLIT_SEED = 0

# ImageNet statistics. The akamaster CIFAR-10 ResNets were trained with these,
# not with CIFAR-10's own mean and std.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the data root: ``root`` if given, else GRAIL_DATA_DIR, else ../shared/data."""
    if root is not None:
        return Path(root)

    env_value = os.environ.get(DATA_DIR_ENV)
    if env_value:
        return Path(env_value)
    return REPO_ROOT.parent / "shared" / "data"


def dataset_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the folder that contains the CIFAR-10 JPEG test set."""
    return data_dir(root) / DATASET_SUBDIR


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 test data not found: {path}. "
            f"Set {DATA_DIR_ENV} to the folder that contains {DATASET_SUBDIR}/ "
            f"or pass the data root explicitly."
        )
    return path


def preprocess(images: np.ndarray) -> np.ndarray:
    """Convert uint8 RGB images (N, H, W, 3) to normalised float32 (N, 3, H, W)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )

    scaled = images.astype(np.float32) / np.float32(255.0)
    normalised = (scaled - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2), dtype=np.float32)


def load_decoded(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load all 10,000 decoded test images (uint8 NHWC) and their labels (uint8)."""
    path = _require_file(dataset_dir(root) / DECODED_NPZ)
    with np.load(path) as archive:
        images = archive["x"]
        labels = archive["y"]

    if images.shape != (NUM_IMAGES, 32, 32, 3) or labels.shape != (NUM_IMAGES,):
        raise ValueError(
            f"{path}: expected x (10000, 32, 32, 3) and y (10000,), "
            f"got x {images.shape} and y {labels.shape}"
        )
    return images, labels


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Return the protocol's calibration (512) and test (9,488) indices. Needs torch."""
    import torch

    generator = torch.Generator().manual_seed(SPLIT_SEED)
    permutation = torch.randperm(NUM_IMAGES, generator=generator).numpy()
    return permutation[:NUM_CALIB], permutation[NUM_CALIB:]


def load_split(
    root: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(calib_x, calib_y, test_x, test_y)``, images uint8 NHWC. Needs torch."""
    images, labels = load_decoded(root)
    calib_indices, test_indices = split_indices()
    return (
        images[calib_indices],
        labels[calib_indices],
        images[test_indices],
        labels[test_indices],
    )


def tar_member_name(index: int) -> str:
    """Return the name of the tar member that contains npz image ``index``."""
    if not 0 <= index < NUM_IMAGES:
        raise IndexError(f"image index {index} is outside 0..{NUM_IMAGES - 1}")

    class_name = CLASSES[index // IMAGES_PER_CLASS]
    return f"test/{class_name}/{index % IMAGES_PER_CLASS:04d}.jpg"


def read_jpeg_bytes(
    indices: np.ndarray | list[int], root: str | os.PathLike | None = None
) -> list[bytes]:
    """Read the original JPEG bytes of the given npz indices from the tar."""
    path = _require_file(dataset_dir(root) / JPEG_TAR)
    with tarfile.open(path) as archive:
        contents = []
        for index in indices:
            member = archive.extractfile(tar_member_name(int(index)))
            if member is None:
                raise ValueError(f"{path}: {tar_member_name(int(index))} is not a regular file")
            contents.append(member.read())
    return contents


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to a uint8 RGB (H, W, 3) array with Pillow, as the npz was made."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def read_jpeg_folder(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``folder/<class_name>/*.jpg`` into uint8 NHWC images and int64 labels.

    Subfolder names must be CIFAR-10 class names. Files are read in sorted
    order, class by class in label order.
    """
    folder = Path(folder)
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in CLASSES)
    if unknown:
        raise ValueError(f"{folder}: subfolders {unknown} are not CIFAR-10 class names {CLASSES}")

    images = []
    labels = []
    for label, class_name in enumerate(CLASSES):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.glob("*.jpg")):
            images.append(decode_jpeg(path.read_bytes()))
            labels.append(label)

    if not images:
        raise FileNotFoundError(f"no <class_name>/*.jpg images found under {folder}")
    return np.stack(images), np.array(labels, dtype=np.int64)


def evaluate_onnx(
    model_path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 500,
) -> float:
    """Return the top-1 accuracy (%) of an ONNX classifier in ONNX Runtime on CPU.

    ``images`` are uint8 NHWC and are preprocessed here. The model must have
    one input and return logits (N, 10) as its first output.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    correct = 0
    for start in range(0, len(images), batch_size):
        batch = preprocess(images[start : start + batch_size])
        logits = session.run(None, {input_name: batch})[0]
        correct += int((logits.argmax(axis=1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / len(images)


def temporary_path_for(path: Path) -> Path:
    """Return a hidden name next to ``path`` to write to before renaming it to ``path``.

    The name is unique per process, and unlike tempfile's names the file or
    folder gets the usual umask permissions.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_npz(
    path: str | os.PathLike,
    input_name: str,
    images: np.ndarray,
    labels: np.ndarray | None = None,
) -> None:
    """Write ``{input_name: preprocess(images)}`` and int64 ``labels`` to an .npz file.

    The file is written to a temporary name in the same folder and then renamed,
    so a reader never sees a partial file.
    """
    path = Path(path)
    if input_name == "labels":
        raise ValueError("input_name 'labels' clashes with the labels array. Use another name.")

    arrays = {input_name: preprocess(images)}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"expected {len(images)} labels, got shape {labels.shape}")
        arrays["labels"] = labels

    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = temporary_path_for(path)
    try:
        with open(temp_path, "xb") as temp_file:
            np.savez(temp_file, **arrays)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _check_replaceable_sample(folder: Path) -> None:
    # write_sample deletes an existing sample folder, so make sure it is one.
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder. Choose another --sample-dir.")

    unexpected = sorted(p.name for p in folder.iterdir() if p.name not in ("calib", "eval"))
    if unexpected:
        raise FileExistsError(
            f"{folder} exists and is not a sample folder (unexpected entries: {unexpected}). "
            f"Remove it or choose another --sample-dir."
        )


def write_sample(
    out_dir: str | os.PathLike,
    num_calib: int = 256,
    num_eval: int = 500,
    root: str | os.PathLike | None = None,
) -> None:
    """Copy original JPEG bytes of the protocol's first images into a small sample folder.

    ``out_dir/calib/`` gets the first ``num_calib`` calibration images as
    ``<rank>_<class_name>.jpg``. ``out_dir/eval/<class_name>/`` gets the first
    ``num_eval`` test images as ``<rank>.jpg``, where rank is the position in
    the protocol split. The folder is built under a temporary name and replaces
    ``out_dir`` at the end.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        _check_replaceable_sample(out_dir)

    calib_indices, test_indices = split_indices()
    if not 0 <= num_calib <= len(calib_indices) or not 0 <= num_eval <= len(test_indices):
        raise ValueError(
            f"sample sizes must be within 0..{len(calib_indices)} (calib) and "
            f"0..{len(test_indices)} (eval), got {num_calib} and {num_eval}"
        )
    calib_indices = calib_indices[:num_calib]
    test_indices = test_indices[:num_eval]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = temporary_path_for(out_dir)
    temp_dir.mkdir()
    try:
        calib_dir = temp_dir / "calib"
        calib_dir.mkdir()
        for rank, (index, data) in enumerate(zip(calib_indices, read_jpeg_bytes(calib_indices, root))):
            class_name = CLASSES[index // IMAGES_PER_CLASS]
            (calib_dir / f"{rank:05d}_{class_name}.jpg").write_bytes(data)

        for rank, (index, data) in enumerate(zip(test_indices, read_jpeg_bytes(test_indices, root))):
            class_dir = temp_dir / "eval" / CLASSES[index // IMAGES_PER_CLASS]
            class_dir.mkdir(parents=True, exist_ok=True)
            (class_dir / f"{rank:05d}.jpg").write_bytes(data)

        if out_dir.exists():
            _check_replaceable_sample(out_dir)
            shutil.rmtree(out_dir)
        os.replace(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def write_outputs(args: argparse.Namespace) -> None:
    """Write the .npz split and the JPEG sample that the parsed command line requests."""
    if args.out_dir is not None:
        calib_x, _, test_x, test_y = load_split(args.data_dir)
        write_npz(args.out_dir / "calib.npz", args.input_name, calib_x)
        write_npz(args.out_dir / "test.npz", args.input_name, test_x, test_y)
        print(f"wrote {args.out_dir / 'calib.npz'} ({len(calib_x)} images)")
        print(f"wrote {args.out_dir / 'test.npz'} ({len(test_x)} images with labels)")

    if args.sample_dir is not None:
        write_sample(args.sample_dir, args.sample_calib, args.sample_eval, args.data_dir)
        print(
            f"wrote {args.sample_dir} ({args.sample_calib} calibration and "
            f"{args.sample_eval} test JPEGs)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.cifar10",
        description=(
            "Write the CIFAR-10 JPEG protocol split as preprocessed .npz files "
            "(calib.npz: 512 images, test.npz: 9,488 images with labels), "
            "or copy a small JPEG sample of it."
        ),
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="folder to write calib.npz and test.npz to",
    )
    parser.add_argument(
        "--input-name",
        default="input",
        help="array name for the images in the .npz files, i.e. the model's input name (default: input)",
    )
    parser.add_argument(
        "--sample-dir",
        type=Path,
        help="folder to write the JPEG sample to, as calib/ and eval/<class_name>/ (an existing sample folder is replaced)",
    )
    parser.add_argument(
        "--sample-calib",
        type=int,
        default=256,
        help="number of calibration images in the sample (default: 256)",
    )
    parser.add_argument(
        "--sample-eval",
        type=int,
        default=500,
        help="number of test images in the sample (default: 500)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"data root that contains {DATASET_SUBDIR}/ (default: ${DATA_DIR_ENV} or ../shared/data)",
    )
    args = parser.parse_args(argv)

    if args.out_dir is None and args.sample_dir is None:
        parser.error("nothing to do: give --out-dir, --sample-dir or both")

    try:
        write_outputs(args)
    except (FileNotFoundError, FileExistsError) as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
