"""A whole slide's reading tiles: each read (core + margin) at the detector's pixel size and run
through the stages (``tile_outcomes``), then taken in path order until enough white cells are
counted (``count_until``).

Each tile's core is read with a margin all round and the detector sees core + margin (cut into the
detector's own tiles and merged across their seams by smear.detect.tiling); a cell belongs to the
tile whose core holds its box centre, so a cell on a seam between two reading tiles is counted once
and no tile needs another's results. ``tile_outcomes`` runs here (the local engine) and on Ray
workers (``smear.pipeline.ray_engine``, a few tiles a call); ``count_until`` runs where the report
is made, on the outcomes in path order, so that both engines count the same cells and stop at the
same one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generator, Iterable, Iterator, Protocol, Sequence

import cv2
import numpy as np

from smear.errors import ImageReadError
from smear.pipeline.cache import FieldCache
from smear.pipeline.run import Stages, classify_cells, field_view, with_views
from smear.taxonomy import WBC_CLASSES, CellKind
from smear.types import FieldResult, FieldView, SkippedField, SlideRegion
from smear.wsi import finder
from smear.wsi.slide import Level, WholeSlide


@dataclass(frozen=True)
class Geometry:
    """How a slide is read: pixel size, level, level-0 px per detector px, tile core and margin, and
    the slide's level-0 width and height."""

    mpp: float
    mpp_source: str
    level: Level
    scale: float
    tile_l0: int
    margin_l0: int
    extent: tuple[int, int]

    @property
    def tile_mm2(self) -> float:
        """A tile's core, mm^2 of the slide."""
        return (self.tile_l0 * self.mpp) ** 2 / 1e6


def _sides(geo: Geometry, side_l0: int) -> tuple[int, int]:
    """(px of the level read, px at the detector's pixel size) of a square of ``side_l0`` level-0 px."""
    return max(1, int(math.ceil(side_l0 / geo.level.downsample))), max(1, int(round(side_l0 / geo.scale)))


def region_of(geo: Geometry, x0: int, y0: int, side_l0: int) -> SlideRegion:
    """Where ``read_tile`` of this square lies on the slide (without reading it)."""
    side_lv, out = _sides(geo, side_l0)
    return SlideRegion(float(x0), float(y0), side_lv * geo.level.downsample / out, geo.mpp, geo.extent)


def read_tile(slide: WholeSlide, geo: Geometry, x0: int, y0: int, side_l0: int) -> tuple[np.ndarray, SlideRegion]:
    """A square of ``side_l0`` level-0 px at (x0, y0), at the detector's pixel size, and where it lies."""
    side_lv, out = _sides(geo, side_l0)
    img = slide.read(x0, y0, side_lv, side_lv, geo.level)
    if out != side_lv:
        interp = cv2.INTER_AREA if out < side_lv else cv2.INTER_LINEAR
        img = cv2.resize(img, (out, out), interpolation=interp)
    return img, region_of(geo, x0, y0, side_l0)


def placed(tile: finder.TileScore, side_l0: int) -> tuple[int, int]:
    """Level-0 top-left of a square of ``side_l0`` px centred on the tile's core: the core with its
    margin all round (``side_l0`` over the core's side), or a focus probe inside it (under)."""
    return tile.x0 + (tile.size - side_l0) // 2, tile.y0 + (tile.size - side_l0) // 2


@dataclass(frozen=True)
class TileJob:
    """A slide's tiles as they are counted, here or on a worker: the file, the slide's name in the
    reports, how the file is read, and the focus under which a tile read is skipped as blurred."""

    path: str
    name: str
    geo: Geometry
    min_focus: float

    @property
    def side_l0(self) -> int:
        """A tile's read: core and margin, level-0 px."""
        return self.geo.tile_l0 + 2 * self.geo.margin_l0

    def key(self, slide: WholeSlide, tile: finder.TileScore) -> str:
        """The tile's result cache key: the slide's identity, the tile's place, level and scale."""
        geo = self.geo
        return (f"wsi|{slide.fingerprint}|{tile.x0},{tile.y0},{geo.tile_l0},{geo.margin_l0}|level {geo.level.index}|"
                f"{geo.scale:.6f}")

    def region(self, tile: finder.TileScore) -> SlideRegion:
        """Where the tile's read lies (for a cached result: as if it were read)."""
        return region_of(self.geo, *placed(tile, self.side_l0), self.side_l0)


@dataclass(frozen=True)
class TileOutcome:
    """A tile along the path once looked at: its result (a FieldResult with its region, a
    SkippedField, or None when it was found out of focus as read), whether the result came from the
    cache, and the seconds spent reading it and running the models on it."""

    tile: finder.TileScore
    result: FieldResult | SkippedField | None
    cached: bool = False
    read_s: float = 0.0
    detect_s: float = 0.0


