"""Count a whole slide: open the file, find the monolayer, read its tiles along the reading path at
the detector's pixel size, and stop once the target number of white cells is classified.

Each tile's core is read with a margin all round and the detector sees core + margin (cut into the
detector's own tiles and merged across their seams by smear.detect.tiling); a cell belongs to the
tile whose core holds its box centre, so a cell on a seam between two reading tiles is counted once
and no tile needs another's results (memory flat, tiles cached and resumed one by one).
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from smear.io import Slide, write_bytes_atomic
from smear.pipeline.cache import FieldCache
from smear.pipeline.run import Stages, _gather, classify_cells, field_view, with_views
from smear.errors import ImageReadError, SmearError
from smear.taxonomy import WBC_CLASSES, CellKind
from smear.types import FieldResult, FieldView, SkippedField, SlideRegion, SlideReport, WholeSlideInfo
from smear.wsi import finder
from smear.wsi.slide import Level, WholeSlide, thumbnail

HPF_SOURCE = ("platelets per 100x oil field x 20 = 10^9/L (x 20,000/uL), counted in the monolayer: Rodak's "
              "Hematology (Keohane, Otto, Walenga), peripheral blood film chapter; compared in Malok et al., "
              "Clin Lab Sci 2007;20(3):154-160")


MAX_THUMB_SIDE = 6000  # the finder's thumbnail is coarser than finder_mpp on a slide larger than this at it


@dataclass(frozen=True)
class WsiSettings:
    """The ``wsi`` section of the pipeline config, as the run uses it."""

    target_wbc: int = 200
    mpp: float | None = None
    detector_mpp: float = 0.08
    rbc_diameter_um: float = 7.5
    tile_px: int = 1920
    margin_px: int = 128
    finder_mpp: float = 2.0
    probe_px: int = 384
    finder: finder.FinderSettings = finder.FinderSettings()
    hpf_diameter_um: float = 220.0
    platelet_factor: float = 20.0
    quality_map: str = "auto"

    @classmethod
    def from_config(cls, section: Any) -> "WsiSettings":
        """From the config's ``wsi`` section (a dict or a config model)."""
        data = section.model_dump() if hasattr(section, "model_dump") else dict(section or {})
        names = {f.name for f in dataclasses.fields(finder.FinderSettings)}
        fs = finder.FinderSettings(**{k: v for k, v in data.items() if k in names})
        own = {f.name for f in dataclasses.fields(cls)} - {"finder"}
        return cls(finder=fs, **{k: v for k, v in data.items() if k in own})


@dataclass(frozen=True)
class Geometry:
    """How a slide is read: pixel size, level, level-0 px per detector px, tile core and margin."""

    mpp: float
    mpp_source: str
    level: Level
    scale: float
    tile_l0: int
    margin_l0: int


