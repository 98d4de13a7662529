"""Per-field result cache keyed by file content and model versions, so a run can resume.

An entry is believed only when its checksum matches and it passes the FieldResult schema (finite
numbers in range, boxes inside the field, detection indices that exist, known labels); any other
entry is a miss, with a warning, and the field is run again.

A run that makes the review page also stores each result's views (``Stages.keep_views``) beside
its entry, in a ``.views`` file bound to the entry by its checksum, so that a resumed run need not
read and mask the field again to show it. The entries themselves are the same with or without.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

from smear.io import write_text_atomic
from smear.taxonomy import FINE_CLASSES, UNIDENTIFIED, CellKind
from smear.types import CellPrediction, CellView, Detection, FieldResult, FieldView, MaskStats

_log = logging.getLogger(__name__)

ENTRY_FORMAT = 2
VIEWS_FORMAT = 1
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
LABELS = frozenset(FINE_CLASSES) | {UNIDENTIFIED, ""}  # "": a cell only masked, not classified


class BadEntry(ValueError):
    """A cache entry that fails its checksum or the schema."""


def field_to_dict(fr: FieldResult) -> dict[str, Any]:
    """A FieldResult as plain JSON-able data (cells point at detections by index)."""
    index = {id(d): i for i, d in enumerate(fr.detections)}
    return {
        "width": fr.width, "height": fr.height,
        "detections": [[list(d.box_xyxy), d.kind.value, d.score] for d in fr.detections],
        "cells": [{"det": index[id(c.detection)], "label": c.label, "prob": c.prob, "probs": c.probs,
                   "mask": [c.mask.cell_area_px, c.mask.nucleus_area_px] if c.mask else None,
                   "novelty": c.novelty, **({"guard": list(c.guard)} if c.guard is not None else {})}
                  for c in fr.cells],
    }


def _number(value: Any, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadEntry(f"{what} is not a finite number")
    if not low <= value <= high:
        raise BadEntry(f"{what} {value} is outside [{low}, {high}]")
    return float(value)


def _count(value: Any, what: str, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value >= high):
        raise BadEntry(f"{what} {value!r} is not an index or count in range")
    return value


def _detection(item: Any, width: int, height: int, k: int) -> Detection:
    if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], list) or len(item[0]) != 4:
        raise BadEntry(f"detection {k} is malformed")
    box, kind, score = item
    x0, x1 = (_number(v, f"detection {k} x", 0, width) for v in (box[0], box[2]))
    y0, y1 = (_number(v, f"detection {k} y", 0, height) for v in (box[1], box[3]))
    if x1 <= x0 or y1 <= y0:
        raise BadEntry(f"detection {k} has an empty box")
    if kind not in {c.value for c in CellKind}:
        raise BadEntry(f"detection {k} has an unknown kind {kind!r}")
    return Detection((x0, y0, x1, y1), CellKind(kind), _number(score, f"detection {k} score", 0, 1))


def _cell(c: Any, dets: tuple[Detection, ...], used: set[int], k: int) -> CellPrediction:
    if not isinstance(c, dict):
        raise BadEntry(f"cell {k} is malformed")
    det = _count(c.get("det"), f"cell {k} det", len(dets))
    if det in used or dets[det].kind != CellKind.WBC:
        raise BadEntry(f"cell {k} points at detection {det}, not at a WBC of its own")
    used.add(det)
    if c.get("label") not in LABELS:
        raise BadEntry(f"cell {k} has an unknown label {c.get('label')!r}")
    probs = c.get("probs")
    if not isinstance(probs, dict) or not all(isinstance(name, str) for name in probs):
        raise BadEntry(f"cell {k} has malformed probabilities")
    probs = {name: _number(v, f"cell {k} probability of {name}", 0, 1) for name, v in probs.items()}
    prob = _number(c.get("prob"), f"cell {k} prob", 0, 1)
    fine = {name: v for name, v in probs.items() if name in FINE_CLASSES}
    if fine and abs(prob - max(fine.values())) > 1e-6:
        raise BadEntry(f"cell {k}: prob {prob} is not its top probability")
    if fine and c["label"] not in (UNIDENTIFIED, max(FINE_CLASSES, key=lambda n: fine.get(n, 0.0))):
        raise BadEntry(f"cell {k}: label {c['label']} is not its most probable class")
    mask = c.get("mask")
    if mask is not None:
        if not isinstance(mask, list) or len(mask) != 2:
            raise BadEntry(f"cell {k} has a malformed mask")
        mask = MaskStats(_count(mask[0], f"cell {k} cell area"), _count(mask[1], f"cell {k} nucleus area"))
    novelty = c.get("novelty")
    if novelty is not None:
        novelty = _number(novelty, f"cell {k} novelty", 0)
    guard = c.get("guard")
    if guard is not None:
        if not isinstance(guard, list) or len(guard) > 256:
            raise BadEntry(f"cell {k} has a malformed guard vector")
        guard = tuple(_number(v, f"cell {k} guard value") for v in guard)
    return CellPrediction(dets[det], c["label"], prob, probs, mask, novelty, guard)


def field_from_dict(data: dict[str, Any], slide: str, field: str, path: str) -> FieldResult:
    """Inverse of field_to_dict, for the given slide, field name and path; raises BadEntry for data
    that no run could have made."""
    if not isinstance(data, dict):
        raise BadEntry("not an object")
    width = _count(data.get("width"), "width")
    height = _count(data.get("height"), "height")
    if not width or not height or not isinstance(data.get("detections"), list) or not isinstance(data.get("cells"), list):
        raise BadEntry("size, detections or cells missing")
    dets = tuple(_detection(d, width, height, k) for k, d in enumerate(data["detections"]))
    used: set[int] = set()
    cells = tuple(_cell(c, dets, used, k) for k, c in enumerate(data["cells"]))
    return FieldResult(slide, field, width, height, dets, cells, path)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def views_to_dict(fr: FieldResult) -> dict[str, Any]:
    """The views of a result (its field's and its cells') as JSON-able data, the images in base64."""
    v = fr.view
    return {"field": [_b64(v.image_jpeg), v.scale, v.digest],
            "cells": [None if c.view is None else [_b64(c.view.crop_jpeg), _b64(c.view.mask_png)] for c in fr.cells]}


def _blob(value: Any, magic: bytes, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadEntry(f"{what} is malformed")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise BadEntry(f"{what} is not base64") from exc
    if not data.startswith(magic):
        raise BadEntry(f"{what} is not the image it should be")
    return data


def with_views_from_dict(data: Any, fr: FieldResult) -> FieldResult:
    """``fr`` with the views ``views_to_dict`` made of it; raises BadEntry for data no run could have made."""
    if not isinstance(data, dict) or not isinstance(data.get("field"), list) or len(data["field"]) != 3:
        raise BadEntry("field view malformed")
    cells = data.get("cells")
    if not isinstance(cells, list) or len(cells) != len(fr.cells):
        raise BadEntry("cell views malformed")
    jpeg, scale, digest = data["field"]
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BadEntry("field view digest malformed")
    view = FieldView(_blob(jpeg, _JPEG, "field view"), _number(scale, "field view scale", 1e-6, 1), digest)
    shown = []
    for k, c in enumerate(cells):
        if c is not None and (not isinstance(c, list) or len(c) != 2):
            raise BadEntry(f"cell view {k} malformed")
        shown.append(None if c is None else CellView(_blob(c[0], _JPEG, f"cell view {k}"),
                                                     None if c[1] is None else _blob(c[1], _PNG, f"cell mask {k}")))
    return dataclasses.replace(fr, view=view, cells=tuple(dataclasses.replace(c, view=v)
                                                          for c, v in zip(fr.cells, shown)))


def _checksum(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class FieldCache:
    """Stores each field's result under sha256(file bytes) + the stages' version.

    ``warn`` hears of entries that were refused and, once, of a cache that cannot be written
    (default: this module's logger; a Ray worker collects them for the driver to say).
    """

    def __init__(self, folder: str | Path, stages_version: str, warn: Callable[[str], None] | None = None):
        self.folder = Path(folder) / stages_version
        self.stages_version = stages_version
        self.warn = warn or _log.warning
        self._write_warned = False

    def _entry(self, path: Path, key: str | None = None) -> Path:
        digest = hashlib.sha256(key.encode() if key is not None else Path(path).read_bytes()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, path: Path, slide: str, key: str | None = None, field: str | None = None,
            views: bool = False) -> FieldResult | None:
        """The cached result for this file's content, or None (also for an entry that fails its check).
        With ``key`` (a whole slide's tile: the slide's fingerprint and the tile's place) the entry is
        found by the key instead of the file's bytes, and the result is named ``field``. With ``views``
        it has the views stored beside it, where there are any that fit it (else none)."""
        try:
            entry = self._entry(path, key)
            if not entry.is_file():
                return None
            stored = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("format") != ENTRY_FORMAT:
            return None  # written by an earlier version of smear: a plain miss
        try:
            if stored.get("sha256") != _checksum(stored.get("result")):
                raise BadEntry("checksum mismatch")
            result = field_from_dict(stored["result"], slide, field or Path(path).name, str(path))
        except (BadEntry, LookupError, TypeError, AttributeError) as exc:
            self.warn(f"{path}: cached result refused ({exc}); the field is run again")
            return None
        return self._with_views(entry, stored["sha256"], result) if views else result

    def _with_views(self, entry: Path, checksum: str, result: FieldResult) -> FieldResult:
        """``result`` with the views stored beside its entry; as it is when there are none, or none
        that fit it (the field is then read again for them: a cost, not an error)."""
        try:
            stored = json.loads(entry.with_suffix(".views").read_text(encoding="utf-8"))
            if (not isinstance(stored, dict) or stored.get("format") != VIEWS_FORMAT or stored.get("entry") != checksum
                    or stored.get("sha256") != _checksum(stored.get("views"))):
                return result
            return with_views_from_dict(stored.get("views"), result)
        except (OSError, ValueError, LookupError, TypeError, RecursionError, BadEntry):
            return result

    def put(self, path: Path, result: FieldResult, key: str | None = None) -> None:
        """Store a field's result with its checksum (atomic write), under ``key`` when given, and its
        views beside it when it has them."""
        data = field_to_dict(result)
        try:
            entry = self._entry(path, key)
            write_text_atomic(entry, json.dumps({"format": ENTRY_FORMAT, "sha256": _checksum(data), "result": data}))
        except OSError as exc:  # a cache that cannot be written only costs speed, but --resume is off
            self._unwritable(exc)
            return
        if result.view is not None and result.view.image_jpeg is not None:
            self._put_views(entry, _checksum(data), result)

    def put_views(self, path: Path, result: FieldResult, key: str | None = None) -> None:
        """Store the views of a result already stored (its field read again for them) beside its entry."""
        if result.view is None or result.view.image_jpeg is None:
            return
        try:
            entry = self._entry(path, key)
        except OSError:  # the field's file is gone meanwhile: nothing to key the views by (its entry stays)
            return
        self._put_views(entry, _checksum(field_to_dict(result)), result)

    def _put_views(self, entry: Path, checksum: str, result: FieldResult) -> None:
        views = views_to_dict(result)
        try:
            write_text_atomic(entry.with_suffix(".views"), json.dumps({"format": VIEWS_FORMAT, "entry": checksum,
                                                                       "sha256": _checksum(views), "views": views}))
        except OSError as exc:
            self._unwritable(exc)

    def _unwritable(self, exc: OSError) -> None:
        if not self._write_warned:
            self._write_warned = True
            self.warn(f"{self.folder}: cannot write the result cache ({exc.strerror or exc}); "
                      "--resume will not find these fields (cache_dir sets another folder)")
