"""Find the stained cell in a single-cell image (PBC style: one WBC near the centre) as a box.

Training crops must have the geometry the pipeline gives the classifier at inference: a square
of side = long side of the WBC box x margin around the detector's box. Single-cell datasets give
no box, so we estimate the one a detector would draw: nucleus plus cytoplasm of the cell nearest
the centre.

Why ``B - G``: Romanowsky stains (May-Grunwald-Giemsa, Wright) colour nuclei purple and most
WBC cytoplasm lilac or blue, so blue exceeds green there; red cells and plasma are pink or cream,
where green is close to or above blue. Subtracting the image's median (background and red
cells) makes the score independent of the white balance.
"""

from __future__ import annotations

import cv2
import numpy as np

from smear.crops import stain_score

#: Bumped whenever the algorithm changes, so crop caches keyed on it are rebuilt.
CELLBOX_VERSION = 1

WORK_SIDE = 128           # the mask is computed on a copy whose long side is this many pixels
FALLBACK_FRACTION = 0.45  # fallback box side as a fraction of the image's short side
NUCLEUS_LEVEL = 0.45      # fraction of the 99.5th-percentile score: nucleus
CYTO_LEVEL = 0.10         # ... and cytoplasm
LOBE_REACH = 0.35         # nucleus blobs within this x the first blob's size are its lobes
RAY_GAP = 3               # px of outside in a row that end the cell along a ray
RAY_CLIP = 1.3            # rays longer than this x their median are neighbours, clipped


def central_box(h: int, w: int, fraction: float = FALLBACK_FRACTION) -> tuple[float, float, float, float]:
    """A square box of side ``fraction`` x short side, centred on the image."""
    side = fraction * min(h, w)
    cx, cy = w / 2.0, h / 2.0
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _component_near_centre(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int] | None:
    """Labels of ``mask`` and the label of the component (area >= min_area) nearest the centre."""
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    best, best_d = None, np.inf
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        # distance from the centre to the component's nearest pixel, so a cell covering the
        # centre wins over a small blob whose centroid happens to be nearer
        ys, xs = np.nonzero(labels == i)
        d = float(np.min((xs - w / 2.0) ** 2 + (ys - h / 2.0) ** 2))
        d = d + 1e-3 * float((cents[i, 0] - w / 2.0) ** 2 + (cents[i, 1] - h / 2.0) ** 2)
        if d < best_d:
            best, best_d = i, d
    return None if best is None else (labels, best)


_ANGLES = np.linspace(0, 2 * np.pi, 48, endpoint=False)


def _ray_lengths(mask: np.ndarray, cx: float, cy: float, gap: int = RAY_GAP) -> np.ndarray:
    """Per angle, the distance from (cx, cy) to where ``mask`` ends (``gap`` px of outside in a row)."""
    h, w = mask.shape
    steps = np.arange(0, int(np.hypot(h, w)) + 1, dtype=np.float32)
    xs = np.rint(cx + np.cos(_ANGLES)[:, None] * steps[None, :]).astype(int)
    ys = np.rint(cy + np.sin(_ANGLES)[:, None] * steps[None, :]).astype(int)
    valid = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    inside = np.zeros(xs.shape, dtype=bool)
    inside[valid] = mask[ys[valid], xs[valid]]
    out = np.zeros(len(_ANGLES), dtype=np.float32)
    for i, row in enumerate(inside):
        # first index where `gap` outside samples follow in a row (or the ray leaves the image)
        run = np.convolve(~row, np.ones(gap, dtype=int), mode="valid") >= gap
        stop = int(np.argmax(run)) if run.any() else len(row)
        stop = min(stop, int(np.argmax(~valid[i])) if (~valid[i]).any() else len(row))
        out[i] = max(0, stop - 1)
    return out


def find_cell_box_info(image_rgb: np.ndarray) -> tuple[tuple[float, float, float, float], bool]:
    """``(box_xyxy, fell_back)``: the stained cell nearest the centre, or a central box."""
    h, w = image_rgb.shape[:2]
    fallback = central_box(h, w), True
    if h < 8 or w < 8:
        return fallback
    scale = WORK_SIDE / max(h, w)
    small = cv2.resize(image_rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image_rgb
    scale = small.shape[1] / w
    sh, sw = small.shape[:2]
    score = stain_score(small)
    top = float(np.percentile(score, 99.5))
    if top < 12.0:  # no purple at all: blank, unstained or not a Romanowsky image
        return fallback
    min_area = max(4, int(0.004 * sh * sw))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))

    # 1. nucleus (or the whole cell when it is dark throughout): the strongly stained blob
    nucleus = cv2.morphologyEx((score > NUCLEUS_LEVEL * top).astype(np.uint8), cv2.MORPH_OPEN, kernel)
    found = _component_near_centre(nucleus, min_area)
    if found is None:
        return fallback
    labels, k = found
    nuc = labels == k
    # a segmented neutrophil's lobes are separate blobs: take in those close to the chosen one
    ys, xs = np.nonzero(nuc)
    reach = max(2, int(round(LOBE_REACH * max(np.ptp(xs), np.ptp(ys)))))
    near = cv2.dilate(nuc.astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))).astype(bool)
    lobes = np.unique(labels[near & (labels > 0)])
    nuc = np.isin(labels, lobes)
    ys, xs = np.nonzero(nuc)
    nx0, ny0, nx1, ny1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1

    # 2. cell = nucleus + the weakly stained cytoplasm around it. Red cells touching the WBC can
    # join that mask, so measure the cell along rays from the nucleus and clip rays far longer
    # than the median: a cell is roughly round, neighbours stick out in a few directions only.
    cell = (score > CYTO_LEVEL * top).astype(np.uint8)
    cell = cv2.morphologyEx(cell, cv2.MORPH_OPEN, kernel) | nuc.astype(np.uint8)
    cy, cx = float(ys.mean()), float(xs.mean())
    lengths = _ray_lengths(cell.astype(bool), cx, cy)
    lengths = np.minimum(lengths, RAY_CLIP * float(np.median(lengths)))
    px = cx + lengths * np.cos(_ANGLES)
    py = cy + lengths * np.sin(_ANGLES)
    x0, y0 = min(float(px.min()), nx0), min(float(py.min()), ny0)
    x1, y1 = max(float(px.max()) + 1, nx1), max(float(py.max()) + 1, ny1)
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(sw), x1), min(float(sh), y1)

    # sanity: tiny cells or a box that swallowed half the image means the mask failed
    side = max(x1 - x0, y1 - y0)
    if side < 0.06 * max(sh, sw) or (x1 - x0) * (y1 - y0) > 0.8 * sh * sw:
        return fallback
    box = (x0 / scale, y0 / scale, x1 / scale, y1 / scale)
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3])), False


def find_cell_box(image_rgb: np.ndarray) -> tuple[float, float, float, float]:
    """Box xyxy of the stained cell (nucleus + cytoplasm) nearest the image centre; falls back
    to a central box of side 0.45 x the short side when no stained cell is found."""
    return find_cell_box_info(image_rgb)[0]
