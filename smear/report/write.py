"""A run's result as a report file: CSV, JSON or the HTML review page (the table is the CLI's)."""

from __future__ import annotations

from pathlib import Path

from smear.artifacts import cache_setting
from smear.config_models import PipelineConfig
from smear.io import write_text_atomic
from smear.errors import SmearError
from smear.types import RunResult

FORMATS = ("csv", "json", "html")
KEPT_HINT = "every field's result is in the cache: fix the cause and rerun with --resume"


def render(result: RunResult, fmt: str) -> str:
    """The report of ``result`` as text in ``fmt`` (csv | json | html)."""
    from smear.report import tables

    if fmt == "csv":
        return tables.summary_csv(result.differentials)
    if fmt == "json":
        return tables.to_json(result.reports, result.differentials)
    if fmt == "html":
        from smear.report.html import render_html

        return render_html(result.reports, result.differentials, result.cfg.report.gallery_per_class,
                           cfg=result.cfg, audit=result.audit)
    raise ValueError(f"unknown report format {fmt!r}: one of {', '.join(FORMATS)}")


def write(result: RunResult, fmt: str, out: str | Path | None = None) -> str | None:
    """Write the report of ``result`` in ``fmt`` to ``out`` atomically, or return its text when
    ``out`` is None. A report that cannot be written is a SmearError naming the file."""
    text = render(result, fmt)
    if out is None:
        return text
    save(text, out, result.cfg, result.finished)
    return None


def kept_hint(cfg: PipelineConfig, finished: int | None = None, total: int | None = None) -> str:
    """The --resume hint of an output that could not be written: with a cache, the fields' results
    are kept (``finished`` of ``total`` fields, when known)."""
    if cache_setting(cfg.cache_dir, "fields") is None:
        return ""
    if finished is None:
        return KEPT_HINT
    return (f"{finished} of {total} fields finished and their results are in the cache: fix the cause and "
            "rerun with --resume to skip them")


def save(text: str, out: str | Path, cfg: PipelineConfig, finished: tuple[int, int] | None = None) -> None:
    """``text`` written atomically to ``out``; a SmearError naming the file when it cannot be
    (``finished``: fields done of all, for the --resume hint)."""
    try:
        write_text_atomic(out, text)
    except OSError as exc:
        raise SmearError(f"{out}: cannot write the report ({exc.strerror or exc})",
                         hint=kept_hint(cfg, *(finished or (None, None)))) from exc
