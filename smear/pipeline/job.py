"""One run of `smear run` as a library call: slides and a pipeline config in, a RunResult out.

``run_job`` builds the stages (or, with Ray, starts workers that build their own: the driver loads
no model), runs every slide's fields through them with the result cache, and returns the slides'
reports with their differentials and what a report states to be traced. Writing the result is the
report layer's job (``smear.report.write``); progress and warnings go to the callbacks given.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from smear.config_models import PipelineConfig
from smear.io import Slide
from smear.pipeline.run import FieldCallback, run_slides
from smear.types import CropGeometry, RunResult, SkippedField, SlideReport

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how ``--engine ray`` runs (``smear.pipeline.ray_engine.RayEngine``)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    worker_logs: bool = False


@dataclass(frozen=True)
class JobOutputs:
    """What a run hands back besides its result, and how much it keeps: each field's result (or
    skip) to ``on_field(slide_name, item)`` as it is made, warnings (refused cache entries, a
    classifier without a novelty score) to ``warn`` (None: the logger of each module that warns),
    the fields kept in the reports (``keep_fields``; else the slides' counts only) and, with
    ``views``, what the review page shows of each kept field and cell (``Stages.keep_views``)."""

    on_field: FieldCallback | None = None
    warn: Callable[[str], None] | None = None
    keep_fields: bool = True
    views: bool = False


class WholeSlides(Protocol):
    """Whole-slide files a run counts after the field slides (``smear.cli.wsi``): with the stages
    here, or on the Ray engine's workers."""

    def run(self, stages: Any, cache: Any, resume: bool, on_field: FieldCallback, keep: bool,
            warn: Callable[[str], None] | None, engine: Any = None) -> list[SlideReport]:
        """Each file counted into its SlideReport."""
        ...


def run_job(slides: Sequence[Slide], cfg: PipelineConfig, resume: bool = False, ray: RayOptions | None = None,
            whole: WholeSlides | None = None, outputs: JobOutputs = JobOutputs()) -> RunResult:
    """Every field of ``slides`` through the stages ``cfg`` names, locally or on Ray workers (``ray``),
    then the tiles of the ``whole`` slide files the same way; ``outputs`` says where each field's
    result and the warnings go, and what the result keeps of the fields."""
    from smear.pipeline.build import audit_info, build_cache, build_stages, guard_notice, model_metas, stages_version
    from smear.report.tables import differentials

    on_field, warn, keep_fields, views = outputs.on_field, outputs.warn, outputs.keep_fields, outputs.views
    metas = model_metas(cfg)  # each model folder read and hashed once (the Ray driver loads no model)
    notice = guard_notice(cfg, metas)
    if notice:
        (warn or _log.warning)(notice)
    version = stages_version(cfg, metas)
    cache = build_cache(cfg, version, warn=warn)
    stages, engine = None, contextlib.nullcontext(None)
    if ray is None:
        stages = build_stages(cfg, metas, views=views)
    else:
        from smear.pipeline.ray_engine import BuildFromConfig, RayEngine

        engine = RayEngine(BuildFromConfig(cfg, keep_views=views), field_batch=cfg.field_batch, cache=cache, address=ray.address,
                           workers=ray.workers, gpus_per_worker=ray.gpus_per_worker, warn=warn,
                           worker_logs=ray.worker_logs, classified=cfg.classifier != "off",
                           guard=_guard(metas))
    done = [0, 0]  # results made (fields and whole-slide tiles); whole-slide tiles reached (made or unreadable)

    def each(name: str, item) -> None:
        done[0] += not isinstance(item, SkippedField)
        if on_field is not None:
            on_field(name, item)

    def tile(name: str, item) -> None:
        done[1] += 1
        each(name, item)

    with engine as eng:
        reports = (run_slides(slides, stages, cfg.io.max_pixels, each, cache, resume, keep_fields, engine=eng)
                   if slides else [])
        geometry = (stages or eng).crop_geometry
        if whole is not None:
            reports += whole.run(stages, cache, resume, tile, keep_fields, warn, engine=eng)
    return RunResult(tuple(reports), tuple(differentials(reports, cfg)), cfg, version, audit_info(cfg, version, metas),
                     None if geometry is None else CropGeometry(*geometry),
                     finished=(done[0], sum(len(s.fields) for s in slides) + done[1]))


def _guard(metas) -> Any:
    """The slide guard's statistics of the classifier folder (read here, with no network), or None."""
    if "classifier" not in metas:
        return None
    from smear.classify.guard import SlideGuard

    meta = metas["classifier"]
    return SlideGuard.from_dir(meta.folder, meta) if meta.novelty else None
