"""`smear train classify` and `smear eval classify` through the CLI, on a tiny drawn PBC folder."""

from __future__ import annotations

import json

import pytest
from test_classify_data import PBC_FOLDERS, make_pbc
from typer.testing import CliRunner

from smear.artifacts import ModelMeta
from smear.cli import app


def _train_tiny(tmp_path):
    """`smear train classify` on a drawn PBC folder with timm's tiny test network; returns the data root."""
    root = make_pbc(tmp_path / "pbc", {p: 4 for p in PBC_FOLDERS}, size=40)
    sets = ["model.arch=test_efficientnet", "model.input_size=32", f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch=16", "train.device=cpu",
            "train.patience=0"]
    args = ["train", "classify", "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "model folder" in res.stdout
    return root


@pytest.mark.slow
def test_train_then_eval_json(tmp_path):
    root = _train_tiny(tmp_path)
    assert (tmp_path / "run" / "model" / "meta.json").is_file()
    res = CliRunner().invoke(app, ["eval", "classify", "--model", str(tmp_path / "run" / "model"),
                                   "--data", str(root), "--split", str(tmp_path / "run" / "split.json"),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert set(m) == {"accuracy", "macro_f1", "kappa", "ece", "per_class", "group8_accuracy",
                      "type5_accuracy", "n", "n_skipped"}
    assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] > 0


def test_eval_classify_missing_model_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["eval", "classify", "--model", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert res.exit_code != 0 and "model folder not found" in res.stderr


@pytest.mark.slow
def test_run_with_trained_classifier_reports_classes(tmp_path):
    """The pipeline with `classifier: cnn` labels every detected WBC and reports the class columns."""
    import io

    import pandas as pd

    from smear.io import write_image_atomic
    from smear.synth import make_field

    _train_tiny(tmp_path)
    slide = tmp_path / "slide"
    fields = [make_field(s) for s in (1, 2)]
    for i, f in enumerate(fields):
        write_image_atomic(slide / f"f{i}.png", f.image_rgb)
    res = CliRunner().invoke(app, ["run", str(slide), "--report", "csv", "--set", "detector=classical",
                                   "--set", "classifier=cnn", "--set", f"classifier_model={tmp_path / 'run' / 'model'}",
                                   "--set", "review_threshold=0.0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(io.StringIO(res.stdout)).iloc[0]
    counted = sum(int(row[f"{c}_n"]) for c in ("SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO",
                                                "ERB", "PLATELET")) + int(row["n_unidentified"])
    assert counted == row["n_wbc_detected"] > 0


@pytest.mark.slow
def test_explain_writes_gradcam_overlays(tmp_path):
    """`smear explain` on single-cell images: one overlay PNG per image, a map in [0, 1], a share per image."""
    from PIL import Image

    root = _train_tiny(tmp_path)
    cells = sorted(root.glob("*/*.jpg"))[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "cam"
    res = CliRunner().invoke(app, ["explain", *map(str, cells), str(bad), "--model", str(tmp_path / "run" / "model"),
                                   "--out", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["n"] == 3 and "broken.png" in res.stderr  # the unreadable file is skipped with a warning
    for row, src in zip(m["images"], cells):
        png = Image.open(row["overlay"])
        assert png.size == (2 * 2 * 32, 2 * 32)  # crop and overlay side by side, enlarged x2
        assert 0.0 <= row["cam_in_box"] <= 1.0
        assert row["overlay"].endswith(f"{src.stem}_gradcam.png")
    res = CliRunner().invoke(app, ["explain", str(cells[0]), "--model", str(tmp_path / "run" / "model"),
                                   "--target", "NOPE", "--out", str(out), "--device", "cpu"])
    assert res.exit_code != 0 and "NOPE" in res.output


def test_grad_cam_points_at_the_evidence():
    """A toy network that sees only the top-left quarter: its map lies there, not elsewhere."""
    import numpy as np
    import torch

    from smear.classify.explain import box_share, grad_cam
    from smear.classify.model import CnnClassifier

    class Quarter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.head = torch.nn.Linear(4, 11)
            with torch.no_grad():  # positive evidence for every class
                self.conv.weight.abs_()
                self.head.weight.abs_()

        def forward(self, x):
            mask = torch.zeros_like(x)
            mask[..., :16, :16] = 1
            return self.head(torch.relu(self.conv(x * mask)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    meta = {"classes": ["SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO", "ERB", "PLATELET"],
            "crop_margin": 1.3, "input_size": 32}
    clf = CnnClassifier(Quarter(), ModelMeta.of(meta), device="cpu")
    crop = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    [ex] = grad_cam(clf, [crop], ["LY"], layer="conv")
    assert ex.target == "LY"
    assert ex.cam.shape == (32, 32) and ex.cam.max() == 1.0
    assert ex.cam[:17, :17].sum() > 0.99 * ex.cam.sum()  # the quarter, plus the 3x3 conv's 1 px rim
    assert box_share(np.ones((26, 26)), 1.3) == pytest.approx(20 * 20 / 26 ** 2)  # an even map: (1/1.3)^2
