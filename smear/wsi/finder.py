"""The monolayer finder: score a slide's tiles on a low-resolution level, keep the monolayer, order
the reading path as a lab would (a serpentine through the monolayer), draw the quality map.

Cues per tile, from the optical density (OD) of a thumbnail at ``finder_mpp``:
- density: mean OD over the tile / the OD of one layer of red cells (``ref_od``), about the share of
  the tile that red cells cover (over 1 where they overlap);
- overlap: share of the tile whose OD is over ``overlap_od`` x ``ref_od`` (two layers of cells);
- background: share of the tile that is bare glass;
- focus (on the monolayer candidates only, from a probe patch read at the detector's scale):
  the band-pass energy ratio of ``sharpness``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

#: what a tile can be, in the order the checks are made
GLASS_OD = 0.12  # summed OD under this is bare glass (a 4% darkening): scanner shading and noise
KINDS = ("empty", "thick", "edge", "blurred", "monolayer")
KIND_BGR = {"monolayer": (60, 170, 60), "thick": (50, 50, 210), "edge": (0, 200, 230), "empty": (150, 150, 150),
            "blurred": (200, 60, 160)}


@dataclass(frozen=True)
class FinderSettings:
    """Thresholds of the finder (the ``wsi`` section of the pipeline config)."""

    min_density: float = 0.25   # under: feathered edge / thin
    max_density: float = 1.0    # over: thick
    max_overlap: float = 0.15   # share of the tile with two layers of cells; over: thick (clumped)
    empty_density: float = 0.05  # under: empty glass
    overlap_od: float = 1.5     # x ref_od: two layers of cells
    min_focus: float = 0.36     # sharpness under this: out of focus


@dataclass(frozen=True)
class TileScore:
    """One reading tile: grid place, core in level-0 pixels, scores and what it was judged to be."""

    row: int
    col: int
    x0: int
    y0: int
    size: int       # side of the core, level-0 px
    density: float
    overlap: float
    background: float
    focus: float | None
    kind: str

    @property
    def name(self) -> str:
        """The tile's field name in reports: its level-0 top-left."""
        return f"x{self.x0}_y{self.y0}"


