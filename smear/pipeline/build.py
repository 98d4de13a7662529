"""Build the stages a pipeline config names; the one place that picks implementations."""

from __future__ import annotations

from typing import Any

from smear.artifacts import resolve_model_dir
from smear.pipeline.run import Stages
from smear.types import ConfigError, Detector

DETECTORS = ("yolo", "classical")
CLASSIFIERS = ("off",)
SEGMENTERS = ("off",)


def build_detector(cfg: dict[str, Any]) -> Detector:
    """The detector named by ``cfg['detector']``."""
    kind = str(cfg["detector"])
    if kind == "classical":
        from smear.detect.classical import ClassicalDetector

        return ClassicalDetector(**(cfg.get("classical") or {}))
    if kind == "yolo":
        from smear.detect.tiling import TiledDetector
        from smear.detect.yolo import YoloDetector

        det = YoloDetector.from_dir(resolve_model_dir(cfg["detector_model"], "detector"), device=cfg["device"])
        return TiledDetector(det, tile=det.field_scale, overlap=det.tile_overlap,
                             tile_above=int(det.field_scale * det.tile_above))
    raise ConfigError(f"unknown detector {kind!r}", hint=f"one of {', '.join(DETECTORS)}")


def build_stages(cfg: dict[str, Any]) -> Stages:
    """Stages for a resolved pipeline config."""
    for key, allowed in (("classifier", CLASSIFIERS), ("segment", SEGMENTERS)):
        if str(cfg[key]) not in allowed:
            raise ConfigError(f"{key}: {cfg[key]!r} is not available in this version",
                              hint=f"one of {', '.join(allowed)}")
    return Stages(detector=build_detector(cfg), review_threshold=float(cfg["review_threshold"]),
                  classify_batch=int(cfg["classify_batch"]))
