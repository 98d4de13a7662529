"""`smear run`: fields to a differential, one report per slide."""

from __future__ import annotations

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
    from smear.io import check_outputs, find_slides

    if engine == EngineName.local and (address is not None or workers is not None or gpus_per_worker is not None):
        raise SmearError("--address, --workers and --gpus-per-worker go with --engine ray")
    if engine == EngineName.ray:
        from smear.pipeline.ray_engine import require_ray

        require_ray()  # a missing extra is said before any model loads
    cfg = load_config("pipeline", config, set_ or [], {"--device": ("device", device), "--segment": ("segmenter", segment)})
    if report == ReportFormat.html and out is None and _stdout_is_terminal():
        raise SmearError("--report html writes one HTML file, not text for a terminal: pass --out FILE.html")
    from smear.cli.wsi import check_whole_slides

    whole, paths = check_whole_slides(paths, target_wbc, all_tiles, recursive)
    slides = find_slides(paths, recursive=recursive, empty_slides=True) if paths else []
    check_outputs({"--out": out, "--cells": cells}, slides + whole.as_slides())  # before any model loads
    ray = None
    if engine == EngineName.ray:
        from smear.cli.app import verbose
        from smear.pipeline.job import RayOptions

        ray = RayOptions(address, workers, gpus_per_worker, worker_logs=verbose())
    with terminate_cleanly():
        result = _run_job(slides, cfg, resume, cells, report, ray, whole.options(cfg, target_wbc, all_tiles, out, cells))
    _render(result, report, out)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _render(result, report: ReportFormat, out: Optional[Path]) -> None:
    """The guard's and the count's warnings, then the report: a rich table, or a file in its format."""
    from smear.cli.render import render_summary
    from smear.report.write import save, write

    for d in result.differentials:
        for message in d.domain_warnings:
            warn(f"{d.slide}: {message}")
        for message in d.warnings:
            warn(message)
    if report != ReportFormat.table:
        text = write(result, report.value, out)
        if text is not None:
            sys.stdout.write(text)
    elif out is None:
        render_summary(list(result.differentials), out_console)
    else:
        console = Console(record=True, file=io.StringIO(), width=100)
        render_summary(list(result.differentials), console)
        save(console.export_text(), out, result.cfg, result.finished)


def _run_job(slides, cfg, resume: bool, cells: Optional[Path], report: ReportFormat, ray, whole):
    """``pipeline.run_job`` with a progress bar, writing --cells rows as fields finish (the whole-slide
    files, ``whole``: smear.cli.wsi.WholeSlideRun, tile by tile); the fields' results are kept for a
    JSON or HTML ``report``, with what the page shows for HTML."""
    from smear.cli.render import progress
    from smear.pipeline.job import JobOutputs, run_job
    from smear.report import tables as rep
    from smear.report.write import kept_hint
    from smear.types import SkippedField

    n_fields = sum(len(s.fields) for s in slides)
    finished = [0, 0]  # results made (and cached): what a --resume after a failure skips; fields and tiles seen
    writer = None
    try:
        if cells is not None:
            writer = rep.CellsWriter(cells, masks=cfg.segmenter != "off", slide_coords=bool(whole))
        with progress(err_console, total=None if whole else n_fields) as advance:
            def on_field(slide_name, item):
                finished[1] += 1
                if isinstance(item, SkippedField):
                    if n_fields > 1:
                        warn(f"skipped {item.reason}")
                else:
                    finished[0] += 1
                    if writer is not None:
                        writer.write(slide_name, item)
                advance()
            outputs = JobOutputs(on_field, keep_fields=report in (ReportFormat.json, ReportFormat.html),
                                 views=report == ReportFormat.html)  # warnings: the logger's, as the library's
            result = run_job(slides, cfg, resume, ray=ray, whole=whole or None, outputs=outputs)
        if writer is not None:
            writer.close()
    except OSError as exc:
        if cells is None:
            raise
        if writer is not None:
            writer.abort()
        raise SmearError(f"{cells}: cannot write the cells table ({exc.strerror or exc})",
                         hint=kept_hint(cfg, finished[0], max(n_fields, finished[1]))) from exc  # + whole-slide tiles
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return result
