"""The crop geometry, in one function shared by the pipeline and classifier training: a square
centred on the box, padded at field borders."""

from __future__ import annotations

import cv2
import numpy as np


def crop_square(box_xyxy: tuple[float, float, float, float], margin: float) -> tuple[int, int, int, int]:
    """Integer square (x0, y0, x1, y1) centred on the box, side = long side x margin (may leave the field)."""
    x0, y0, x1, y1 = box_xyxy
    side = max(1, int(round(max(x1 - x0, y1 - y0) * margin)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    return left, top, left + side, top + side


def pad_value(image_rgb: np.ndarray) -> tuple[int, int, int]:
    """The fill for crop padding: the field's median colour, i.e. its background."""
    step = max(1, int(np.sqrt(image_rgb.shape[0] * image_rgb.shape[1] / 4096)))
    med = np.median(image_rgb[::step, ::step].reshape(-1, 3), axis=0)
    return int(med[0]), int(med[1]), int(med[2])


def cut_crop(image_rgb: np.ndarray, box_xyxy: tuple[float, float, float, float], margin: float,
             size: int | None, fill: tuple[int, int, int] | int | None = None, nearest: bool = False) -> np.ndarray:
    """The classifier's input for a detection: square crop around the box, padded (not shifted)
    where it leaves the field with ``fill`` (default: the field's median colour), resized to
    ``size`` x ``size`` (``None`` keeps the native size). A 2-D label mask is cut the same way
    with ``nearest=True`` and a scalar ``fill``."""
    h, w = image_rgb.shape[:2]
    x0, y0, x1, y1 = crop_square(box_xyxy, margin)
    side = x1 - x0
    fill = pad_value(image_rgb) if fill is None else fill
    out = np.empty((side, side) + image_rgb.shape[2:], dtype=image_rgb.dtype)
    out[:] = np.asarray(fill, dtype=image_rgb.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image_rgb[sy0:sy1, sx0:sx1]
    if size is not None and side != size:
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        out = cv2.resize(out, (size, size), interpolation=interp)
    return out


def paint_background(crop: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int] | None = None) -> np.ndarray:
    """A copy of ``crop`` with the pixels its mask calls background (0) set to ``fill`` (default:
    the median colour of those pixels, i.e. the plasma around the cell)."""
    out = crop.copy()
    bg = mask == 0
    if not bg.any():
        return out
    if fill is None:
        fill = tuple(int(v) for v in np.median(crop[bg].reshape(-1, 3), axis=0))
    out[bg] = np.asarray(fill, dtype=crop.dtype)
    return out


def stain_score(image_rgb: np.ndarray) -> np.ndarray:
    """Per-pixel ``B - G`` minus its image median, smoothed: high on nuclei, medium on cytoplasm."""
    img = image_rgb.astype(np.float32)
    score = img[..., 2] - img[..., 1]
    score = cv2.GaussianBlur(score, (0, 0), 1.0)
    return score - float(np.median(score))
