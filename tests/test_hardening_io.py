"""Hardening of image decoding, slide listing and memory (smear/io.py, smear/pipeline/run.py): only the
documented formats are decoded, 16-bit data keeps its range, dark or blank fields are skipped, deep
folder trees and special files are one line, and the decoded pixels in flight are bounded."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import CLASSICAL, one_line_error, runner, slide
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

    import smear.pipeline.run as run
    from fakes import FakeDetector
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
