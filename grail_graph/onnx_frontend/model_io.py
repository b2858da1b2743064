"""Loading and saving ONNX models, with or without external data, atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from grail_graph.errors import GrailError, UnsupportedModelError

# Protobuf cannot serialise a message above 2 GiB, so larger models keep their
# weights in a side file next to the .onnx file.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Tensors at or above this size move to the side file when external data is used.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (external data is read lazily from beside the file)."""
    path = Path(path)
    if not path.is_file():
        raise GrailError(f"model file {str(path)!r} not found", "Check the path.")
    invalid = f"model file {str(path)!r} is not a valid ONNX model"
    fix = "Pass an .onnx file written by an ONNX exporter."
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises several unrelated types on bad bytes
        raise UnsupportedModelError(f"{invalid} ({type(error).__name__}: {error})", fix) from error
    # Protobuf parses an empty file (and some other junk) as an empty model.
    if len(model.graph) == 0 or not model.graph.outputs:
        raise UnsupportedModelError(f"{invalid} (it has no nodes or no outputs)", fix)
    return model


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """Return the external data files that the model at `path` reads its weights from."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / location for location in sorted(locations)]


def model_size_bytes(model: ir.Model) -> int:
    """Return the total byte size of the model's initializers."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    overwrite_guard: tuple[Path, ...] = (),
    external_data: bool | None = None,
) -> list[Path]:
    """Write `model` to `path` atomically and return the files written.

    With `external_data` True, or None and weights above half the protobuf limit, the
    tensors of at least EXTERNAL_DATA_THRESHOLD_BYTES go to an external data file
    `<name>.data` next to `path`. Files are written to a temporary folder in the
    destination directory and renamed into place, data file first, so a reader never
    sees a half-written model. `overwrite_guard` lists input files that must not be
    replaced.
    """
    path = Path(path)
    data_name = path.name + ".data"
    external = model_size_bytes(model) > PROTOBUF_LIMIT_BYTES // 2 if external_data is None else external_data
    targets = [path] + ([path.with_name(data_name)] if external else [])
    guarded = {guard.resolve() for guard in overwrite_guard}
    for target in targets:
        if target.resolve() in guarded:
            raise GrailError(
                f"output path {str(target)!r} is an input file", "Choose another output path with -o."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external:
        # Without `external_data`, ir.save (onnx-ir 1.1) writes a tensor still backed by
        # the source's data file as a reference to that file's relative location, which
        # does not exist beside `path`. Loading such tensors into memory embeds them instead.
        ir.external_data.load_to_model(model)

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".grail-tmp-") as tmp:
        tmp_path = Path(tmp) / path.name
        ir.save(
            model,
            tmp_path,
            external_data=data_name if external else None,
            size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES,
        )
        if external:
            os.replace(Path(tmp) / data_name, path.with_name(data_name))
        os.replace(tmp_path, path)
    return targets


def check_model_file(path: str | os.PathLike) -> None:
    """Run the ONNX checker with shape inference on a saved model."""
    onnx.checker.check_model(str(path), full_check=True)
