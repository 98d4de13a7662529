"""Write a pyramidal tiled TIFF (what a scanner's generic TIFF export is) from a region renderer,
row of tiles by row of tiles, so a gigapixel slide is never held whole. Needs tifffile and
imagecodecs (the test extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

#: render(x0, y0, width, height, downsample) -> RGB uint8 (height x width x 3) of that region of the
#: level ``downsample``, the region given in that level's pixels
Renderer = Callable[[int, int, int, int, float], np.ndarray]


@dataclass(frozen=True)
class TiffTiles:
    """How a pyramid's tiles are stored: ``size`` px square, ``compression`` jpeg (at JPEG
    ``quality``) or lzw."""

    size: int = 256
    compression: str = "jpeg"
    quality: int = 90


def write_pyramid(path: str | Path, width: int, height: int, render: Renderer, mpp: float | None,
                  levels: int = 3, tiles: TiffTiles = TiffTiles()) -> Path:
    """A tiled TIFF with ``levels`` levels (each half the last), JPEG or LZW ``tiles``, the pixel size in
    its resolution tags (``mpp`` um per level-0 px; None writes none)."""
    import tifffile

    path = Path(path)
    tile, compression = tiles.size, tiles.compression
    args = {"jpeg": {"level": tiles.quality}}.get(compression, None)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        for k in range(levels):
            ds = 2 ** k
            w, h = max(1, width // ds), max(1, height // ds)
            res = {}
            if mpp:
                per_cm = 1e4 / (mpp * ds)
                res = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(_tiles(render, w, h, ds, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                     compression=compression, compressionargs=args, photometric="rgb",
                     subfiletype=1 if k else 0, metadata=None, **res)
    return path


def _tiles(render: Renderer, w: int, h: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, h, tile):
        rows = min(tile, h - y)
        strip = render(0, y, w, rows, ds)
        for x in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = strip[:, x:x + tile]
            t[:rows, :part.shape[1]] = part
            yield t
