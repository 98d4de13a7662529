"""`smear train classify` and `smear eval classify` through the CLI, on a tiny drawn PBC folder."""

from __future__ import annotations

import json

import pytest
from test_classify_data import PBC_FOLDERS, make_pbc
from typer.testing import CliRunner

from smear.cli import app


def _train_tiny(tmp_path):
    """`smear train classify` on a drawn PBC folder with timm's tiny test network; returns the data root."""
    root = make_pbc(tmp_path / "pbc", {p: 4 for p in PBC_FOLDERS}, size=40)
    sets = ["model.arch=test_efficientnet", "model.input_size=32", f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch=16", "train.device=cpu",
            "train.patience=0", "infer.device=cpu"]
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
                      "type5_accuracy", "n"}
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