def estimate_mpp(slide: WholeSlide, rbc_diameter_um: float, side: int = 1024) -> float | None:
    """um per level-0 px from the median diameter of isolated red cells in up to three thin regions
    (``side`` level-0 px square, about half covered by cells)."""
    ds = max(1.0, max(slide.width, slide.height) / 2048.0)
    thumb = thumbnail(slide, ds)
    od, background = finder.optical_density(thumb)
    side = min(side, slide.width, slide.height)
    block = max(4, int(side / ds))
    h, w = (od.shape[0] // block) * block, (od.shape[1] // block) * block
    if h == 0 or w == 0:
        return None
    share = (od[:h, :w] > finder.GLASS_OD).reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    diameters: list[float] = []
    for flat in np.argsort(np.abs(share - 0.45), axis=None)[:12]:
        r, c = np.unravel_index(flat, share.shape)
        if not 0.2 <= share[r, c] <= 0.7 or len(diameters) >= 3:
            break
        patch = slide.read(int(c * block * ds), int(r * block * ds), side, side, 0)
        d = finder.estimate_rbc_diameter_px(patch, background)
        if d is not None:
            diameters.append(d)
    return rbc_diameter_um / float(np.median(diameters)) if diameters else None


def geometry(slide: WholeSlide, settings: WsiSettings, warn: Callable[[str], None] | None = None) -> Geometry:
    """Pixel size (the file's, else the config's, else estimated from the red cells) and the reading
    level whose pixel size is the finest that is no finer than the detector needs."""
    mpp, source = slide.file_mpp(), "file"
    if mpp is None and settings.mpp:
        mpp, source = float(settings.mpp), "config"
    if mpp is None:
        mpp, source = estimate_mpp(slide, settings.rbc_diameter_um), "estimated"
        if mpp is None:
            raise SmearError(f"{slide.path}: the file states no pixel size and no red cells could be measured",
                             hint="give it: --set wsi.mpp=0.25 (um per level-0 pixel)")
        if warn is not None:
            warn(f"{slide.path}: no pixel size in the file; {mpp:.3f} um/px estimated from the red cells "
                 f"({settings.rbc_diameter_um:g} um across); set wsi.mpp to give it")
    scale = settings.detector_mpp / mpp
    level = slide.level_for(scale)
    return Geometry(mpp, source, level, scale, max(1, int(round(settings.tile_px * scale))),
                    max(0, int(round(settings.margin_px * scale))))


def read_tile(slide: WholeSlide, geo: Geometry, x0: int, y0: int, side_l0: int) -> tuple[np.ndarray, SlideRegion]:
    """A square of ``side_l0`` level-0 px at (x0, y0), at the detector's pixel size, and where it lies."""
    lv = geo.level
    side_lv = max(1, int(math.ceil(side_l0 / lv.downsample)))
    img = slide.read(x0, y0, side_lv, side_lv, lv)
    out = max(1, int(round(side_l0 / geo.scale)))
    if out != side_lv:
        interp = cv2.INTER_AREA if out < side_lv else cv2.INTER_LINEAR
        img = cv2.resize(img, (out, out), interpolation=interp)
    return img, SlideRegion(float(x0), float(y0), side_lv * lv.downsample / out, geo.mpp)


def _owned(fr_dets, cells, margin: float, core: float):
    """The detections (and their cells) whose box centre lies in the core [margin, margin + core)."""
    def inside(d):
        cx, cy = (d.box_xyxy[0] + d.box_xyxy[2]) / 2, (d.box_xyxy[1] + d.box_xyxy[3]) / 2
        return margin <= cx < margin + core and margin <= cy < margin + core
    dets = tuple(d for d in fr_dets if inside(d))
    keep = {id(d) for d in dets}
    return dets, tuple(c for c in cells if id(c.detection) in keep)


def _identified(fr: FieldResult, classified: bool) -> int:
    if classified:
        return sum(1 for c in fr.cells if c.label in WBC_CLASSES)
    return fr.count(CellKind.WBC)


def _cut_at(fr: FieldResult, need: int, classified: bool) -> FieldResult:
    """The tile's result with its white cells after the ``need``-th counted one (top to bottom) left out."""
    if _identified(fr, classified) <= need:
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


@dataclass
class _Counter:
    tiles_read: int = 0
    from_cache: int = 0
    blurred_on_read: int = 0
    identified: int = 0
    platelets: int = 0
    read_s: float = 0.0
    detect_s: float = 0.0
    counted: list[str] = dataclasses.field(default_factory=list)


def _tile_key(slide: WholeSlide, geo: Geometry, tile: finder.TileScore) -> str:
    return (f"wsi|{slide.fingerprint}|{tile.x0},{tile.y0},{geo.tile_l0},{geo.margin_l0}|level {geo.level.index}|"
            f"{geo.scale:.6f}")


def iter_tiles(slide: WholeSlide, name: str, geo: Geometry, path: list[finder.TileScore], stages: Stages,
               settings: WsiSettings, target_wbc: int | None, counter: _Counter, cache: FieldCache | None = None,
               resume: bool = False) -> Iterator[FieldResult | SkippedField]:
    """The counted tiles' results along ``path``, until ``target_wbc`` white cells are counted (None:
    every tile). The next tile is read in a background thread while the models run on this one."""
    classified = stages.classifier is not None
    side = geo.tile_l0 + 2 * geo.margin_l0
    margin_px = geo.margin_l0 / geo.scale

    def load(tile: finder.TileScore):
        """(cache key, the cached result or the tile's image or its read error, the tile's region, the
        read's seconds, the tile's image for the views of a cached result)."""
        key = _tile_key(slide, geo, tile)
        hit = cache.get(slide.path, name, key=key, field=tile.name) if cache is not None and resume else None
        if hit is not None and not stages.keep_views:
            return key, hit, None, 0.0, None
        start = time.perf_counter()
        try:
            img, region = read_tile(slide, geo, tile.x0 - geo.margin_l0, tile.y0 - geo.margin_l0, side)
        except ImageReadError as exc:
            return (key, hit, None, 0.0, None) if hit is not None else (key, exc, None, time.perf_counter() - start,
                                                                       None)
        if hit is not None:  # read again for the page's views only
            return key, hit, region, 0.0, img
        return key, img, region, time.perf_counter() - start, None

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, path[0]) if path else None
        for k, tile in enumerate(path):
            key, got, region, read_s, image = pending.result()
            pending = pool.submit(load, path[k + 1]) if k + 1 < len(path) else None
            counter.read_s += read_s
            region = region or SlideRegion(float(tile.x0 - geo.margin_l0), float(tile.y0 - geo.margin_l0),
                                           geo.scale, geo.mpp)
            if isinstance(got, ImageReadError):
                yield SkippedField(name, tile.name, str(got))
                continue
            if isinstance(got, FieldResult):
                counter.tiles_read += 1
                counter.from_cache += 1
                fr = dataclasses.replace(got, region=region)
                if stages.keep_views and image is None:  # the tile could not be read again: counted, not shown
                    fr = dataclasses.replace(fr, view=FieldView(None, 1.0, ""))
                elif stages.keep_views:  # masked again here, not in the reading thread
                    fr = with_views(fr, image, stages.view_geometry, stages.segmenter)
            else:
                counter.tiles_read += 1
                h, w = got.shape[:2]
                c0 = int(margin_px)
                core = got[c0:h - c0, c0:w - c0] if h > 2 * c0 + 16 else got
                if finder.sharpness(core) < settings.finder.min_focus:
                    counter.blurred_on_read += 1
                    continue
                start = time.perf_counter()
                dets = stages.detector.detect([got])[0]
                cells = classify_cells([got], [dets], stages)[0]
                counter.detect_s += time.perf_counter() - start
                dets, cells = _owned(dets, cells, margin_px, geo.tile_l0 / geo.scale)
                fr = FieldResult(name, tile.name, w, h, dets, cells, str(slide.path))
                if cache is not None:
                    cache.put(slide.path, fr, key=key)
                fr = dataclasses.replace(fr, region=region, view=field_view(got) if stages.keep_views else None)
            if target_wbc is not None:
                fr = _cut_at(fr, target_wbc - counter.identified, classified)
            counter.identified += _identified(fr, classified)
            counter.platelets += fr.count(CellKind.PLATELET) + sum(1 for c in fr.cells if c.label == "PLATELET")
            counter.counted.append(tile.name)
            yield fr
            if target_wbc is not None and counter.identified >= target_wbc:
                if pending is not None:
                    pending.cancel()
                return


