"""Hardening of smear/io.py (and the field batches of smear/pipeline/run.py): outputs never replace
inputs, special files or symlinks; writes are atomic and leave no temporary file; only the
documented formats are decoded, 16-bit data keeps its range, dark or blank fields and lying JPEGs are
skipped; deep folder trees and special files are one line; decoded pixels in flight are bounded."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hostile import CLASSICAL, no_models, one_line_error, runner, slide
from smear.cli import app
from smear.errors import ImageReadError

# ------------------------------------------------------------------ formats


def _content(fmt: str) -> bytes:
    """A small image in ``fmt`` (EPS by hand: PIL writes it only with Ghostscript)."""
    if fmt == "EPS":
        return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
                b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (im.convert("P") if fmt in ("GIF", "PCX") else im).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "ICO", "PCX", "TGA", "EPS"])
def test_an_undocumented_format_named_png_is_refused_undecoded(tmp_path, fmt, monkeypatch):
    from PIL import EpsImagePlugin

    from smear.io import read_image

    def no_ghostscript(*_a, **_k):
        raise AssertionError("an EPS file was handed to Ghostscript")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", no_ghostscript)
    path = tmp_path / "field.png"
    path.write_bytes(_content(fmt))
    with pytest.raises(ImageReadError, match="field.png"):
        read_image(path)


def test_an_undocumented_format_in_a_slide_is_a_skipped_field_with_a_warning(tmp_path):
    slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "s" / "field_09.png").write_bytes(_content("GIF"))
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "field_09.png" in res.stderr
    assert ",1,detector" not in res.stdout  # not counted as a field
    assert "n_skipped" in res.stdout.splitlines()[0]
    row = dict(zip(res.stdout.splitlines()[0].split(","), res.stdout.splitlines()[1].split(",")))
    assert row["n_fields"] == "1" and row["n_skipped"] == "1"


def test_the_documented_formats_still_read(tmp_path):
    from smear.io import read_image

    rgb = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    for suffix, fmt in ((".jpg", "JPEG"), (".png", "PNG"), (".bmp", "BMP"), (".tif", "TIFF"), (".webp", "WEBP")):
        Image.fromarray(rgb).save(tmp_path / f"f{suffix}", format=fmt)
        assert read_image(tmp_path / f"f{suffix}").shape == (20, 24, 3)


def test_a_mask_in_an_undocumented_format_is_refused(tmp_path):
    from smear.errors import DataError
    from smear.segment.data import read_mask

    (tmp_path / "m.png").write_bytes(_content("GIF"))
    with pytest.raises((DataError, ImageReadError), match="m.png"):
        read_mask(tmp_path / "m.png")


# ------------------------------------------------------------------ 16-bit data and exposure


def _twelve_bit_field(path: Path, channels: int = 3) -> np.ndarray:
    """A synthetic field saved as a 16-bit PNG holding 12-bit data (0..4095); returns the 8-bit field."""
    import cv2

    from smear.synth import make_field

    rgb = make_field(seed=3, width=160, height=120).image_rgb
    data = (rgb.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    if channels == 1:
        data = data[..., 0]
        cv2.imwrite(str(path), data)
    else:
        cv2.imwrite(str(path), data[..., ::-1])  # OpenCV writes BGR
    return rgb


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_of_12_bit_data_keeps_its_range(tmp_path, channels):
    from smear.io import read_image

    rgb = _twelve_bit_field(tmp_path / "f.png", channels)
    got = read_image(tmp_path / "f.png")
    want = rgb if channels == 3 else np.repeat(rgb[..., :1], 3, axis=2)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("value", [2, 253])
def test_a_nearly_black_or_nearly_white_field_is_skipped_with_a_warning(tmp_path, value):
    slide(tmp_path / "s", seeds=(1,))
    noise = np.random.default_rng(0).integers(-2, 3, (120, 160, 3))
    Image.fromarray((value + noise).clip(0, 255).astype(np.uint8)).save(tmp_path / "s" / "field_09.png")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "field_09.png" in res.stderr and ("black" in res.stderr or "white" in res.stderr)
    row = dict(zip(res.stdout.splitlines()[0].split(","), res.stdout.splitlines()[1].split(",")))
    assert row["n_fields"] == "1" and row["n_skipped"] == "1"


# ------------------------------------------------------------------ slide listing


@pytest.mark.slow
def test_a_1100_level_folder_tree_with_recursive_is_one_line_or_a_run(tmp_path):
    deep = tmp_path / "tree"
    deep.mkdir()
    path = deep
    for _ in range(1100):  # one level at a time: os.makedirs itself recurses this deep
        path = path / "d"
        path.mkdir()
    slide(path, seeds=(1,))
    try:
        res = runner.invoke(app, ["run", str(deep), "--recursive", "--report", "csv", *CLASSICAL])
    finally:
        _remove_deep(deep)
    assert "Traceback" not in res.output and "RecursionError" not in res.output
    assert res.exit_code == 0 or res.stderr.count("error:") == 1, res.output


def _remove_deep(top: Path) -> None:
    """Remove a deep tree bottom-up (shutil.rmtree, and pytest's clean-up with it, recurse)."""
    levels = [top]
    while True:
        subs = [p for p in levels[-1].iterdir() if p.is_dir()]
        if not subs:
            break
        levels.append(subs[0])
    for folder in reversed(levels):
        for item in folder.iterdir():
            if not item.is_dir():
                item.unlink()
        folder.rmdir()


def test_a_fifo_as_the_slide_is_one_line(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    res = runner.invoke(app, ["run", str(fifo), *CLASSICAL])
    one_line_error(res, "pipe.png")


# ------------------------------------------------------------------ memory


def test_decoded_pixels_in_flight_stay_within_the_budget(tmp_path):
    """Six 160x120 fields, field_batch 8, a budget of two fields' pixels: the current batch and the
    one decoded ahead together never hold more than two fields."""
    import threading

    from fakes import FakeDetector

    import smear.pipeline.run as run
    from smear.io import Slide

    paths = slide(tmp_path / "s", seeds=(1, 2, 3, 4, 5, 6))
    live, peak, lock = [0], [0], threading.Lock()
    real = run.read_image

    def counted(path, **kw):
        img = real(path, **kw)
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return img

    det = FakeDetector({})
    detect = det.detect

    def release(images):
        out = detect(images)
        with lock:
            live[0] -= len(images)
        return out

    det.detect = release
    stages = run.Stages(detector=det, field_batch=8, pixel_budget=2 * 160 * 120)
    original = run.read_image
    run.read_image = counted
    try:
        items = list(run.iter_field_results(Slide("s", tuple(paths)), stages, 10**9))
    finally:
        run.read_image = original
    assert len(items) == 6 and peak[0] <= 2, peak[0]
    assert max(det.batches) == 1


def test_the_default_pixel_budget_is_a_share_of_the_machines_memory():
    from smear.io import DEFAULT_MAX_PIXELS, pixel_budget

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    auto = pixel_budget("auto", DEFAULT_MAX_PIXELS)
    assert auto >= DEFAULT_MAX_PIXELS  # one field of the largest size always fits
    assert auto * 3 <= max(memory // 4, DEFAULT_MAX_PIXELS * 3)
    assert pixel_budget(5_000_000, 1_000) == 5_000_000


# ------------------------------------------------------------------ from issue 16's probe


@pytest.mark.parametrize("option", ["--out", "--cells"])
def test_output_naming_a_field_inside_a_slide_is_refused(tmp_path, option, monkeypatch):
    fields = slide(tmp_path / "slideC")
    before = fields[0].read_bytes()
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "slideC"), "--report", "csv", option, str(fields[0]), *CLASSICAL])
    one_line_error(res, fields[0].name, "input")
    assert fields[0].read_bytes() == before


