"""PyTorch model specs on the command line: timm names, saved modules, exported programs."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from grail_graph.cli import main  # noqa: E402
from grail_graph.torch_models import is_torch_spec, load_timm, spec_stem  # noqa: E402


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def calib(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, input=rng.standard_normal((24, 3, 32, 32)).astype(np.float32))
    return path


def _run(argv, tmp_path):
    report = tmp_path / "report.json"
    code = main([*argv, "--report", str(report), "--latency-runs", "0", "--quiet"])
    return code, (json.loads(report.read_text()) if report.exists() else None)


def test_spec_names():
    assert is_torch_spec("timm:resnet18")
    assert is_torch_spec("model.pt2")
    assert not is_torch_spec("model.onnx")
    assert spec_stem("timm:resnet18") == "resnet18"
    assert spec_stem("dir/net.pt") == "net"


def save_small_net(folder):
    """Save a seeded SmallNet as a whole module and return its path."""
    torch.manual_seed(0)
    model_path = folder / "net.pt"
    torch.save(SmallNet().eval(), model_path)
    return model_path


def test_saved_module_compresses_to_onnx(tmp_path, calib):
    model_path = save_small_net(tmp_path)
    output = tmp_path / "small.onnx"

    code, report = _run([str(model_path), "--calib", str(calib), "--sparsity", "0.5", "-o", str(output)], tmp_path)

    assert code == 0
    assert [group["kept"] for group in report["groups"]] == [8]
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (2, 4)
    assert report["validation"]["cosine_similarity"] > 0.5


def test_validated_export_is_written_once(tmp_path, calib, monkeypatch):
    from grail_graph.fx_frontend.frontend import FxFrontEnd

    exports = []
    save = FxFrontEnd.save

    def counted_save(self, path):
        exports.append(path)
        return save(self, path)

    monkeypatch.setattr(FxFrontEnd, "save", counted_save)
    model_path = save_small_net(tmp_path)
    output = tmp_path / "small.onnx"

    code, report = _run([str(model_path), "--calib", str(calib), "--sparsity", "0.5", "-o", str(output)], tmp_path)

    assert code == 0
    assert len(exports) == 1
    assert report["files"] == [str(output)]
    assert "cosine_similarity" in report["validation"]
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["grail_opt.pipeline"] == report["pipeline"]
    assert not list(tmp_path.glob(".grail-tmp-*"))


def test_exported_program_compresses(tmp_path, calib):
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(SmallNet().eval(), (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    model_path = tmp_path / "net.pt2"
    torch.export.save(program, str(model_path))

    code, report = _run([str(model_path), "--calib", str(calib), "-o", str(tmp_path / "small.onnx")], tmp_path)

    assert code == 0
    assert report["groups"][0]["verdict"] == "compressed: 16 -> 8 channels"


def test_exported_program_with_fixed_batch_is_a_clear_error(tmp_path, calib, capsys):
    program = torch.export.export(SmallNet().eval(), (torch.zeros(2, 3, 32, 32),))
    model_path = tmp_path / "net.pt2"
    torch.export.save(program, str(model_path))

    code = main([str(model_path), "--calib", str(calib), "-o", str(tmp_path / "small.onnx")])

    assert code == 2
    assert "fails in" in capsys.readouterr().err
    assert not (tmp_path / "small.onnx").exists()


def test_timm_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False)
    weights = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), weights)

    loaded = load_timm("resnet10t", weights=weights)

    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor), name
    assert loaded.input_specs[0].shape == (None, *source.pretrained_cfg["input_size"])


def test_timm_without_weights_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))

    code = main(["timm:resnet10t", "--calib", str(tmp_path / "x.npz"), "-o", str(tmp_path / "o.onnx")])

    assert code == 2
    assert "--random-weights" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_timm_unknown_name(tmp_path, capsys):
    code = main(["timm:resnet_does_not_exist", "--random-weights", "-o", str(tmp_path / "o.onnx")])

    assert code == 2
    assert "timm has no model 'resnet_does_not_exist'" in capsys.readouterr().err


def test_timm_random_weights_through_cli(tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.standard_normal((8, 3, 176, 176)).astype(np.float32))

    code, report = _run(
        ["timm:resnet10t", "--random-weights", "--calib", str(calib), "--sparsity", "0.25", "--eval", str(calib),
         "-o", str(tmp_path / "small.onnx")],
        tmp_path,
    )  # fmt: skip

    assert code == 0
    assert any(group["verdict"].startswith("compressed") for group in report["groups"])
    assert report["validation"]["after"]["parameters"] < report["validation"]["before"]["parameters"]
