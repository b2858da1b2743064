"""End-to-end tests of the grail-opt command line on the bundled ResNet-20 and tiny models."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from grail_graph.cli import main
from grail_graph.data import Dataset, InputSpec, load_dataset
from grail_graph.driver import tool_version
from grail_graph.onnx_frontend import model_io
from grail_graph.passes.transform import Rewrite

REPO = Path(__file__).resolve().parents[1]
RESNET = REPO / "models" / "resnet20_cifar10.onnx"
CALIB = REPO / "models" / "cifar10-sample" / "calib"
EVAL = REPO / "models" / "cifar10-sample" / "eval"
RESNET_SPEC = InputSpec("input", np.dtype(np.float32), (None, 3, 32, 32))
# models/README.md reports 81.80% with ONNX Runtime 1.32.0 and Pillow 13.0.0. Other JPEG
# decoders may change a few of the 500 predictions, so the tests allow 0.01 either way.
RESNET_SAMPLE_ACCURACY = 0.818
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


# Helpers ------------------------------------------------------------------------------------


@dataclass
class CliRun:
    """Exit code, captured streams and JSON report of one in-process `grail-opt` call."""

    code: int
    out: str
    err: str
    output: Path
    report: dict[str, Any] | None


def run_resnet(folder: Path, *extra: str) -> CliRun:
    """Compress the bundled ResNet-20 into `folder` with the given extra options."""
    output = folder / "small.onnx"
    report = folder / "report.json"
    argv = [str(RESNET), "--calib", str(CALIB), "-o", str(output), "--report", str(report), "--latency-runs", "0"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main([*argv, *extra])
    content = json.loads(report.read_text()) if report.exists() else None
    return CliRun(code, stdout.getvalue(), stderr.getvalue(), output, content)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def logits(model: Path, data: Dataset) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, data.arrays)[0]


def parameter_count(model: Path) -> int:
    """Count the elements of float initializers, because integer shape constants are not parameters."""
    tensors = onnx.load(str(model)).graph.initializer
    return sum(int(np.prod(tensor.dims)) for tensor in tensors if tensor.data_type == TensorProto.FLOAT)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_conv_model(path: Path, height: int | None = 8, width: int | None = 8) -> Path:
    """Write Conv(3->6), Relu, Conv(6->4), GlobalAveragePool and Flatten, which has one group of width 6."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 6, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["z"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["z"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["y"], name="flatten"),
    ]
    shape = ["N", 3, height if height is not None else "H", width if width is not None else "W"]
    graph = helper.make_graph(
        nodes,
        "tiny_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def make_gemm_model(path: Path) -> Path:
    """Write one Gemm whose output is the graph output, so nothing can be compressed."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1)],
        "single_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def conv_samples(path: Path, count: int = 32) -> Path:
    np.save(path, np.random.default_rng(1).standard_normal((count, 3, 8, 8)).astype(np.float32))
    return path


# Bundled ResNet-20 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data() -> Dataset:
    return load_dataset(EVAL, [RESNET_SPEC])


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    return run_resnet(tmp_path_factory.mktemp("ridge"), "--eval", str(EVAL), "--sparsity", "0.5")


@pytest.fixture(scope="module")
def slicing_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    folder = tmp_path_factory.mktemp("slicing")
    return run_resnet(folder, "--eval", str(EVAL), "--sparsity", "0.5", "--compensation", "none")


def test_resnet_writes_runnable_model(ridge_run: CliRun, eval_data: Dataset) -> None:
    assert ridge_run.code == 0
    assert ridge_run.err == ""
    assert ridge_run.output.is_file()

    outputs = logits(ridge_run.output, eval_data)

    assert outputs.shape == (500, 10)
    assert np.isfinite(outputs).all()


def test_resnet_has_fewer_parameters(ridge_run: CliRun) -> None:
    before = parameter_count(RESNET)
    after = parameter_count(ridge_run.output)

    assert after < before
    assert ridge_run.report["validation"]["before"]["parameters"] == before
    assert ridge_run.report["validation"]["after"]["parameters"] == after
    assert ridge_run.report["validation"]["after"]["macs"] < ridge_run.report["validation"]["before"]["macs"]


def test_resnet_report_covers_candidates(ridge_run: CliRun) -> None:
    candidates = {node.name for node in onnx.load(str(RESNET)).graph.node if node.op_type in ("Conv", "Gemm")}
    groups = ridge_run.report["groups"]
    declined = ridge_run.report["declined"]

    producers = {producer for group in groups for producer in group["producers"]}
    # A declined candidate names every producer of its would-be group, joined by ", ".
    skipped = {name for record in declined for name in record["candidate"].split(", ")}
    assert producers | skipped == candidates
    assert not producers & skipped
    for group in groups:
        assert group["verdict"] == f"compressed: {group['width']} -> {group['kept']} channels"
        assert group["kept"] == group["width"] // 2
    for record in declined:
        assert record["reason"]
        assert record["verdict"] == f"skipped: {record['reason']}"


def test_resnet_report_pass_statistics(ridge_run: CliRun) -> None:
    passes = {record["pass"]: record for record in ridge_run.report["passes"]}
    groups = ridge_run.report["groups"]

    assert list(passes) == ["find-groups", "calibrate", "select", "compensate", "rewrite", "validate"]
    assert all(record["seconds"] >= 0 for record in passes.values())
    assert passes["find-groups"]["statistics"]["groups"] == len(groups)
    assert passes["calibrate"]["statistics"]["samples"] == 256
    assert passes["select"]["statistics"]["channels_removed"] == sum(g["width"] - g["kept"] for g in groups)
    assert passes["compensate"]["statistics"]["method"] == "ridge"
    assert passes["rewrite"]["changed"] is True
    assert passes["rewrite"]["statistics"]["groups_rewritten"] == len(groups)
    assert passes["select"]["options"] == {"method": "wanda", "sparsity": 0.5, "multiple": 1, "seed": 0, "head_sparsity": 0.0, "heads": "auto"}


def test_resnet_report_validation(ridge_run: CliRun, eval_data: Dataset) -> None:
    validation = ridge_run.report["validation"]
    predictions = logits(ridge_run.output, eval_data).argmax(axis=1)

    assert validation["samples"] == 500
    assert validation["accuracy_before"] == pytest.approx(RESNET_SAMPLE_ACCURACY, abs=0.01)
    assert validation["accuracy_after"] == pytest.approx(float((predictions == eval_data.labels).mean()))
    assert 0.0 < validation["top1_agreement"] <= 1.0
    assert -1.0 <= validation["cosine_similarity"] <= 1.0
    assert "latency_ms" not in validation["after"]
    assert ridge_run.report["evaluation_data"] == f"500 samples from {EVAL}"


def test_resnet_output_metadata(ridge_run: CliRun) -> None:
    metadata = {prop.key: prop.value for prop in onnx.load(str(ridge_run.output)).metadata_props}

    assert metadata["grail_opt.pipeline"] == ridge_run.report["pipeline"]
    assert metadata["grail_opt.version"] == tool_version()
    assert "select{method=wanda sparsity=0.5 multiple=1 seed=0 head-sparsity=0.0 heads=auto}" in metadata["grail_opt.pipeline"]


def test_resnet_summary_on_stdout(ridge_run: CliRun) -> None:
    compressed = len(ridge_run.report["groups"])
    before = ridge_run.report["validation"]["accuracy_before"]
    after = ridge_run.report["validation"]["accuracy_after"]

    assert f"{RESNET} -> {ridge_run.output}" in ridge_run.out
    assert f"groups: {compressed} compressed, 0 unchanged" in ridge_run.out
    assert "validation on 500 held-out samples" in ridge_run.out
    assert f"accuracy {100 * before:.2f}% -> {100 * after:.2f}%" in ridge_run.out


def test_ridge_beats_plain_slicing(ridge_run: CliRun, slicing_run: CliRun) -> None:
    assert slicing_run.code == 0
    assert "compensate{method=none" in slicing_run.report["pipeline"]
    assert parameter_count(slicing_run.output) == parameter_count(ridge_run.output)

    assert ridge_run.report["validation"]["accuracy_after"] > slicing_run.report["validation"]["accuracy_after"]
    assert ridge_run.report["validation"]["relative_error"] < slicing_run.report["validation"]["relative_error"]


def test_sparsity_zero_keeps_logits(tmp_path: Path, eval_data: Dataset) -> None:
    run = run_resnet(tmp_path, "--eval", str(EVAL), "--sparsity", "0")

    assert run.code == 0
    assert all(group["verdict"].startswith("unchanged: all ") for group in run.report["groups"])
    assert parameter_count(run.output) == parameter_count(RESNET)
    difference = np.abs(logits(run.output, eval_data) - logits(RESNET, eval_data)).max()
    assert difference < 1e-6
    assert run.report["validation"]["max_abs_error"] < 1e-6


def test_holdout_without_eval(tmp_path: Path) -> None:
    run = run_resnet(tmp_path)

    assert run.code == 0
    assert run.report["evaluation_data"] == "last 32 of 256 calibration samples, held out from calibration"
    assert run.report["validation"]["samples"] == 32
    assert "accuracy_before" not in run.report["validation"]
    calibrate = next(record for record in run.report["passes"] if record["pass"] == "calibrate")
    assert calibrate["statistics"]["samples"] == 224
    assert "validation on 32 held-out samples" in run.out


def test_batch_with_corrupt_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(2).bytes(2000))
    out_dir = tmp_path / "out"

    argv = [RESNET, corrupt, "--calib", CALIB, "--out-dir", out_dir, "--report", tmp_path / "batch.json"]
    code, out, err = run_cli(capsys, *argv, "--latency-runs", "0", "-q")

    assert code == 1
    assert sorted(path.name for path in out_dir.iterdir()) == ["resnet20_cifar10.grail.onnx"]
    # The table shows the last 40 characters of each model path, then the status.
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert len(rows) == 2
    success = next(line for name, line in rows.items() if name.endswith("resnet20_cifar10.onnx"))
    failure = next(line for name, line in rows.items() if name.endswith("corrupt.onnx"))
    assert success.split()[1] == "ok"
    assert failure.split()[1] == "failed"
    assert "not a valid ONNX model" in failure
    report = json.loads((tmp_path / "batch.json").read_text())
    assert [entry["output"] for entry in report["models"]] == [str(out_dir / "resnet20_cifar10.grail.onnx"), None]
    assert "not a valid ONNX model" in report["models"][1]["error"]
    errors = [line for line in err.splitlines() if line.startswith("grail-opt: error: ")]
    assert len(errors) == 1
    assert errors[0].count(str(corrupt)) == 1


# Rejected inputs ----------------------------------------------------------------------------


def save_npz(folder: Path, **arrays: np.ndarray) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **arrays)
    return path


def resnet_samples(count: int = 8, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, 3, 32, 32)).astype(dtype)


def with_value(value: float) -> np.ndarray:
    array = resnet_samples()
    array[2, 1, 3, 4] = value
    return array


def broken_image_folder(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir()
    for source in sorted(CALIB.iterdir())[:4]:
        shutil.copy(source, images / source.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return images


def noise_file(folder: Path) -> Path:
    path = folder / "noise.onnx"
    path.write_bytes(np.random.default_rng(4).bytes(3000))
    return path


def gemm_samples(folder: Path) -> Path:
    path = folder / "gemm_inputs.npy"
    np.save(path, np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32))
    return path


# Each builder takes (scratch folder, copy of the ResNet model, output path) and returns argv.
Builder = Callable[[Path, Path, Path], list]
REJECTED: dict[str, tuple[Builder, list[str]]] = {
    "missing model": (
        lambda d, m, o: [d / "absent.onnx", "--calib", CALIB, "-o", o],
        ["model file", "absent.onnx' not found", "Check the path"],
    ),
    "corrupt model": (
        lambda d, m, o: [noise_file(d), "--calib", CALIB, "-o", o],
        ["noise.onnx' is not a valid ONNX model", "Pass an .onnx file"],
    ),
    "missing calib": (
        lambda d, m, o: [m, "--calib", d / "nowhere", "-o", o],
        ["calibration data", "nowhere' not found", "Check the path"],
    ),
    "npz wrong key": (
        lambda d, m, o: [m, "--calib", save_npz(d, images=resnet_samples()), "-o", o],
        ["['images']", "['input']", "Save one array per model input under its name"],
    ),
    "wrong shape": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=resnet_samples()[:, :, :16, :16]), "-o", o],
        ["(8, 3, 16, 16)", "(N, 3, 32, 32)", "Preprocess the samples"],
    ),
    "string dtype": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=np.full((8, 3, 32, 32), "x")), "-o", o],
        ["dtype <U1", "expects float32", "Save the array as float32"],
    ),
    "complex dtype": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=resnet_samples(dtype=np.complex64)), "-o", o],
        ["dtype complex64", "Save the array as float32"],
    ),
    "nan value": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=with_value(np.nan)), "-o", o],
        ["1 NaN or Inf values", "(2, 1, 3, 4)", "Remove or repair"],
    ),
    "inf value": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=with_value(np.inf)), "-o", o],
        ["1 NaN or Inf values", "(2, 1, 3, 4)", "Remove or repair"],
    ),
    "empty array": (
        lambda d, m, o: [m, "--calib", save_npz(d, input=resnet_samples(count=0)), "-o", o],
        ["non-zero number of samples", "got [0]", "Save at least one sample"],
    ),
    "negative sparsity": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", o, "--sparsity", "-0.1"],
        ["--sparsity -0.1 is outside [0, 1)", "Pass a fraction"],
    ),
    "sparsity one": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", o, "--sparsity", "1.0"],
        ["--sparsity 1.0 is outside [0, 1)", "Pass a fraction"],
    ),
    "output is input": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", m],
        ["model.onnx' is the input model", "Choose another path"],
    ),
    "output is folder": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", d],
        ["is a folder", "Give a file name"],
    ),
    "report is output": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", o, "--report", o],
        ["small.onnx' is also a model or output path", "Choose another file"],
    ),
    "output and out-dir": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", o, "--out-dir", o.parent],
        ["both -o and --out-dir were given", "Use -o for one model"],
    ),
    "two models with -o": (
        lambda d, m, o: [m, m, "--calib", CALIB, "-o", o],
        ["-o names one output but 2 models were given", "Use --out-dir"],
    ),
    "no output": (
        lambda d, m, o: [m, "--calib", CALIB],
        ["no output path given", "Add -o OUTPUT.onnx"],
    ),
    "no model": (
        lambda d, m, o: ["--calib", CALIB, "-o", o],
        ["no model given", "grail-opt model.onnx -o small.onnx"],
    ),
    "no compressible group": (
        lambda d, m, o: [make_gemm_model(d / "gemm.onnx"), "--calib", gemm_samples(d), "-o", o],
        ["has no compressible channel group", "gemm: hidden value `y` is a graph output", "Nothing was written"],
    ),
    "unreadable image": (
        lambda d, m, o: [m, "--calib", broken_image_folder(d), "-o", o],
        ["broken.jpg' cannot be read", "Remove or replace the file"],
    ),
    "dynamic image size": (
        lambda d, m, o: [make_conv_model(d / "dynamic.onnx", None, None), "--calib", CALIB, "-o", o],
        ["input 'x' has no fixed square image size", "--image-size"],
    ),
    "cuda without provider": (
        lambda d, m, o: [m, "--calib", CALIB, "-o", o, "--device", "cuda"],
        ["device 'cuda' requested", "no CUDAExecutionProvider", "use --device cpu"],
    ),
}
CUDA_CASE = pytest.mark.skipif(HAS_CUDA, reason="ONNX Runtime has a CUDA provider here, so --device cuda is valid")


@pytest.mark.parametrize(
    "case",
    [pytest.param(name, marks=CUDA_CASE) if name == "cuda without provider" else name for name in REJECTED],
)
def test_rejected_input(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build, fragments = REJECTED[case]
    model = tmp_path / "model.onnx"
    shutil.copy(RESNET, model)
    digest = sha256(model)
    out_dir = tmp_path / "out"
    output = out_dir / "small.onnx"

    code, out, err = run_cli(capsys, *build(tmp_path, model, output))

    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("grail-opt: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out_dir.exists()
    assert sha256(model) == digest
    assert not list(tmp_path.glob(".grail*"))


# Atomic writes ------------------------------------------------------------------------------


@pytest.fixture
def tiny_job(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Return (model, calibration .npy, existing empty output folder) for a one-group model."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return make_conv_model(tmp_path / "tiny.onnx"), conv_samples(tmp_path / "x.npy"), out_dir


def test_tiny_model_compresses(tiny_job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, samples, out_dir = tiny_job

    code, out, err = run_cli(capsys, model, "--calib", samples, "-o", out_dir / "small.onnx", "--latency-runs", "0")

    assert code == 0
    assert err == ""
    assert "g0:conv1: compressed: 6 -> 3 channels" in out
    assert "declined conv2" in out
    assert sorted(path.name for path in out_dir.iterdir()) == ["small.onnx"]


def test_summary_says_why_validation_skipped(tiny_job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, samples, out_dir = tiny_job

    code, out, err = run_cli(capsys, model, "--calib", samples, "-o", out_dir / "small.onnx", "--no-validate")

    assert code == 0
    assert "validation: skipped, because the pipeline has no 'validate' pass" in out


def test_pass_error_leaves_no_files(tiny_job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, samples, out_dir = tiny_job
    pipeline = "find-groups,select{method=wanda sparsity=0.5},compensate,rewrite"

    code, out, err = run_cli(capsys, model, "--calib", samples, "-o", out_dir / "small.onnx", "--pipeline", pipeline)

    assert code == 2
    assert "pass 'select' needs Gram statistics" in err
    assert list(out_dir.iterdir()) == []


def test_validate_error_leaves_no_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_conv_model(tmp_path / "tiny.onnx")
    # Seven samples hold out int(7 / 8) = 0 for validation, so the last pass fails.
    samples = conv_samples(tmp_path / "x.npy", count=7)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    code, out, err = run_cli(capsys, model, "--calib", samples, "-o", out_dir / "small.onnx", "--latency-runs", "0")

    assert code == 2
    assert "pass 'validate' needs held-out data" in err
    assert list(out_dir.iterdir()) == []


def test_crashing_pass_leaves_no_files(
    tiny_job: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, samples, out_dir = tiny_job

    def crash(self, state):
        raise RuntimeError("rewrite crashed")

    monkeypatch.setattr(Rewrite, "run", crash)

    with pytest.raises(RuntimeError, match="rewrite crashed"):
        main([str(model), "--calib", str(samples), "-o", str(out_dir / "small.onnx"), "--latency-runs", "0"])
    assert list(out_dir.iterdir()) == []


def test_failed_save_keeps_old_output(tiny_job: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, out_dir = tiny_job
    output = out_dir / "small.onnx"
    output.write_bytes(b"previous model")

    def partial_save(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.ir, "save", partial_save)
    argv = [str(model), "-o", str(output), "--selector", "magnitude", "--compensation", "none", "--no-validate"]

    with pytest.raises(OSError, match="No space left"):
        main(argv)
    assert list(out_dir.iterdir()) == [output]
    assert output.read_bytes() == b"previous model"


def test_report_file_is_readable(tiny_job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, samples, out_dir = tiny_job
    report = out_dir / "report.json"

    code, _, _ = run_cli(capsys, model, "--calib", samples, "-o", out_dir / "small.onnx", "--report", report, "-q")

    assert code == 0
    assert json.loads(report.read_text())["output"] == str(out_dir / "small.onnx")
    assert sorted(path.name for path in out_dir.iterdir()) == ["report.json", "small.onnx"]
    plain = out_dir / "plain.txt"
    plain.write_text("")
    assert stat.S_IMODE(report.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


# Installed console script -------------------------------------------------------------------


def test_console_script_compresses(tiny_job: tuple[Path, Path, Path]) -> None:
    model, samples, out_dir = tiny_job
    script = Path(sys.executable).parent / "grail-opt"
    assert script.is_file(), f"console script {script} is missing; run pip install -e . first"
    output = out_dir / "small.onnx"

    result = subprocess.run(
        [str(script), str(model), "--calib", str(samples), "-o", str(output), "--latency-runs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{model} -> {output}" in result.stdout
    assert parameter_count(output) < parameter_count(model)


def test_empty_model_file_is_invalid(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")

    code = main([str(empty), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.onnx")])

    assert code == 2
    assert "is not a valid ONNX model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pipeline", "fragment"),
    [
        ("rewrite,find-groups", "'rewrite' runs before any 'find-groups'"),
        ("find-groups,calibrate", "has no 'rewrite' pass"),
        ("find-groups,rewrite,select", "'rewrite' runs before any 'select'"),
    ],
)
def test_pipeline_order_rejected(tmp_path: Path, pipeline: str, fragment: str, capsys) -> None:
    output = tmp_path / "out.onnx"
    code = main([str(RESNET), "--calib", str(CALIB), "--pipeline", pipeline, "-o", str(output)])
    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not output.exists()


def test_budget_without_allocation_rejected(tmp_path: Path, capsys) -> None:
    code = main([str(RESNET), "--calib", str(CALIB), "--budget", "macs", "-o", str(tmp_path / "out.onnx")])
    assert code == 2
    assert "--budget macs applies only to a global allocation" in capsys.readouterr().err


def test_output_without_onnx_suffix_rejected(tmp_path: Path, capsys) -> None:
    output = tmp_path / "small.txt"
    code = main([str(RESNET), "--calib", str(CALIB), "-o", str(output)])
    assert code == 2
    assert "does not end in .onnx" in capsys.readouterr().err
    assert not output.exists()
