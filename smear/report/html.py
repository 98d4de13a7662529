"""The interactive review page: one self-contained HTML file (inline CSS and JS, crops and fields as
data URIs) rendered from the jinja2 template in smear/report/templates, with autoescape on."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any, Sequence

import cv2
import numpy as np

from smear import __version__
from smear.config_models import PipelineConfig
from smear.taxonomy import (
    ARTEFACT, FINE_CLASSES, FINE_NAMES, FINE_TO_GROUP8, FINE_TO_TYPE5, GROUPS8, REVIEW_CLASSES, REVIEW_NAMES,
    SMUDGE, TYPES5, UNIDENTIFIED, WBC_CLASSES, CellKind,
)
from smear.report.summary import FLAG_RULES, rule_classes
from smear.types import VIEW_JPEG_QUALITY, Differential, FieldResult, SlideReport, summary_columns

KIND_BGR = {CellKind.WBC: (200, 60, 140), CellKind.RBC: (40, 40, 220), CellKind.PLATELET: (40, 160, 40)}
#: one key per class a reviewer can give (shown in the page's legend)
REVIEW_KEYS: dict[str, str] = {"SNE": "s", "BNE": "b", "MMY": "m", "MY": "y", "PMY": "p", "EO": "e",
                               "BA": "a", "LY": "l", "MO": "o", "ERB": "r", "PLATELET": "t", ARTEFACT: "x",
                               SMUDGE: "u"}
GALLERY_ORDER = (UNIDENTIFIED, *REVIEW_CLASSES)
#: the classes behind each flag (its key under ``flags:``): with ``report.signoff_requires_review`` every
#: cell of a raised flag's classes, and every UNIDENTIFIED cell, must be reviewed before sign-off
FLAG_CLASSES: dict[str, list[str]] = {key: rule_classes(name) for key, name, _side, _text in FLAG_RULES}
NAMES = {**FINE_NAMES, **REVIEW_NAMES, UNIDENTIFIED: "unidentified: review first"}


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("smear.report", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def _b64_jpeg(image_rgb: np.ndarray, quality: int = VIEW_JPEG_QUALITY) -> str:
    ok, buf = cv2.imencode(".jpg", image_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _decoded(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """An image the pipeline kept encoded (a view's JPEG or PNG bytes), as cv2 decodes it: BGR, or
    one channel with ``cv2.IMREAD_UNCHANGED`` for a mask; None when the bytes do not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def _field_figure(fr: FieldResult) -> str | None:
    """The field as the pipeline kept it for the page, with its boxes and the cells' labels drawn
    (None: its kept image does not decode, e.g. a damaged cached view: shown as a field without one)."""
    bgr = _decoded(fr.view.image_jpeg)
    if bgr is None:
        return None
    scale = fr.view.scale
    labels = {id(c.detection): c.label for c in fr.cells}
    for d in fr.detections:
        x0, y0, x1, y1 = (int(round(v * scale)) for v in d.box_xyxy)
        cv2.rectangle(bgr, (x0, y0), (x1, y1), KIND_BGR[d.kind], 2)
        if id(d) in labels:
            cv2.putText(bgr, labels[id(d)], (x0 + 2, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        KIND_BGR[d.kind], 1, cv2.LINE_AA)
    return _b64_jpeg(bgr[..., ::-1])


def summary_config(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything the page's JavaScript needs to recompute a summary row exactly as
    summary.differential does: thresholds from the pipeline config, the taxonomy, the z values scipy
    uses, the CSV columns, and the flag and guard rules with every message (recount.js interprets
    them)."""
    from scipy.special import ndtri
    from scipy.stats import norm

    from smear.report.tables import FORMULA_START
    from smear.report.summary import (
        ADVICE, APART, EVIDENCE_TEXT, GROUPS_APART, IMPLAUSIBLE_RULES, MESSAGES, QUANTITIES,
    )

    conf = float(cfg.report.confidence)
    columns = summary_columns()
    return {
        "report": cfg.report.model_dump(), "flags": cfg.flags.model_dump(), "guard": cfg.guard.model_dump(),
        "z_ci": float(ndtri(0.5 + 0.5 * conf)), "z_needed": float(norm.ppf(0.5 + conf / 2.0)),
        "fine": list(FINE_CLASSES), "wbc": list(WBC_CLASSES), "apart": list(APART), "groups": list(GROUPS8),
        "groups_apart": list(GROUPS_APART), "types": list(TYPES5), "to_group": FINE_TO_GROUP8,
        "to_type": {k: v for k, v in FINE_TO_TYPE5.items() if v}, "unidentified": UNIDENTIFIED,
        "advice": ADVICE, "evidence_text": EVIDENCE_TEXT, "columns": columns, "formula_start": list(FORMULA_START),
        "int_columns": [c for c in columns if c.endswith("_n") or c.startswith("n_") or c == "wbc_needed"],
        "messages": MESSAGES, "quantities": list(QUANTITIES.items()), "flag_rules": FLAG_RULES,
        "implausible_rules": IMPLAUSIBLE_RULES,
    }


def slide_base(rep: SlideReport) -> dict[str, Any]:
    """The counts of a slide that a review does not change, and its label counts as predicted."""
    n_scored, n_novel = rep.novelty_counts()
    return {"slide": rep.slide, "classified": rep.classified, "n_fields": rep.n_fields,
            "n_rbc": rep.count(CellKind.RBC), "n_platelet_detected": rep.count(CellKind.PLATELET),
            "n_wbc_detected": rep.count(CellKind.WBC), "n_skipped": len(rep.skipped),
            "n_scored": n_scored, "n_novel": n_novel, "evidence": dict(rep.evidence),
            "counts": rep.label_counts() if rep.classified else {}}


def _top3(probs: dict[str, float]) -> list[tuple[str, float]]:
    return [(k, round(float(v), 3)) for k, v in sorted(probs.items(), key=lambda kv: -kv[1])[:3]]


MASK_BGR = {1: (0, 215, 255), 2: (255, 255, 0)}  # outlines drawn on crops: cell yellow, nucleus cyan


def outline(crop_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The crop with the outlines of a segmenter's mask (1 cytoplasm, 2 nucleus) drawn on it."""
    out = np.ascontiguousarray(crop_rgb[..., ::-1])
    mask = cv2.resize(mask, out.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    for level, bgr in MASK_BGR.items():
        inside = (mask >= level).astype(np.uint8)
        contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, bgr, 1, cv2.LINE_AA)
    return out[..., ::-1]


def _cell_entry(cell_id: str, fr, c, index: int) -> dict[str, Any]:
    nc = c.mask.nucleus_to_cell if c.mask is not None and c.mask.cell_area_px else None
    return {"id": cell_id, "field": fr.field, "label": c.label, "prob": round(float(c.prob), 3),
            "box": [round(float(v), 1) for v in c.detection.box_xyxy], "top3": _top3(c.probs),
            "nc": None if nc is None else round(float(nc), 2),
            "pos": _position(fr, c.detection.box_xyxy) if fr.region is not None else "",
            "anchor": f"s{index}-{fr.field}"}


#: what the script needs of every cell (the rest of a cell shown by the template is in its figure)
SCRIPT_KEYS = ("id", "field", "label", "prob", "box")
#: what the script needs to show a cell the template did not
MORE_KEYS = ("src", "top3", "nc", "pos", "anchor")


def _position(fr, box) -> str:
    """Where a box of a whole-slide tile lies: level-0 px of its centre, and um when known."""
    b = fr.region.level0(box)
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    um = f" ({cx * fr.region.mpp / 1000:.3f}, {cy * fr.region.mpp / 1000:.3f} mm)" if fr.region.mpp else ""
    return f"x {cx:.0f}, y {cy:.0f} px{um}"


def _whole_slide_view(info) -> dict[str, Any]:
    """What the page says of a whole slide: reading, skipping, area, platelets, the quality map."""
    src = "data:image/png;base64," + base64.b64encode(info.quality_map_png).decode("ascii") if info.quality_map_png else ""
    return {"info": info, "map": src, "skipped": ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in info.skipped.items())}


def _slide_view(rep: SlideReport, d: Differential, index: int,
                gallery_per_class: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the template shows of a slide, what the script gets of it), from the views the pipeline
    kept in its results. Every cell is on the page: the first ``gallery_per_class`` of each class as
    figures, the rest as data the script shows on demand ("show all"); each crop is in the file once.
    A field without a view (it could not be read again for a resumed run) shows no figure and no cells."""
    if rep.fields and all(fr.view is None for fr in rep.fields):
        raise ValueError(f"{rep.slide}: its field results hold no views; run the pipeline with "
                         "Stages.keep_views (run_job(..., outputs=JobOutputs(views=True))) to make the review page")
    by_label: dict[str, list[dict[str, Any]]] = {c: [] for c in GALLERY_ORDER}
    fields, field_hashes = [], []
    for k, fr in enumerate(rep.fields):
        field_hashes.append(fr.view.digest if fr.view is not None else "")  # the field's content, as shown
        if fr.view is None or fr.view.image_jpeg is None:
            continue
        figure = _field_figure(fr)
        if figure is None:
            continue
        where = _position(fr, (0.0, 0.0, float(fr.width), float(fr.height))) if fr.region is not None else ""
        fields.append({"name": fr.field, "src": figure, "anchor": f"s{index}-{fr.field}", "where": where})
        for j, c in enumerate(fr.cells):
            if c.label not in by_label or c.view is None:
                continue
            crop = _decoded(c.view.crop_jpeg)
            if crop is None:  # a damaged kept crop: the cell is counted, not shown
                continue
            entry = _cell_entry(f"s{index}f{k}c{j}", fr, c, index)
            crop = crop[..., ::-1]
            mask = _decoded(c.view.mask_png, cv2.IMREAD_UNCHANGED) if c.view.mask_png is not None else None
            if mask is not None:
                crop = outline(crop, mask)
            entry["src"] = _b64_jpeg(crop)
            by_label[c.label].append(entry)
    cells = [c for label in GALLERY_ORDER for c in by_label[label]]  # the review queue: unidentified first
    shown = {code: by_label[code][:max(0, gallery_per_class)] for code in GALLERY_ORDER}
    more = {c["id"]: {k: c[k] for k in MORE_KEYS}
            for code in GALLERY_ORDER for c in by_label[code][len(shown[code]):]}
    counts = rep.label_counts() if rep.classified else {}
    galleries = [{"code": code, "name": NAMES[code], "key": REVIEW_KEYS.get(code, ""), "cells": shown[code],
                  "total": counts.get(code, 0)} for code in GALLERY_ORDER]
    script_cells = [{k: c[k] for k in SCRIPT_KEYS} for c in cells]
    # the saved review state belongs to this content: the fields' bytes and the cells found on them
    key = hashlib.sha256(json.dumps([rep.slide, field_hashes, script_cells]).encode()).hexdigest()[:32]
    view = {"index": index, "name": rep.slide, "d": d, "classified": rep.classified,
            "wsi": _whole_slide_view(rep.whole_slide) if rep.whole_slide is not None else None,
            "galleries": galleries, "fields": fields, "n_queue": len(cells),
            "n_hidden": len(more),
            "table": [{"code": c, "name": FINE_NAMES[c], "share": d.fine[c]} for c in FINE_CLASSES]}
    return view, {"base": slide_base(rep), "cells": script_cells, "more": more,
                  "storage_key": f"smear-review:{key}"}


#: the columns <slide>_reviewed.csv adds after the CSV report's (the models' come after these)
AUDIT_COLUMNS = ("reviewer", "signed_off_utc", "cells_total", "cells_reviewed", "cells_changed",
                 "cells_never_shown", "cells_never_reviewed", "smear_version", "run_id")


def audit_row(audit: dict[str, Any]) -> dict[str, str]:
    """The page header's model hashes and smear version as the reviewed CSV's last columns:
    ``<stage>_model``, ``<stage>_weights``, ``<stage>_meta`` for each model folder."""
    row = {"smear_version": str(audit.get("smear", "")), "run_id": str(audit.get("run_id", ""))}
    for m in audit.get("models", []):
        row.update({f"{m['stage']}_model": str(m["name"]), f"{m['stage']}_weights": str(m["version"]),
                    f"{m['stage']}_meta": str(m["meta"])})
    return row


def render_html(reports: Sequence[SlideReport], diffs: Sequence[Differential], gallery_per_class: int = 60,
                cfg: PipelineConfig | None = None, audit: dict[str, Any] | None = None) -> str:
    """The whole review page as one HTML string (images embedded as data URIs) of the slides' reports,
    made with the views the pipeline keeps (``Stages.keep_views``: fields, crops and masks, each masked
    crop with its mask's outline drawn), and their differentials; ``cfg`` is the pipeline config the
    differentials were made with (its thresholds drive the page's live recount), ``audit`` what
    build.audit_info says of the run. A whole slide's crops link to their tile and its place."""
    if cfg is None:
        from smear.config import default_config

        cfg = default_config("pipeline")  # type: ignore[assignment]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    audit = {"smear": __version__, "date": now, "run_id": "", "models": [], "settings": {}, **(audit or {})}
    views, script = [], []
    for i, (rep, d) in enumerate(zip(reports, diffs)):
        view, data = _slide_view(rep, d, i, gallery_per_class)
        views.append(view)
        script.append(data)
    keys = [{"code": c, "key": REVIEW_KEYS[c], "name": NAMES[c]} for c in REVIEW_CLASSES]
    data = {"config": summary_config(cfg), "slides": script, "keys": keys,
            "gallery_order": list(GALLERY_ORDER), "audit_columns": list(AUDIT_COLUMNS),
            "audit": audit_row(audit), "require_review": bool(cfg.report.signoff_requires_review),
            "flag_classes": FLAG_CLASSES}
    legend = [{"kind": k.value, "rgb": "#{:02x}{:02x}{:02x}".format(*reversed(bgr))}
              for k, bgr in KIND_BGR.items()]
    page = _environment().get_template("review.html.j2").render(
        slides=views, audit=audit, keys=keys, data=data, box_legend=legend)
    return page.rstrip("\n") + "\n"
