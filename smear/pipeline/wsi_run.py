"""Count a whole slide: open the file, find the monolayer, read its tiles along the reading path at
the detector's pixel size (here, or on Ray workers), and stop once the target number of white cells
is classified; the tiles themselves are smear.pipeline.wsi_tiles'.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from smear.errors import SmearError
from smear.io import write_bytes_atomic
from smear.pipeline.cache import FieldCache
from smear.pipeline.run import Stages, gather_report
from smear.pipeline.wsi_tiles import (
    Counter, Geometry, TileEngine, TileJob, count_until, placed, read_tile, tile_outcomes,
)
from smear.types import FieldResult, SkippedField, SlideReport, WholeSlideInfo
from smear.wsi import finder
from smear.wsi.slide import WholeSlide, thumbnail

_log = logging.getLogger(__name__)

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
    level whose pixel size is the finest that is no finer than the detector needs; an estimated pixel
    size is said to ``warn`` (default: this module's logger)."""
    mpp, source = slide.file_mpp(), "file"
    if mpp is None and settings.mpp:
        mpp, source = float(settings.mpp), "config"
    if mpp is None:
        mpp, source = estimate_mpp(slide, settings.rbc_diameter_um), "estimated"
        if mpp is None:
            raise SmearError(f"{slide.path}: the file states no pixel size and no red cells could be measured",
                             hint="give it: --set wsi.mpp=0.25 (um per level-0 pixel)")
        (warn or _log.warning)(f"{slide.path}: no pixel size in the file; {mpp:.3f} um/px estimated from the red cells "
                 f"({settings.rbc_diameter_um:g} um across); set wsi.mpp to give it")
    scale = settings.detector_mpp / mpp
    level = slide.level_for(scale)
    return Geometry(mpp, source, level, scale, max(1, int(round(settings.tile_px * scale))),
                    max(0, int(round(settings.margin_px * scale))), (slide.width, slide.height))


def quality_map_path(folder: Path | None, name: str) -> Path | None:
    """Where a slide's quality map is written (None: nowhere, it is only in the HTML report)."""
    return None if folder is None else Path(folder) / f"{name}.quality.png"


def find_monolayer(slide: WholeSlide, geo: Geometry, settings: WsiSettings) -> finder.Plan:
    """The finder's plan of a slide: its tiles scored on a thumbnail at ``finder_mpp`` (coarser on a
    slide too large for MAX_THUMB_SIDE), the candidates' focus probed at the detector's scale."""
    ds = max(1.0, settings.finder_mpp / geo.mpp, max(slide.width, slide.height) / MAX_THUMB_SIDE)
    thumb = thumbnail(slide, ds)
    probe_l0 = max(8, int(round(settings.probe_px * geo.scale)))

    def probe(t: finder.TileScore) -> np.ndarray:
        return read_tile(slide, geo, *placed(t, probe_l0), probe_l0)[0]

    return finder.plan(thumb, ds, geo.tile_l0, slide.width, slide.height, settings.finder, probe)


@dataclass(frozen=True)
class SlideOutputs:
    """How a whole-slide run names and hands back what it found besides its report: the report's
    slide ``name`` (default: the file's stem), each counted tile to ``on_field``, the fields kept in
    the report (``keep_fields``; else running counts only), the quality map written into
    ``quality_map_dir`` (None: only in the report), warnings to ``warn`` (None: this module's logger)."""

    name: str | None = None
    on_field: Callable[[FieldResult | SkippedField], None] | None = None
    keep_fields: bool = True
    quality_map_dir: Path | None = None
    warn: Callable[[str], None] | None = None


@dataclass(frozen=True)
class _Found:
    """What the finder found on a slide, and the time it took."""

    geo: Geometry
    plan: finder.Plan
    finder_s: float