class TileEngine(Protocol):
    """Runs a slide's tiles somewhere else (``smear.pipeline.ray_engine.RayEngine``) on stages it
    builds there; ``classified`` and ``guard`` are theirs."""

    classified: bool
    guard: Any

    def tiles(self, job: TileJob, tiles: Sequence[finder.TileScore], resume: bool, target_wbc: int | None = None
              ) -> Generator[TileOutcome, None, None]:
        """One outcome per tile, in the order given, until the generator is closed (which stops the
        work); ``target_wbc``: the white cells the count needs (None: every tile), so that little
        work is done past it."""
        ...


def _owned(fr_dets, cells, margin: float, core: float):
    """The detections (and their cells) whose box centre lies in the core [margin, margin + core)."""
    def inside(d):
        cx, cy = (d.box_xyxy[0] + d.box_xyxy[2]) / 2, (d.box_xyxy[1] + d.box_xyxy[3]) / 2
        return margin <= cx < margin + core and margin <= cy < margin + core
    dets = tuple(d for d in fr_dets if inside(d))
    keep = {id(d) for d in dets}
    return dets, tuple(c for c in cells if id(c.detection) in keep)


def _load(slide: WholeSlide, job: TileJob, tile: finder.TileScore, cache: FieldCache | None, resume: bool,
          views: bool):
    """(cache key, the cached FieldResult or the tile's image or the ImageReadError, its region, read
    seconds, the tile's image for the ``views`` of a cached result the cache has none for: read again
    only for those)."""
    key = job.key(slide, tile)
    hit = (cache.get(slide.path, job.name, key=key, field=tile.name, views=views) if cache is not None and resume
           else None)
    if hit is not None and (not views or hit.view is not None):
        return key, hit, job.region(tile), 0.0, None
    start = time.perf_counter()
    try:
        img, region = read_tile(slide, job.geo, *placed(tile, job.side_l0), job.side_l0)
    except ImageReadError as exc:
        if hit is not None:
            return key, hit, job.region(tile), 0.0, None
        return key, exc, None, time.perf_counter() - start, None
    if hit is not None:
        return key, hit, region, 0.0, img
    return key, img, region, time.perf_counter() - start, None


def _run(slide: WholeSlide, job: TileJob, tile: finder.TileScore, stages: Stages, cache: FieldCache | None,
         loaded) -> TileOutcome:
    """The outcome of a loaded tile: the models run on its image, its cells kept to its core."""
    key, got, region, read_s, image = loaded
    if isinstance(got, ImageReadError):
        return TileOutcome(tile, SkippedField(job.name, tile.name, str(got)), read_s=read_s)
    if isinstance(got, FieldResult):
        fr = dataclasses.replace(got, region=region)
        if stages.keep_views and fr.view is None and image is None:  # could not be read again: counted, not shown
            fr = dataclasses.replace(fr, view=FieldView(None, 1.0, ""))
        elif stages.keep_views and fr.view is None:  # masked again here, not in the reading thread
            fr = with_views(fr, image, stages.view_geometry, stages.segmenter)
            if cache is not None:
                cache.put_views(slide.path, fr, key=key)
        return TileOutcome(tile, fr, cached=True, read_s=read_s)
    geo = job.geo
    margin_px = geo.margin_l0 / geo.scale
    h, w = got.shape[:2]
    c0 = int(margin_px)
    core = got[c0:h - c0, c0:w - c0] if h > 2 * c0 + 16 else got
    if finder.sharpness(core) < job.min_focus:
        return TileOutcome(tile, None, read_s=read_s)
    start = time.perf_counter()
    dets = stages.detector.detect([got])[0]
    cells = classify_cells([got], [dets], stages)[0]
    dets, cells = _owned(dets, cells, margin_px, geo.tile_l0 / geo.scale)
    fr = FieldResult(job.name, tile.name, w, h, dets, cells, str(slide.path),
                     view=field_view(got) if stages.keep_views else None)
    detect_s = time.perf_counter() - start
    if cache is not None:
        cache.put(slide.path, fr, key=key)  # with its views beside it, when kept
    return TileOutcome(tile, dataclasses.replace(fr, region=region), read_s=read_s, detect_s=detect_s)


def tile_outcomes(slide: WholeSlide, job: TileJob, tiles: Sequence[finder.TileScore], stages: Stages,
                  cache: FieldCache | None = None, resume: bool = False) -> Iterator[TileOutcome]:
    """Each tile's outcome, in order; the next tile is read in a background thread while the models
    run on this one. With a cache each result is stored as it is made; with ``resume`` a cached
    tile is not run again (nor read, unless the stages keep the views the review page shows)."""
    def load(tile: finder.TileScore):
        return _load(slide, job, tile, cache, resume, stages.keep_views)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, tiles[0]) if tiles else None
        for k, tile in enumerate(tiles):
            loaded = pending.result()
            pending = pool.submit(load, tiles[k + 1]) if k + 1 < len(tiles) else None
            try:
                yield _run(slide, job, tile, stages, cache, loaded)
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise


