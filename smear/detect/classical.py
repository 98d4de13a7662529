"""A detector with no training: colour masks, morphology and connected components.

Leukocyte nuclei and platelets are strongly blue/violet (blue well above red), red cells are red
(red well above blue), the background is pale. Thresholds adapt to each field through Otsu on the
blue-minus-red channel, with floors so a field without white cells finds none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage

from smear.types import CellKind, ConfigError, Detection


@dataclass(frozen=True)
class ClassicalParams:
    """Sizes are in pixels at the scale of a 640x480 field at 100x oil."""

    min_blue: float = 45.0          # floor of the blue-minus-red threshold for nuclei
    max_blue: float = 90.0          # ceiling of the Otsu threshold
    merge_px: int = 27              # nuclear lobes closer than this are one cell
    min_nucleus_px: int = 2000      # smaller blue components are platelets (or noise)
    min_platelet_px: int = 40
    platelet_blue: float = 34.0     # platelets stain weaker than nuclei
    platelet_min_side: float = 36.0  # platelet boxes are drawn at least this big (as annotated in BCCD)
    wbc_grow: float = 0.18          # nucleus box grown by this fraction of its long side per edge
    wbc_pad_px: float = 8.0
    red_delta: float = 8.0          # red-minus-blue above this (and darker than background) is a red cell
    dark_delta: float = 14.0        # green darker than the background by this much
    rbc_min_radius: float = 26.0
    rbc_peak_dist: float = 38.0     # centres of separate red cells are at least this far apart


class ClassicalDetector:
    """Implements the Detector protocol with colour rules; keyword overrides of ClassicalParams."""

    def __init__(self, **overrides: Any):
        known = {f.name for f in fields(ClassicalParams)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown classical detector parameter(s): {', '.join(unknown)}",
                              hint=f"known: {', '.join(sorted(known))}")
        self.params = ClassicalParams(**overrides)

    def config(self) -> dict[str, Any]:
        return asdict(self.params)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per RGB uint8 field."""
        return [self._detect_one(im) for im in images]

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        p = self.params
        if image.ndim != 3 or image.shape[0] < 8 or image.shape[1] < 8:
            return []
        img = cv2.GaussianBlur(image, (5, 5), 0).astype(np.int16)
        r, b = img[..., 0], img[..., 2]
        blue = np.clip(b - r, 0, 255).astype(np.uint8)
        otsu, _ = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = float(np.clip(otsu, p.min_blue, p.max_blue))
        nuclei = (blue > thr).astype(np.uint8)
        nuclei = cv2.morphologyEx(nuclei, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
        h, w = nuclei.shape
        out: list[Detection] = []
        merged = cv2.dilate(nuclei, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (p.merge_px, p.merge_px)))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
        wbc_mask = np.zeros_like(nuclei)
        for i in range(1, n):
            x, y, bw, bh, _ = stats[i]
            comp = (labels[y:y + bh, x:x + bw] == i) & (nuclei[y:y + bh, x:x + bw] > 0)
            area = int(comp.sum())
            if area < p.min_platelet_px:
                continue
            ys, xs = np.nonzero(comp)
            x0, y0, x1, y1 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
            strength = float(blue[y:y + bh, x:x + bw][comp].mean())
            score = float(np.clip((strength - thr) / 60.0 + 0.5, 0.05, 1.0))
            if area >= p.min_nucleus_px:
                grow = p.wbc_grow * max(x1 - x0, y1 - y0) + p.wbc_pad_px
                box = (max(0.0, x0 - grow), max(0.0, y0 - grow), min(float(w), x1 + grow), min(float(h), y1 + grow))
                out.append(Detection(box, CellKind.WBC, score))
                wbc_mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 1
        out += self._platelets(blue, wbc_mask)
        out += self._red_cells(img, wbc_mask)
        return out

    def _platelets(self, blue: np.ndarray, wbc_mask: np.ndarray) -> list[Detection]:
        p = self.params
        mask = ((blue > p.platelet_blue) & (wbc_mask == 0)).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
        n, _, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
        h, w = mask.shape
        out = []
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if not (p.min_platelet_px <= area < p.min_nucleus_px):
                continue
            cx, cy = cents[i]
            half = max(max(bw, bh) / 2.0 + 6.0, p.platelet_min_side / 2.0)
            score = float(np.clip(area / 400.0, 0.1, 0.9))
            out.append(Detection((max(0.0, cx - half), max(0.0, cy - half), min(float(w), cx + half),
                                  min(float(h), cy + half)), CellKind.PLATELET, score))
        return out

    def _red_cells(self, img: np.ndarray, wbc_mask: np.ndarray) -> list[Detection]:
        p = self.params
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        red = ((r - b) > p.red_delta) & (g < np.percentile(g, 90) - p.dark_delta) & (wbc_mask == 0)
        red = ndimage.binary_fill_holes(cv2.morphologyEx(red.astype(np.uint8), cv2.MORPH_CLOSE,
                                                          np.ones((5, 5), np.uint8)))
        red = cv2.morphologyEx(red.astype(np.uint8), cv2.MORPH_OPEN, np.ones((7, 7), np.uint8))
        if not red.any():
            return []
        dist = cv2.distanceTransform(red, cv2.DIST_L2, 5)
        size = int(2 * p.rbc_peak_dist + 1)
        peaks = (dist == ndimage.maximum_filter(dist, size=size)) & (dist >= p.rbc_min_radius)
        ys, xs = np.nonzero(peaks)
        h, w = red.shape
        out, seen = [], []
        for y, x in sorted(zip(ys.tolist(), xs.tolist()), key=lambda t: -dist[t]):
            if any((x - sx) ** 2 + (y - sy) ** 2 < p.rbc_peak_dist ** 2 for sx, sy in seen):
                continue
            seen.append((x, y))
            rad = float(dist[y, x]) * 1.08 + 2.0
            out.append(Detection((max(0.0, x - rad), max(0.0, y - rad), min(float(w), x + rad),
                                  min(float(h), y + rad)), CellKind.RBC, 0.5))
        return out
