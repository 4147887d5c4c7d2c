"""ONNX export: the file onnxruntime runs equals Model.forward to 1e-4, at any batch size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_model
from test_fast import random_model

import detkit
from detkit.errors import DetkitError
from detkit.export import ONNX_OPSET, export_onnx, ort_session, tolerance

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_matches(session, model: detkit.Model, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(["preds"], {"images": x.numpy()})[0]
    assert got.shape == expected.shape
    assert (np.abs(got - expected) <= tolerance(expected, (x.shape[3], x.shape[2]))).all()


def test_official_tiny_weights_any_batch(tmp_path, tiny_weights):
    model = detkit.load_model(REPO / "cfg" / "yolov3-tiny.cfg", tiny_weights)
    report = export_onnx(model, tmp_path / "tiny.onnx", size=(320, 256))
    assert report.max_rel_diff < 1e-4
    assert report.output_shape == (1, 3 * (10 * 8 + 20 * 16), 85)   # strides 32 and 16
    proto = onnx.load(str(report.path))
    assert proto.opset_import[0].version == ONNX_OPSET
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    session = ort_session(report.path)
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3):
        assert_matches(session, model, torch.rand(batch, 3, 256, 320, generator=gen))


def test_region_reorg_net(tmp_path):
    model = random_model("mini-region", 128)
    report = export_onnx(model, tmp_path / "region.onnx")
    assert report.output_shape == (1, 5 * 16 * 16, 7)
    assert_matches(ort_session(report.path), model, torch.rand(2, 3, 128, 128))


def test_the_check_catches_a_wrong_file(tmp_path):
    from detkit.export import ExportError, check_onnx

    model = random_model("mini-yolo", 96)
    report = export_onnx(model, tmp_path / "a.onnx", check=False)
    assert report.max_abs_diff is None
    other = randomize_model(random_model("mini-yolo", 96), seed=5)
    with pytest.raises(ExportError, match="differs"):
        check_onnx(report.path, other, (96, 96))


def test_cli_export_and_errors(tmp_path):
    out = tmp_path / "m.onnx"
    cfg = tmp_path / "mini.cfg"
    from test_fast import MINI_YOLO

    cfg.write_text(MINI_YOLO)
    run = subprocess.run([sys.executable, "-m", "detkit", "export", str(cfg), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"exported {out} (ONNX opset {ONNX_OPSET})" in run.stdout
    assert "onnxruntime vs PyTorch: max abs diff" in run.stdout
    from typer.testing import CliRunner

    from detkit.cli import app

    bad = CliRunner().invoke(app, ["export", str(cfg), "--format", "tflite"])
    assert isinstance(bad.exception, DetkitError) and "only onnx" in str(bad.exception)


def test_missing_package_is_a_clear_error(monkeypatch):
    import detkit.export as export

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DetkitError, match=r"pip install 'detkit\[export\]'"):
        export._require("onnx")


def test_detector_onnxruntime_backend_equals_eager(tmp_path, monkeypatch, tiny_weights):
    from test_fast import assert_same_detections, photos

    from detkit.engine.predict import Detector
    from detkit.export import OnnxRuntimeModel

    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path))
    cfg = REPO / "cfg" / "yolov3-tiny.cfg"
    ort_detector = Detector(cfg, tiny_weights, device="cpu", backend="onnxruntime")
    assert isinstance(ort_detector.model, OnnxRuntimeModel)
    assert ort_detector.model.path.parent == tmp_path / "onnx"
    again = Detector(cfg, tiny_weights, device="cpu", backend="onnxruntime")   # from the cache
    assert again.model.path == ort_detector.model.path
    eager = Detector(cfg, tiny_weights, device="cpu", fast=False)
    images = photos()
    assert_same_detections(eager.predict_arrays(images), ort_detector.predict_arrays(images),
                           box_atol=1e-2, score_atol=1e-4)
    with pytest.raises(DetkitError, match="torch or onnxruntime"):
        Detector(cfg, tiny_weights, device="cpu", backend="tvm")


def test_ssd_export_spells_out_logsumexp(tmp_path):
    """OpenVINO 2026.4 mis-infers ONNX's ReduceLogSumExp(axes=[-1]) and refused the SSD export;
    the exported graph spells it out and still equals the eager SSD."""
    model = detkit.load_model(REPO / "cfg" / "ssd-tiny-trees.cfg")
    randomize_model(model, seed=5)
    report = export_onnx(model, tmp_path / "ssd.onnx", size=(224, 224))
    ops = {node.op_type for node in onnx.load(str(report.path)).graph.node}
    assert "ReduceLogSumExp" not in ops
    assert_matches(ort_session(report.path), model, torch.rand(2, 3, 224, 224))
