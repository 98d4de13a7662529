"""Crop geometry: square on the box, long side x margin, padded (not shifted) at borders."""

from __future__ import annotations

import numpy as np

from smear.crops import crop_square, cut_crop


def _field(h=100, w=120):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None, :]  # x in red
    img[..., 1] = np.arange(h, dtype=np.uint8)[:, None]  # y in green
    return img


def test_square_side_and_centre():
    x0, y0, x1, y1 = crop_square((40, 30, 60, 40), margin=1.5)
    assert x1 - x0 == y1 - y0 == 30
    assert (x0 + x1) / 2 == 50 and (y0 + y1) / 2 == 35


def test_inside_crop_is_exact_pixels():
    img = _field()
    crop = cut_crop(img, (40, 30, 60, 50), margin=1.0, size=None, fill=(9, 9, 9))
    np.testing.assert_array_equal(crop, img[30:50, 40:60])


def test_corner_is_padded_not_shifted():
    img = _field()
    crop = cut_crop(img, (0, 0, 10, 10), margin=2.0, size=None, fill=(255, 0, 255))
    assert crop.shape == (20, 20, 3)
    # the square is centred on (5, 5): pixels left of/above the field are fill
    assert tuple(crop[0, 0]) == (255, 0, 255)
    assert tuple(crop[4, 4]) == (255, 0, 255)
    # field pixel (0, 0) sits at crop (5, 5): the cell stays centred
    assert tuple(crop[5, 5]) == (0, 0, 0)
    assert tuple(crop[5, 6]) == (1, 0, 0) and tuple(crop[6, 5]) == (0, 1, 0)


def test_bottom_right_border_and_resize():
    img = _field()
    crop = cut_crop(img, (110, 90, 120, 100), margin=1.6, size=32, fill=(255, 255, 255))
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert tuple(crop[-1, -1]) == (255, 255, 255)
    assert crop[0, 0, 0] > 100  # top-left of the crop is inside the field, near x=107


def test_box_entirely_outside_gives_fill_and_default_fill_is_background():
    img = np.full((50, 50, 3), 200, np.uint8)
    img[20:30, 20:30] = 10
    crop = cut_crop(img, (-40, -40, -30, -30), margin=1.0, size=8)
    assert (crop == 200).all()  # default fill = field median = background
