"""A lab's labelled cells for ``smear adapt``: from the review page's corrections CSVs (each cell cut
from its field at its box, as the pipeline cuts it) or from any single-cell dataset that
``smear eval classify --data`` reads. Bad input is one error naming the file (and row)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smear.artifacts import ModelMeta
from smear.classify.data import label_from_name, load_items
from smear.crops import cut_crop
from smear.io import read_image
from smear.errors import DataError, SmearError
from smear.taxonomy import UNIDENTIFIED

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
    groups: list[int] | None = None  # one id per physical cell (duplicates share it); None: each its own
    corrected: list[bool | None] | None = None  # the reviewer changed the model's call (None: unknown)

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
                     [self.files[i] for i in idx], dict(self.skipped), self.origin,
                     None if self.groups is None else [self.groups[i] for i in idx],
                     None if self.corrected is None else [self.corrected[i] for i in idx])

    @property
    def cell_groups(self) -> list[int]:
        """The group id of each cell (``groups``, or one group per cell)."""
        return list(range(len(self))) if self.groups is None else list(self.groups)


def wide_geometry(meta: ModelMeta, config: dict[str, Any]) -> tuple[float, int]:
    """The margin and side of the training crops: the model's crop, ``data.cache_pad`` times wider."""
    size, margin = int(meta.input_size), float(meta.crop_margin)  # type: ignore[arg-type]
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
    """``"x1,y1,x2,y2"`` (commas, semicolons or spaces) -> a box in field pixels; ValueError if it is
    not four numbers, or (finite and) inverted. Non-finite values pass: ``check_box`` skips them."""
    parts = [p for p in text.replace(";", " ").replace(",", " ").split() if p]
    if len(parts) != 4:
        raise ValueError(f"box {text[:80]!r}: expected x1,y1,x2,y2")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"box {text[:80]!r}: expected four numbers x1,y1,x2,y2") from None
    if np.all(np.isfinite([x0, y0, x1, y1])) and (x1 < x0 or y1 < y0):
        raise ValueError(f"box {text[:80]!r}: expected x1 < x2 and y1 < y2")
    return x0, y0, x1, y1


#: the smallest box side, in field pixels, a cell can have (a 640x480 field at 100x: WBCs ~60-120 px)
MIN_BOX_PX = 4.0
#: the share of a box that must lie inside its field (detections on the border are cut by the field)
MIN_INSIDE = 0.5


def check_box(box: tuple[float, float, float, float], height: int, width: int) -> str | None:
    """Why a box cannot be a cell of a ``height`` x ``width`` field (a skip reason), or None if it can:
    non-finite, larger than the field, mostly outside it, or degenerate (a side under MIN_BOX_PX)."""
    if not np.all(np.isfinite(box)):
        return "non-finite box"
    x0, y0, x1, y1 = box
    if x1 - x0 > max(height, width) or y1 - y0 > max(height, width):
        return "box larger than its field"
    cw, ch = min(x1, width) - max(x0, 0.0), min(y1, height) - max(y0, 0.0)
    if x1 - x0 < MIN_BOX_PX or y1 - y0 < MIN_BOX_PX or min(cw, ch) < MIN_BOX_PX:
        return "degenerate box" if cw > 0 and ch > 0 else "box outside its field"
    if cw * ch < MIN_INSIDE * (x1 - x0) * (y1 - y0):
        return "box outside its field"
    return None


def _box_text(row: dict[str, str], column: str | tuple[str, ...]) -> str:
    """The box of a row: one ``box`` column, or the four the review page writes (x0,y0,x1,y1)."""
    if isinstance(column, str):
        return row.get(column) or ""
    return ",".join((row.get(c) or "").strip() for c in column)


def _in_slide(path: Path, slide: str) -> bool:
    """Whether a field file belongs to the slide named ``slide`` as ``find_slides`` names slides: a
    folder slide is its folder's name (or path under the folder given), a one-image slide its stem."""
    parts = Path(slide).parts
    return path.stem == slide or (bool(parts) and path.parent.parts[-len(parts):] == parts)


def _field_path(value: str, slide: str, csv_path: Path, fields: Path | None, where: str) -> Path:
    """A field named in a corrections CSV: an absolute path as is; else the first that exists of
    under ``fields/<slide>``, under ``fields``, beside the CSV and in the working folder, among those
    in a folder of the row's slide (when the row names one: another slide's field is an error)."""
    p = Path(value)
    tries = [p] if p.is_absolute() else (
        ([fields / slide / p] if fields is not None and slide else []) + ([fields / p] if fields is not None else [])
        + [csv_path.parent / p] + ([csv_path.parent / slide / p] if slide else []) + [p])
    found = [t for t in tries if t.is_file()]
    if not found:
        return tries[0]
    if not slide:
        return found[0]
    ours = [t for t in found if _in_slide(t.absolute(), slide)]
    if not ours:
        raise DataError(f"{where}: field {value!r} of slide {slide!r} was found only in {found[0].parent}, "
                        "a folder of another slide",
                        hint="--fields the folder holding the slide folders (or that slide's folder), "
                             "or leave the slide column empty")
    return ours[0]


