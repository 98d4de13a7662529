"""A lab's labelled cells for ``smear adapt``: from the review page's corrections CSVs (each cell cut
from its field at its box, as the pipeline cuts it) or from any single-cell dataset that
``smear eval classify --data`` reads. Bad input is one error naming the file (and row)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smear.classify.data import label_from_name, load_items
from smear.crops import cut_crop
from smear.io import read_image
from smear.types import UNIDENTIFIED, DataError, SmearError

#: Corrected labels that mean "no leukocyte to learn from": such rows are skipped and counted.
NOT_A_CELL = frozenset({"artefact", "artifact", "not a wbc", "not a wbc / artefact", "not a wbc/artefact",
                        "smudge", "smudge cell"})

#: Columns of a corrections CSV (as the review page writes them) and the spellings accepted.
COLUMNS: dict[str, tuple[str, ...]] = {
    "slide": ("slide",), "field": ("field", "field_path", "image"), "box": ("box", "box_xyxy"),
    "predicted_label": ("predicted_label", "predicted", "label"), "probability": ("probability", "prob"),
    "corrected_label": ("corrected_label", "corrected"), "reviewer": ("reviewer",), "time": ("time",),
}
REQUIRED = ("field", "box", "corrected_label")
#: the review page writes the box as four columns
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class Cells:
    """Labelled cells ready to train on: crops cut wider than the model input (``wide_geometry``)
    so augmentation has real pixels; their centre is the inference crop."""

    crops: np.ndarray                # N x S x S x 3 uint8
    fine: list[str | None]           # fine class, or None when only the group/type is known
    group: list[str]                 # 8-group
    files: list[str]                 # the image each came from (for the data fingerprint)
    skipped: dict[str, int] = field(default_factory=dict)
    origin: str = ""

    def __len__(self) -> int:
        return len(self.fine)

    @property
    def strata(self) -> list[str]:
        return [f if f is not None else f"group:{g}" for f, g in zip(self.fine, self.group)]

    def labels(self) -> list[str]:
        return [f or g for f, g in zip(self.fine, self.group)]

    def subset(self, idx: Sequence[int]) -> Cells:
        idx = list(idx)
        return Cells(self.crops[idx], [self.fine[i] for i in idx], [self.group[i] for i in idx],
                     [self.files[i] for i in idx], dict(self.skipped), self.origin)


def wide_geometry(meta: dict[str, Any], config: dict[str, Any]) -> tuple[float, int]:
    """The margin and side of the training crops: the model's crop, ``data.cache_pad`` times wider."""
    size, margin = int(meta["input_size"]), float(meta["crop_margin"])
    wide = round(size * float((config.get("data") or {}).get("cache_pad", 1.25)))
    return margin * wide / size, wide


# ---------------------------------------------------------------- reading cells