def test_output_through_a_symlink_or_other_slide_is_refused(tmp_path, monkeypatch):
    a = slide(tmp_path / "a", seeds=(1,))
    slide(tmp_path / "b", seeds=(2,))
    link = tmp_path / "out.csv"
    link.symlink_to(a[0])
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(link), *CLASSICAL])
    one_line_error(res, "out.csv")
    assert link.is_symlink() and Image.open(a[0]).format == "PNG"


def test_image_named_output_inside_a_slide_folder_is_refused(tmp_path, monkeypatch):
    slide(tmp_path / "s")
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--cells", str(tmp_path / "s" / "x.jpg"), *CLASSICAL])
    one_line_error(res, "x.jpg", "slide folder")
    assert not (tmp_path / "s" / "x.jpg").exists()


def test_out_and_cells_on_one_file_is_refused(tmp_path, monkeypatch):
    slide(tmp_path / "s", seeds=(1,))
    no_models(monkeypatch)
    target = tmp_path / "x.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--out", str(target),
                              "--cells", str(target), *CLASSICAL])
    one_line_error(res, "x.csv", "same file")


def test_an_output_that_is_a_symlink_is_not_replaced(tmp_path, monkeypatch):
    slide(tmp_path / "s", seeds=(1,))
    real = tmp_path / "elsewhere.csv"
    real.write_text("keep")
    link = tmp_path / "report.csv"
    link.symlink_to(real)
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--out", str(link), *CLASSICAL])
    one_line_error(res, "report.csv", "symbolic link")
    assert link.is_symlink() and real.read_text() == "keep"


