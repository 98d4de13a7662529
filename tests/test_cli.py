"""The CLI through typer's CliRunner: files, exit codes, messages."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from smear.cli import app

runner = CliRunner()
CLASSICAL = ["--set", "detector=classical", "--set", "classifier=off"]


def _synth_slide(folder, seeds=(1, 2, 3)):
    from smear.io import write_image_atomic
    from smear.synth import make_field

    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for s in seeds:
        f = make_field(seed=s)
        write_image_atomic(folder / f"field_{s:02d}.png", f.image_rgb)
        truth[f"field_{s:02d}.png"] = f
    return truth


def test_run_csv_counts_synthetic_wbcs(tmp_path):
    from smear.taxonomy import CellKind

    truth = _synth_slide(tmp_path / "slide1")
    res = runner.invoke(app, ["run", str(tmp_path / "slide1"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df.columns[:4]) == ["slide", "n_fields", "n_wbc", "n_unidentified"]
    assert df.loc[0, "slide"] == "slide1" and df.loc[0, "n_fields"] == 3 and df.loc[0, "n_skipped"] == 0
    n_true = sum(sum(d.kind == CellKind.WBC for d in f.detections) for f in truth.values())
    assert df.loc[0, "n_wbc"] == n_true


def test_run_outputs_cells_json_and_table(tmp_path):
    from smear.taxonomy import CellKind

    truth = _synth_slide(tmp_path / "s", seeds=(4,))
    n_wbc = sum(d.kind == CellKind.WBC for d in truth["field_04.png"].detections)
    out, cells = tmp_path / "o" / "report.json", tmp_path / "cells.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "json", "--out", str(out),
                              "--cells", str(cells), *CLASSICAL])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["slides"][0]["summary"]["n_fields"] == 1
    table = pd.read_csv(cells)
    assert list(table.columns) == ["slide", "field", "x0", "y0", "x1", "y1", "kind", "det_score", "label", "prob", "novelty"]
    assert set(table["kind"]) <= {"wbc", "rbc", "platelet"} and (table["x1"] > table["x0"]).all()
    res = runner.invoke(app, ["run", str(tmp_path / "s"), *CLASSICAL])
    assert res.exit_code == 0 and f"s: 1 fields, {n_wbc} WBC" in res.stdout and "RBC" in res.stdout


def test_batch_with_one_bad_field_reports_the_rest(tmp_path):
    _synth_slide(tmp_path / "s", seeds=(5, 6))
    (tmp_path / "s" / "field_99.png").write_text("this is text, not a PNG")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0
    assert "warning" in res.stderr and "field_99.png" in res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert df.loc[0, "n_fields"] == 2 and df.loc[0, "n_skipped"] == 1


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing", "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no image files"),
    (lambda p: (p / "t.png").write_text("text") and p / "t.png", "t.png"),
])
def test_bad_inputs_one_line_error(tmp_path, make, match):
    path = make(tmp_path)
    res = runner.invoke(app, ["run", str(path), *CLASSICAL])
    assert res.exit_code != 0
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and match in res.stderr
    assert "Traceback" not in res.output


def test_truncated_jpeg_single_field(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="JPEG")
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(buf.getvalue()[:200])
    res = runner.invoke(app, ["run", str(bad), "--report", "csv", *CLASSICAL])
    assert res.exit_code != 0 and "cut.jpg" in res.stderr


def test_refuses_to_overwrite_input(tmp_path):
    _synth_slide(tmp_path / "s", seeds=(7,))
    target = tmp_path / "s" / "field_07.png"
    before = target.read_bytes()
    res = runner.invoke(app, ["run", str(target), "--out", str(target), *CLASSICAL])
    assert res.exit_code != 0 and "overwrite" in res.stderr
    assert target.read_bytes() == before


def test_config_show_and_errors(tmp_path):
    res = runner.invoke(app, ["config", "show", "detect", "--set", "train.epochs=2"])
    assert res.exit_code == 0 and "epochs: 2" in res.stdout
    res = runner.invoke(app, ["config", "show", "--set", "detectr=yolo"])
    assert res.exit_code != 0 and "unknown config key 'detectr'" in res.stderr
    _synth_slide(tmp_path / "s", seeds=(1,))  # a slide that would run: the error is the classifier's
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--set", "classifier=resnet"])
    assert res.exit_code != 0 and "config key 'classifier' must be one of off or cnn (got 'resnet')" in res.stderr


def test_info_lists_device_and_models():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    assert "device: cpu" in res.stdout or "device: cuda" in res.stdout
    assert "detector model" in res.stdout


@pytest.mark.slow
def test_default_run_classifies_with_the_shipped_models(tmp_path):
    """No --set: the shipped detector and classifier; every detected WBC is labelled or unidentified."""
    _synth_slide(tmp_path / "s", seeds=(4, 5))
    cells = tmp_path / "cells.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(cells)])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(io.StringIO(res.stdout)).iloc[0]
    assert row["n_wbc_detected"] > 0
    assert row["n_wbc"] + row["n_unidentified"] + row["ERB_n"] + row["PLATELET_n"] == row["n_wbc_detected"]
    pct = [row[f"{c}_pct"] for c in ("SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO")]
    if row["n_wbc"]:
        assert abs(np.nansum(pct) - 100.0) < 0.05
    wbc = pd.read_csv(cells).query("kind == 'wbc'")
    assert wbc["label"].notna().all() and wbc["prob"].between(0, 1).all()


def test_eval_detect_scores_cleaned_truth_and_warns_of_repeated_boxes(tmp_path):
    """A cell labelled twice is dropped with a warning naming the file, not scored as a miss."""
    from smear.detect.data import DET_CLASSES, write_yolo_dataset, Sample
    from smear.io import write_image_atomic
    from smear.synth import make_field
    from smear.taxonomy import CellKind

    f = make_field(seed=3)
    image = tmp_path / "src" / "field.png"
    image.parent.mkdir()
    write_image_atomic(image, f.image_rgb)
    h, w = f.image_rgb.shape[:2]
    boxes = [(d.kind, d.box_xyxy) for d in f.detections]
    wbc = next(b for b in boxes if b[0] == CellKind.WBC)
    data_yaml = write_yolo_dataset({"test": [Sample(image, w, h, boxes + [wbc], source="synth")]}, tmp_path / "ds")
    res = runner.invoke(app, ["eval", "detect", "--detector", "classical", "--data", str(data_yaml),
                              "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    assert "repeats an earlier box" in res.stderr and "field.png" in res.stderr
    out = json.loads(res.stdout)
    n_wbc = sum(k == CellKind.WBC for k, _ in boxes)
    assert out["per_class"]["wbc"]["n_truth"] == n_wbc  # the repeat is not counted
    assert set(out["per_class"]) == set(DET_CLASSES) and "synth" in out["per_source"]


def test_version_and_verbose_after_the_subcommand(tmp_path):
    from smear import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"smear {__version__}"
    quiet = runner.invoke(app, ["run", str(tmp_path / "nowhere")])
    assert quiet.exit_code == 1 and quiet.exception is None or isinstance(quiet.exception, SystemExit)
    assert "error:" in quiet.stderr and "no such file or folder" in quiet.stderr
    loud = runner.invoke(app, ["run", str(tmp_path / "nowhere"), "-v"])  # -v after the subcommand
    assert loud.exit_code == 1 and type(loud.exception).__name__ == "SmearError"


def test_help_shows_a_usage_example_for_run_and_each_train_command():
    for args in (["run"], ["train", "detect"], ["train", "classify"], ["train", "segment"], ["train", "novelty"]):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0 and "Example" in res.stdout and f"smear {' '.join(args)}" in res.stdout
