"""Build the stages a pipeline config names; the one place that picks implementations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smear.io import pixel_budget
from smear.artifacts import META, ONNX_FILE, file_sha256, files_version, model_version, resolve_model_dir
from smear.pipeline.run import Stages
from smear.types import ConfigError, Detector, ModelError, Segmenter

DETECTORS = ("yolo", "classical")
CLASSIFIERS = ("off", "cnn")
SEGMENTERS = ("off", "unet", "kmeans", "grabcut")


def _runtime(cfg: dict[str, Any]) -> str:
    from smear.nn.onnx import check_runtime

    return check_runtime(str(cfg.get("runtime", "torch")))


def _with_fallback(cfg: dict[str, Any], load):
    """``load(runtime)`` with the configured runtime; if ONNX cannot be made or loaded, a warning and
    the torch runtime (a missing or broken model folder is still an error)."""
    runtime = _runtime(cfg)
    if runtime == "torch":
        return load("torch")
    try:
        return load(runtime)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - export/onnxruntime failures of any kind
        import warnings

        warnings.warn(f"runtime onnx unavailable ({type(exc).__name__}: {exc}); using torch", stacklevel=2)
        return load("torch")


def build_detector(cfg: dict[str, Any]) -> Detector:
    """The detector named by ``cfg['detector']``."""
    kind = str(cfg["detector"])
    if kind == "classical":
        from smear.detect.classical import ClassicalDetector

        return ClassicalDetector(**(cfg.get("classical") or {}))
    if kind == "yolo":
        from smear.detect.yolo import YoloDetector

        det = _with_fallback(cfg, lambda rt: YoloDetector.from_dir(
            resolve_model_dir(cfg["detector_model"], "detector"), device=cfg["device"], runtime=rt))
        return _checked(det.tiled(), cfg)
    raise ConfigError(f"unknown detector {kind!r}", hint=f"one of {', '.join(DETECTORS)}")


def _checked(det: Detector, cfg: dict[str, Any]) -> Detector:
    """The detector behind the WBC plausibility check (``wbc_check`` in the pipeline config)."""
    check = dict(cfg.get("wbc_check") or {})
    if not check.pop("enabled", False):
        return det
    from smear.detect.plausible import CheckedDetector, WbcCheck

    try:
        return CheckedDetector(det, WbcCheck(**check))
    except TypeError as exc:
        raise ConfigError(f"wbc_check: {exc}", hint="keys: enabled, max_rbc_area_ratio, min_nucleus_fraction, "
                          "nucleus_level, min_stain, min_rbcs") from exc


def build_segmenter(cfg: dict[str, Any]) -> Segmenter | None:
    """The segmenter named by ``cfg['segment']`` (None for off)."""
    kind = str(cfg["segment"])
    if kind == "off":
        return None
    if kind == "unet":
        from smear.segment.model import UnetSegmenter

        return _with_fallback(cfg, lambda rt: UnetSegmenter.from_dir(
            resolve_model_dir(cfg["segmenter_model"], "segmenter"), device=cfg["device"], runtime=rt))
    if kind in ("kmeans", "grabcut"):
        from smear.segment.classical import GrabCutSegmenter, KMeansSegmenter

        return KMeansSegmenter() if kind == "kmeans" else GrabCutSegmenter()
    raise ConfigError(f"unknown segmenter {kind!r}", hint=f"one of {', '.join(SEGMENTERS)}")


#: pipeline settings that change a field's result (with the model folders in use)
RESULT_SETTINGS = ("detector", "classical", "wbc_check", "segment", "classifier", "review_threshold",
                   "mask_background", "runtime", "classify_tta", "device")


def models_in_use(cfg: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(config key, stage name, model folder) of each model folder the config runs."""
    out = []
    for key, name, on in (("detector_model", "detector", cfg["detector"] == "yolo"),
                          ("classifier_model", "classifier", cfg["classifier"] != "off"),
                          ("segmenter_model", "segmenter", cfg["segment"] == "unet")):
        if on:
            out.append((key, name, resolve_model_dir(cfg[key], name)))
    return out


def stages_version(cfg: dict[str, Any]) -> str:
    """A short id of everything that decides a field's result: stage choices, settings, device, and
    each model folder's files that run (weights, model.onnx, network YAML, novelty statistics, and
    meta.json: its thresholds, temperature, crop geometry)."""
    from smear import __version__

    parts: dict[str, Any] = {k: cfg.get(k) for k in RESULT_SETTINGS}
    parts["smear"] = __version__
    for key, _name, model_dir in models_in_use(cfg):
        parts[key] = files_version(model_dir)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audit_info(cfg: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What a report states to be traced: each model folder (stage, folder, weights hash, meta.json
    hash, model.onnx hash where it has one, and the hash of all its files that run), the settings
    that change results and the run id (the page adds smear's version and the date)."""
    models = []
    for _key, name, model_dir in models_in_use(cfg):
        onnx = Path(model_dir) / ONNX_FILE
        models.append({"stage": name, "folder": str(model_dir), "name": Path(model_dir).name,
                       "version": model_version(model_dir), "meta": file_sha256(Path(model_dir) / META)[:12],
                       "onnx": file_sha256(onnx)[:12] if onnx.is_file() else "",
                       "files": files_version(model_dir)})
    settings = {k: cfg.get(k) for k in RESULT_SETTINGS}
    report = cfg.get("report") or {}
    settings.update({f"report.{k}": v for k, v in report.items() if k != "gallery_per_class"})
    return {"run_id": run_id, "models": models, "settings": settings}


def build_stages(cfg: dict[str, Any]) -> Stages:
    """Stages for a resolved pipeline config."""
    _runtime(cfg)
    for key, allowed in (("classifier", CLASSIFIERS), ("segment", SEGMENTERS)):
        if str(cfg[key]) not in allowed:
            raise ConfigError(f"{key}: {cfg[key]!r} is not available in this version",
                              hint=f"one of {', '.join(allowed)}")
    classifier = None
    if cfg["classifier"] == "cnn":
        from smear.classify.model import CnnClassifier

        classifier = _with_fallback(cfg, lambda rt: CnnClassifier.from_dir(
            resolve_model_dir(cfg["classifier_model"], "classifier"), device=cfg["device"],
            batch=int(cfg["classify_batch"]), runtime=rt, tta=cfg.get("classify_tta")))
    return Stages(detector=build_detector(cfg), classifier=classifier, segmenter=build_segmenter(cfg),
                  review_threshold=float(cfg["review_threshold"]), mask_background=bool(cfg["mask_background"]),
                  classify_batch=int(cfg["classify_batch"]), field_batch=int(cfg["field_batch"]), version=stages_version(cfg),
                  pixel_budget=pixel_budget(cfg["io"].get("max_pixels_in_flight", "auto"), cfg["io"]["max_pixels"]))


def build_cache(cfg: dict[str, Any], version: str, warn=None):
    """The per-field result cache named by ``cfg['cache_dir']`` ('auto', 'off' or a folder);
    ``warn`` hears of refused entries and of a cache that cannot be written."""
    from smear.artifacts import cache_setting
    from smear.pipeline.cache import FieldCache

    folder = cache_setting(cfg["cache_dir"], "fields")
    return None if folder is None else FieldCache(folder, version, warn=warn)
