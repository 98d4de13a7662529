"""Image reading in every odd format, slide listing, atomic writes."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from smear.io import atomic_path, find_slides, read_image, write_text_atomic
from smear.errors import ImageReadError, SmearError


def _rgb(h=20, w=30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".bmp", "BMP"), (".tif", "TIFF"), (".webp", "WEBP")])
def test_lossless_formats_roundtrip(tmp_path, suffix, fmt):
    arr = _rgb()
    path = tmp_path / f"f{suffix}"
    Image.fromarray(arr).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, arr)


def test_jpeg_reads_as_rgb(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[..., 0] = 200  # strongly red: channel order must survive
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16, 3)
    assert out[..., 0].mean() > 180 and out[..., 2].mean() < 20


def test_grayscale_rgba_cmyk_palette(tmp_path):
    Image.fromarray(np.full((5, 6), 77, np.uint8), mode="L").save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (5, 6, 3) and (g == 77).all()

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top opaque red, bottom transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    assert tuple(a[0, 0]) == (255, 0, 0)
    assert tuple(a[3, 0]) == (255, 255, 255)  # transparency composited on white

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    c = read_image(tmp_path / "c.jpg")
    assert c.shape == (8, 8, 3) and c[..., 0].mean() > 200 and c[..., 1].mean() < 60

    Image.fromarray(_rgb()).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (20, 30, 3)


def test_16bit_tiff_scaled_to_8bit(tmp_path):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.tif")
    out = read_image(tmp_path / "d.tif")
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[1, 0, 0] == 128


def test_multipage_tiff_first_page_with_warning(tmp_path, caplog):
    p1 = Image.fromarray(np.full((4, 4, 3), 10, np.uint8))
    p2 = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    p1.save(tmp_path / "m.tif", save_all=True, append_images=[p2])
    with caplog.at_level(logging.WARNING, logger="smear"):
        out = read_image(tmp_path / "m.tif")
        read_image(tmp_path / "m.tif")  # said once a file, as Python's warnings did
    said = f"{tmp_path / 'm.tif'}: multi-page image, using the first page only"
    assert [r.getMessage() for r in caplog.records] == [said]
    assert (out == 10).all()


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # wide image
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "o.jpg").shape == (20, 10, 3)


def test_truncated_jpeg_names_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="JPEG")
    path = tmp_path / "trunc.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image(path)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"hello, not an image", "not a readable image")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=match) as err:
        read_image(path)
    assert "bad.png" in str(err.value)


def test_missing_and_too_large(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(tmp_path / "big.png", max_pixels=5000)


def test_reading_does_not_modify_input(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(path)
    before = path.read_bytes()
    read_image(path)
    assert path.read_bytes() == before


def test_slides_sorted_images_only_hidden_skipped(tmp_path):
    slide = tmp_path / "s1"
    slide.mkdir()
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt", "C.TIF"):
        (slide / name).write_bytes(b"x")
    (slide / "sub").mkdir()
    (slide / "sub" / "z.png").write_bytes(b"x")
    [s] = find_slides([slide])
    assert s.name == "s1"
    assert [p.name for p in s.fields] == ["C.TIF", "a.jpg", "b.png"]
    nested = find_slides([slide], recursive=True)
    assert [x.name for x in nested] == ["s1", "s1/sub"]


def test_single_image_is_one_field_slide(tmp_path):
    path = tmp_path / "f.png"
    path.write_bytes(b"x")
    [s] = find_slides([path])
    assert s.name == "f" and s.fields == (path,)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(SmearError, match="holds no image files"):
        find_slides([tmp_path])
    with pytest.raises(SmearError, match="no such file or folder"):
        find_slides([tmp_path / "missing"])
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(SmearError, match="not an image file"):
        find_slides([tmp_path / "r.txt"])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
