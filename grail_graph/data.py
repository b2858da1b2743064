"""Calibration and evaluation data: arrays keyed by input name, or a folder of images.

Every reader returns a `Dataset` whose arrays were checked once against the model's
inputs (names, ranks, static dimensions, dtypes, finite values), so the passes can trust
them.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grail_graph.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"})
LABELS_KEY = "labels"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, dtype and shape (None marks a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing of an image folder: RGB in [0, 1], then (x - mean) / std."""

    size: int | None = None
    """Square side in pixels; None takes it from the model's static input shape."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass
class Dataset:
    """Model inputs with a shared leading sample axis, and optional integer labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    text: bool = False
    """True when the samples are token windows cut from a text, scored by perplexity."""

    def __len__(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {name: array[start : start + batch_size] for name, array in self.arrays.items()}

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def subset(self, start: int, stop: int | None = None) -> Dataset:
        labels = None if self.labels is None else self.labels[start:stop]
        arrays = {name: array[start:stop] for name, array in self.arrays.items()}
        return Dataset(arrays, labels, self.source, self.text)


def infer_input_specs(path: str | Path, images: ImageOptions | None = None) -> list[InputSpec]:
    """Derive input specs from a data file, for models that do not declare their inputs.

    Arrays keep their trailing shape with a dynamic sample axis; floating arrays become
    float32. An image folder needs `images.size` and gives one (N, 3, size, size) input.
    """
    path = Path(path)
    if path.is_dir():
        if images is None or images.size is None:
            raise DataError(f"the input size for image folder {str(path)!r} is unknown", "Give it with --image-size.")
        return [InputSpec("input", np.dtype(np.float32), (None, 3, images.size, images.size))]
    if path.suffix == ".npy":
        arrays = {"input": np.load(path, mmap_mode="r", allow_pickle=False)}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files if key != LABELS_KEY}
    else:
        raise DataError(f"cannot derive model inputs from {str(path)!r}", "Pass an .npz or .npy file, or an image folder.")
    specs = []
    for name, array in arrays.items():
        dtype = np.dtype(np.float32) if np.issubdtype(array.dtype, np.floating) else array.dtype
        specs.append(InputSpec(name, dtype, (None, *array.shape[1:])))
    return specs


