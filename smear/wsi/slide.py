"""A scanner's whole-slide file read through OpenSlide: levels, pixel size, regions as RGB uint8."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smear.errors import ImageReadError, SmearError

#: suffixes that are always whole-slide files (a .tif/.tiff is one when it is tiled and pyramidal or large)
WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".dcm", ".scn", ".bif", ".vms", ".vmu", ".svslide"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
LARGE_TIFF_PIXELS = 64_000_000  # a tiled one-level TIFF over this is a slide, not a field
EXTRA_HINT = 'whole-slide files need the wsi extra: pip install "smear[wsi]"'


class MissingExtra(SmearError):
    """An optional extra that the run needs is not installed."""


def require_openslide():
    """The openslide module (with its binary from openslide-bin), or one error line naming the extra."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the module is there but its C library is not
        raise MissingExtra(f"cannot read whole-slide files: {exc}", hint=EXTRA_HINT) from exc
    return openslide


def _tiled_tiff(path: Path) -> tuple[bool, int, int]:
    """(tiled, pages, level-0 pixels) of a TIFF, from its tags only (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(path, formats=("TIFF",)) as im:  # a header read: only TIFF's parser runs
            tiled = 322 in im.tag_v2  # TileWidth
            return tiled, getattr(im, "n_frames", 1), im.width * im.height
    except Exception:  # noqa: BLE001 - not a TIFF PIL can parse: leave it to the field reader
        return False, 1, 0


def is_whole_slide(path: str | Path) -> bool:
    """True for a file to read as a whole slide: a scanner format, or a tiled TIFF that is
    pyramidal (several pages) or over LARGE_TIFF_PIXELS. A folder is never one."""
    path = Path(path)
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in WSI_SUFFIXES:
        return True
    if suffix in TIFF_SUFFIXES:
        tiled, pages, pixels = _tiled_tiff(path)
        return tiled and (pages > 1 or pixels > LARGE_TIFF_PIXELS)
    return False


@dataclass(frozen=True)
class Level:
    """One pyramid level: its index, size in its own pixels and downsample from level 0."""

    index: int
    width: int
    height: int
    downsample: float


class WholeSlide:
    """An open slide file. Regions are given in level-0 pixels and returned as RGB uint8 HxWx3
    (transparent pixels, outside the scanned area, as white). Safe to read from two threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        openslide = require_openslide()
        if not self.path.is_file():
            raise ImageReadError(f"{self.path}: no such file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
            raise ImageReadError(f"{self.path}: not a whole-slide file OpenSlide can read ({exc})",
                                 hint="formats: SVS, NDPI, MRXS, DICOM, SCN, BIF, VMS, tiled pyramidal TIFF") from exc
        self.properties = dict(self._osr.properties)
        self.levels = tuple(Level(i, int(w), int(h), float(d)) for i, ((w, h), d)
                            in enumerate(zip(self._osr.level_dimensions, self._osr.level_downsamples)))
        self.width, self.height = self.levels[0].width, self.levels[0].height

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "WholeSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", "")

    @property
    def fingerprint(self) -> str:
        """OpenSlide's quickhash (the smallest level and the properties) with the file's size: a
        slide's identity for the result cache, without hashing gigabytes."""
        return f"{self.properties.get('openslide.quickhash-1', '')}:{self.path.stat().st_size}"

    def file_mpp(self) -> float | None:
        """Micrometres per level-0 pixel as the file states it (mean of x and y), or None."""
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                v = float(self.properties.get(key, ""))
            except ValueError:
                continue
            if np.isfinite(v) and 0.01 <= v <= 50.0:
                values.append(v)
        return float(np.mean(values)) if values else None

    def level_for(self, downsample: float) -> Level:
        """The coarsest level whose downsample is at most ``downsample`` (level 0 when none is)."""
        fits = [lv for lv in self.levels if lv.downsample <= downsample * 1.001]
        return max(fits, key=lambda lv: lv.downsample) if fits else self.levels[0]

    def read(self, x0: int, y0: int, width: int, height: int, level: Level | int = 0) -> np.ndarray:
        """The region whose top-left is (x0, y0) in level-0 pixels, ``width`` x ``height`` pixels of
        ``level``, as RGB uint8 (alpha composited on white)."""
        index = level.index if isinstance(level, Level) else int(level)
        try:
            rgba = np.asarray(self._osr.read_region((int(x0), int(y0)), index, (int(width), int(height))))
        except Exception as exc:  # a damaged tile: one line naming the file and the place
            raise ImageReadError(f"{self.path}: cannot read the region at ({x0}, {y0}) level {index} ({exc})") from exc
        alpha = rgba[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
        return rgb.astype(np.uint8)


def thumbnail(slide: WholeSlide, downsample: float, strip_pixels: int = 16_000_000) -> np.ndarray:
    """The whole slide at ``downsample`` level-0 px per pixel, read from the nearest finer level in
    strips (memory flat: a slide without a pyramid is never held whole)."""
    import cv2

    level = slide.level_for(downsample)
    f = level.downsample / downsample  # level px -> thumbnail px (<= 1)
    out_w, out_h = max(1, int(slide.width / downsample)), max(1, int(slide.height / downsample))
    out = np.empty((out_h, out_w, 3), np.uint8)
    rows = max(1, int(strip_pixels / level.width * f))  # thumbnail rows per strip of about strip_pixels
    y = 0
    while y < out_h:
        n = min(rows, out_h - y)
        ly0, ly1 = int(y / f), min(level.height, int(np.ceil((y + n) / f)))
        part = slide.read(0, int(ly0 * level.downsample), level.width, max(1, ly1 - ly0), level)
        out[y:y + n] = cv2.resize(part, (out_w, n), interpolation=cv2.INTER_AREA)
        y += n
    return out
