"""ONNX export and the onnxruntime path agree with torch within stated tolerances."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from smear.cli import app
from smear.config import default_config

runner = CliRunner()
PROB_TOL = 1e-4  # max abs difference of calibrated class probabilities, ONNX vs torch (float32)


@pytest.fixture()
def tiny_classifier(tmp_path):
    from test_classify_cli import _train_tiny

    _train_tiny(tmp_path)
    return tmp_path / "run" / "model"


@pytest.mark.slow
def test_classifier_onnx_matches_torch(tiny_classifier, tmp_path, monkeypatch):
    from smear.classify.model import CnnClassifier

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    crops = list(np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8))
    t = CnnClassifier.from_dir(tiny_classifier, device="cpu").classify(crops).probs
    o_clf = CnnClassifier.from_dir(tiny_classifier, runtime="onnx")
    o = o_clf.classify(crops).probs
    assert o.shape == t.shape == (5, 11)
    assert np.abs(o - t).max() < PROB_TOL
    # made once from the weights into the cache, reused after
    cached = list((tmp_path / "xdg" / "smear" / "onnx").glob("classify-*.onnx"))
    assert len(cached) == 1 and o_clf.model.path == cached[0]
    assert not (tiny_classifier / "model.onnx").exists()  # the model folder is not written to


@pytest.mark.slow
def test_export_command_and_onnx_pipeline_run(tiny_classifier, tmp_path):
    import pandas as pd

    from smear.io import write_image_atomic
    from smear.synth import make_field

    out = tmp_path / "exported"
    res = runner.invoke(app, ["export", "--out", str(out), "--stage", "classifier",
                              "--set", f"classifier_model={tiny_classifier}"])
    assert res.exit_code == 0, res.output
    assert (out / "classifier" / "model.onnx").is_file() and (out / "classifier" / "meta.json").is_file()
    slide = tmp_path / "slide"
    slide.mkdir()
    write_image_atomic(slide / "f.png", make_field(3, n_wbc=2).image_rgb)
    runs = {}
    for runtime, model in (("torch", tiny_classifier), ("onnx", out / "classifier")):
        cells = tmp_path / f"cells_{runtime}.csv"
        res = runner.invoke(app, ["run", str(slide), "--report", "csv", "--cells", str(cells),
                                  "--set", "detector=classical", "--set", "classifier=cnn",
                                  "--set", f"classifier_model={model}", "--set", f"runtime={runtime}"])
        assert res.exit_code == 0, res.output
        runs[runtime] = pd.read_csv(cells)
    a, b = runs["torch"], runs["onnx"]
    assert (a.label.fillna("") == b.label.fillna("")).all() and (a.kind == "wbc").sum() >= 1
    assert np.abs(a.prob.fillna(0) - b.prob.fillna(0)).max() < 1e-3  # printed to 3 decimals


def test_export_unknown_stage_and_missing_model(tmp_path):
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "o"), "--stage", "nope"])
    assert res.exit_code != 0 and "nope" in res.output
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "o"), "--stage", "classifier",
                              "--set", f"classifier_model={tmp_path / 'missing'}"])
    assert res.exit_code != 0 and "missing" in res.output


def test_unknown_runtime_is_a_config_error(tmp_path):
    from smear.io import write_image_atomic
    from smear.synth import make_field

    write_image_atomic(tmp_path / "f.png", make_field(1).image_rgb)
    res = runner.invoke(app, ["run", str(tmp_path), "--set", "detector=classical", "--set", "runtime=tensorrt"])
    assert res.exit_code != 0 and "tensorrt" in res.output


def test_unet_onnx_matches_torch(tmp_path, monkeypatch):
    import torch

    from smear.segment.model import UnetSegmenter, build_unet
    from smear.nn.weights import save_weights
    from smear.artifacts import ModelMeta, save_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    torch.manual_seed(0)
    model_dir = tmp_path / "unet"
    model_dir.mkdir()
    net = build_unet("tu-mobilenetv3_small_100", (32, 16, 16, 8, 8))
    save_weights(net, model_dir / "model.safetensors")
    save_model_dir(ModelMeta.of({"stage": "segment", "weights": "model.safetensors",
                                 "classes": ["background", "cytoplasm", "nucleus"], "encoder": "tu-mobilenetv3_small_100",
                                 "decoder_channels": [32, 16, 16, 8, 8], "input_size": 64, "crop_margin": 1.3},
                                model_dir), {})
    crops = list(np.random.default_rng(1).integers(0, 255, (3, 50, 50, 3), dtype=np.uint8))
    t = UnetSegmenter.from_dir(model_dir, device="cpu").probabilities(crops)
    o = UnetSegmenter.from_dir(model_dir, runtime="onnx").probabilities(crops)
    assert torch.abs(t - o).max().item() < PROB_TOL


def test_onnx_failure_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    from smear.pipeline.build import _with_fallback

    calls = []

    def load(rt):
        calls.append(rt)
        if rt == "onnx":
            raise RuntimeError("exporter broke")
        return "torch model"

    with caplog.at_level(logging.WARNING, logger="smear"):
        assert _with_fallback(default_config("pipeline").model_copy(update={"runtime": "onnx"}), load) == "torch model"
    assert [r.levelno for r in caplog.records if "exporter broke" in r.getMessage()] == [logging.WARNING]
    assert calls == ["onnx", "torch"]
    from smear.errors import ModelError

    def missing(rt):
        raise ModelError("model folder not found")

    with pytest.raises(ModelError):  # a missing model is not hidden by the fallback
        _with_fallback(default_config("pipeline").model_copy(update={"runtime": "onnx"}), missing)


def test_classify_tta_override(tmp_path):
    from smear.config import load_config
    from smear.pipeline.build import build_stages

    cfg = load_config("pipeline", None, ["detector=classical", "classify_tta=2", "runtime=torch"])
    stages = build_stages(cfg)
    assert stages.classifier.tta == 2
    # without the override, each model folder's own views: 1 for the default, 8 for the mobilenet
    assert build_stages(load_config("pipeline", None, ["detector=classical", "runtime=torch"])).classifier.tta == 1
    assert build_stages(load_config("pipeline", None, ["detector=classical", "runtime=torch",
                                                       "classifier_model=shipped:classifier_mobilenet"])).classifier.tta == 8