def quality_map_path(folder: Path | None, name: str) -> Path | None:
    return None if folder is None else Path(folder) / f"{name}.quality.png"


def run_whole_slide(path: str | Path, stages: Stages, settings: WsiSettings, *, target_wbc: int | None = 200,
                    cache: FieldCache | None = None, resume: bool = False,
                    on_field: Callable[[FieldResult | SkippedField], None] | None = None, keep_fields: bool = True,
                    quality_map_dir: Path | None = None, warn: Callable[[str], None] | None = None,
                    name: str | None = None) -> SlideReport:
    """One whole-slide file counted into its SlideReport (``whole_slide`` says what was read and
    skipped); ``target_wbc=None`` counts every monolayer tile."""
    path = Path(path)
    name = name or path.stem
    with WholeSlide(path) as slide:
        geo = geometry(slide, settings, warn)
        start = time.perf_counter()
        ds = max(1.0, settings.finder_mpp / geo.mpp, max(slide.width, slide.height) / MAX_THUMB_SIDE)
        thumb = thumbnail(slide, ds)
        probe_l0 = max(8, int(round(settings.probe_px * geo.scale)))

        def probe(t: finder.TileScore) -> np.ndarray:
            x0 = t.x0 + (t.size - probe_l0) // 2
            y0 = t.y0 + (t.size - probe_l0) // 2
            return read_tile(slide, geo, x0, y0, probe_l0)[0]

        plan = finder.plan(thumb, ds, geo.tile_l0, slide.width, slide.height, settings.finder, probe)
        finder_s = time.perf_counter() - start
        counter = _Counter()
        items = iter_tiles(slide, name, geo, plan.path, stages, settings, target_wbc, counter, cache, resume)
        report = _gather(Slide(name, ()), items, stages.classifier is not None, stages.guard, on_field, keep_fields)
    counted = set(counter.counted)
    png = cv2.imencode(".png", finder.quality_map(plan, counted)[..., ::-1])[1].tobytes()
    target = quality_map_path(quality_map_dir, name)
    if target is not None:
        write_bytes_atomic(target, png)
    area = len(counted) * (geo.tile_l0 * geo.mpp) ** 2 / 1e6
    hpf_mm2 = math.pi * (settings.hpf_diameter_um / 2000.0) ** 2
    per_hpf = round(counter.platelets / area * hpf_mm2, 2) if area > 0 else None
    known = geo.mpp_source in ("file", "config")
    skipped = {k: plan.counts.get(k, 0) for k in ("empty", "thick", "edge", "blurred")}
    n_done = len(counted) + counter.blurred_on_read + len(report.skipped)
    skipped.update({"blurred_on_read": counter.blurred_on_read, "not_reached": max(0, len(plan.path) - n_done)})
    info = WholeSlideInfo(
        path=str(path), width=slide.width, height=slide.height, mpp=round(geo.mpp, 5), mpp_source=geo.mpp_source,
        level=geo.level.index, scale=round(geo.scale, 5), tile_px=geo.tile_l0, tiles_total=len(plan.tiles),
        tiles_read=counter.tiles_read, tiles_counted=len(counted), skipped=skipped,
        area_mm2=round(area, 6), target_wbc=target_wbc,
        reached_target=target_wbc is not None and counter.identified >= target_wbc, n_platelet=counter.platelets,
        platelets_per_hpf=per_hpf,
        platelets_1e9_per_l=round(per_hpf * settings.platelet_factor, 1) if per_hpf is not None and known else None,
        hpf_diameter_um=settings.hpf_diameter_um, platelet_factor=settings.platelet_factor, platelet_formula=HPF_SOURCE,
        quality_map=str(target) if target is not None else "", quality_map_png=png, finder_s=round(finder_s, 3),
        read_s=round(counter.read_s, 3), detect_s=round(counter.detect_s, 3), tiles_from_cache=counter.from_cache)
    if warn is not None and target_wbc is not None and not info.reached_target:
        warn(f"{name}: the monolayer ran out at {counter.identified} of {target_wbc} white cells "
             f"({len(counted)} tiles counted)")
    return dataclasses.replace(report, whole_slide=info)