@dataclass
class Plan:
    """The finder's result: every tile scored, the monolayer tiles in reading order, the thumbnail."""

    tiles: list[TileScore]
    path: list[TileScore]
    thumb_rgb: np.ndarray
    thumb_downsample: float   # level-0 px per thumbnail px
    ref_od: float
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def optical_density(rgb: np.ndarray, background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed OD over the three channels, per pixel, float32; the per-channel background used:
    the 99th percentile of each channel unless given)."""
    if background is None:
        background = np.array([np.percentile(rgb[::4, ::4, k], 99.0) for k in range(3)], np.float32)
    bg = np.maximum(np.asarray(background, np.float32), 1.0)
    od = np.zeros(rgb.shape[:2], np.float32)
    for k in range(3):  # a channel at a time: a large thumbnail is not held three times in float
        ratio = (rgb[..., k].astype(np.float32) + 0.5) / bg[k]
        od -= np.log(np.clip(ratio, 1e-3, 1.0))
    return od, bg


def sharpness(rgb: np.ndarray) -> float:
    """Focus of an RGB patch at the detector's scale: fine-band over mid-band energy on the strongest
    edges (blur removes the fine band first); about 0.4-0.9 in focus, under 0.35 blurred by 3 px."""
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    b1, b2, b3 = (cv2.GaussianBlur(g, (0, 0), s) for s in (0.8, 2.0, 5.0))
    mag = cv2.magnitude(cv2.Sobel(b2, cv2.CV_32F, 1, 0), cv2.Sobel(b2, cv2.CV_32F, 0, 1))
    strong = mag > np.percentile(mag, 95)
    if strong.sum() < 16 or float(mag.max()) < 1.0:
        return 0.0  # flat: nothing to focus on
    return float(np.abs(b1 - b2)[strong].mean() / (np.abs(b2 - b3)[strong].mean() + 1e-6))


def _area_mean(mask: np.ndarray, n_cols: int, n_rows: int, cell: float) -> np.ndarray:
    """Mean of ``mask`` over each grid cell of side ``cell`` thumbnail pixels (rows x cols)."""
    h, w = int(round(n_rows * cell)), int(round(n_cols * cell))
    part = np.zeros((h, w), np.float32)
    src = mask[:h, :w].astype(np.float32)
    part[:src.shape[0], :src.shape[1]] = src
    return cv2.resize(part, (n_cols, n_rows), interpolation=cv2.INTER_AREA)


def reference_od(od: np.ndarray, settings: FinderSettings) -> float:
    """The OD of one layer of red cells: the 90th percentile of cell pixels in the thumbnail's regions
    that show glass between their cells (so hold one layer), of the slide's cell pixels if there are none."""
    cells = od > GLASS_OD
    if cells.sum() < 50:
        return 1.0
    block = 16
    h, w = (od.shape[0] // block) * block, (od.shape[1] // block) * block
    glass = (~cells[:h, :w]).reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    thin = (glass > 0.15) & (glass < 0.85)
    if thin.sum() >= 4:
        keep = np.repeat(np.repeat(thin, block, 0), block, 1) & cells[:h, :w]
        if keep.sum() >= 50:
            return max(0.1, float(np.percentile(od[:h, :w][keep], 90)))
    return max(0.1, float(np.percentile(od[cells], 90)))


def score_tiles(thumb_rgb: np.ndarray, thumb_downsample: float, tile_l0: int, width_l0: int, height_l0: int,
                settings: FinderSettings) -> tuple[list[TileScore], float]:
    """Every whole tile of side ``tile_l0`` (level-0 px) scored and judged from the thumbnail
    (focus not yet measured: candidates are 'monolayer' here); and the reference OD."""
    od, _ = optical_density(thumb_rgb)
    ref = reference_od(od, settings)
    n_cols, n_rows = width_l0 // tile_l0, height_l0 // tile_l0
    if n_cols == 0 or n_rows == 0:
        return [], ref
    cell = tile_l0 / thumb_downsample
    density = _area_mean(np.where(od > GLASS_OD, od, 0.0), n_cols, n_rows, cell) / ref
    overlap = _area_mean(od > settings.overlap_od * ref, n_cols, n_rows, cell)
    background = _area_mean(od <= GLASS_OD, n_cols, n_rows, cell)
    tiles = []
    for r in range(n_rows):
        for c in range(n_cols):
            d, o, b = float(density[r, c]), float(overlap[r, c]), float(background[r, c])
            if d < settings.empty_density:
                kind = "empty"
            elif d > settings.max_density or o > settings.max_overlap:
                kind = "thick"
            elif d < settings.min_density:
                kind = "edge"
            else:
                kind = "monolayer"
            tiles.append(TileScore(r, c, c * tile_l0, r * tile_l0, tile_l0, round(d, 4), round(o, 4),
                                   round(b, 4), None, kind))
    return tiles, ref


def serpentine(tiles: list[TileScore]) -> list[TileScore]:
    """The monolayer tiles in a lab's reading order: steps along the smear's long axis (the one the
    density changes along), starting at its thin end, sweeping across it in alternate directions."""
    mono = [t for t in tiles if t.kind == "monolayer"]
    if not mono:
        return []
    rows = {t.row for t in tiles}
    cols = {t.col for t in tiles}

    def profile(key):
        groups: dict[int, list[float]] = {}
        for t in tiles:
            groups.setdefault(key(t), []).append(t.density)
        means = [float(np.mean(v)) for _, v in sorted(groups.items())]
        return means

    along_cols = profile(lambda t: t.col)
    along_rows = profile(lambda t: t.row)
    spread = lambda p: (max(p) - min(p)) if len(p) > 1 else 0.0  # noqa: E731
    long_is_x = spread(along_cols) >= spread(along_rows) if len(cols) > 1 or len(rows) == 1 else False
    outer = (lambda t: t.col) if long_is_x else (lambda t: t.row)
    inner = (lambda t: t.row) if long_is_x else (lambda t: t.col)
    prof = along_cols if long_is_x else along_rows
    # the thin end: where density is lower (feathered edge); start at the monolayer's side next to it
    thin_first = float(np.mean(prof[:max(1, len(prof) // 2)])) <= float(np.mean(prof[len(prof) // 2:]))
    steps = sorted({outer(t) for t in mono}, reverse=not thin_first)
    by_step: dict[int, list[TileScore]] = {}
    for t in mono:
        by_step.setdefault(outer(t), []).append(t)
    path = []
    for k, s in enumerate(steps):
        path += sorted(by_step[s], key=inner, reverse=bool(k % 2))
    return path


def judge_focus(tiles: list[TileScore], probe: Callable[[TileScore], np.ndarray],
                settings: FinderSettings) -> list[TileScore]:
    """Monolayer candidates whose probe patch is out of focus become 'blurred'."""
    out = []
    for t in tiles:
        if t.kind != "monolayer":
            out.append(t)
            continue
        f = round(sharpness(probe(t)), 4)
        out.append(TileScore(t.row, t.col, t.x0, t.y0, t.size, t.density, t.overlap, t.background, f,
                             "monolayer" if f >= settings.min_focus else "blurred"))
    return out


def plan(thumb_rgb: np.ndarray, thumb_downsample: float, tile_l0: int, width_l0: int, height_l0: int,
         settings: FinderSettings, probe: Callable[[TileScore], np.ndarray] | None = None) -> Plan:
    """Score, judge (focus by ``probe`` patches when given) and order a slide's tiles."""
    start = time.perf_counter()
    tiles, ref = score_tiles(thumb_rgb, thumb_downsample, tile_l0, width_l0, height_l0, settings)
    if probe is not None:
        tiles = judge_focus(tiles, probe, settings)
    path = serpentine(tiles)
    counts = {k: sum(1 for t in tiles if t.kind == k) for k in KINDS}
    return Plan(tiles, path, thumb_rgb, thumb_downsample, ref, time.perf_counter() - start, counts)


def estimate_rbc_diameter_px(rgb: np.ndarray, background: np.ndarray | None = None) -> float | None:
    """Median diameter (px) of the isolated, round red cells of a high-resolution patch, or None
    when fewer than 10 are found; ``background`` is the glass's RGB (else the patch's brightest)."""
    od, _ = optical_density(rgb, background)
    cells = (od > max(GLASS_OD, 0.15 * float(np.percentile(od[::4, ::4], 99)))).astype(np.uint8)
    cells = cv2.morphologyEx(cells, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))  # fill the central pallor
    n, labels, stats, _ = cv2.connectedComponentsWithStats(cells, connectivity=8)
    diam = []
    h, w = cells.shape
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < 30 or x == 0 or y == 0 or x + bw >= w or y + bh >= h:
            continue
        if not 0.75 <= bw / bh <= 1.33 or area < 0.6 * bw * bh:  # round and filled: one cell, not a clump
            continue
        diam.append(2.0 * np.sqrt(area / np.pi))
    if len(diam) < 10:
        return None
    med = float(np.median(diam))
    single = [d for d in diam if d < 1.4 * med]  # drop what is left of pairs and white cells
    return float(np.median(single)) if len(single) >= 10 else med


def quality_map(p: Plan, counted: set[str], max_side: int = 1600, min_side: int = 800) -> np.ndarray:
    """The quality map as RGB: the thumbnail (scaled to between ``min_side`` and ``max_side`` px), each
    tile tinted by its kind, the reading path as a line through the counted tiles, which are outlined
    in white; a legend with the count of each kind below."""
    img = p.thumb_rgb
    scale = min(max_side / max(img.shape[:2]), max(1.0, min_side / max(img.shape[:2])))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    bgr = np.ascontiguousarray(cv2.resize(img, None, fx=scale, fy=scale, interpolation=interp)[..., ::-1])
    tint = bgr.copy()
    f = scale / p.thumb_downsample  # level-0 px -> map px
    rects = {}
    for t in p.tiles:
        x0, y0 = int(round(t.x0 * f)), int(round(t.y0 * f))
        x1, y1 = int(round((t.x0 + t.size) * f)) - 1, int(round((t.y0 + t.size) * f)) - 1
        rects[t.name] = (x0, y0, x1, y1)
        cv2.rectangle(tint, (x0, y0), (x1, y1), KIND_BGR[t.kind], -1)
    out = cv2.addWeighted(bgr, 0.6, tint, 0.4, 0)
    centres = [((rects[t.name][0] + rects[t.name][2]) // 2, (rects[t.name][1] + rects[t.name][3]) // 2)
               for t in p.path if t.name in counted]
    if len(centres) > 1:
        cv2.polylines(out, [np.asarray(centres, np.int32)], False, (255, 255, 255), 1, cv2.LINE_AA)
    for name in counted:
        if name in rects:
            x0, y0, x1, y1 = rects[name]
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 255), 2)
    legend = np.full((22, max(out.shape[1], 640), 3), 255, np.uint8)
    x = 4
    for kind in KINDS:
        cv2.rectangle(legend, (x, 5), (x + 12, 17), KIND_BGR[kind], -1)
        text = f"{kind} {p.counts.get(kind, 0)}"
        cv2.putText(legend, text, (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 16 + 9 * len(text) + 14
    cv2.putText(legend, f"counted {len(counted)} (white)", (x, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    canvas = np.full((out.shape[0] + legend.shape[0], legend.shape[1], 3), 255, np.uint8)
    canvas[:out.shape[0], :out.shape[1]] = out
    canvas[out.shape[0]:] = legend
    return canvas[..., ::-1].copy()