def test_recursive_skips_hidden_folders_and_folder_symlinks(tmp_path):
    from smear.io import find_slides

    root = tmp_path / "root"
    slide(root / "a", seeds=(1,))
    slide(root / ".venv" / "mpl-data" / "images", seeds=(2,))
    (root / "a" / "sub").symlink_to(root / "a")
    (root / "up").symlink_to(root)
    names = [s.name for s in find_slides([root], recursive=True)]
    assert names == ["root/a"]
    res = runner.invoke(app, ["run", str(root), "--recursive", "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(io.StringIO(res.stdout))["slide"]) == ["root/a"]


def test_an_empty_folder_among_slides_is_a_warning_and_an_empty_row(tmp_path):
    slide(tmp_path / "good", seeds=(1,))
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["run", str(tmp_path / "empty"), str(tmp_path / "good"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "empty" in res.stderr and "no image files" in res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df["slide"]) == ["empty", "good"] and list(df["n_fields"]) == [0, 1]
    res = runner.invoke(app, ["run", str(tmp_path / "empty"), *CLASSICAL])  # alone, it is still an error
    one_line_error(res, "no image files")


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


def test_sigterm_mid_run_leaves_no_temporary_file(tmp_path):
    import subprocess
    import sys

    slide(tmp_path / "s", seeds=(1, 2, 3))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MID_RUN, "run", str(tmp_path / "s"), "--report", "csv",
                           "--out", str(out / "r.csv"), "--cells", str(out / "c.csv"), *CLASSICAL,
                           "--set", "field_batch=1", "--set", "cache_dir=off"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [], proc.stderr  # no .c.csv.<pid>.tmp, no half report


def test_a_failed_write_leaves_no_temporary_file_and_resume_gets_the_results(tmp_path, monkeypatch):
    import errno

    import smear.report.tables as rep

    slide(tmp_path / "s", seeds=(1, 2))
    cells = tmp_path / "out" / "c.csv"
    args = ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(cells), *CLASSICAL,
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    real_write = rep.CellsWriter.write

    def full_disk(self, slide, fr):
        real_write(self, slide, fr)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rep.CellsWriter, "write", full_disk)
    res = runner.invoke(app, args)
    one_line_error(res, "c.csv", "No space left")
    assert "--resume" in res.stderr and list(cells.parent.iterdir()) == []
    monkeypatch.setattr(rep.CellsWriter, "write", real_write)
    import smear.pipeline.run as run

    monkeypatch.setattr(run, "classify_cells", lambda *a, **k: pytest.fail("a cached field ran again"))
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(cells)) > 0


def test_stale_temporary_files_of_dead_processes_are_swept(tmp_path):
    import subprocess
    import sys

    slide(tmp_path / "s", seeds=(1,))
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


def test_an_output_folder_that_cannot_be_made_fails_before_any_model_loads(tmp_path, monkeypatch):
    slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "afile").write_text("x")
    no_models(monkeypatch)
    for option in ("--out", "--cells"):
        res = runner.invoke(app, ["run", str(tmp_path / "s"), option, str(tmp_path / "afile" / "r.csv"), *CLASSICAL])
        one_line_error(res, "afile", "cannot create")