#: the largest corrections CSV read (bytes); rows are capped by ``adapt.max_rows`` in the config
MAX_CSV_BYTES = 64 << 20


def _csv_text(path: Path, log: Callable[[str], None] | None) -> str:
    """A corrections CSV's text: UTF-8 (with or without a BOM), or cp1252 as Excel saves it on Windows."""
    if not path.is_file():
        raise DataError(f"{path}: corrections CSV not found")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(f"{path}: {path.stat().st_size / 2**20:.0f} MB, larger than a corrections CSV can be "
                        f"({MAX_CSV_BYTES >> 20} MB)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not text in UTF-8 or cp1252 (byte {exc.start})",
                        hint="save the CSV as UTF-8") from None
    if log is not None:
        log(f"{path}: not UTF-8, read as cp1252 (Windows)")
    return text


@dataclass
class _Row:
    where: str
    csv: Path
    slide: str
    field: str
    box: tuple[float, float, float, float]
    fine: str | None
    group: str
    corrected: bool | None


def _corrected(predicted: str, fine: str | None, group: str) -> bool | None:
    """Whether the reviewer changed the model's call (None when the row has no predicted label)."""
    if not predicted or predicted.upper() == UNIDENTIFIED:
        return None if not predicted else True
    p_fine, p_group = label_from_name(predicted)
    if p_group is None:
        return None
    return (p_fine != fine) if (fine is not None and p_fine is not None) else (p_group != group)


def _read_rows(paths: Sequence[Path], skipped: Counter[str], max_rows: int,
               log: Callable[[str], None] | None) -> list[_Row]:
    """Every row of the CSVs with a cell label, checked for columns, labels and box syntax; at most
    ``max_rows`` rows in all (a one-line error beyond)."""
    rows: list[_Row] = []
    n_rows = 0
    for path in paths:
        reader = csv.DictReader(io.StringIO(_csv_text(path, log), newline=""))
        try:
            cols = _column_map(path, reader.fieldnames or [])
            for line, row in enumerate(reader, start=2):
                n_rows += 1
                if n_rows > max_rows:
                    raise DataError(f"{path}: over {max_rows} rows in the corrections CSV(s)",
                                    hint="raise adapt.max_rows (--set adapt.max_rows=N), or split the CSVs")
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
                    raise DataError(f"{where}: corrected label {label[:40]!r} is not a class smear knows",
                                    hint="a fine class (SNE, LY, ...), a type (neutrophil, ...), or artefact/smudge")
                try:
                    box = parse_box(_box_text(row, cols["box"]))
                except ValueError as exc:
                    raise DataError(f"{where}: {exc}") from exc
                predicted = (row.get(cols.get("predicted_label", "")) or "").strip()
                rows.append(_Row(where, path, (row.get(cols.get("slide", "")) or "").strip(),
                                 (row.get(cols["field"]) or "").strip(), box, fine_c, group_c,
                                 _corrected(predicted, fine_c, group_c)))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not a readable CSV row ({exc})",
                            hint="a corrections CSV as the review page writes it") from None
    return rows


def _unique(rows: list[_Row], located: list[Path], skipped: Counter[str]) -> tuple[list[_Row], list[Path]]:
    """The rows with duplicates (same field file and box) kept once, counted; a box given
    conflicting labels is dropped with all its rows, counted too."""
    by_key: dict[tuple, list[int]] = {}
    for i, (r, f) in enumerate(zip(rows, located)):
        by_key.setdefault((str(f.absolute()), tuple(round(v, 2) for v in r.box)), []).append(i)
    keep = []
    for same in by_key.values():
        if len({(rows[i].fine, rows[i].group) for i in same}) > 1:
            skipped["box given conflicting labels"] += len(same)
        else:
            skipped["duplicate row"] += len(same) - 1
            keep.append(same[0])
    for why in ("duplicate row", "box given conflicting labels"):
        if not skipped[why]:
            del skipped[why]
    keep.sort()
    return [rows[i] for i in keep], [located[i] for i in keep]


