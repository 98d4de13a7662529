"""A detector with no training: colour masks, morphology and connected components.

On a May-Grunwald-Giemsa smear leukocyte nuclei and platelets are violet (blue well above red),
red cells are pink (darker than the background, red above blue) and the background is pale
grey. Nuclear lobes are grouped into one white cell, whose box grows into the lilac or blue
cytoplasm around it within measured limits. Small isolated violet specks are platelets. Red cells
are circles of red-cell size on the green channel (Hough) with a pink disc. Sizes are in pixels at
the scale of a 640x480 field at 100x oil (BCCD); thresholds adapt to each field (Otsu, background percentiles),
with floors so a field without white cells finds none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from smear.errors import ConfigError
from smear.taxonomy import CellKind
from smear.types import Detection


@dataclass(frozen=True)
class ClassicalParams:
    """Thresholds and sizes of the classical detector (pixels at BCCD scale, 8-bit colour units)."""

    min_blue: float = 45.0          # floor of the Otsu threshold on blue-minus-red for nuclei
    max_blue: float = 90.0          # ceiling of that threshold
    merge_px: int = 27              # nuclear lobes closer than this are one cell
    min_nucleus_px: int = 2000      # violet groups at least this big are white cells
    wbc_min_grow: float = 0.04      # the cell box reaches at least this * nucleus size past the nucleus,
    wbc_max_grow: float = 0.30      # at most this (cytoplasm decides in between), plus pad
    wbc_pad_px: float = 8.0
    wbc_min_aspect: float = 0.8     # white cells are round: the short side is widened to this * long side
    wbc_merge: float = 0.3          # cell boxes overlapping by this fraction of the smaller are one cell
    cyto_blue: float = 9.0          # cytoplasm: blue-minus-red above the field median by this,
    cyto_dark: float = 10.0         # and green darker than the background by this
    min_platelet_px: int = 100
    platelet_blue: float = 28.0     # platelets stain weaker than nuclei
    platelet_pad_px: float = 6.0
    platelet_min_side: float = 34.0  # platelet boxes are at least this big (BCCD boxes them loosely)
    red_delta: float = 8.0          # red cells: red-minus-blue above this and
    dark_delta: float = 14.0        # green darker than the background by this
    rbc_min_radius: float = 32.0    # red cells are found as circles (Hough) of these radii
    rbc_max_radius: float = 62.0
    rbc_min_dist: float = 65.0      # centres of separate red cells are at least this far apart
    rbc_edge: float = 30.0          # Canny high threshold on the green channel
    rbc_votes: float = 28.0         # accumulator votes a circle needs
    rbc_min_pink: float = 0.3       # fraction of the inner disc that must be red-cell coloured
    rbc_scale: float = 1.0          # box half-side = rbc_scale * circle radius

    def __post_init__(self) -> None:
        if self.merge_px < 1 or self.min_blue > self.max_blue or self.wbc_min_grow > self.wbc_max_grow:
            raise ConfigError("classical detector: merge_px must be >= 1, min_blue <= max_blue and "
                              "wbc_min_grow <= wbc_max_grow")


def _disk(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(1, px), max(1, px)))


def _clip_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> tuple[float, float, float, float]:
    return (max(0.0, float(x0)), max(0.0, float(y0)), min(float(w), float(x1)), min(float(h), float(y1)))


def _merge_overlapping(cells: list, frac: float) -> list:
    """Union boxes that overlap by ``frac`` of the smaller one (lobes split off one cell), max score."""
    cells = list(cells)
    merged = True
    while merged:
        merged = False
        for i in range(len(cells)):
            for j in range(i + 1, len(cells)):
                (a, sa), (b, sb) = cells[i], cells[j]
                iw = min(a[2], b[2]) - max(a[0], b[0])
                ih = min(a[3], b[3]) - max(a[1], b[1])
                small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                box = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                grows = max(box[2] - box[0], box[3] - box[1]) / max(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1])
                if iw > 0 and ih > 0 and iw * ih >= frac * small and grows <= 1.2:  # not two cells side by side
                    cells[i] = (box, max(sa, sb))
                    del cells[j]
                    merged = True
                    break
            if merged:
                break
    return cells


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
        """The parameters in effect, as a plain dict."""
        return asdict(self.params)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per RGB uint8 field."""
        return [self._detect_one(np.asarray(im)) for im in images]

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 16:
            return []
        img = cv2.GaussianBlur(image.astype(np.uint8, copy=False), (5, 5), 0).astype(np.int16)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        blue = np.clip(b - r, 0, 255).astype(np.uint8)
        g_bg = float(np.percentile(g, 90))  # the background is the brightest large area
        wbcs, wbc_mask = self._white_cells(blue, (b - r).astype(np.float32), g.astype(np.float32) - g_bg)
        out = wbcs + self._platelets(blue, wbc_mask)
        out += self._red_cells(image, r, g, b, g_bg, wbc_mask)
        return out

    def _white_cells(self, blue: np.ndarray, b_minus_r: np.ndarray,
                     g_rel: np.ndarray) -> tuple[list[Detection], np.ndarray]:
        p = self.params
        h, w = blue.shape
        otsu, _ = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = float(np.clip(otsu, p.min_blue, p.max_blue))
        nuclei = cv2.morphologyEx((blue > thr).astype(np.uint8), cv2.MORPH_OPEN, _disk(3))
        wbc_mask = np.zeros((h, w), np.uint8)
        if not nuclei.any():
            return [], wbc_mask
        cyto = ((b_minus_r > float(np.median(b_minus_r)) + p.cyto_blue) & (g_rel < -p.cyto_dark)).astype(np.uint8)
        cyto = cv2.morphologyEx(cyto, cv2.MORPH_OPEN, _disk(5))
        merged = cv2.dilate(nuclei, _disk(p.merge_px))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
        cells: list[tuple[tuple[float, float, float, float], float]] = []
        for i in range(1, n):
            x, y, bw, bh, _ = stats[i]
            comp = (labels[y:y + bh, x:x + bw] == i) & (nuclei[y:y + bh, x:x + bw] > 0)
            area = int(comp.sum())
            if area < p.min_nucleus_px:
                continue
            ys, xs = np.nonzero(comp)
            nb = (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)
            box = self._grow_into_cytoplasm(nb, comp, (x, y), cyto, w, h)
            strength = float(blue[y:y + bh, x:x + bw][comp].mean())
            score = float(np.clip(0.5 + (strength - thr) / 80.0, 0.05, 1.0)
                          * min(1.0, 0.6 + 0.4 * area / (3.0 * p.min_nucleus_px)))
            cells.append((box, score))
        out = [Detection(box, CellKind.WBC, round(score, 4)) for box, score in _merge_overlapping(cells, p.wbc_merge)]
        for d in out:
            x0, y0, x1, y1 = d.box_xyxy
            wbc_mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
        return out, wbc_mask

    def _grow_into_cytoplasm(self, nb, comp, origin, cyto, w, h):
        """The cell box: the nucleus box grown to the cytoplasm touching it, within the limits."""
        p = self.params
        side = max(nb[2] - nb[0], nb[3] - nb[1])
        lo, hi = p.wbc_min_grow * side + p.wbc_pad_px, p.wbc_max_grow * side + p.wbc_pad_px
        wx0, wy0 = max(0, int(nb[0] - hi)), max(0, int(nb[1] - hi))
        wx1, wy1 = min(w, int(np.ceil(nb[2] + hi))), min(h, int(np.ceil(nb[3] + hi)))
        region = cyto[wy0:wy1, wx0:wx1].copy()
        ox, oy = origin[0] - wx0, origin[1] - wy0
        ch, cw = comp.shape
        region[oy:oy + ch, ox:ox + cw] |= comp.astype(np.uint8)
        region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, _disk(7))
        _, lab = cv2.connectedComponents(region, connectivity=8)
        ids = np.unique(lab[oy:oy + ch, ox:ox + cw][comp])
        ys, xs = np.nonzero(np.isin(lab, ids[ids > 0]))
        cx0, cy0, cx1, cy1 = wx0 + xs.min(), wy0 + ys.min(), wx0 + xs.max() + 1, wy0 + ys.max() + 1
        # per edge: past the nucleus by at least lo, at most hi
        x0 = nb[0] - np.clip(nb[0] - cx0 + p.wbc_pad_px, lo, hi)
        y0 = nb[1] - np.clip(nb[1] - cy0 + p.wbc_pad_px, lo, hi)
        x1 = nb[2] + np.clip(cx1 - nb[2] + p.wbc_pad_px, lo, hi)
        y1 = nb[3] + np.clip(cy1 - nb[3] + p.wbc_pad_px, lo, hi)
        bw, bh = x1 - x0, y1 - y0
        if bw < p.wbc_min_aspect * bh:
            x0, x1 = x0 - (p.wbc_min_aspect * bh - bw) / 2, x1 + (p.wbc_min_aspect * bh - bw) / 2
        elif bh < p.wbc_min_aspect * bw:
            y0, y1 = y0 - (p.wbc_min_aspect * bw - bh) / 2, y1 + (p.wbc_min_aspect * bw - bh) / 2
        return _clip_box(x0, y0, x1, y1, w, h)

    def _platelets(self, blue: np.ndarray, wbc_mask: np.ndarray) -> list[Detection]:
        p = self.params
        mask = ((blue > p.platelet_blue) & (wbc_mask == 0)).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(3))
        n, _, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
        h, w = mask.shape
        out = []
        for i in range(1, n):
            _, _, bw, bh, area = stats[i]
            if not (p.min_platelet_px <= area < p.min_nucleus_px) or max(bw, bh) > 4 * min(bw, bh) + 4:
                continue
            cx, cy = cents[i]
            half = max(max(bw, bh) / 2.0 + p.platelet_pad_px, p.platelet_min_side / 2.0)
            score = float(np.clip(area / 400.0, 0.1, 0.9))
            out.append(Detection(_clip_box(cx - half, cy - half, cx + half, cy + half, w, h),
                                 CellKind.PLATELET, round(score, 4)))
        return out

    def _red_cells(self, image: np.ndarray, r, g, b, g_bg: float, wbc_mask: np.ndarray) -> list[Detection]:
        """Circles of red-cell size on the green channel (the rims), kept where the disc is pink."""
        p = self.params
        h, w = g.shape
        green = cv2.GaussianBlur(image[..., 1], (0, 0), 2.0)
        circles = cv2.HoughCircles(green, cv2.HOUGH_GRADIENT, dp=1.5, minDist=p.rbc_min_dist,
                                   param1=p.rbc_edge, param2=p.rbc_votes,
                                   minRadius=int(p.rbc_min_radius), maxRadius=int(p.rbc_max_radius))
        if circles is None:
            return []
        red = (((r - b) > p.red_delta) & (g < g_bg - p.dark_delta)).astype(np.float32)
        integral = cv2.integral(red)
        out: list[Detection] = []
        found = circles[0]
        for rank, (cx, cy, rad) in enumerate(found):
            x0, y0 = int(max(0, cx - rad * 0.7)), int(max(0, cy - rad * 0.7))
            x1, y1 = int(min(w, cx + rad * 0.7)), int(min(h, cy + rad * 0.7))
            if x1 <= x0 or y1 <= y0 or wbc_mask[int(min(cy, h - 1)), int(min(cx, w - 1))]:
                continue
            pink = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / ((x1 - x0) * (y1 - y0))
            if pink < p.rbc_min_pink:
                continue
            score = float(np.clip(0.9 - 0.5 * rank / len(found), 0.1, 0.9) * min(1.0, 0.5 + pink))
            rad = rad * p.rbc_scale
            out.append(Detection(_clip_box(cx - rad, cy - rad, cx + rad, cy + rad, w, h), CellKind.RBC, round(score, 4)))
        return out
