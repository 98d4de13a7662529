"""Slide reports as rows: per-slide summary, per-cell table, CSV and JSON text."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any, Sequence

import pandas as pd

from smear.pipeline.summary import summarize
from smear.types import CellKind, SlideReport

CELL_COLUMNS = ("slide", "field", "x0", "y0", "x1", "y1", "kind", "det_score", "label", "prob")
#: added to the per-cell table when a segmenter ran: areas in field pixels and their ratio
MASK_COLUMNS = ("cell_area_px", "nucleus_area_px", "nc_ratio")


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def summary_rows(reports: Sequence[SlideReport], cfg: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The summary of each slide (see summary.summarize); ``cfg`` is the pipeline config."""
    cfg = cfg or {}
    return [summarize(r, cfg.get("report"), cfg.get("flags")) for r in reports]


def summary_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Summary rows as the CSV table: one row per slide, flags joined by '; '."""
    table = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in ("classified", "warnings", "flags")}
        out["flags"] = "; ".join(row["flags"])
        table.append(out)
    return pd.DataFrame(table)


def cell_rows(reports: Sequence[SlideReport]) -> list[dict[str, Any]]:
    """One row per detected cell; label and prob filled for classified WBCs."""
    rows = []
    for rep in reports:
        for fr in rep.fields:
            by_det = {id(c.detection): c for c in fr.cells}
            for det in fr.detections:
                cell = by_det.get(id(det))
                x0, y0, x1, y1 = det.box_xyxy
                rows.append({
                    "slide": rep.slide, "field": fr.field,
                    "x0": _r(x0, 1), "y0": _r(y0, 1), "x1": _r(x1, 1), "y1": _r(y1, 1),
                    "kind": det.kind.value, "det_score": _r(det.score),
                    "label": cell.label if cell else "",
                    "prob": _r(cell.prob) if cell and cell.probs else None,
                })
                if cell is not None and cell.mask is not None:
                    m = cell.mask
                    rows[-1].update({"cell_area_px": m.cell_area_px, "nucleus_area_px": m.nucleus_area_px,
                                     "nc_ratio": _r(m.nucleus_to_cell) if m.cell_area_px else None})
    return rows


def to_csv(df: pd.DataFrame) -> str:
    """CSV text with a header, no index."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def cells_csv(reports: Sequence[SlideReport]) -> str:
    """The per-cell table as CSV text."""
    rows = cell_rows(reports)
    masked = any("cell_area_px" in r for r in rows)
    return to_csv(pd.DataFrame(rows, columns=list(CELL_COLUMNS) + (list(MASK_COLUMNS) if masked else [])))


def to_json(reports: Sequence[SlideReport], rows: Sequence[dict[str, Any]]) -> str:
    """Summary plus per-field results and skipped fields, as JSON text."""
    out = []
    for rep, row in zip(reports, rows):
        fields = []
        for fr in rep.fields:
            fields.append({
                "field": fr.field, "path": fr.path, "width": fr.width, "height": fr.height,
                "counts": {k.value: fr.count(k) for k in CellKind},
                "detections": [{"box_xyxy": [_r(v, 1) for v in d.box_xyxy], "kind": d.kind.value,
                                "score": _r(d.score)} for d in fr.detections],
                "cells": [{"box_xyxy": [_r(v, 1) for v in c.detection.box_xyxy], "label": c.label,
                           "prob": _r(c.prob), "mask": asdict(c.mask) if c.mask else None}
                          for c in fr.cells],
            })
        out.append({"summary": row, "fields": fields,
                    "skipped": [{"field": s.field, "reason": s.reason} for s in rep.skipped]})
    return json.dumps({"slides": out}, indent=2) + "\n"
