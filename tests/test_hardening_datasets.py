"""Hardening of the training and evaluation datasets (smear/detect/data.py, smear/segment/data.py,
smear/classify/data.py): an unreadable image is skipped with a warning and counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from hostile import runner
from smear.cli import app


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:3000])  # the header reads, the pixels do not
    return path


def test_eval_detect_skips_unreadable_images_and_counts_them(tmp_path):
    from smear.synth import make_field

    data = tmp_path / "det"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for s in (1, 2):
        f = make_field(seed=s, width=320, height=240)
        Image.fromarray(f.image_rgb).save(data / "images" / f"f{s}.png")
        (data / "labels" / f"f{s}.txt").write_text("".join(
            f"0 {(d.box_xyxy[0] + d.box_xyxy[2]) / 640} {(d.box_xyxy[1] + d.box_xyxy[3]) / 480} "
            f"{d.width / 320} {d.height / 240}\n" for d in f.detections if d.kind.value == "wbc"))
    _truncated_png(data / "images" / "cut.png")
    (data / "images" / "text.jpg").write_text("not an image")
    res = runner.invoke(app, ["eval", "detect", "--detector", "classical", "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert "cut.png" in res.stderr and "text.jpg" in res.stderr
    m = json.loads(res.stdout)
    assert m["n_images"] == 2 and m["n_skipped"] == 1


def test_eval_segment_skips_unreadable_images_and_counts_them(tmp_path):
    import cv2

    from smear.crops import cut_crop
    from smear.synth import make_field
    from smear.taxonomy import CellKind

    src = tmp_path / "lab"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        f = make_field(100 + i, 320, 240, n_wbc=1, n_rbc=4, n_platelets=0, wbc_kinds=["LY"])
        box = next(d.box_xyxy for d in f.detections if d.kind == CellKind.WBC)
        cv2.imwrite(str(src / "images" / f"{i:03d}.png"),
                    cv2.cvtColor(cut_crop(f.image_rgb, box, 1.15, None), cv2.COLOR_RGB2BGR))
        lab = cut_crop(f.wbc_mask, box, 1.15, None, 0, nearest=True)
        cv2.imwrite(str(src / "masks" / f"{i:03d}.png"), (lab * 127.5).round().astype(np.uint8))
    _truncated_png(src / "images" / "003.png")
    cv2.imwrite(str(src / "masks" / "003.png"), np.zeros((240, 320), np.uint8))
    res = runner.invoke(app, ["eval", "segment", "--method", "kmeans", "--data", str(src), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["n_skipped"] == 1 and "003.png" in m["skipped"][0]
    res = runner.invoke(app, ["eval", "segment", "--method", "kmeans", "--data", str(src)])
    assert res.exit_code == 0 and "003.png" in res.output


def test_train_and_eval_classify_skip_unreadable_images_and_count_them(tmp_path):
    from test_classify_data import PBC_FOLDERS, make_pbc

    root = make_pbc(tmp_path / "pbc", {p: 4 for p in PBC_FOLDERS}, size=40)
    _truncated_png(root / "lymphocyte" / "LY_9001.jpg")
    (root / "monocyte" / "MO_9002.jpg").write_text("not an image")
    args = ["train", "classify", "--out", str(tmp_path / "run")]
    for s in ("model.arch=test_efficientnet", "model.input_size=32", f"data.root={root}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch=16", "train.device=cpu",
              "train.patience=0", "model.novelty_quantile=null"):
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = res.stderr + res.stdout
    assert "LY_9001.jpg" in out and "MO_9002.jpg" in out and "(skipped)" in out
    res = runner.invoke(app, ["eval", "classify", "--model", str(tmp_path / "run" / "model"), "--data", str(root),
                              "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["n_skipped"] == 2 and "LY_9001.jpg" in res.stderr and "MO_9002.jpg" in res.stderr
    assert m["n"] == sum(1 for p in root.rglob("*.jpg")) - 2