def _column_map(path: Path, header: Sequence[str]) -> dict[str, Any]:
    norm = {h.strip().lower().replace(" ", "_"): h for h in header}
    got = {key: next((norm[a] for a in aliases if a in norm), None) for key, aliases in COLUMNS.items()}
    if got["box"] is None and all(c in norm for c in BOX_COLUMNS):
        got["box"] = tuple(norm[c] for c in BOX_COLUMNS)
    missing = [k for k in REQUIRED if got[k] is None]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}",
                        hint="a corrections CSV has slide,field,box,predicted_label,probability,"
                             "corrected_label,reviewer,time")
    return {k: v for k, v in got.items() if v is not None}


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (commas, semicolons or spaces) -> a box in field pixels; ValueError if not."""
    parts = [p for p in text.replace(";", " ").replace(",", " ").split() if p]
    if len(parts) != 4:
        raise ValueError(f"box {text!r}: expected x1,y1,x2,y2")
    x0, y0, x1, y1 = (float(p) for p in parts)
    if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {text!r}: expected x1 < x2 and y1 < y2")
    return x0, y0, x1, y1


def _box_text(row: dict[str, str], column: str | tuple[str, ...]) -> str:
    """The box of a row: one ``box`` column, or the four the review page writes (x0,y0,x1,y1)."""
    if isinstance(column, str):
        return row.get(column) or ""
    return ",".join((row.get(c) or "").strip() for c in column)


def _field_path(value: str, slide: str, csv_path: Path, fields: Path | None) -> Path:
    """A field named in a corrections CSV: an absolute path as is; else the first that exists of
    beside the CSV, under ``fields``, under ``fields/<slide>`` and the working folder."""
    p = Path(value)
    if p.is_absolute():
        return p
    tries = [csv_path.parent / p]
    if fields is not None:
        tries += [fields / p, fields / slide / p]
    tries.append(p)
    return next((t for t in tries if t.is_file()), tries[0])


def read_corrections(paths: Sequence[str | Path], margin: float, size: int,
                     log: Callable[[str], None] | None = None, fields: str | Path | None = None) -> Cells:
    """The cells of corrections CSVs, each cut from its field at its box with the pipeline's crop
    geometry (``cut_crop``). A relative field path is looked for beside the CSV, then under
    ``fields`` (the slide folder, or the folder holding the slide folders). Rows
    whose corrected label is an artefact, a smudge, UNIDENTIFIED or empty are skipped and counted."""
    crops: list[np.ndarray] = []
    fine: list[str | None] = []
    group: list[str] = []
    files: list[str] = []
    skipped: Counter[str] = Counter()
    images: dict[Path, np.ndarray] = {}
    root = None if fields is None else Path(fields)
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: corrections CSV not found")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = _column_map(path, reader.fieldnames or [])
            for line, row in enumerate(reader, start=2):
                where = f"{path}:{line}"
                label = (row.get(cols["corrected_label"]) or "").strip()
                if " ".join(label.lower().replace("_", " ").replace("-", " ").split()) in NOT_A_CELL:
                    skipped["artefact or smudge"] += 1
                    continue
                if not label or label.upper() == UNIDENTIFIED:
                    skipped["no corrected label"] += 1
                    continue
                fine_c, group_c = label_from_name(label)
                if group_c is None:
                    raise DataError(f"{where}: corrected label {label!r} is not a class smear knows",
                                    hint="a fine class (SNE, LY, ...), a type (neutrophil, ...), or artefact/smudge")
                try:
                    box = parse_box(_box_text(row, cols["box"]))
                except ValueError as exc:
                    raise DataError(f"{where}: {exc}") from exc
                field_path = _field_path((row.get(cols["field"]) or "").strip(),
                                         (row.get(cols.get("slide", "")) or "").strip(), path, root)
                if field_path not in images:
                    try:
                        images[field_path] = read_image(field_path)
                    except SmearError as exc:
                        raise DataError(f"{where}: {exc.args[0]}") from exc
                crops.append(cut_crop(images[field_path], box, margin, size))
                fine.append(fine_c)
                group.append(group_c)
                files.append(str(field_path))
    if log is not None and skipped:
        log("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    arr = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return Cells(arr, fine, group, files, dict(skipped), ", ".join(str(p) for p in paths))


def read_dataset(root: str | Path, margin: float, size: int, layout: str = "auto",
                 cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Cells:
    """The cells of a single-cell dataset (class folders, a labels.csv folder, PBC-style names),
    cut as training crops are (``smear.classify.cache``); an unreadable image is an error naming it."""
    from smear.classify.cache import UnreadableImages, cached_crops

    items = load_items(root, layout)
    try:
        crops = cached_crops(items, margin, size, cache_dir, log=log)
    except UnreadableImages as exc:
        path, msg = exc.errors[0]
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        raise DataError(msg if str(path) in msg else f"{path}: {msg}" + more,
                        hint="remove or replace the unreadable image(s)") from exc
    return Cells(crops, [it.fine for it in items], [it.group for it in items], [str(it.path) for it in items],
                 origin=str(root))


def read_cells(data: Sequence[str | Path], margin: float, size: int, layout: str = "auto",
               cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
               fields: str | Path | None = None) -> Cells:
    """Cells from corrections CSVs (files ending in .csv) or from one single-cell dataset folder."""
    data = [Path(d).absolute() for d in data]
    if not data:
        raise DataError("no data given", hint="--data a dataset folder or corrections CSV(s)")
    csvs = [d for d in data if d.suffix.lower() == ".csv"]
    if csvs and len(csvs) != len(data):
        raise DataError("--data: give corrections CSVs or one dataset folder, not both")
    if csvs:
        cells = read_corrections(csvs, margin, size, log, fields)
    elif len(data) > 1:
        raise DataError("--data: one dataset folder at a time (or several corrections CSVs)")
    else:
        cells = read_dataset(data[0], margin, size, layout, cache_dir, log)
    if len(cells) < 2:
        raise DataError(f"{cells.origin}: {len(cells)} usable cell(s); adapting needs at least 2")
    return cells
