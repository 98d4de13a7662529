"""Slide reports as rows: per-slide summary, per-cell table, CSV and JSON text."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any, Sequence

import pandas as pd

from smear.types import FINE_CLASSES, UNIDENTIFIED, WBC_CLASSES, CellKind, SlideReport

CELL_COLUMNS = ("slide", "field", "x0", "y0", "x1", "y1", "kind", "det_score", "label", "prob")


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def summary_row(report: SlideReport) -> dict[str, Any]:
    """One slide's counts: fields, detected kinds, and when classified each fine class's n and %."""
    n_fields = report.n_fields
    n_rbc, n_plt = report.count(CellKind.RBC), report.count(CellKind.PLATELET)
    row: dict[str, Any] = {"slide": report.slide, "n_fields": n_fields, "n_skipped": len(report.skipped)}
    if not report.classified:
        row["n_wbc"] = report.count(CellKind.WBC)
    else:
        counts = report.label_counts()
        n_wbc = sum(counts[c] for c in WBC_CLASSES)
        row["n_wbc"] = n_wbc
        row["n_unidentified"] = counts[UNIDENTIFIED]
        for code in FINE_CLASSES:
            row[f"{code}_n"] = counts[code]
            # ERB and PLATELET are counted apart from the WBC percentages.
            pct = code in WBC_CLASSES and n_wbc > 0
            row[f"{code}_pct"] = _r(100.0 * counts[code] / n_wbc, 2) if pct else None
    row["n_rbc"] = n_rbc
    row["n_platelet"] = n_plt
    row["rbc_per_field"] = _r(n_rbc / n_fields, 2) if n_fields else None
    row["platelets_per_field"] = _r(n_plt / n_fields, 2) if n_fields else None
    return row


def summary_frame(reports: Sequence[SlideReport]) -> pd.DataFrame:
    """Summary rows of all slides as a DataFrame (columns in a fixed order)."""
    return pd.DataFrame([summary_row(r) for r in reports])


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
                    "label": cell.label if cell else "", "prob": _r(cell.prob) if cell else None,
                })
    return rows


def to_csv(df: pd.DataFrame) -> str:
    """CSV text with a header, no index."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def cells_csv(reports: Sequence[SlideReport]) -> str:
    """The per-cell table as CSV text."""
    return to_csv(pd.DataFrame(cell_rows(reports), columns=list(CELL_COLUMNS)))


def to_json(reports: Sequence[SlideReport]) -> str:
    """Summary plus per-field results and skipped fields, as JSON text."""
    out = []
    for rep in reports:
        fields = []
        for fr in rep.fields:
            fields.append({
                "field": fr.field, "width": fr.width, "height": fr.height,
                "counts": {k.value: fr.count(k) for k in CellKind},
                "detections": [{"box_xyxy": [_r(v, 1) for v in d.box_xyxy], "kind": d.kind.value,
                                "score": _r(d.score)} for d in fr.detections],
                "cells": [{"box_xyxy": [_r(v, 1) for v in c.detection.box_xyxy], "label": c.label,
                           "prob": _r(c.prob), "mask": asdict(c.mask) if c.mask else None}
                          for c in fr.cells],
            })
        out.append({"summary": summary_row(rep), "fields": fields,
                    "skipped": [{"field": s.field, "reason": s.reason} for s in rep.skipped]})
    return json.dumps({"slides": out}, indent=2) + "\n"
