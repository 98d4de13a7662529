"""Build the stages a pipeline config names; the one place that picks implementations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smear.artifacts import META, file_sha256, model_version, resolve_model_dir
from smear.pipeline.run import Stages
from smear.types import ConfigError, Detector, ModelError, Segmenter

DETECTORS = ("yolo", "classical")
CLASSIFIERS = ("off", "cnn")
SEGMENTERS = ("off", "unet", "kmeans", "grabcut")


def _runtime(cfg: dict[str, Any]) -> str:
    from smear.nn.runtime import check_runtime

    return check_runtime(str(cfg.get("runtime", "torch")))


def _with_fallback(cfg: dict[str, Any], load, warned: set[str] | None = None):
    """``load(runtime)`` with the configured runtime. A runtime that cannot run here (OpenVINO not
    installed, no training data to calibrate INT8 on): one warning and fp32 onnxruntime. ONNX that
    cannot be made or loaded: a warning and torch. A missing or broken model folder is still an error.
    ``warned``: messages already given (one build of the stages says each once)."""
    import warnings

    from smear.nn.runtime import RuntimeUnavailable

    warned = set() if warned is None else warned

    def _warn_once(message: str) -> None:
        if message not in warned:
            warned.add(message)
            warnings.warn(message, stacklevel=4)

    runtime = _runtime(cfg)
    if runtime == "torch":
        return load("torch")
    try:
        return load(runtime)
    except ModelError:
        raise
    except RuntimeUnavailable as exc:
        _warn_once(f"runtime {runtime} unavailable ({exc}); using onnx (fp32)")
        runtime = "onnx"
    except Exception as exc:  # noqa: BLE001 - export/quantisation failures of any kind
        if runtime != "onnx":
            _warn_once(f"runtime {runtime} unavailable ({type(exc).__name__}: {exc}); using onnx (fp32)")
            runtime = "onnx"
        else:
            _warn_once(f"runtime onnx unavailable ({type(exc).__name__}: {exc}); using torch")
            return load("torch")
    try:
        return load(runtime)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        _warn_once(f"runtime onnx unavailable ({type(exc).__name__}: {exc}); using torch")
        return load("torch")


def calibration_root(cfg: dict[str, Any]) -> Path | None:
    """The training data the INT8 runtimes calibrate on (``calibration_data``): a folder laid out as
    ``../shared/data`` (bccd/train, txl-pbc/images/train, pbc/); ``auto``: $SMEAR_DATA, else the
    ``shared/data`` folder beside the source tree; None when there is none."""
    import os

    setting = str(cfg.get("calibration_data") or "auto")
    if setting == "auto":
        env = os.environ.get("SMEAR_DATA")
        import smear

        root = Path(env) if env else Path(smear.__file__).resolve().parents[2] / "shared" / "data"
    else:
        root = Path(setting).expanduser()
    return root if root.is_dir() else None


def detector_calibration(cfg: dict[str, Any]) -> list[Path] | None:
    """Training fields for an INT8 detector: BCCD train and TXL-PBC train (never a test split)."""
    from smear.io import IMAGE_SUFFIXES

    root = calibration_root(cfg)
    if root is None:
        return None
    fields = [p for d in (root / "bccd" / "train" / "images", root / "txl-pbc" / "images" / "train") if d.is_dir()
              for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return fields or None


def classifier_calibration(cfg: dict[str, Any]) -> Path | None:
    """The PBC folder whose training split calibrates an INT8 classifier."""
    root = calibration_root(cfg)
    return root / "pbc" if root is not None and (root / "pbc").is_dir() else None


def _calibrated(cfg: dict[str, Any], runtime: str, find):
    """``find(cfg)`` for an INT8 runtime (RuntimeUnavailable when there is no training data), else None."""
    from smear.nn.runtime import INT8_RUNTIMES, RuntimeUnavailable

    if runtime not in INT8_RUNTIMES:
        return None
    found = find(cfg)
    if found is None:
        raise RuntimeUnavailable("no training data to calibrate on: set calibration_data or $SMEAR_DATA")
    return found


def build_detector(cfg: dict[str, Any], warned: set[str] | None = None) -> Detector:
    """The detector named by ``cfg['detector']``."""
    kind = str(cfg["detector"])
    if kind == "classical":
        from smear.detect.classical import ClassicalDetector

        return ClassicalDetector(**(cfg.get("classical") or {}))
    if kind == "yolo":
        from smear.detect.yolo import YoloDetector

        det = _with_fallback(cfg, lambda rt: YoloDetector.from_dir(
            resolve_model_dir(cfg["detector_model"], "detector"), device=cfg["device"], runtime=rt,
            calibration=_calibrated(cfg, rt, detector_calibration)), warned)
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


def build_segmenter(cfg: dict[str, Any], warned: set[str] | None = None) -> Segmenter | None:
    """The segmenter named by ``cfg['segment']`` (None for off)."""
    kind = str(cfg["segment"])
    if kind == "off":
        return None
    if kind == "unet":
        from smear.segment.model import UnetSegmenter

        # no INT8 segmenter: the INT8 runtimes run it in fp32 on the same engine
        return _with_fallback(cfg, lambda rt: UnetSegmenter.from_dir(
            resolve_model_dir(cfg["segmenter_model"], "segmenter"), device=cfg["device"],
            runtime=rt.removesuffix("-int8")), warned)
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
    each model folder's weights and meta.json (its thresholds, temperature, crop geometry)."""
    from smear import __version__

    parts: dict[str, Any] = {k: cfg.get(k) for k in RESULT_SETTINGS}
    parts["smear"] = __version__
    for key, _name, model_dir in models_in_use(cfg):
        parts[key] = [model_version(model_dir), file_sha256(Path(model_dir) / META)[:12]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audit_info(cfg: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What a report states to be traced: each model folder (stage, folder, weights hash, meta.json
    hash), the settings that change results and the run id (the page adds smear's version and the date)."""
    models = [{"stage": name, "folder": str(model_dir), "name": Path(model_dir).name,
               "version": model_version(model_dir), "meta": file_sha256(Path(model_dir) / META)[:12]}
              for _key, name, model_dir in models_in_use(cfg)]
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
    classifier, warned = None, set()  # a fallback's warning said once for all three stages
    if cfg["classifier"] == "cnn":
        from smear.classify.model import CnnClassifier

        classifier = _with_fallback(cfg, lambda rt: CnnClassifier.from_dir(
            resolve_model_dir(cfg["classifier_model"], "classifier"), device=cfg["device"],
            batch=int(cfg["classify_batch"]), runtime=rt, tta=cfg.get("classify_tta"),
            calibration=_calibrated(cfg, rt, classifier_calibration)), warned)
    return Stages(detector=build_detector(cfg, warned), classifier=classifier, segmenter=build_segmenter(cfg, warned),
                  review_threshold=float(cfg["review_threshold"]), mask_background=bool(cfg["mask_background"]),
                  classify_batch=int(cfg["classify_batch"]), field_batch=int(cfg["field_batch"]), version=stages_version(cfg))


def build_cache(cfg: dict[str, Any], version: str, warn=None):
    """The per-field result cache named by ``cfg['cache_dir']`` ('auto', 'off' or a folder);
    ``warn`` hears of refused entries and of a cache that cannot be written."""
    from smear.artifacts import cache_setting
    from smear.pipeline.cache import FieldCache

    folder = cache_setting(cfg["cache_dir"], "fields")
    return None if folder is None else FieldCache(folder, version, warn=warn)
