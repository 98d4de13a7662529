"""Slide reports as rows: per-slide summary, per-cell table, CSV and JSON text."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from smear.config_models import PipelineConfig
from smear.io import temp_name
from smear.report.summary import differential
from smear.taxonomy import CellKind
from smear.types import Differential, FieldResult, SlideReport

CELL_COLUMNS = ("slide", "field", "x0", "y0", "x1", "y1", "kind", "det_score", "label", "prob", "novelty")
#: added to the per-cell table when a segmenter ran: areas in field pixels and their ratio
MASK_COLUMNS = ("cell_area_px", "nucleus_area_px", "nc_ratio")
#: added when the run has a whole-slide file: the box in level-0 pixels of the slide and its centre in um
SLIDE_COLUMNS = ("x0_l0", "y0_l0", "x1_l0", "y1_l0", "x_um", "y_um")


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def differentials(reports: Sequence[SlideReport], cfg: PipelineConfig | None = None) -> list[Differential]:
    """The Differential of each slide; ``cfg`` is the pipeline config (None: shipped report and
    guard settings, no flags)."""
    if cfg is None:
        return [differential(r) for r in reports]
    return [differential(r, cfg.report, cfg.flags, cfg.guard) for r in reports]


def summary_frame(diffs: Sequence[Differential]):
    """The slides' differentials as the CSV table: one row per slide (``Differential.row``), flags
    joined by '; '."""
    table = []
    for d in diffs:
        row = d.row()
        out = {k: v for k, v in row.items() if k not in ("classified", "warnings", "flags", "domain_warnings",
                                                         "domain_evidence")}
        out["flags"] = "; ".join(row["flags"])
        table.append(out)
    import pandas as pd  # here, not at import: a table or JSON report needs no pandas (start-up)

    return pd.DataFrame(table)


def summary_csv(diffs: Sequence[Differential]) -> str:
    """The summary CSV report of the slides' differentials."""
    return to_csv(summary_frame(diffs))


def field_cell_rows(slide: str, fr: FieldResult) -> list[dict[str, Any]]:
    """One row per detected cell of a field; label and prob filled for classified WBCs, areas
    for masked ones."""
    rows = []
    by_det = {id(c.detection): c for c in fr.cells}
    for det in fr.detections:
        cell = by_det.get(id(det))
        x0, y0, x1, y1 = det.box_xyxy
        rows.append({
            "slide": slide, "field": fr.field,
            "x0": _r(x0, 1), "y0": _r(y0, 1), "x1": _r(x1, 1), "y1": _r(y1, 1),
            "kind": det.kind.value, "det_score": _r(det.score),
            "label": cell.label if cell else "",
            "prob": _r(cell.prob) if cell and cell.probs else None,
            "novelty": _r(cell.novelty) if cell and cell.novelty is not None else None,
        })
        if fr.region is not None:
            b = fr.region.level0(det.box_xyxy)
            rows[-1].update({"x0_l0": _r(b[0], 1), "y0_l0": _r(b[1], 1), "x1_l0": _r(b[2], 1), "y1_l0": _r(b[3], 1)})
            if fr.region.mpp:
                rows[-1].update({"x_um": _r((b[0] + b[2]) / 2 * fr.region.mpp, 2),
                                 "y_um": _r((b[1] + b[3]) / 2 * fr.region.mpp, 2)})
        if cell is not None and cell.mask is not None:
            m = cell.mask
            rows[-1].update({"cell_area_px": m.cell_area_px, "nucleus_area_px": m.nucleus_area_px,
                             "nc_ratio": _r(m.nucleus_to_cell) if m.cell_area_px else None})
    return rows


def cell_rows(reports: Sequence[SlideReport]) -> list[dict[str, Any]]:
    """The per-cell rows of every kept field of the reports."""
    return [row for rep in reports for fr in rep.fields for row in field_cell_rows(rep.slide, fr)]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (it starts with = + - @, tab or CR),
    prefixed with ' (OWASP's advice for CSV injection); numbers and other text unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _csv_line(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return ["" if row.get(c) is None else str(csv_safe(row[c])) for c in columns]


class CellsWriter:
    """The per-cell CSV written field by field (memory flat in the number of fields) into a temporary
    file beside ``path``, renamed over ``path`` by ``close()``; ``masks`` adds the mask columns,
    ``slide_coords`` the level-0 and um columns of whole-slide tiles."""

    def __init__(self, path: str | Path, masks: bool = False, slide_coords: bool = False):
        self.path = Path(path)
        self.columns = (list(CELL_COLUMNS) + (list(MASK_COLUMNS) if masks else [])
                        + (list(SLIDE_COLUMNS) if slide_coords else []))
        self.tmp = self.path.with_name(f"{temp_name(self.path)}tmp")  # swept as io's own temporary files
        self.fh = open(self.tmp, "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.writer.writerow(self.columns)

    def write(self, slide: str, fr: FieldResult) -> None:
        self.writer.writerows(_csv_line(r, self.columns) for r in field_cell_rows(slide, fr))

    def close(self) -> None:
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def to_csv(df) -> str:
    """CSV text with a header, no index."""
    buf = io.StringIO()
    df = df.copy()
    for col in df.columns:
        if not _numeric(df[col]):
            df[col] = df[col].map(csv_safe)
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def cells_csv(reports: Sequence[SlideReport]) -> str:
    """The per-cell table as CSV text."""
    rows = cell_rows(reports)
    columns = (list(CELL_COLUMNS) + (list(MASK_COLUMNS) if any("cell_area_px" in r for r in rows) else [])
               + (list(SLIDE_COLUMNS) if any("x0_l0" in r for r in rows) else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(_csv_line(r, columns) for r in rows)
    return buf.getvalue()


def to_json(reports: Sequence[SlideReport], diffs: Sequence[Differential]) -> str:
    """Each slide's differential (``Differential.row``) plus its per-field results and skipped
    fields, as JSON text."""
    out = []
    for rep, d in zip(reports, diffs):
        row = d.row()
        fields = []
        for fr in rep.fields:
            fields.append({
                "field": fr.field, "path": fr.path, "width": fr.width, "height": fr.height,
                **({"region": asdict(fr.region)} if fr.region is not None else {}),
                "counts": {k.value: fr.count(k) for k in CellKind},
                "detections": [{"box_xyxy": [_r(v, 1) for v in d.box_xyxy], "kind": d.kind.value,
                                "score": _r(d.score)} for d in fr.detections],
                "cells": [{"box_xyxy": [_r(v, 1) for v in c.detection.box_xyxy], "label": c.label,
                           "prob": _r(c.prob), "novelty": _r(c.novelty) if c.novelty is not None else None,
                           "mask": asdict(c.mask) if c.mask else None}
                          for c in fr.cells],
            })
        entry = {"summary": row, "fields": fields,
                 "skipped": [{"field": s.field, "reason": s.reason} for s in rep.skipped]}
        if rep.whole_slide is not None:
            entry["whole_slide"] = whole_slide_dict(rep.whole_slide)
        out.append(entry)
    return json.dumps({"slides": out}, indent=2) + "\n"


def whole_slide_dict(info) -> dict[str, Any]:
    """What a whole-slide run read and skipped, for the JSON report (the quality map by its path)."""
    return {k: v for k, v in asdict(info).items() if k != "quality_map_png"}


def _numeric(column) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(column))