def load_dataset(
    path: str | Path, specs: Sequence[InputSpec], images: ImageOptions | None = None, role: str = "calibration"
) -> Dataset:
    """Read `path` (.npz, .npy or an image folder) and check it against `specs`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} data {str(path)!r} not found", "Check the path.")
    if path.is_dir():
        arrays, labels = _read_image_folder(path, specs, images or ImageOptions(), role)
    elif path.suffix == ".npz":
        arrays, labels = _read_npz(path, specs, role)
    elif path.suffix == ".npy":
        arrays, labels = _read_npy(path, specs, role)
    else:
        raise DataError(
            f"{role} data {str(path)!r} has an unknown format",
            "Pass an .npz file keyed by input name, an .npy file, or a folder of images.",
        )
    dataset = Dataset(check_arrays(arrays, specs, str(path)), labels, str(path))
    if labels is not None and labels.shape != (len(dataset),):
        raise DataError(f"{path}: 'labels' has shape {labels.shape}, expected ({len(dataset)},)")
    return dataset


def _read_npz(path: Path, specs: Sequence[InputSpec], role: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{role} data {str(path)!r} is not a readable .npz file ({error})", "Write it with numpy.savez."
        ) from error
    labels = arrays.pop(LABELS_KEY, None)
    expected = [spec.name for spec in specs]
    unknown = sorted(set(arrays) - set(expected))
    missing = [name for name in expected if name not in arrays]
    if unknown or missing:
        raise DataError(
            f"{path}: arrays {unknown or '[]'} do not match the model inputs {expected} "
            f"(missing: {missing or 'none'})",
            f"Save one array per model input under its name, plus optional '{LABELS_KEY}'.",
        )
    return arrays, None if labels is None else _check_labels(labels, path)


def _read_npy(path: Path, specs: Sequence[InputSpec], role: str) -> tuple[dict[str, np.ndarray], None]:
    if len(specs) != 1:
        names = [spec.name for spec in specs]
        raise DataError(
            f"{path}: an .npy file holds one array but the model has inputs {names}",
            "Use an .npz file keyed by input name.",
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(
            f"{role} data {str(path)!r} is not a readable .npy file ({error})", "Write it with numpy.save."
        ) from error
    return {specs[0].name: array}, None


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{LABELS_KEY}' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def check_arrays(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec], source: str) -> dict[str, np.ndarray]:
    """Validate arrays against the model inputs and cast them to the input dtypes."""
    checked = {}
    sizes = set()
    for spec in specs:
        array = arrays[spec.name]
        where = f"{source}: input '{spec.name}'"
        if array.ndim != len(spec.shape) and spec.shape:
            raise DataError(
                f"{where} has shape {array.shape}, but the model expects rank {len(spec.shape)} {_show(spec.shape)}",
                "Stack the samples on a leading batch axis.",
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if want is not None and got != want and axis > 0:
                raise DataError(
                    f"{where} has shape {array.shape}, but the model expects {_show(spec.shape)}",
                    "Preprocess the samples to the model's input shape.",
                )
        checked[spec.name] = _cast(array, spec.dtype, where)
        sizes.add(array.shape[0] if array.ndim else 0)
    if len(sizes) != 1 or 0 in sizes:
        raise DataError(
            f"{source}: inputs must share a non-zero number of samples on axis 0, got {sorted(sizes)}",
            "Save at least one sample, and the same number for every input.",
        )
    return checked


def _cast(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        if np.issubdtype(array.dtype, np.integer):
            # Integer data for a float input is usually raw pixels that were never scaled.
            raise DataError(
                f"{where} has integer dtype {array.dtype}, but the model expects {dtype}",
                f"Scale and normalise the values the way the model expects (raw 8-bit pixels, for example, "
                f"are divided by 255), then save the array as {dtype}.",
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(
                f"{where} has dtype {array.dtype}, but the model expects {dtype}", f"Save the array as {dtype}."
            )
        bad = ~np.isfinite(array)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), array.shape)
            raise DataError(
                f"{where} contains {int(bad.sum())} NaN or Inf values (first at index {tuple(map(int, first))})",
                "Remove or repair those samples.",
            )
        return array.astype(dtype, copy=False)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.integer):
        return array.astype(dtype, copy=False)
    if dtype == np.bool_ and array.dtype == np.bool_:
        return array
    raise DataError(
        f"{where} has dtype {array.dtype}, but the model expects {dtype}", f"Save the array as {dtype}."
    )


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


# Image folders -----------------------------------------------------------------------------


def _image_layout(spec: InputSpec, options: ImageOptions) -> tuple[bool, int]:
    """Return (channels_first, side) for a single 4-D image input."""
    shape = spec.shape
    if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        raise DataError(
            f"image folders need one float input of rank 4, but input '{spec.name}' is {spec.dtype} {_show(shape)}",
            "Pass an .npz file keyed by input name instead.",
        )
    channels_first = shape[1] == 3 or shape[3] != 3
    spatial = shape[2:] if channels_first else shape[1:3]
    side = options.size
    if side is None:
        if None in spatial or spatial[0] != spatial[1]:
            raise DataError(
                f"input '{spec.name}' has no fixed square image size {_show(shape)}",
                "Give the size with --image-size.",
            )
        side = spatial[0]
    return channels_first, side


def _read_image_folder(
    folder: Path, specs: Sequence[InputSpec], options: ImageOptions, role: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    from PIL import Image, UnidentifiedImageError

    if len(specs) != 1:
        raise DataError(f"image folders work for single-input models, this one has {len(specs)} inputs")
    spec = specs[0]
    channels_first, side = _image_layout(spec, options)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{role} folder {str(folder)!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    images = np.empty((len(files), side, side, 3), dtype=np.float32)
    for index, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
                if image.size != (side, side):
                    image = image.resize((side, side), Image.Resampling.BILINEAR)
                images[index] = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"image {str(file)!r} cannot be read ({error})", "Remove or replace the file.") from error
    images = (images - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    if channels_first:
        images = images.transpose(0, 3, 1, 2)
    return {spec.name: np.ascontiguousarray(images)}, _folder_labels(folder, files)


def _folder_labels(folder: Path, files: list[Path]) -> np.ndarray | None:
    """Return class labels when every image sits in a class subfolder, else None."""
    parents = [file.parent for file in files]
    if any(parent.parent != folder for parent in parents):
        return None
    classes = sorted({parent.name for parent in parents})
    index = {name: label for label, name in enumerate(classes)}
    return np.asarray([index[parent.name] for parent in parents], dtype=np.int64)
