"""Per-field result cache keyed by file content and model versions, so a run can resume."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from smear.io import write_text_atomic
from smear.types import CellKind, CellPrediction, Detection, FieldResult, MaskStats


def default_cache_dir() -> Path:
    """~/.cache/smear/fields (or under $XDG_CACHE_HOME)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smear" / "fields"


def field_to_dict(fr: FieldResult) -> dict[str, Any]:
    """A FieldResult as plain JSON-able data (cells point at detections by index)."""
    index = {id(d): i for i, d in enumerate(fr.detections)}
    return {
        "width": fr.width, "height": fr.height,
        "detections": [[list(d.box_xyxy), d.kind.value, d.score] for d in fr.detections],
        "cells": [{"det": index[id(c.detection)], "label": c.label, "prob": c.prob, "probs": c.probs,
                   "mask": [c.mask.cell_area_px, c.mask.nucleus_area_px] if c.mask else None,
                   "novelty": c.novelty}
                  for c in fr.cells],
    }


def field_from_dict(data: dict[str, Any], slide: str, field: str, path: str) -> FieldResult:
    """Inverse of field_to_dict, for the given slide, field name and path."""
    dets = tuple(Detection(tuple(box), CellKind(kind), score) for box, kind, score in data["detections"])
    cells = tuple(CellPrediction(dets[c["det"]], c["label"], c["prob"], c["probs"],
                                 MaskStats(*c["mask"]) if c["mask"] else None, c.get("novelty"))
                  for c in data["cells"])
    return FieldResult(slide, field, data["width"], data["height"], dets, cells, path)


class FieldCache:
    """Stores each field's result under sha256(file bytes) + the stages' version."""

    def __init__(self, folder: str | Path, stages_version: str):
        self.folder = Path(folder) / stages_version
        self.stages_version = stages_version

    def _entry(self, path: Path) -> Path:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, path: Path, slide: str) -> FieldResult | None:
        """The cached result for this file's content, or None."""
        try:
            entry = self._entry(path)
            if not entry.is_file():
                return None
            return field_from_dict(json.loads(entry.read_text()), slide, Path(path).name, str(path))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, path: Path, result: FieldResult) -> None:
        """Store a field's result (atomic write)."""
        try:
            write_text_atomic(self._entry(path), json.dumps(field_to_dict(result)))
        except OSError:
            pass  # a cache that cannot be written only costs speed
