"""Tiling of large fields: every cell counted once, none doubled at seams."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smear.detect.tiling import TiledDetector, tile_grid
from smear.taxonomy import CellKind
from smear.types import Detection


class BlobDetector:
    """A perfect detector for the drawn test fields: each dark connected blob is one WBC."""

    def detect(self, images):
        out = []
        for im in images:
            mask = (im[..., 0] < 128).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            out.append([Detection((float(x), float(y), float(x + w), float(y + h)), CellKind.WBC, 0.9)
                        for x, y, w, h, _ in stats[1:]])
        return out


def _mosaic(seed: int, w: int, h: int, n: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 230, np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        r = int(rng.integers(15, 70))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        b = (cx - r, cy - r, cx + r + 1, cy + r + 1)
        if any(not (b[2] + 3 < o[0] or o[2] + 3 < b[0] or b[3] + 3 < o[1] or o[3] + 3 < b[1]) for o in boxes):
            continue
        cv2.circle(img, (cx, cy), r, (60, 40, 120), -1)
        boxes.append(b)
    return img, boxes


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_grid_covers_field_with_overlap():
    tiles = tile_grid(1500, 1000, 640, 0.25)
    cover = np.zeros((1000, 1500), bool)
    for x0, y0, x1, y1 in tiles:
        assert x1 - x0 == 640 and y1 - y0 == 640
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    assert tile_grid(300, 200, 640, 0.25) == [(0, 0, 300, 200)]


@pytest.mark.parametrize("overlap", [0.25, 0.08])  # 0.08 x 640 = 51 px: big cells are cut in every tile
def test_tiled_count_matches_truth_no_doubles(overlap):
    img, truth = _mosaic(seed=3, w=2600, h=1900, n=140)
    tiled = TiledDetector(BlobDetector(), tile=640, overlap=overlap, tile_above=1024)
    [dets] = tiled.detect([img])
    assert len(dets) == len(truth)
    for t in truth:
        best = max(_iou(t, d.box_xyxy) for d in dets)
        assert best > 0.95
    # Cells larger than the overlap are cut in every tile: check that seam pieces were merged
    # by comparing with the whole-field answer.
    [whole] = BlobDetector().detect([img])
    assert len(whole) == len(dets)


def test_small_images_bypass_tiling():
    img, truth = _mosaic(seed=1, w=640, h=480, n=10)
    [dets] = TiledDetector(BlobDetector(), tile_above=1024).detect([img])
    assert len(dets) == 10


@pytest.mark.slow
def test_large_synthetic_smear_tiled_counts_each_wbc_once():
    """Many synthetic cells on a mosaic: the tiled detector finds each WBC once, none doubled at seams."""
    from smear.detect.classical import ClassicalDetector
    from smear.detect.evaluate import match_boxes
    from smear.synth import make_large_field

    f = make_large_field(3, width=2200, height=1650, n_wbc=30)
    truth = [d for d in f.detections if d.kind == CellKind.WBC]
    [found] = TiledDetector(ClassicalDetector(), tile=640, overlap=0.25, tile_above=1024).detect([f.image_rgb])
    wbcs = [d for d in found if d.kind == CellKind.WBC]
    assert len(wbcs) == len(truth) == 30
    assert match_boxes(wbcs, truth, iou=0.5) == (30, 0, 0)