def test_a_missing_cells_folder_is_created(tmp_path):
    slide(tmp_path / "s", seeds=(1,))
    cells = tmp_path / "new" / "deeper" / "c.csv"
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--cells", str(cells), *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert cells.is_file()


def test_io_max_pixels_replaces_pils_own_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from smear.io import read_image

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50_000)  # PIL's 89.5 MP default, scaled down
    for side in (250, 400):  # over PIL's limit (a warning), and over twice it (an error in PIL)
        PILImage.new("RGB", (side, side), (200, 180, 190)).save(tmp_path / f"m{side}.png")
        assert read_image(tmp_path / f"m{side}.png", max_pixels=1_000_000).shape == (side, side, 3)
    res = runner.invoke(app, ["run", str(tmp_path / "m400.png"), *CLASSICAL, "--set", "io.max_pixels=100000"])
    one_line_error(res, "m400.png", "over the limit of 100000 pixels")


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
        from smear.taxonomy import CellKind
        from smear.types import Detection

        self.batches.append(len(images))
        return [[Detection((im.shape[1] / 2 - 40, im.shape[0] / 2 - 40, im.shape[1] / 2 + 40, im.shape[0] / 2 + 40),
                           CellKind.WBC, 0.9)] for im in images]


@pytest.mark.slow
def test_a_108_megapixel_mosaic_is_read_and_tiled(tmp_path):
    from smear.detect.tiling import TiledDetector, tile_grid
    from smear.io import read_image

    image = read_image(mosaic(tmp_path / "mosaic.jpg"), max_pixels=500_000_000)  # over PIL's 89.5 MP
    assert image.shape == (9000, 12000, 3)
    inner = _TileRecorder()
    [dets] = TiledDetector(inner, tile=640, overlap=0.2, tile_above=1024).detect([image])
    assert sum(inner.batches) == len(tile_grid(12000, 9000, 640, 0.2)) and max(inner.batches) <= 16
    assert len(dets) == sum(inner.batches)  # tile centres never overlap: each is one cell


def _lying_jpeg(path: Path, claim: int = 3000) -> Path:
    from smear.synth import make_field

    buf = io.BytesIO()
    Image.fromarray(make_field(seed=3, width=320, height=240).image_rgb).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = claim.to_bytes(2, "big") + claim.to_bytes(2, "big")  # height, width
    path.write_bytes(bytes(data))
    return path


def test_a_jpeg_whose_header_claims_more_pixels_is_skipped_with_a_warning(tmp_path):
    slide(tmp_path / "s", seeds=(1,))
    _lying_jpeg(tmp_path / "s" / "liar.jpg")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "liar.jpg" in res.stderr and "flat colour" in res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert df.loc[0, "n_fields"] == 1 and df.loc[0, "n_skipped"] == 1
    res = runner.invoke(app, ["run", str(tmp_path / "s" / "liar.jpg"), *CLASSICAL])
    one_line_error(res, "liar.jpg", "fewer pixels than its header says")


def test_blank_and_ordinary_jpegs_still_read(tmp_path):
    from smear.io import read_image

    Image.new("RGB", (64, 48), (128, 128, 128)).save(tmp_path / "blank.jpg")
    assert read_image(tmp_path / "blank.jpg").shape == (48, 64, 3)
    img = np.full((48, 64, 3), 200, np.uint8)
    img[:6] = (90, 40, 140)  # a cell at the top, background below: most rows flat, not a fill
    Image.fromarray(img).save(tmp_path / "top.png")
    assert read_image(tmp_path / "top.png").shape == (48, 64, 3)
