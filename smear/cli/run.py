"""`smear run`: fields to a differential, one report per slide."""

from __future__ import annotations

import contextlib
import io
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from smear.cli.app import ConfigOpt, SetOpt, app, err_console, out_console, terminate_cleanly, warn
from smear.errors import SmearError


class EngineName(str, Enum):
    local = "local"
    ray = "ray"


class ReportFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


@app.command(epilog="Examples: smear run examples/slide_demo --report csv  |  smear run slides/ --recursive "
                     "--report html --out report.html --cells cells.csv  |  smear run slide/ --segment unet --resume  |  "
                     "smear run /shared/slides --recursive --engine ray --address auto --report csv --out /shared/out.csv")
def run(
    paths: Annotated[list[Path], typer.Argument(help="Field images, folders (a folder is one slide) or whole-slide "
                                                     "files (.svs .ndpi .mrxs .dcm, pyramidal .tif).")],
    report: Annotated[ReportFormat, typer.Option(help="table | csv | json | html (one self-contained file).")
                      ] = ReportFormat.table,
    out: Annotated[Optional[Path], typer.Option(help="Write the report here (default: stdout).")] = None,
    cells: Annotated[Optional[Path], typer.Option(help="Also write one CSV row per detected cell.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    segment: Annotated[Optional[str], typer.Option(help="off | unet | kmeans | grabcut: mask each WBC crop "
                                                         "(adds areas and N:C ratio to --cells).")] = None,
    recursive: Annotated[bool, typer.Option(help="Each subfolder holding images is a slide.")] = False,
    resume: Annotated[bool, typer.Option(help="Reuse results of fields already done (same file, same models).")
                      ] = False,
    engine: Annotated[EngineName, typer.Option(help="local (this process) | ray (Ray actors; pip install "
                                                    "\"smear\\[ray]\").")] = EngineName.local,
    address: Annotated[Optional[str], typer.Option(help="ray: auto (this node's cluster) | HOST:PORT; default: a "
                                                        "local Ray instance, or $RAY_ADDRESS.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="ray: worker actors (default: one per GPU, "
                                                               "or one per node).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0.0, help="ray: GPUs each worker holds (default: 1 "
                                                                           "when the cluster has GPUs, else 0).")] = None,
    target_wbc: Annotated[Optional[int], typer.Option(min=1, help="Whole slides: stop once N white cells are "
                                                                  "classified (default wsi.target_wbc, 200).")] = None,
    all_tiles: Annotated[bool, typer.Option("--all", help="Whole slides: count every monolayer tile.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Count and classify the cells of each slide and print the differential."""
    from smear.config import load_config
    from smear.io import check_outputs, find_slides, write_text_atomic
    from smear.cli.render import render_summary
    from smear.pipeline.build import build_cache, build_stages, guard_notice
    from smear.report import tables as rep

    if engine == EngineName.local and (address is not None or workers is not None or gpus_per_worker is not None):
        raise SmearError("--address, --workers and --gpus-per-worker go with --engine ray")
    if engine == EngineName.ray:
        from smear.pipeline.ray_engine import require_ray

        require_ray()  # a missing extra is said before any model loads
    overrides = list(set_ or []) + ([f"device={device}"] if device else []) + ([f"segment={segment}"] if segment else [])
    cfg = load_config("pipeline", config, overrides)
    if report == ReportFormat.html and out is None and _stdout_is_terminal():
        raise SmearError("--report html writes one HTML file, not text for a terminal: pass --out FILE.html")
    from smear.cli.wsi import check_whole_slides

    whole, paths = check_whole_slides(paths, engine == EngineName.ray, target_wbc, all_tiles, recursive)
    slides = find_slides(paths, recursive=recursive, warn=warn) if paths else []
    check_outputs({"--out": out, "--cells": cells}, slides + whole.as_slides())  # before any model loads
    stages = build_stages(cfg)
    notice = guard_notice(cfg, stages)
    if notice:
        warn(notice)
    cache = build_cache(cfg, stages.version, warn=warn)
    with terminate_cleanly(), _engine(engine, cfg, stages, cache, address, workers, gpus_per_worker) as eng:
        reports, finished = _run_slides(slides, stages, cfg, cache, resume, cells,
                                        keep=report in (ReportFormat.json, ReportFormat.html), engine=eng,
                                        whole=whole.options(cfg, target_wbc, all_tiles, out, cells))
    diffs = rep.differentials(reports, cfg)
    rows = [d.row() for d in diffs]  # the flat rows of the CSV, JSON and HTML reports
    for d in diffs:
        for message in d.domain_warnings:
            warn(f"{d.slide}: {message}")
        for message in d.warnings:
            warn(message)
    if report == ReportFormat.csv:
        text = rep.to_csv(rep.summary_frame(rows))
    elif report == ReportFormat.json:
        text = rep.to_json(reports, rows)
    elif report == ReportFormat.html:
        from smear.pipeline.build import audit_info
        from smear.report.html import render_html

        geometry = stages.classifier or stages.segmenter  # the crops the run cut (run.classify_cells)
        margin = geometry.crop_margin if geometry is not None else 1.2
        text = render_html(reports, rows, cfg.report.gallery_per_class, margin, cfg=cfg,
                           audit=audit_info(cfg, stages.version), segmenter=stages.segmenter,
                           segment_size=int(geometry.input_size) if geometry is not None else 96,
                           read_field=whole.read_field)
    else:
        console = Console(record=True, file=io.StringIO(), width=100) if out else out_console
        render_summary(diffs, console)
        text = console.export_text() if out else None
    if out is not None:
        try:
            write_text_atomic(out, text)
        except OSError as exc:
            total = sum(len(sl.fields) for sl in slides)
            raise SmearError(f"{out}: cannot write the report ({exc.strerror or exc})",
                             hint=_kept_hint(finished, total) if cache is not None else "") from exc
    elif text is not None:
        sys.stdout.write(text)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _kept_hint(finished: int, total: int) -> str:
    """The --resume hint after a failed write: how many fields' results the cache holds."""
    return (f"{finished} of {total} fields finished and their results are in the cache: fix the cause and "
            "rerun with --resume to skip them")


def _engine(name: EngineName, cfg, stages, cache, address, workers, gpus_per_worker):
    """The engine a run asked for, as a context: None (the local run) or a started RayEngine."""
    if name == EngineName.local:
        return contextlib.nullcontext(None)
    from smear.cli.app import verbose
    from smear.pipeline.ray_engine import BuildFromConfig, RayEngine

    return RayEngine(BuildFromConfig(cfg), field_batch=stages.field_batch, cache=cache, address=address,
                     workers=workers, gpus_per_worker=gpus_per_worker, warn=warn, worker_logs=verbose())


def _run_slides(slides, stages, cfg, cache, resume: bool, cells: Optional[Path], keep: bool, engine=None,
                whole=None) -> tuple[list, int]:
    """``pipeline.run_slides`` with a progress bar, writing --cells rows as fields finish; then the
    whole-slide files (``whole``: smear.cli.wsi.WholeSlideRun), tile by tile. The reports, and the
    number of fields whose result was made (and cached)."""
    from smear.cli.render import progress
    from smear.pipeline.run import run_slides
    from smear.report import tables as rep

    n_fields = sum(len(s.fields) for s in slides)
    finished = [0]  # fields whose result is made (and cached): what a --resume after a failure skips
    writer = None
    try:
        if cells is not None:
            writer = rep.CellsWriter(cells, masks=stages.segmenter is not None, slide_coords=bool(whole))
        with progress(err_console, total=None if whole else n_fields) as advance:
            def on_field(slide_name, item):
                if hasattr(item, "reason"):
                    if n_fields > 1:
                        warn(f"skipped {item.reason}")
                else:
                    finished[0] += 1
                    if writer is not None:
                        writer.write(slide_name, item)
                advance()
            reports = run_slides(slides, stages, cfg.io.max_pixels, on_field, cache, resume, keep_fields=keep,
                                 engine=engine) if slides else []
            if whole:
                reports += whole.run(stages, cache, resume, on_field, keep, warn)
        if writer is not None:
            writer.close()
    except OSError as exc:
        if cells is None:
            raise
        if writer is not None:
            writer.abort()
        raise SmearError(f"{cells}: cannot write the cells table ({exc.strerror or exc})",
                         hint=_kept_hint(finished[0], n_fields) if cache is not None else "") from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return reports, finished[0]
