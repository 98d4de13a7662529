"""`smear train detect` end to end on a tiny drawn VOC dataset: run folder, model folder, reload."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from smear.cli import app

pytestmark = pytest.mark.slow
VOC_OBJ = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def _voc(root, n=6):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((96, 128, 3), 225, np.uint8)
        objs = []
        for k, (name, r, colour) in enumerate((("WBC", 14, (120, 60, 160)), ("RBC", 9, (200, 110, 110)))):
            cx, cy = 30 + 60 * k + int(rng.integers(-5, 5)), 48 + int(rng.integers(-10, 10))
            cv2.circle(img, (cx, cy), r, colour, -1)
            objs.append(VOC_OBJ.format(name, cx - r, cy - r, cx + r, cy + r))
        cv2.imwrite(str(root / "images" / f"f{i}.jpg"), img[..., ::-1])
        (root / "annotations" / f"f{i}.xml").write_text(
            f"<annotation><filename>f{i}.jpg</filename>{''.join(objs)}</annotation>")


def test_train_package_and_reload(tmp_path):
    from smear.detect.yolo import YoloDetector

    _voc(tmp_path / "bccd" / "train")
    run = tmp_path / "run"
    args = ["train", "detect", "--out", str(run),
            "--set", f"data.bccd={tmp_path / 'bccd'}", "--set", "data.txl=",
            "--set", f"data.workdir={tmp_path / 'ds'}", "--set", "data.bccd_val_fraction=0.34",
            "--set", "train.epochs=1", "--set", "train.imgsz=64", "--set", "train.batch=4",
            "--set", "train.device=cpu", "--set", "infer.imgsz=64"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (run / "smear_config.yaml").exists() and (run / "weights" / "last.pt").exists()
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["classes"] == ["wbc", "rbc", "platelet"] and meta["stage"] == "detect"
    assert set(meta["infer"]["per_class_conf"]) == {"wbc", "rbc", "platelet"}
    assert "split" in meta["metrics"]["val"]
    det = YoloDetector.from_dir(run / "model", device="cpu")
    assert det.imgsz == 64 and len(det.detect([np.full((96, 128, 3), 225, np.uint8)])) == 1


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["train", "detect", "--out", str(tmp_path / "nothing"), "--resume"])
    assert res.exit_code != 0 and "nothing to resume" in res.stderr


def test_missing_fine_tune_weights_is_a_clear_error_before_any_work(tmp_path):
    res = CliRunner().invoke(app, ["train", "detect", "--out", str(tmp_path / "run"),
                                   "--set", f"model={tmp_path / 'gone.pt'}",
                                   "--set", f"data.workdir={tmp_path / 'data'}"])
    assert res.exit_code != 0 and "gone.pt: weights to fine-tune from not found" in res.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_stain_jitter_reaches_every_training_epoch_and_survives_closing_the_mosaic(tmp_path, monkeypatch):
    from smear.detect.stain import StainJitter

    seen = []
    original = StainJitter.__call__

    def spy(self, labels):
        seen.append(labels["img"].shape)
        return original(self, labels)

    monkeypatch.setattr(StainJitter, "__call__", spy)
    _voc(tmp_path / "bccd" / "train")
    args = ["train", "detect", "--out", str(tmp_path / "run"),
            "--set", f"data.bccd={tmp_path / 'bccd'}", "--set", "data.txl=",
            "--set", f"data.workdir={tmp_path / 'ds'}", "--set", "data.bccd_val_fraction=0.34",
            "--set", "train.epochs=2", "--set", "train.close_mosaic=1", "--set", "train.workers=0",
            "--set", "train.imgsz=64", "--set", "train.batch=4", "--set", "train.device=cpu",
            "--set", "infer.imgsz=64", "--set", "stain.p=1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    n_train = len(list((tmp_path / "ds" / "images" / "train").iterdir()))
    assert len(seen) == 2 * n_train  # every image of both epochs, the mosaic one and the closed one


def test_stain_jitter_tints_the_background_and_keeps_the_image_shape():
    from smear.detect.stain import SHIFTS, StainJitter, shift

    img = np.full((20, 30, 3), 250, np.uint8)
    img[5:10, 5:10] = (60, 30, 120)  # a nucleus
    rng = np.random.default_rng(1)
    from smear.config import default_config

    shipped = default_config("detect").stain.model_dump()
    outs = [StainJitter(**{**shipped, "tint": 0.4}).apply(img, rng) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    backgrounds = np.array([o[0, 0] for o in outs], float)
    assert backgrounds.std(axis=0).min() > 5  # each channel of the background moves
    assert all(o[7, 7].mean() < o[0, 0].mean() for o in outs)  # the nucleus stays darker than glass
    assert StainJitter(**{**shipped, "p": 0.0})({"img": img})["img"] is img
    for name in SHIFTS:
        assert shift(img, name).shape == img.shape
    with pytest.raises(ValueError, match="unknown stain shift"):
        shift(img, "teal")


def test_train_on_a_converted_folder_keeps_its_data_in_the_run_and_summarises_each_epoch(tmp_path, monkeypatch):
    """--data takes `smear data convert`'s folder; detect-data goes under --out, not the working
    directory; one plain line per epoch (no colour codes off a terminal); the run line at the end."""
    import re

    _voc(tmp_path / "voc")
    res = CliRunner().invoke(app, ["data", "convert", str(tmp_path / "voc"), "--out", str(tmp_path / "mine"),
                                   "--val-fraction", "0.34"])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "detect", "--data", "mine", "--out", "det", "--epochs", "2",
                                   "--batch", "4", "--device", "cpu", "--set", "train.imgsz=64",
                                   "--set", "infer.imgsz=64", "--set", "train.workers=0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "det" / "detect-data" / "data.yaml").is_file() and not (tmp_path / "runs").exists()
    epochs = [line for line in res.stderr.splitlines() if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"], res.stderr
    assert all(re.search(r"box_loss \d+\.\d{3} .*val mAP50 \d\.\d{3}$", e) for e in epochs), epochs
    assert "\x1b" not in res.output
    assert res.stdout.splitlines()[-1] == f"  smear run SLIDE_FOLDER --set detector_model={tmp_path / 'det' / 'model'}"
    meta = json.loads((tmp_path / "det" / "model" / "meta.json").read_text())
    assert meta["metrics"]["val"]["split"] == f"{tmp_path / 'mine' / 'data.yaml'} val"
