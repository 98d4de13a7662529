"""Faults, odd inputs and hostile files (issue 16): each case refused in one line, or survived.

Data loss
  1  an output that is, or replaces, an input field, or an image name in a slide folder
  2  `smear export` into a folder that holds files
  3  --out and --cells on one file; an output that is a symlink
  4  temporary files after SIGTERM, a failed write, or a killed run
  5  unwritable output folders found before any field runs
Code execution
  6  a model folder or checkpoint holding a pickle payload
A cache that is verified
  7  tampered, out-of-range or inconsistent cache entries
  8  the cache key covers meta.json and the settings
Inputs
  9  file names that look like rich markup ("q[/]x.png", "[bold]slide")
  10 io.max_pixels is PIL's limit too
  11 a JPEG whose header claims more pixels than the file holds
  12 --recursive skips hidden folders and folder symlinks
  13 a dataset with a truncated image
  14 CSV formula injection
  15 an empty folder among several slides
No network, no surprises
  16 no connection outside loopback while the pipeline runs
  17 ultralytics' offline / no-autoinstall settings are forced
  18 an unwritable cache folder warns
  19 broken caches and ONNX files fall back or fail cleanly
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from smear.cli import app

runner = CliRunner()
CLASSICAL = ["--set", "detector=classical", "--set", "classifier=off"]


def _slide(folder: Path, seeds=(1, 2)) -> list[Path]:
    from smear.io import write_image_atomic
    from smear.synth import make_field

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        paths.append(write_image_atomic(folder / f"field_{s:02d}.png", make_field(seed=s, width=320, height=240).image_rgb))
    return paths


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _no_models(monkeypatch):
    """Fail the test if any stage is built (the checks must come first)."""
    import smear.pipeline.build as build

    def boom(_cfg):
        raise AssertionError("stages were built before the outputs were checked")

    monkeypatch.setattr(build, "build_stages", boom)


# ------------------------------------------------------------------ 1. outputs never replace inputs


@pytest.mark.parametrize("option", ["--out", "--cells"])
def test_1_output_naming_a_field_inside_a_slide_is_refused(tmp_path, option, monkeypatch):
    fields = _slide(tmp_path / "slideC")
    before = fields[0].read_bytes()
    _no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "slideC"), "--report", "csv", option, str(fields[0]), *CLASSICAL])
    _one_line_error(res, fields[0].name, "input")
    assert fields[0].read_bytes() == before


def test_1_output_through_a_symlink_or_other_slide_is_refused(tmp_path, monkeypatch):
    a = _slide(tmp_path / "a", seeds=(1,))
    _slide(tmp_path / "b", seeds=(2,))
    link = tmp_path / "out.csv"
    link.symlink_to(a[0])
    _no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(link), *CLASSICAL])
    _one_line_error(res, "out.csv")
    assert link.is_symlink() and Image.open(a[0]).format == "PNG"


def test_1_image_named_output_inside_a_slide_folder_is_refused(tmp_path, monkeypatch):
    _slide(tmp_path / "s")
    _no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--cells", str(tmp_path / "s" / "x.jpg"), *CLASSICAL])
    _one_line_error(res, "x.jpg", "slide folder")
    assert not (tmp_path / "s" / "x.jpg").exists()


def test_1_explain_refuses_to_write_overlays_among_its_input_images(tmp_path):
    fields = _slide(tmp_path / "cells", seeds=(1,))
    res = runner.invoke(app, ["explain", str(fields[0]), "--out", str(tmp_path / "cells")])
    _one_line_error(res, "folder of input images")
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["field_01.png"]


# ------------------------------------------------------------------ 2. export never deletes


def _fake_model_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"stage": "classify", "weights": "w.bin", "classes": ["A"]}))
    (folder / "w.bin").write_bytes(b"weights")
    return folder


def test_2_export_into_a_folder_with_files_is_refused_and_force_deletes_nothing(tmp_path, monkeypatch):
    import smear.pipeline.export as rt

    out = tmp_path / "exported"
    (out / "classifier").mkdir(parents=True)
    mine = out / "classifier" / "notes.txt"
    mine.write_text("my notes")
    model = _fake_model_dir(tmp_path / "model")
    res = runner.invoke(app, ["export", "--out", str(out), "--stage", "classifier",
                              "--set", f"classifier_model={model}"])
    _one_line_error(res, "not empty")
    assert mine.read_text() == "my notes"

    monkeypatch.setattr(rt, "export_module", lambda module, path, size: Path(path).write_bytes(b"onnx") or path)
    import smear.classify.model as cm

    monkeypatch.setattr(cm.CnnClassifier, "from_dir", classmethod(lambda cls, d, device="cpu": type("M", (), {"model": None})()))
    (model / "meta.json").write_text(json.dumps({"stage": "classify", "weights": "w.bin", "classes": ["A"],
                                                 "input_size": 8}))
    res = runner.invoke(app, ["export", "--out", str(out), "--stage", "classifier", "--force",
                              "--set", f"classifier_model={model}"])
    assert res.exit_code == 0, res.output
    assert mine.read_text() == "my notes"  # --force replaced only what the export writes
    assert (out / "classifier" / "w.bin").read_bytes() == b"weights" and (out / "classifier" / "model.onnx").exists()


# ------------------------------------------------------------------ 3. two outputs on one file, symlinked outputs


def test_3_out_and_cells_on_one_file_is_refused(tmp_path, monkeypatch):
    _slide(tmp_path / "s", seeds=(1,))
    _no_models(monkeypatch)
    target = tmp_path / "x.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--out", str(target),
                              "--cells", str(target), *CLASSICAL])
    _one_line_error(res, "x.csv", "same file")


def test_3_an_output_that_is_a_symlink_is_not_replaced(tmp_path, monkeypatch):
    _slide(tmp_path / "s", seeds=(1,))
    real = tmp_path / "elsewhere.csv"
    real.write_text("keep")
    link = tmp_path / "report.csv"
    link.symlink_to(real)
    _no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--out", str(link), *CLASSICAL])
    _one_line_error(res, "report.csv", "symbolic link")
    assert link.is_symlink() and real.read_text() == "keep"


# ------------------------------------------------------------------ 7. the cache is verified


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json"))


def test_7_a_tampered_cache_entry_is_refused_on_resume(tmp_path):
    _slide(tmp_path / "s", seeds=(1,))
    cache = tmp_path / "cache"
    args = ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL, "--set", f"cache_dir={cache}"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    [entry] = _cache_entries(cache)
    stored = json.loads(entry.read_text())
    stored["result"]["detections"] += [[[1.0, 1.0, 20.0, 20.0], "wbc", 0.9]] * 40  # 40 fake white cells
    entry.write_text(json.dumps(stored))
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert "cached result refused (checksum mismatch)" in res.stderr
    assert res.stdout == first.stdout  # the field was run again


def _entry(**cell):
    base = {"det": 0, "label": "BA", "prob": 0.9, "probs": {"BA": 0.9, "LY": 0.1}, "mask": None, "novelty": None}
    return {"width": 100, "height": 80, "detections": [[[10.0, 10.0, 40.0, 40.0], "wbc", 0.9],
                                                       [[50.0, 10.0, 70.0, 30.0], "rbc", 0.8]],
            "cells": [{**base, **cell}]}


@pytest.mark.parametrize("data,reason", [
    (_entry(det=-1), "not an index"),
    (_entry(det=999), "not an index"),
    (_entry(det=1), "not at a WBC"),
    (_entry(prob=float("nan")), "not a finite number"),
    (_entry(probs={"BA": float("nan")}), "not a finite number"),
    (_entry(label="XX"), "unknown label"),
    (_entry(label="LY"), "not its most probable"),
    (_entry(prob=0.2), "not its top probability"),
    ({**_entry(), "detections": [[[10.0, 10.0, 400.0, 40.0], "wbc", 0.9]]}, "outside"),
    ({**_entry(), "detections": [[[10.0, 10.0, 40.0, 40.0], "wbc", 1.5]]}, "outside"),
    ({**_entry(), "cells": [_entry()["cells"][0]] * 2}, "not at a WBC of its own"),
])
def test_7_cache_entries_outside_the_schema_are_refused(data, reason):
    from smear.pipeline.cache import BadEntry, field_from_dict

    with pytest.raises(BadEntry, match=reason):
        field_from_dict(data, "s", "f.png", "f.png")
    field_from_dict(_entry(), "s", "f.png", "f.png")  # the untouched entry is fine


# ------------------------------------------------------------------ 8. the cache key covers meta.json


def test_8_cache_key_changes_with_a_detector_meta(tmp_path):
    import shutil

    from smear.artifacts import shipped_dir
    from smear.config import default_config
    from smear.pipeline.build import stages_version

    copy = tmp_path / "det"
    shutil.copytree(shipped_dir("detector"), copy)
    cfg = default_config("pipeline").model_copy(update={"detector_model": str(copy)})
    before = stages_version(cfg)
    meta = json.loads((copy / "meta.json").read_text())
    meta.setdefault("infer", {})["per_class_conf"] = {"wbc": 0.9, "rbc": 0.9, "platelet": 0.9}
    (copy / "meta.json").write_text(json.dumps(meta))
    assert stages_version(cfg) != before
    assert stages_version(cfg.model_copy(update={"device": "cuda:0"})) != stages_version(cfg)


# ------------------------------------------------------------------ 9. names are not markup


def test_9_markup_like_file_names_are_printed_as_they_are(tmp_path):
    folder = tmp_path / "q["  # the path of its field "]x.png" reads "q[/]x.png": a closing tag
    _slide(folder, seeds=(1,))
    (folder / "]x.png").write_text("not a png")
    res = runner.invoke(app, ["run", str(folder), *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "q[/]x.png" in res.stderr and "q[: 1 fields" in res.stdout
    res = runner.invoke(app, ["run", str(folder / "]x.png"), *CLASSICAL])
    _one_line_error(res, "q[/]x.png")
    bold = tmp_path / "[bold]slide"
    _slide(bold, seeds=(1,))
    res = runner.invoke(app, ["run", str(bold), *CLASSICAL])
    assert res.exit_code == 0 and "[bold]slide: 1 fields" in res.stdout


# ------------------------------------------------------------------ 12. --recursive


def test_12_recursive_skips_hidden_folders_and_folder_symlinks(tmp_path):
    from smear.io import find_slides

    root = tmp_path / "root"
    _slide(root / "a", seeds=(1,))
    _slide(root / ".venv" / "mpl-data" / "images", seeds=(2,))
    (root / "a" / "sub").symlink_to(root / "a")
    (root / "up").symlink_to(root)
    names = [s.name for s in find_slides([root], recursive=True)]
    assert names == ["root/a"]
    res = runner.invoke(app, ["run", str(root), "--recursive", "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(io.StringIO(res.stdout))["slide"]) == ["root/a"]


# ------------------------------------------------------------------ 14. CSV formula injection


def test_14_csv_cells_that_start_a_formula_are_quoted(tmp_path):
    folder = tmp_path / "=1+1"
    _slide(folder, seeds=(1,))
    (folder / "field_01.png").rename(folder / "@SUM(A1).png")
    cells = tmp_path / "cells.csv"
    res = runner.invoke(app, ["run", str(folder), "--report", "csv", "--cells", str(cells), *CLASSICAL])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(io.StringIO(res.stdout), dtype=str)
    assert summary.loc[0, "slide"] == "'=1+1"
    table = pd.read_csv(cells, dtype=str)
    assert set(table["slide"]) == {"'=1+1"} and set(table["field"]) == {"'@SUM(A1).png"}


# ------------------------------------------------------------------ 15. an empty folder among slides


def test_15_an_empty_folder_among_slides_is_a_warning_and_an_empty_row(tmp_path):
    _slide(tmp_path / "good", seeds=(1,))
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["run", str(tmp_path / "empty"), str(tmp_path / "good"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "empty" in res.stderr and "no image files" in res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df["slide"]) == ["empty", "good"] and list(df["n_fields"]) == [0, 1]
    res = runner.invoke(app, ["run", str(tmp_path / "empty"), *CLASSICAL])  # alone, it is still an error
    _one_line_error(res, "no image files")


# ------------------------------------------------------------------ 6. a model folder never runs code


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_detector(tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    import torch

    from smear.artifacts import shipped_dir

    folder, marker = tmp_path / "evil_detector", tmp_path / "PWNED"
    folder.mkdir()
    shutil.copyfile(shipped_dir("detector") / "meta.json", folder / "meta.json")
    torch.save({"model": _Payload(marker), "train_args": {}}, folder / "detector.pt")
    return folder, marker


@pytest.mark.parametrize("command", [
    ["run", "{slide}", "--set", "detector_model={model}", "--set", "runtime=torch", "--set", "classifier=off"],
    ["run", "{slide}", "--set", "detector_model={model}", "--set", "runtime=onnx", "--set", "classifier=off"],
    ["eval", "detect", "--model", "{model}", "--data", "{slide}"],
])
def test_6_a_detector_pt_with_a_pickle_payload_is_refused_unrun(tmp_path, command):
    _slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "s" / "field_01.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    model, marker = _evil_detector(tmp_path)
    args = [a.format(slide=tmp_path / "s", model=model) for a in command]
    res = runner.invoke(app, args)
    _one_line_error(res, "detector.pt", "refusing")
    assert not marker.exists()


def test_6_the_shipped_detector_passes_the_pickle_check():
    from smear.artifacts import check_torch_file, shipped_dir
    from smear.detect.ultra import allowed_global, ultralytics

    ultralytics()
    check_torch_file(shipped_dir("detector") / "detector.pt", allowed_global)
    assert not allowed_global("ultralytics.nn.tasks", "torch_safe_load")  # a function, not a layer
    assert not allowed_global("torch", "load") and not allowed_global("builtins", "eval")


def test_6_a_detector_in_a_format_that_runs_code_is_refused(tmp_path):
    import shutil

    from smear.artifacts import shipped_dir

    folder = tmp_path / "ts_detector"
    folder.mkdir()
    meta = json.loads((shipped_dir("detector") / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "weights": "detector.torchscript"}))
    shutil.copyfile(shipped_dir("detector") / "detector.pt", folder / "detector.torchscript")
    res = runner.invoke(app, ["eval", "detect", "--model", str(folder), "--data", str(folder)])
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", str(folder), "--set", f"detector_model={folder}", "--set", "runtime=torch"])
    _one_line_error(res)


def test_6_a_training_checkpoint_with_a_pickle_payload_is_refused_unrun(tmp_path):
    import torch

    from smear.nn.loop import load_checkpoint
    from smear.types import ModelError

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "epoch": _Payload(marker)}, ckpt)
    with pytest.raises(ModelError, match="checkpoint.pt: refusing to load"):
        load_checkpoint(ckpt, None, None, None, None)
    assert not marker.exists()


# ------------------------------------------------------------------ 4. no temporary file stays behind

_SIGTERM_MID_RUN = """
import os, signal, sys
import smear.pipeline.run as run
calls = []
real = run.classify_cells
def classify_then_term(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the first field's cells rows are in the temporary file by now
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
run.classify_cells = classify_then_term
from smear.cli import app
app(sys.argv[1:])
"""


def test_4_sigterm_mid_run_leaves_no_temporary_file(tmp_path):
    import subprocess
    import sys

    _slide(tmp_path / "s", seeds=(1, 2, 3))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MID_RUN, "run", str(tmp_path / "s"), "--report", "csv",
                           "--out", str(out / "r.csv"), "--cells", str(out / "c.csv"), *CLASSICAL,
                           "--set", "field_batch=1", "--set", "cache_dir=off"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [], proc.stderr  # no .c.csv.<pid>.tmp, no half report


def test_4_a_failed_write_leaves_no_temporary_file_and_resume_gets_the_results(tmp_path, monkeypatch):
    import errno

    import smear.report.tables as rep

    _slide(tmp_path / "s", seeds=(1, 2))
    cells = tmp_path / "out" / "c.csv"
    args = ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(cells), *CLASSICAL,
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    real_write = rep.CellsWriter.write

    def full_disk(self, slide, fr):
        real_write(self, slide, fr)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rep.CellsWriter, "write", full_disk)
    res = runner.invoke(app, args)
    _one_line_error(res, "c.csv", "No space left")
    assert "--resume" in res.stderr and list(cells.parent.iterdir()) == []
    monkeypatch.setattr(rep.CellsWriter, "write", real_write)
    import smear.pipeline.run as run

    monkeypatch.setattr(run, "classify_cells", lambda *a, **k: pytest.fail("a cached field ran again"))
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(cells)) > 0


def test_4_stale_temporary_files_of_dead_processes_are_swept(tmp_path):
    import subprocess
    import sys

    _slide(tmp_path / "s", seeds=(1,))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".c.csv.{dead}.tmp"
    stale.write_text("x" * 1000)
    alive = out / f".c.csv.{os.getppid()}.tmp"  # another run still writing: left alone
    alive.write_text("x")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--cells", str(out / "c.csv"), *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and alive.exists() and (out / "c.csv").exists()


# ------------------------------------------------------------------ 5. output folders checked up front


def test_5_an_output_folder_that_cannot_be_made_fails_before_any_model_loads(tmp_path, monkeypatch):
    _slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "afile").write_text("x")
    _no_models(monkeypatch)
    for option in ("--out", "--cells"):
        res = runner.invoke(app, ["run", str(tmp_path / "s"), option, str(tmp_path / "afile" / "r.csv"), *CLASSICAL])
        _one_line_error(res, "afile", "cannot create")


def test_5_a_missing_cells_folder_is_created(tmp_path):
    _slide(tmp_path / "s", seeds=(1,))
    cells = tmp_path / "new" / "deeper" / "c.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--cells", str(cells), *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert cells.is_file()


# ------------------------------------------------------------------ 18. an unwritable cache warns once


def test_18_an_unwritable_cache_folder_warns_once(tmp_path):
    _slide(tmp_path / "s", seeds=(1, 2, 3))
    blocked = tmp_path / "cache_is_a_file"
    blocked.write_text("x")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL,
                              "--set", f"cache_dir={blocked}"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("cannot write the result cache") == 1 and "--resume" in res.stderr


# ------------------------------------------------------------------ 10. io.max_pixels is the limit


def test_10_io_max_pixels_replaces_pils_own_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from smear.io import read_image

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50_000)  # PIL's 89.5 MP default, scaled down
    for side in (250, 400):  # over PIL's limit (a warning), and over twice it (an error in PIL)
        PILImage.new("RGB", (side, side), (200, 180, 190)).save(tmp_path / f"m{side}.png")
        assert read_image(tmp_path / f"m{side}.png", max_pixels=1_000_000).shape == (side, side, 3)
    res = runner.invoke(app, ["run", str(tmp_path / "m400.png"), *CLASSICAL, "--set", "io.max_pixels=100000"])
    _one_line_error(res, "m400.png", "over the limit of 100000 pixels")


def mosaic(path: Path, width: int = 12000, height: int = 9000) -> Path:
    """A synthetic mosaic of 640x480 fields (a whole-slide export), saved as JPEG."""
    from smear.synth import make_field

    fields = [make_field(seed=s).image_rgb for s in range(4)]
    rows, cols = -(-height // 480), -(-width // 640)
    big = np.empty((rows * 480, cols * 640, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            big[r * 480:(r + 1) * 480, c * 640:(c + 1) * 640] = fields[(r * cols + c + r) % len(fields)]
    Image.fromarray(big[:height, :width]).save(path, quality=90)
    return path


class _TileRecorder:
    """An inner detector that finds one WBC in the middle of each tile and records its batches."""

    def __init__(self):
        self.batches: list[int] = []

    def detect(self, images):
        from smear.types import CellKind, Detection

        self.batches.append(len(images))
        return [[Detection((im.shape[1] / 2 - 40, im.shape[0] / 2 - 40, im.shape[1] / 2 + 40, im.shape[0] / 2 + 40),
                           CellKind.WBC, 0.9)] for im in images]


@pytest.mark.slow
def test_10_a_108_megapixel_mosaic_is_read_and_tiled(tmp_path):
    from smear.detect.tiling import TiledDetector, tile_grid
    from smear.io import read_image

    image = read_image(mosaic(tmp_path / "mosaic.jpg"), max_pixels=500_000_000)  # over PIL's 89.5 MP
    assert image.shape == (9000, 12000, 3)
    inner = _TileRecorder()
    [dets] = TiledDetector(inner, tile=640, overlap=0.2, tile_above=1024).detect([image])
    assert sum(inner.batches) == len(tile_grid(12000, 9000, 640, 0.2)) and max(inner.batches) <= 16
    assert len(dets) == sum(inner.batches)  # tile centres never overlap: each is one cell


# ------------------------------------------------------------------ 11. a JPEG whose header lies


def _lying_jpeg(path: Path, claim: int = 3000) -> Path:
    from smear.synth import make_field

    buf = io.BytesIO()
    Image.fromarray(make_field(seed=3, width=320, height=240).image_rgb).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = claim.to_bytes(2, "big") + claim.to_bytes(2, "big")  # height, width
    path.write_bytes(bytes(data))
    return path


def test_11_a_jpeg_whose_header_claims_more_pixels_is_skipped_with_a_warning(tmp_path):
    _slide(tmp_path / "s", seeds=(1,))
    _lying_jpeg(tmp_path / "s" / "liar.jpg")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "liar.jpg" in res.stderr and "flat colour" in res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert df.loc[0, "n_fields"] == 1 and df.loc[0, "n_skipped"] == 1
    res = runner.invoke(app, ["run", str(tmp_path / "s" / "liar.jpg"), *CLASSICAL])
    _one_line_error(res, "liar.jpg", "fewer pixels than its header says")


def test_11_blank_and_ordinary_jpegs_still_read(tmp_path):
    from smear.io import read_image

    Image.new("RGB", (64, 48), (128, 128, 128)).save(tmp_path / "blank.jpg")
    assert read_image(tmp_path / "blank.jpg").shape == (48, 64, 3)
    img = np.full((48, 64, 3), 200, np.uint8)
    img[:6] = (90, 40, 140)  # a cell at the top, background below: most rows flat, not a fill
    Image.fromarray(img).save(tmp_path / "top.png")
    assert read_image(tmp_path / "top.png").shape == (48, 64, 3)


# ------------------------------------------------------------------ 16. no network


_AUDITED_RUN = """
import socket, sys
def no_network(event, args):
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise RuntimeError(f"network connection to {address}")
    if event == "socket.getaddrinfo" and args[0] not in (None, "localhost", "127.0.0.1", "::1"):
        raise RuntimeError(f"DNS lookup of {args[0]}")
sys.addaudithook(no_network)
from smear.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_16_the_pipeline_with_onnx_export_opens_no_connection(tmp_path):
    import subprocess
    import sys

    _slide(tmp_path / "s", seeds=(1,))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "YOLO_OFFLINE": "0"}  # a user's environment that allows it
    env.pop("YOLO_CONFIG_DIR", None)
    proc = subprocess.run([sys.executable, "-c", _AUDITED_RUN, "run", str(tmp_path / "s"), "--report", "csv",
                           "--set", "runtime=onnx"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network connection" not in proc.stderr and "DNS lookup" not in proc.stderr
    assert list((tmp_path / "xdg" / "smear" / "onnx").glob("*.onnx"))  # the first-use export did run


# ------------------------------------------------------------------ 17. ultralytics' offline settings are forced


_ULTRALYTICS_SETTINGS = """
import os
from smear.detect.ultra import ultralytics
ultralytics()
import ultralytics.utils as u
import ultralytics.utils.checks as checks
from PIL import Image
def no_install(*args, **kwargs):
    raise SystemExit("ultralytics was asked to install " + repr(args))
checks.check_requirements = no_install
from smear.io import read_image
open("notimage.jpg", "w").write("this is not an image")
try:
    read_image("notimage.jpg")
except Exception as exc:
    print("refused:", exc)
print(os.environ["YOLO_OFFLINE"], os.environ["YOLO_AUTOINSTALL"], u.ONLINE, u.AUTOINSTALL)
"""


def test_17_ultralytics_is_offline_and_never_installs_whatever_the_environment(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "YOLO_OFFLINE": "0",
           "YOLO_AUTOINSTALL": "true", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-c", _ULTRALYTICS_SETTINGS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: " in proc.stdout and "not a readable image" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "1 false False False"


# ------------------------------------------------------------------ 19. broken caches fall back or fail cleanly


def test_19_an_unwritable_cache_home_does_not_stop_ultralytics(tmp_path, monkeypatch):
    from smear.detect.ultra import setup_offline

    blocked = tmp_path / "xdg_is_a_file"
    blocked.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.delenv("YOLO_CONFIG_DIR", raising=False)
    setup_offline()
    assert (Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics").is_dir()


def _truncate(path: Path, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes()[:4096] if source.is_file() else b"\x08\x07onnx-cut")


@pytest.mark.slow
def test_19_truncated_cached_onnx_files_are_made_again(tmp_path, monkeypatch):
    from smear.artifacts import load_meta, model_version, shipped_dir
    from smear.nn.onnx import check_onnx, onnx_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _slide(tmp_path / "s", seeds=(1,))
    det, clf = shipped_dir("detector"), shipped_dir("classifier")
    infer = load_meta(det)["infer"]
    cut = [onnx_cache_dir() / f"detect-{model_version(det)}-{infer['imgsz']}px-b{infer['batch']}.onnx"]
    cut += [onnx_cache_dir() / f"{stage}-{model_version(clf)}.onnx" for stage in ("classify", "classify-feat")]
    for path in cut:
        _truncate(path, clf / "model.safetensors")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--set", "runtime=onnx",
                              "--set", "cache_dir=off"])
    assert res.exit_code == 0, res.output
    check_onnx(cut[0])  # the detector's was made again

    def loads(path):
        try:
            return bool(check_onnx(path))
        except Exception:  # noqa: BLE001
            return False

    assert sum(loads(p) for p in cut[1:]) == 1  # and the classifier's one in use


def test_19_a_truncated_onnx_in_a_model_folder_falls_back_to_torch(tmp_path):
    import shutil

    from smear.artifacts import shipped_dir
    from smear.pipeline.build import build_stages
    from smear.config import default_config

    folder = tmp_path / "clf"
    shutil.copytree(shipped_dir("classifier"), folder)
    _truncate(folder / "model.onnx", folder / "model.safetensors")
    cfg = default_config("pipeline").model_copy(update={"detector": "classical", "classifier_model": str(folder),
                                                        "runtime": "onnx"})
    with pytest.warns(UserWarning, match="cannot load the ONNX model"):
        stages = build_stages(cfg)
    assert stages.classifier is not None


# ------------------------------------------------------------------ 13. a dataset with one bad image


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:3000])  # the header reads, the pixels do not
    return path


def test_13_eval_detect_skips_unreadable_images_and_counts_them(tmp_path):
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


def test_13_eval_segment_skips_unreadable_images_and_counts_them(tmp_path):
    import cv2

    from smear.crops import cut_crop
    from smear.synth import make_field
    from smear.types import CellKind

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


def test_13_train_and_eval_classify_skip_unreadable_images_and_count_them(tmp_path):
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
