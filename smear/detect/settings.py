"""How a YOLO detector runs: its inference settings, from a model's meta over detect.yaml's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def infer_defaults() -> dict[str, Any]:
    """The detector's inference settings where a model's meta names none: the ``infer:`` section of
    the shipped detect.yaml, the one place they are written."""
    from smear.config import default_config

    infer = default_config("detect").infer.model_dump()
    infer.pop("border")  # what a model is trained with (meta's infer.border); one whose meta names none has none
    return infer


@dataclass(frozen=True)
class YoloSettings:
    """The settings both YOLO detectors (torch and ONNX) run with: network input size, score
    threshold, NMS IoU, boxes per field, fields per batch, per-class score thresholds (class name ->
    threshold, over ``conf``; names or CellKinds), the gray border put round each field (px at the network's input
    scale), and the tiling of large fields (over ``tile_above`` x ``field_scale`` px they are cut
    into ``field_scale`` tiles overlapping by ``tile_overlap``)."""

    imgsz: int
    conf: float
    iou: float
    max_det: int
    batch: int
    field_scale: int
    tile_above: float
    tile_overlap: float
    per_class_conf: Mapping[Any, float] = field(default_factory=dict)
    border: float = 0.0

    @classmethod
    def of(cls, infer: Mapping[str, Any] | None = None) -> YoloSettings:
        """The settings of a meta's ``infer`` section (or of chosen values), each one it lacks (or
        gives as None) taken from detect.yaml's ``infer:``; no border and no per-class thresholds
        unless given."""
        d = infer_defaults() | {k: v for k, v in (infer or {}).items() if v is not None}
        return cls(imgsz=int(d["imgsz"]), conf=float(d["conf"]), iou=float(d["iou"]), max_det=int(d["max_det"]),
                   batch=int(d["batch"]), per_class_conf={k: float(v) for k, v in (d.get("per_class_conf") or {}).items()},
                   border=float(d.get("border", 0.0)), field_scale=int(d["field_scale"]),
                   tile_above=float(d["tile_above"]), tile_overlap=float(d["tile_overlap"]))