def read_corrections(paths: Sequence[str | Path], margin: float, size: int,
                     log: Callable[[str], None] | None = None, fields: str | Path | None = None,
                     max_rows: int = 5000) -> Cells:
    """The cells of corrections CSVs, each cut from its field at its box with the pipeline's crop
    geometry (``cut_crop``). A relative field path is looked for under ``fields/<slide>``, under
    ``fields`` (the slide folder, or the folder holding the slide folders) and beside the CSV,
    in a folder of the row's slide. Skipped and counted: rows whose corrected label is an artefact,
    a smudge, UNIDENTIFIED or empty; duplicate rows; boxes that cannot be a cell of their field
    (``check_box``). Bad CSVs and rows are one error naming the file (and line)."""
    skipped: Counter[str] = Counter()
    paths = [Path(p) for p in paths]
    rows = _read_rows(paths, skipped, max_rows, log)
    root = None if fields is None else Path(fields)
    located = [_field_path(r.field, r.slide, r.csv, root, r.where) for r in rows]
    rows, located = _unique(rows, located, skipped)
    crops: list[np.ndarray | None] = [None] * len(rows)
    boxes: list[tuple[float, float, float, float]] = [(0, 0, 0, 0)] * len(rows)
    for field_path in sorted(set(located), key=str):  # one field in memory at a time
        mine = [i for i, f in enumerate(located) if f == field_path]
        try:
            image = read_image(field_path)
        except SmearError as exc:
            raise DataError(f"{rows[mine[0]].where}: {exc.args[0]}") from exc
        for i in mine:
            why = check_box(rows[i].box, *image.shape[:2])
            if why is not None:
                skipped[why] += 1
                continue
            crops[i], boxes[i] = cut_crop(image, rows[i].box, margin, size), rows[i].box
    keep = [i for i, c in enumerate(crops) if c is not None]
    if log is not None and skipped:
        log("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    arr = np.stack([crops[i] for i in keep]) if keep else np.zeros((0, size, size, 3), np.uint8)
    groups = same_cell_groups(arr, [str(located[i]) for i in keep], [boxes[i] for i in keep])
    return Cells(arr, [rows[i].fine for i in keep], [rows[i].group for i in keep], [str(located[i]) for i in keep],
                 dict(skipped), ", ".join(str(p) for p in paths), groups=groups,
                 corrected=[rows[i].corrected for i in keep])


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


#: boxes of one field overlapping this much (IoU) are taken for the same cell
SAME_CELL_IOU = 0.5


def same_cell_groups(crops: np.ndarray, files: Sequence[str],
                     boxes: Sequence[Sequence[float]] | None = None) -> list[int]:
    """A group id per cell: cells with identical crops, or (with ``boxes``) boxes of one field that
    overlap by SAME_CELL_IOU or more, share one, so a held-out split never puts one cell on both sides."""
    import hashlib

    parent = list(range(len(crops)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    first: dict[bytes, int] = {}
    for i, crop in enumerate(crops):
        union(i, first.setdefault(hashlib.sha1(np.ascontiguousarray(crop).tobytes()).digest(), i))
    if boxes is not None:
        by_file: dict[str, list[int]] = {}
        for i, f in enumerate(files):
            by_file.setdefault(f, []).append(i)
        for idx in by_file.values():
            for a, i in enumerate(idx):
                for j in idx[a + 1:]:
                    if _iou(boxes[i], boxes[j]) >= SAME_CELL_IOU:
                        union(i, j)
    roots: dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(len(crops))]


def read_items(items: Sequence[Any], margin: float, size: int, cache_dir: str | Path | None = None,
               log: Callable[[str], None] | None = None, origin: str = "") -> Cells:
    """The cells of dataset items (``smear.classify.data.Item``), cut as training crops are
    (``smear.classify.crop_cache``); an unreadable image is an error naming it."""
    from smear.classify.crop_cache import UnreadableImages, cached_crops

    try:
        crops = cached_crops(items, margin, size, cache_dir, log=log)
    except UnreadableImages as exc:
        path, msg = exc.errors[0]
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        raise DataError(msg if str(path) in msg else f"{path}: {msg}" + more,
                        hint="remove or replace the unreadable image(s)") from exc
    files = [str(it.path) for it in items]
    return Cells(crops, [it.fine for it in items], [it.group for it in items], files, origin=origin,
                 groups=same_cell_groups(crops, files))


def read_dataset(root: str | Path, margin: float, size: int, layout: str = "auto",
                 cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Cells:
    """The cells of a single-cell dataset (class folders, a labels.csv folder, PBC-style names),
    cut as training crops are (``smear.classify.crop_cache``); an unreadable image is an error naming it."""
    return read_items(load_items(root, layout), margin, size, cache_dir, log, origin=str(root))


def read_cells(data: Sequence[str | Path], margin: float, size: int, layout: str = "auto",
               cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
               fields: str | Path | None = None, max_rows: int = 5000) -> Cells:
    """Cells from corrections CSVs (files ending in .csv, at most ``max_rows`` rows in all) or from
    one single-cell dataset folder."""
    data = [Path(d).absolute() for d in data]
    if not data:
        raise DataError("no data given", hint="--data a dataset folder or corrections CSV(s)")
    csvs = [d for d in data if d.suffix.lower() == ".csv"]
    if csvs and len(csvs) != len(data):
        raise DataError("--data: give corrections CSVs or one dataset folder, not both")
    if csvs:
        cells = read_corrections(csvs, margin, size, log, fields, max_rows)
    elif len(data) > 1:
        raise DataError("--data: one dataset folder at a time (or several corrections CSVs)")
    else:
        cells = read_dataset(data[0], margin, size, layout, cache_dir, log)
    if len(cells) < 2:
        raise DataError(f"{cells.origin}: {len(cells)} usable cell(s); adapting needs at least 2")
    return cells
