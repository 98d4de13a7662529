"""find_cell_box on drawn cells, the pipeline crop geometry, and the crop cache."""

from __future__ import annotations

import numpy as np
import pytest
from test_classify_data import BACKGROUND, draw_cell, make_pbc

from smear.classify.crop_cache import cache_key, cached_crops, cut_cell_crop
from smear.nn.tensors import channel_stats
from smear.classify.cellbox import central_box, find_cell_box, find_cell_box_info
from smear.classify.data import load_pbc
from smear.crops import cut_crop


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("centre,radius,lobes", [((128, 128), 40, 1), ((110, 140), 30, 1), ((128, 128), 45, 3)])
def test_box_fits_the_drawn_cell(centre, radius, lobes):
    img = draw_cell(256, centre=centre, radius=radius, lobes=lobes, rbcs=10, seed=1)
    box, fell_back = find_cell_box_info(img)
    truth = (centre[0] - radius, centre[1] - radius, centre[0] + radius + 1, centre[1] + radius + 1)
    assert not fell_back
    assert iou(box, truth) > 0.8, (box, truth)


def test_cell_nearest_the_centre_wins():
    img = draw_cell(200, centre=(100, 100), radius=30, rbcs=0)
    other = draw_cell(200, centre=(30, 30), radius=20, rbcs=0)
    img[:60, :60] = other[:60, :60]  # a second, smaller WBC in the corner
    box = find_cell_box(img)
    assert iou(box, (70, 70, 131, 131)) > 0.8


def test_blank_or_tiny_image_falls_back_to_central_box():
    blank = np.full((100, 120, 3), BACKGROUND, np.uint8)
    box, fell_back = find_cell_box_info(blank)
    assert fell_back and box == central_box(100, 120)
    assert box == (37.5, 27.5, 82.5, 72.5)
    assert find_cell_box_info(np.zeros((1, 1, 3), np.uint8))[1]


def test_crop_uses_the_pipeline_geometry():
    img = draw_cell(96, radius=20, seed=2)
    crop = cut_cell_crop(img, margin=1.3, size=32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, cut_crop(img, find_cell_box(img), 1.3, 32))


def test_cache_is_written_once_and_keyed_by_geometry(tmp_path):
    items = load_pbc(make_pbc(tmp_path / "pbc", {"LY": 3, "IG": 2}))
    logs: list[str] = []
    a = cached_crops(items, 1.3, 24, tmp_path / "cache", workers=2, log=logs.append)
    assert a.shape == (5, 24, 24, 3) and a.dtype == np.uint8
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    b = cached_crops(items, 1.3, 24, tmp_path / "cache", log=logs.append)
    np.testing.assert_array_equal(a, b)
    assert any("from cache" in line for line in logs)
    assert cache_key(items, 1.3, 24) != cache_key(items, 1.4, 24) != cache_key(items[:4], 1.3, 24)
    from smear.io import read_image
    np.testing.assert_array_equal(a[2], cut_cell_crop(read_image(items[2].path), 1.3, 24))
    mean, std = channel_stats(a)
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and all(s > 0 for s in std)