def run_whole_slide(path: str | Path, stages: Stages | None, settings: WsiSettings, *, target_wbc: int | None = 200,
                    cache: FieldCache | None = None, resume: bool = False, outputs: SlideOutputs = SlideOutputs(),
                    engine: TileEngine | None = None) -> SlideReport:
    """One whole-slide file counted into its SlideReport (``whole_slide`` says what was read and
    skipped); ``target_wbc=None`` counts every monolayer tile. With an ``engine`` the tiles run
    there (on its stages, with its cache; ``stages`` may be None) and are counted here in the same
    order, into the same report."""
    if engine is None and stages is None:
        raise ValueError("run_whole_slide needs stages or an engine")
    path = Path(path)
    name, warn = outputs.name or path.stem, outputs.warn or _log.warning
    classified, guard = ((engine.classified, engine.guard) if engine is not None
                         else (stages.classifier is not None, stages.guard))
    with WholeSlide(path) as slide:
        geo = geometry(slide, settings, warn)
        start = time.perf_counter()
        plan = find_monolayer(slide, geo, settings)
        found = _Found(geo, plan, time.perf_counter() - start)
        job = TileJob(str(path), name, geo, settings.finder.min_focus)
        outcomes = (engine.tiles(job, plan.path, resume, target_wbc=target_wbc) if engine is not None
                    else tile_outcomes(slide, job, plan.path, stages, cache, resume))
        counter = Counter()
        report = gather_report(name, count_until(outcomes, target_wbc, classified, counter), classified=classified,
                               guard=guard, on_field=outputs.on_field, keep_fields=outputs.keep_fields)
    info = _info(slide, found, settings, counter, len(report.skipped), target_wbc,
                 quality_map_path(outputs.quality_map_dir, name))
    if target_wbc is not None and not info.reached_target:
        warn(f"{name}: the monolayer ran out at {counter.identified} of {target_wbc} white cells "
             f"({info.tiles_counted} tiles counted)")
    return dataclasses.replace(report, whole_slide=info)


def _info(slide: WholeSlide, found: _Found, settings: WsiSettings, counter: Counter, n_unreadable: int,
          target_wbc: int | None, target: Path | None) -> WholeSlideInfo:
    """What the run read, skipped and found besides the cells; the quality map drawn (and written
    to ``target`` when given)."""
    geo, plan, finder_s = found.geo, found.plan, found.finder_s
    counted = set(counter.counted)
    png = cv2.imencode(".png", finder.quality_map(plan, counted)[..., ::-1])[1].tobytes()
    if target is not None:
        write_bytes_atomic(target, png)
    area = len(counted) * geo.tile_mm2
    hpf_mm2 = math.pi * (settings.hpf_diameter_um / 2000.0) ** 2
    per_hpf = round(counter.platelets / area * hpf_mm2, 2) if area > 0 else None
    known = geo.mpp_source in ("file", "config")
    skipped = {k: plan.counts.get(k, 0) for k in ("empty", "thick", "edge", "blurred")}
    n_done = len(counted) + counter.blurred_on_read + n_unreadable
    skipped.update({"blurred_on_read": counter.blurred_on_read, "not_reached": max(0, len(plan.path) - n_done)})
    return WholeSlideInfo(
        path=str(slide.path), width=slide.width, height=slide.height, mpp=round(geo.mpp, 5),
        mpp_source=geo.mpp_source, level=geo.level.index, scale=round(geo.scale, 5), tile_px=geo.tile_l0,
        tiles_total=len(plan.tiles), tiles_read=counter.tiles_read, tiles_counted=len(counted), skipped=skipped,
        area_mm2=round(area, 6), target_wbc=target_wbc,
        reached_target=target_wbc is not None and counter.identified >= target_wbc, n_platelet=counter.platelets,
        platelets_per_hpf=per_hpf,
        platelets_1e9_per_l=round(per_hpf * settings.platelet_factor, 1) if per_hpf is not None and known else None,
        hpf_diameter_um=settings.hpf_diameter_um, platelet_factor=settings.platelet_factor, platelet_formula=HPF_SOURCE,
        quality_map=str(target) if target is not None else "", quality_map_png=png, finder_s=round(finder_s, 3),
        read_s=round(counter.read_s, 3), detect_s=round(counter.detect_s, 3), tiles_from_cache=counter.from_cache)

