"""One self-contained HTML review file: summary with CIs and flags, fields with boxes, cell gallery."""

from __future__ import annotations

import base64
import html
from typing import Any, Sequence

import cv2
import numpy as np

from smear.io import read_image
from smear.crops import cut_crop, pad_value
from smear.types import FINE_CLASSES, FINE_NAMES, UNIDENTIFIED, CellKind, SlideReport, SmearError

KIND_BGR = {CellKind.WBC: (200, 60, 140), CellKind.RBC: (40, 40, 220), CellKind.PLATELET: (40, 160, 40)}
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table.summary{border-collapse:collapse;margin:.5em 0}
table.summary td,table.summary th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
table.summary td:first-child,table.summary th:first-child{text-align:left}
.flags li{color:#8a4b00} .warn{color:#a00}
.guard{background:#fde8e8;border:2px solid #a00;padding:.5em;color:#600}
.fields img{max-width:420px;margin:.3em;border:1px solid #ccc}
.gallery{display:flex;flex-wrap:wrap;gap:.4em}
.cell{font-size:.75em;text-align:center;width:100px}
.cell img{width:96px;height:96px;border:1px solid #bbb}
.unidentified .cell img{border:2px solid #c00}
"""


def _b64_jpeg(image_rgb: np.ndarray, quality: int = 80) -> str:
    ok, buf = cv2.imencode(".jpg", image_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _field_figure(image_rgb: np.ndarray, fr, max_side: int = 640) -> str:
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    labels = {id(c.detection): c.label for c in fr.cells}
    for d in fr.detections:
        x0, y0, x1, y1 = (int(round(v)) for v in d.box_xyxy)
        cv2.rectangle(bgr, (x0, y0), (x1, y1), KIND_BGR[d.kind], 2)
        if id(d) in labels:
            cv2.putText(bgr, labels[id(d)], (x0 + 2, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        KIND_BGR[d.kind], 1, cv2.LINE_AA)
    scale = max_side / max(bgr.shape[:2])
    if scale < 1:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return _b64_jpeg(bgr[..., ::-1])


def _summary_table(row: dict[str, Any]) -> str:
    out = ["<table class='summary'><tr><th>class</th><th>name</th><th>n</th><th>%</th><th>95% CI</th></tr>"]
    for code in FINE_CLASSES:
        pct = row[f"{code}_pct"]
        ci = "" if pct is None else f"{row[f'{code}_ci_low']:.1f} – {row[f'{code}_ci_high']:.1f}"
        out.append(f"<tr><td>{code}</td><td>{FINE_NAMES[code]}</td><td>{row[f'{code}_n']}</td>"
                   f"<td>{'' if pct is None else f'{pct:.1f}'}</td><td>{ci}</td></tr>")
    out.append("</table>")
    return "".join(out)


def render_html(reports: Sequence[SlideReport], rows: Sequence[dict[str, Any]], gallery_per_class: int = 60,
                crop_margin: float = 1.2) -> str:
    """The whole review page as one HTML string (images embedded as data URIs)."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>smear report</title>",
             f"<style>{CSS}</style></head><body><h1>smear differential report</h1>",
             "<p>Pre-classification for review by a qualified person; flags are prompts, not diagnoses.</p>"]
    for rep, row in zip(reports, rows):
        parts.append(f"<section class='slide'><h2>Slide {e(rep.slide)}</h2>")
        for w in row.get("domain_warnings", []):
            parts.append(f"<p class='guard'><b>Warning:</b> {e(w)}</p>")
        parts.append(f"<p id='counts'>{row['n_fields']} fields, {row['n_wbc']} WBC identified"
                     + (f", <b>{row['n_unidentified']} unidentified (review queue)</b>" if rep.classified else "")
                     + f", {row['n_rbc']} RBC ({row['rbc_per_field']} per field), {row['n_platelet']} platelets"
                     f" ({row['platelets_per_field']} per field, {row['platelets_per_100_rbc']} per 100 RBC)"
                     + (f", NRBC {row['nrbc_per_100_wbc']} per 100 WBC" if rep.classified else "")
                     + (f", {row['n_skipped']} fields skipped" if row["n_skipped"] else "") + "</p>")
        for w in row["warnings"]:
            parts.append(f"<p class='warn'>{e(w)}</p>")
        if rep.classified:
            parts.append(_summary_table(row))
        parts.append("<h3>Flags</h3><ul class='flags'>" + "".join(f"<li>{e(f)}</li>" for f in row["flags"])
                     + ("" if row["flags"] else "<li>none</li>") + "</ul>")
        gallery: dict[str, list[str]] = {c: [] for c in (UNIDENTIFIED, *FINE_CLASSES)}
        fields_html = []
        for fr in rep.fields:
            try:
                image = read_image(fr.path)
            except SmearError:
                continue
            fields_html.append(f"<figure><img alt='{e(fr.field)}' src='{_field_figure(image, fr)}'>"
                               f"<figcaption>{e(fr.field)}</figcaption></figure>")
            fill = pad_value(image)
            for c in fr.cells:
                if len(gallery[c.label]) >= gallery_per_class:
                    continue
                crop = cut_crop(image, c.detection.box_xyxy, crop_margin, 96, fill)
                top3 = sorted(c.probs.items(), key=lambda kv: -kv[1])[:3]
                tip = ", ".join(f"{k} {v:.2f}" for k, v in top3)
                gallery[c.label].append(f"<div class='cell' title='{e(tip)}'><img src='{_b64_jpeg(crop)}'>"
                                        f"<br>{e(fr.field)}<br>{c.prob:.2f}</div>")
        if rep.classified:
            parts.append("<h3>Cells by class (unidentified first)</h3><div id='gallery'>")
            for label, cells in gallery.items():
                if not cells:
                    continue
                cls = " unidentified" if label == UNIDENTIFIED else ""
                parts.append(f"<h4>{e(label)} ({len(cells)} shown)</h4><div class='gallery{cls}'>"
                             + "".join(cells) + "</div>")
            parts.append("</div>")
        parts.append("<h3>Fields</h3><div class='fields'>" + "".join(fields_html) + "</div></section>")
    parts.append("</body></html>\n")
    return "".join(parts)