@dataclass
class Counter:
    """What ``count_until`` took in: tiles looked at, from the cache, skipped as blurred when read;
    white cells identified and platelets counted; seconds reading and running the models; the
    counted tiles' names."""

    tiles_read: int = 0
    from_cache: int = 0
    blurred_on_read: int = 0
    identified: int = 0
    platelets: int = 0
    read_s: float = 0.0
    detect_s: float = 0.0
    counted: list[str] = dataclasses.field(default_factory=list)


def identified(fr: FieldResult, classified: bool) -> int:
    """The white cells a tile's result adds to the count: classified ones, or detected ones when
    nothing classifies."""
    if classified:
        return sum(1 for c in fr.cells if c.label in WBC_CLASSES)
    return fr.count(CellKind.WBC)


def _cut_at(fr: FieldResult, need: int, classified: bool) -> FieldResult:
    """The tile's result with its white cells after the ``need``-th counted one (top to bottom) left out."""
    if identified(fr, classified) <= need:
        return fr
    label = {id(c.detection): c.label for c in fr.cells}
    wbcs = sorted((d for d in fr.detections if d.kind == CellKind.WBC),
                  key=lambda d: (d.box_xyxy[1] + d.box_xyxy[3], d.box_xyxy[0] + d.box_xyxy[2]))
    dropped, n = set(), 0
    for d in wbcs:
        if n >= need:
            dropped.add(id(d))
        elif (label.get(id(d)) in WBC_CLASSES) if classified else True:
            n += 1
    return dataclasses.replace(fr, detections=tuple(d for d in fr.detections if id(d) not in dropped),
                               cells=tuple(c for c in fr.cells if id(c.detection) not in dropped))


def count_until(outcomes: Iterable[TileOutcome], target_wbc: int | None, classified: bool,
                counter: Counter) -> Iterator[FieldResult | SkippedField]:
    """The counted tiles' results from the outcomes in path order, until ``target_wbc`` white cells
    (classified ones when ``classified``) are counted, the last tile cut at exactly that many (None:
    every tile); the outcomes' generator is closed then, which stops the work still under way."""
    try:
        for out in outcomes:
            counter.read_s += out.read_s
            counter.detect_s += out.detect_s
            if isinstance(out.result, SkippedField):
                yield out.result
                continue
            counter.tiles_read += 1
            counter.from_cache += out.cached
            if out.result is None:
                counter.blurred_on_read += 1
                continue
            fr = out.result
            if target_wbc is not None:
                fr = _cut_at(fr, target_wbc - counter.identified, classified)
            counter.identified += identified(fr, classified)
            counter.platelets += fr.count(CellKind.PLATELET) + sum(1 for c in fr.cells if c.label == "PLATELET")
            counter.counted.append(fr.field)
            yield fr
            if target_wbc is not None and counter.identified >= target_wbc:
                return
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()


PRIOR_WBC_PER_MM2 = 20.0  # white cells a mm^2 of monolayer, before a slide's first results: a normal count's
#                           few a 40x field; low, so that the first calls go out as if the target were far


@dataclass
class TileBudget:
    """How many of a slide's tiles another engine keeps in flight (sent, not yet counted) so that the
    count reaches ``target_wbc`` with little work past it: about as many as the white cells still
    missing need at the rate counted so far (WBC a tile; ``prior_wbc`` a tile before the first
    results), at least one; at most ``start`` until the first results, then at most ``most``
    (None target: ``most``, always)."""

    target_wbc: int | None
    classified: bool
    most: int
    start: int
    prior_wbc: float
    taken: int = 0  # outcomes counted, whatever they were (the sender's tiles in flight: sent - taken)
    tiles: int = 0  # of them, tiles with a result (not blurred, not unreadable): the rate's tiles
    wbc: int = 0    # the white cells in them

    def took(self, out: TileOutcome) -> None:
        """One more tile's outcome counted (a blurred or unreadable tile says nothing of the rate)."""
        self.taken += 1
        if isinstance(out.result, FieldResult):
            self.tiles += 1
            self.wbc += identified(out.result, self.classified)

    def window(self) -> int:
        """Tiles to keep in flight now."""
        if self.target_wbc is None:
            return self.most
        rate = self.wbc / self.tiles if self.tiles else self.prior_wbc
        missing = self.target_wbc - self.wbc
        need = math.ceil(missing / rate) if rate > 0 else self.most
        return max(1, min(self.most if self.tiles else self.start, need))
