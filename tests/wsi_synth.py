"""A synthetic smear as a whole-slide file: blocks of smear.synth fields laid out with a density
gradient along x (thick end, monolayer, feathered edge), a blurred region and an empty one inside the
monolayer band, written as a tiled pyramidal TIFF with tifffile."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from smear.synth import make_field

BLOCK = 512
#: what each column of blocks is, left to right
COLUMNS = ("thick", "thick", "mono", "mono", "mono", "mono", "mono", "mono", "edge", "edge", "bare")
ROWS = 3
BLURRED = {(1, 4), (1, 5)}   # (row, col) blocks blurred
EMPTY = {(2, 6)}             # (row, col) blocks left as bare glass
MPP = 0.08                   # the detector's pixel size: read at level 0, scale 1


def kind_of(row: int, col: int) -> str:
    """What the block at (row, col) is: thick, mono, edge, bare, blurred or empty."""
    if (row, col) in BLURRED:
        return "blurred"
    if (row, col) in EMPTY:
        return "empty"
    return COLUMNS[col]


def _block(row: int, col: int) -> np.ndarray:
    kind = kind_of(row, col)
    seed = 1000 + row * 100 + col
    if kind == "thick":
        return make_field(seed, BLOCK, BLOCK, n_wbc=1, n_rbc=90, n_platelets=2, flat=True).image_rgb
    if kind in ("mono", "blurred"):
        img = make_field(seed, BLOCK, BLOCK, n_wbc=2, n_rbc=22, n_platelets=3, flat=True).image_rgb
        return cv2.GaussianBlur(img, (0, 0), 5.0) if kind == "blurred" else img
    if kind == "edge":
        return make_field(seed, BLOCK, BLOCK, n_wbc=0, n_rbc=6, n_platelets=1, flat=True).image_rgb
    return make_field(seed, BLOCK, BLOCK, n_wbc=0, n_rbc=0, n_platelets=0, flat=True).image_rgb


@lru_cache(maxsize=1)
def _level0() -> np.ndarray:
    """The slide's level 0 (drawn once per test session)."""
    full = np.empty((BLOCK * ROWS, BLOCK * len(COLUMNS), 3), np.uint8)
    for r in range(ROWS):
        for c in range(len(COLUMNS)):
            full[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = _block(r, c)
    full.setflags(write=False)
    return full


def gradient_slide(path: Path, mpp: float | None = MPP, compression: str = "jpeg", levels: int = 3) -> Path:
    """The gradient slide as a pyramidal TIFF at ``path`` (level 0: 5632 x 1536 px)."""
    from smear.wsi.write import TiffTiles, write_pyramid

    full = _level0()
    height, width = full.shape[:2]
    pyramid = {1: full}

    def render(x0, y0, w, h, ds):
        if ds not in pyramid:
            pyramid[ds] = cv2.resize(full, (width // ds, height // ds), interpolation=cv2.INTER_AREA)
        return pyramid[ds][y0:y0 + h, x0:x0 + w]

    return write_pyramid(path, width, height, render, mpp, levels=levels, tiles=TiffTiles(256, compression))
