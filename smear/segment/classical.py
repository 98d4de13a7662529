"""Classical WBC segmentation baselines (the seeds' methods), under the ``Segmenter`` protocol.

- ``KMeansSegmenter``: K=3 colour clustering (OpenCV k-means in CIE Lab, seeded); clusters ranked
  by lightness: darkest = nucleus, middle = cytoplasm, lightest = background. The cell is the
  connected region of nucleus + cytoplasm holding the nucleus nearest the crop centre, holes filled.
- ``GrabCutSegmenter``: OpenCV GrabCut seeded with the cell's box inside the crop (the crop is the
  box x ``crop_margin``, centred); the nucleus is the darker Otsu class of the green channel
  inside the cell.
Both work at the crop's own size and return 0 background / 1 cytoplasm / 2 nucleus.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Binary mask with enclosed holes filled (pixels not reachable from the border)."""
    m = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(m, np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8), (0, 0), 2)
    return (m != 2)[1:-1, 1:-1]


def _component_at_centre(mask: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """The connected component of ``mask`` nearest the centre (or overlapping ``seeds`` most)."""
    n, lab, _, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    if n <= 1:
        return np.zeros(mask.shape, bool)
    h, w = mask.shape
    if seeds is not None and seeds.any():
        overlap = np.bincount(lab[seeds > 0], minlength=n)
        overlap[0] = 0
        if overlap.max() > 0:
            return lab == int(overlap.argmax())
    d = ((cents[1:, 0] - w / 2) ** 2 + (cents[1:, 1] - h / 2) ** 2)
    return lab == int(d.argmin()) + 1


def _compose(cell: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    out = np.zeros(cell.shape, np.uint8)
    out[cell] = 1
    out[cell & nucleus] = 2
    return out


class KMeansSegmenter:
    """K-means colour clustering, K=3 (see the module docstring)."""

    def __init__(self, k: int = 3, seed: int = 0, attempts: int = 3, crop_margin: float = 1.3,
                 input_size: int = 128):
        self.k, self.seed, self.attempts = k, seed, attempts
        self.crop_margin, self.input_size = float(crop_margin), int(input_size)  # pipeline crop geometry

    def segment_one(self, crop: np.ndarray) -> np.ndarray:
        lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
        cv2.setRNGSeed(self.seed)
        crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
        _, labels, centres = cv2.kmeans(lab, self.k, None, crit, self.attempts, cv2.KMEANS_PP_CENTERS)
        rank = np.argsort(np.argsort(centres[:, 0]))  # 0 = darkest
        order = rank[labels.ravel()].reshape(crop.shape[:2])
        nucleus_px = order == 0
        cyto_px = (order > 0) & (order < self.k - 1)
        core = _component_at_centre(cv2.morphologyEx(nucleus_px.astype(np.uint8), cv2.MORPH_OPEN,
                                                     np.ones((3, 3), np.uint8)) > 0)
        cell = _component_at_centre(nucleus_px | cyto_px, seeds=core)
        cell = _fill_holes(cv2.morphologyEx(cell.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0)
        return _compose(cell, nucleus_px)

    def segment(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.segment_one(np.asarray(c)) for c in crops]


class GrabCutSegmenter:
    """GrabCut from the cell box (see the module docstring)."""

    def __init__(self, crop_margin: float = 1.3, iterations: int = 5, input_size: int = 128):
        self.crop_margin, self.iterations, self.input_size = float(crop_margin), int(iterations), int(input_size)

    def segment_one(self, crop: np.ndarray) -> np.ndarray:
        h, w = crop.shape[:2]
        bw, bh = w / self.crop_margin, h / self.crop_margin
        rect = (max(0, int((w - bw) / 2)), max(0, int((h - bh) / 2)), max(2, int(bw)), max(2, int(bh)))
        rect = (rect[0], rect[1], min(rect[2], w - rect[0] - 1), min(rect[3], h - rect[1] - 1))
        gc = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), gc, rect, bgd, fgd, self.iterations,
                        cv2.GC_INIT_WITH_RECT)
        except cv2.error:  # degenerate crops (flat colour): nothing found
            return np.zeros((h, w), np.uint8)
        cell = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        cell = _fill_holes(_component_at_centre(cell))
        if cell.sum() < 10:
            return np.zeros((h, w), np.uint8)
        green = crop[..., 1]
        thr, _ = cv2.threshold(green[cell].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return _compose(cell, green <= thr)

    def segment(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.segment_one(np.asarray(c)) for c in crops]
