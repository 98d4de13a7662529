"""Deterministic synthetic blood-smear fields with exact ground truth, for tests and examples.

Drawn at the scale and colours of a May-Grunwald-Giemsa smear at 100x oil as in BCCD (640x480):
red cells 80-100 px across with central pallor, white cells 110-200 px with lobed or round violet
nuclei, platelets 15-30 px, on a pale grey background, with defocus blur, noise and a vignette.
Stains are painted as optical densities (Beer-Lambert), so overlapping cells darken as on glass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from smear.taxonomy import CellKind
from smear.types import Detection

#: White-cell kinds the generator draws (fine classes).
WBC_KINDS: tuple[str, ...] = ("SNE", "BNE", "LY", "MO", "EO", "BA")
BACKGROUND_RGB = (207.0, 208.0, 205.0)
REF_AREA = 640 * 480  # densities below are per BCCD field
_OD_OFFSET = 0.1  # the render table also holds slightly negative density (brighter than background)

# Optical density per unit stain, RGB (transmitted = background * exp(-od)).
OD_RBC = (0.13, 0.27, 0.255)
OD_NUCLEUS = (0.42, 0.60, 0.02)
OD_PLATELET = (0.40, 0.58, 0.06)
OD_CYTO = {"SNE": (0.05, 0.13, 0.0), "BNE": (0.05, 0.13, 0.0), "EO": (0.02, 0.12, 0.10),
           "BA": (0.10, 0.16, 0.02), "LY": (0.12, 0.07, 0.0), "MO": (0.12, 0.11, 0.02)}
OD_GRANULE = {"EO": (0.0, 0.28, 0.42), "BA": (0.9, 1.1, 0.35)}
# White-cell radius range in px per kind.
WBC_RADIUS = {"SNE": (68, 86), "BNE": (66, 84), "EO": (70, 88), "BA": (62, 78), "LY": (52, 66),
              "MO": (80, 100)}


@dataclass(frozen=True)
class SynthField:
    """A synthetic field: RGB uint8 image, ground-truth detections, fine class of each WBC.

    ``wbc_labels[i]`` is the class of the i-th WBC in ``detections`` (WBCs come first);
    ``wbc_mask`` marks white-cell pixels: 0 other, 1 cytoplasm, 2 nucleus (before defocus).
    """

    image_rgb: np.ndarray
    detections: tuple[Detection, ...]
    wbc_labels: tuple[str, ...]
    wbc_mask: np.ndarray | None = None


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_px: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise of size h x w with blobs about ``cell_px`` across."""
    gh, gw = max(2, int(h / cell_px) + 2), max(2, int(w / cell_px) + 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@dataclass(frozen=True)
class _Ellipse:
    """An ellipse in a patch: centre (cx, cy) in patch px, radii along its axes, the axes' angle (rad)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float


def _shape(rng, hw: tuple[int, int], e: _Ellipse, wobble, soft):
    """Alpha (0..1) of the wobbly ellipse ``e`` in an h x w patch, and its radial coordinate."""
    h, w = hw
    rx, ry = e.rx, e.ry
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx + 0.5 - e.cx, yy + 0.5 - e.cy
    c, s = np.cos(e.angle), np.sin(e.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    z = (u + 1j * v).astype(np.complex64)
    z /= np.maximum(np.abs(z), 1e-3)  # e^{i theta}; harmonics by powers, cheaper than arctan2 + cos
    z2 = z * z
    scale = np.ones(u.shape, np.float32)
    for k, zk in ((2, z2), (3, z2 * z), (5, z2 * z2 * z)):
        phase = np.exp(1j * rng.uniform(0, 2 * np.pi))
        scale += (wobble * rng.uniform(-1, 1) / k) * (zk * phase).real
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / scale
    return _unit((1.0 - d) * (min(rx, ry) / soft) + 0.5), d


def _unit(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (np.clip is slow on small arrays)."""
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


class _Canvas:
    """Optical-density canvas with per-cell alpha bookkeeping for tight boxes."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.od = np.zeros((h, w, 3), np.float32)
        self.labels = np.zeros((h, w), np.uint8)  # white cells: 1 cytoplasm, 2 nucleus

    def window(self, cx: float, cy: float, half: float):
        x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
        x1, y1 = min(self.w, int(cx + half) + 1), min(self.h, int(cy + half) + 1)
        return x0, y0, x1, y1

    def add(self, win, amount: np.ndarray, od_rgb) -> None:
        x0, y0, x1, y1 = win
        self.od[y0:y1, x0:x1] += amount[..., None] * np.asarray(od_rgb, np.float32)


def _box(win, alpha: np.ndarray, thr: float = 0.5) -> tuple[float, float, float, float] | None:
    ys = np.nonzero((alpha >= thr).any(axis=1))[0]
    xs = np.nonzero((alpha >= thr).any(axis=0))[0]
    if len(xs) == 0 or len(ys) == 0:
        return None
    x0, y0 = win[0], win[1]
    return (float(x0 + xs[0]), float(y0 + ys[0]), float(x0 + xs[-1] + 1), float(y0 + ys[-1] + 1))


def _draw_rbc(cv: _Canvas, rng, cx, cy, r, stain):
    win = cv.window(cx, cy, r * 1.25 + 3)
    h, w = win[3] - win[1], win[2] - win[0]
    ecc = rng.uniform(0.88, 1.0)
    alpha, d = _shape(rng, (h, w), _Ellipse(cx - win[0], cy - win[1], r, r * ecc, rng.uniform(0, np.pi)), 0.15,
                      rng.uniform(2.0, 3.5))
    pallor = rng.uniform(0.45, 0.8)
    profile = 1.0 - pallor * np.exp(-(d / rng.uniform(0.4, 0.55)) ** 4) + 0.2 * np.exp(-((d - 0.8) / 0.12) ** 2)
    cv.add(win, alpha * profile * stain * rng.uniform(0.85, 1.15), OD_RBC)
    return _box(win, alpha)


def _nucleus(kind: str, r: float, size: int, rng) -> np.ndarray:
    """Nucleus alpha (float32, size x size) for a cell of radius r centred in the patch."""
    out = np.zeros((size, size), np.uint8)
    c = size / 2.0
    rot = rng.uniform(0, 2 * np.pi)

    def pt(a, rad):
        return int(c + rad * np.cos(a)), int(c + rad * np.sin(a))

    if kind in ("SNE", "EO"):
        n = 2 if kind == "EO" else int(rng.integers(2, 6))
        spread = 0.85 * np.pi if n == 2 else rng.uniform(1.0, 1.5) * np.pi
        lobe = r * (0.4 if n == 2 else 0.37 - 0.015 * n)
        prev = None
        for k in range(n):
            a = rot + spread * (k / max(n - 1, 1) - 0.5) + rng.uniform(-0.12, 0.12)
            p = pt(a, r * rng.uniform(0.28, 0.36))
            axes = (int(lobe * rng.uniform(0.95, 1.15)), int(lobe * rng.uniform(0.75, 0.95)))
            cv2.ellipse(out, p, axes, float(np.degrees(a + rng.uniform(-0.5, 0.5))), 0, 360, 255, -1, cv2.LINE_AA)
            if prev is not None:
                cv2.line(out, prev, p, 255, max(3, int(r * 0.1)), cv2.LINE_AA)
            prev = p
    elif kind == "BNE":  # a thick band bent into a C or S
        cv2.ellipse(out, (int(c), int(c)), (int(r * 0.45), int(r * 0.4)), float(np.degrees(rot)), 0,
                    rng.uniform(210, 280), 255, max(8, int(r * 0.3)), cv2.LINE_AA)
    elif kind == "MO":  # kidney: an ellipse with a bite out of one side
        cv2.ellipse(out, (int(c), int(c)), (int(r * 0.62), int(r * 0.46)), float(np.degrees(rot)), 0, 360,
                    255, -1, cv2.LINE_AA)
        cv2.circle(out, pt(rot + np.pi / 2, r * 0.55), int(r * 0.3), 0, -1, cv2.LINE_AA)
    else:  # LY: big round nucleus, slightly eccentric; BA: round nucleus under the granules
        f = 0.78 if kind == "LY" else 0.55
        off = pt(rot, r * rng.uniform(0.0, 0.1))
        cv2.ellipse(out, off, (int(r * f), int(r * f * rng.uniform(0.88, 1.0))), float(np.degrees(rot)), 0, 360,
                    255, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(out.astype(np.float32) / 255.0, (0, 0), 1.2)


def _draw_wbc(cv: _Canvas, rng, cx, cy, kind, r, stain):
    half = int(r * 1.2) + 4
    size = 2 * half + 1
    alpha, _ = _shape(rng, (size, size), _Ellipse(half + 0.5, half + 0.5, r, r * rng.uniform(0.88, 1.0),
                                                  rng.uniform(0, np.pi)), 0.05, 2.5)
    nuc = _nucleus(kind, r, size, rng) * (alpha > 0.6)
    gx0, gy0 = int(cx) - half, int(cy) - half
    win = cv.window(gx0 + half, gy0 + half, half)
    sl = np.s_[win[1] - gy0:win[3] - gy0, win[0] - gx0:win[2] - gx0]
    tex = _smooth_noise(rng, size, size, 3.0)
    cyto = alpha * (1.0 - nuc) * np.clip(1.0 + 0.4 * tex, 0, 2)
    cv.add(win, (cyto * stain)[sl], OD_CYTO[kind])
    chrom = np.clip(1.0 + 0.2 * _smooth_noise(rng, size, size, 9.0), 0.55, 1.6) * rng.uniform(0.95, 1.2)
    cv.add(win, (nuc * chrom * stain * (0.55 if kind == "BA" else 1.0))[sl], OD_NUCLEUS)
    lab = cv.labels[win[1]:win[3], win[0]:win[2]]
    lab[(alpha[sl] >= 0.5) & (lab == 0)] = 1
    lab[(nuc[sl] >= 0.5) & (alpha[sl] >= 0.5)] = 2
    if kind in OD_GRANULE:
        n_gran = int(alpha.sum() / (4.0 if kind == "EO" else 12.0))
        gran = np.zeros((size, size), np.float32)
        ys, xs = rng.integers(0, size, n_gran), rng.integers(0, size, n_gran)
        keep = (alpha[ys, xs] > 0.7) & ((nuc[ys, xs] < 0.5) if kind == "EO" else True)
        np.add.at(gran, (ys[keep], xs[keep]), 1.0)
        gran = cv2.GaussianBlur(gran, (0, 0), 1.1 if kind == "EO" else 1.6) * (5.0 if kind == "EO" else 10.0)
        cv.add(win, (np.clip(gran, 0, 1.2) * alpha * stain)[sl], OD_GRANULE[kind])
    return _box(win, alpha[sl])


def _draw_platelet(cv: _Canvas, rng, cx, cy, stain):
    """A pale hyalomere with a darker granular centre, 18-30 px across."""
    r = rng.uniform(9.0, 15.0)
    win = cv.window(cx, cy, r * 1.6 + 3)
    h, w = win[3] - win[1], win[2] - win[0]
    alpha, d = _shape(rng, (h, w), _Ellipse(cx - win[0], cy - win[1], r, r * rng.uniform(0.65, 0.95),
                                            rng.uniform(0, np.pi)), 0.3, 1.5)
    grain = np.clip(1.0 + 0.35 * _smooth_noise(rng, h, w, 2.5), 0.3, 1.8)
    core = 0.3 + 1.0 * np.exp(-(d / rng.uniform(0.45, 0.65)) ** 2)
    cv.add(win, alpha * grain * core * stain * rng.uniform(0.8, 1.2), OD_PLATELET)
    return _box(win, alpha)


def _place(rng, w, h, radius, taken, gap, margin=0.0, tries=40):
    """A centre at least ``gap * (r_i + radius)`` from each taken disc, else the roomiest of ``tries``."""
    lo_x, lo_y = min(margin, w / 2), min(margin, h / 2)
    pts = rng.uniform((lo_x, lo_y), (w - lo_x, h - lo_y), size=(tries, 2))
    if taken:
        arr = np.asarray(taken, np.float32)
        dist = np.hypot(pts[:, None, 0] - arr[None, :, 0], pts[:, None, 1] - arr[None, :, 1])
        clearance = (dist - gap * (arr[None, :, 2] + radius)).min(axis=1)
        ok = np.nonzero(clearance > 0)[0]
        pick = pts[ok[0]] if len(ok) else pts[int(np.argmax(clearance))]  # crowded: least overlap
    else:
        pick = pts[0]
    taken.append((float(pick[0]), float(pick[1]), radius))
    return float(pick[0]), float(pick[1])


def make_field(seed: int, width: int = 640, height: int = 480, n_wbc: int | None = None,
               n_rbc: int | None = None, n_platelets: int | None = None,
               wbc_kinds: Sequence[str] | None = None, flat: bool = False) -> SynthField:
    """A seeded synthetic field and its ground-truth boxes (clipped to the image).

    ``flat`` leaves out the vignette and the illumination drift, as a slide scanner's flat-field
    correction does (tiles of a whole slide then meet without steps).
    Counts left as None are drawn at BCCD density for the field's area. White-cell kinds cycle
    through ``wbc_kinds`` in order; by default each is drawn uniformly from WBC_KINDS.
    """
    if width < 1 or height < 1:
        raise ValueError(f"field size must be positive, got {width}x{height}")
    explicit = bool(wbc_kinds)
    kinds = tuple(wbc_kinds) if explicit else WBC_KINDS
    bad = [k for k in kinds if k not in WBC_RADIUS]
    if bad:
        raise ValueError(f"unknown WBC kind(s) {bad}; known: {', '.join(WBC_KINDS)}")
    rng = np.random.default_rng(seed)
    scale = width * height / REF_AREA
    if n_wbc is None:  # as in BCCD, a full-size field has at least one white cell
        n_wbc = int(rng.poisson(1.15 * scale)) if scale < 0.5 else max(1, int(rng.poisson(1.15 * scale)))
    n_rbc = int(rng.poisson(22 * scale)) if n_rbc is None else n_rbc
    n_platelets = int(rng.poisson(1.2 * scale)) if n_platelets is None else n_platelets
    if min(n_wbc, n_rbc, n_platelets) < 0:
        raise ValueError("cell counts must be >= 0")
    stain = rng.uniform(0.9, 1.12)
    cv = _Canvas(height, width)
    taken: list[tuple[float, float, float]] = []
    picks = np.arange(n_wbc) % len(kinds) if explicit else rng.integers(0, len(kinds), n_wbc)
    wbcs = []
    for kind in (kinds[int(i)] for i in picks):
        r = rng.uniform(*WBC_RADIUS[kind])
        wbcs.append((kind, r, *_place(rng, width, height, r, taken, 1.1, margin=0.4 * r)))
    n_wbc_taken = len(taken)
    taken[:] = [(x, y, r * 1.2) for x, y, r in taken]  # red cells may touch white ones, barely overlap
    rbcs = [_place(rng, width, height, 46.0, taken, 0.78) for _ in range(n_rbc)]
    del taken[n_wbc_taken:]  # platelets may sit on red cells, not on white ones
    plts = [_place(rng, width, height, 14.0, taken, 1.0) for _ in range(n_platelets)]
    wbc_boxes = [(kind, _draw_wbc(cv, rng, cx, cy, kind, r, stain)) for kind, r, cx, cy in wbcs]
    boxes = [(CellKind.WBC, b) for _, b in wbc_boxes]
    boxes += [(CellKind.RBC, _draw_rbc(cv, rng, cx, cy, rng.normal(45.0, 2.5), stain)) for cx, cy in rbcs]
    boxes += [(CellKind.PLATELET, _draw_platelet(cv, rng, cx, cy, stain)) for cx, cy in plts]
    image = _render(cv.od, rng, flat)
    dets = tuple(Detection(b, k, 1.0) for k, b in boxes if b is not None)
    return SynthField(image, dets, tuple(kind for kind, b in wbc_boxes if b is not None), cv.labels)


def _render(od: np.ndarray, rng, flat: bool = False) -> np.ndarray:
    """Optical density -> RGB: background colour, uneven illumination, defocus, sensor noise."""
    h, w = od.shape[:2]
    bg = np.asarray(BACKGROUND_RGB, np.float32) * rng.normal(1.0, 0.015) + rng.normal(0, 1.5, 3).astype(np.float32)
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    # vignette, slow illumination drift and luminance noise (~2 grey levels), all as density
    extra = 0.07 * ((xx - cx) ** 2 + (yy - cy) ** 2) + 0.012 * _smooth_noise(rng, h, w, 160.0)
    if flat:
        extra = np.zeros((h, w), np.float32)
    extra += rng.standard_normal((h, w), dtype=np.float32) * 0.01
    od = cv2.GaussianBlur(od, (0, 0), rng.uniform(1.0, 1.6))
    od += extra[..., None]
    # exp through a table on density quantised to 1/128 (the noise dithers the steps): much faster
    steps = np.arange(256, dtype=np.float32) / 128.0 - _OD_OFFSET
    lut = np.clip(bg[None, :] * np.exp(-steps)[:, None] + 0.5, 0, 255).astype(np.uint8).reshape(256, 1, 3)
    return cv2.LUT(cv2.convertScaleAbs(od, alpha=128.0, beta=128.0 * _OD_OFFSET), lut)


def make_large_field(seed: int, width: int = 2000, height: int = 1500, **counts) -> SynthField:
    """A big mosaic (e.g. 2000x1500) with BCCD cell density, for testing tiled detection."""
    return make_field(seed, width=width, height=height, **counts)
