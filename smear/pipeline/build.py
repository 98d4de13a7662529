"""Build the stages a pipeline config names; the one place that picks implementations."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from smear.artifacts import ModelMeta, load_model, resolve_model_dir
from smear.config_models import PipelineConfig
from smear.io import pixel_budget
from smear.pipeline.run import Stages
from smear.errors import ModelError
from smear.types import Detector, Segmenter

_log = logging.getLogger(__name__)


def _runtime(cfg: PipelineConfig) -> str:
    from smear.nn.runtime import check_runtime

    return check_runtime(cfg.runtime)


def _with_fallback(cfg: PipelineConfig, load, warned: set[str] | None = None):
    """``load(runtime)`` with the configured runtime. A runtime that cannot run here (OpenVINO not
    installed, no training data to calibrate INT8 on): one warning and fp32 onnxruntime. ONNX that
    cannot be made or loaded: a warning and torch. A missing or broken model folder is still an error.
    ``warned``: messages already given (one build of the stages says each once)."""
    from smear.nn.runtime import RuntimeUnavailable

    warned = set() if warned is None else warned

    def _warn_once(message: str) -> None:
        if message not in warned:
            warned.add(message)
            _log.warning(message)

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


def calibration_root(setting: str = "auto") -> Path | None:
    """The training data the INT8 runtimes calibrate on (``calibration_data``): a folder laid out as
    ``../shared/data`` (bccd/train, txl-pbc/images/train, pbc/); ``auto``: $SMEAR_DATA, else the
    ``shared/data`` folder beside the source tree; None when there is none."""
    import os

    if setting == "auto":
        env = os.environ.get("SMEAR_DATA")
        import smear

        root = Path(env) if env else Path(smear.__file__).resolve().parents[2] / "shared" / "data"
    else:
        root = Path(setting).expanduser()
    return root if root.is_dir() else None


def detector_calibration(setting: str = "auto") -> list[Path] | None:
    """Training fields for an INT8 detector: BCCD train and TXL-PBC train (never a test split)."""
    from smear.io import IMAGE_SUFFIXES

    root = calibration_root(setting)
    if root is None:
        return None
    fields = [p for d in (root / "bccd" / "train" / "images", root / "txl-pbc" / "images" / "train") if d.is_dir()
              for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return fields or None


def classifier_calibration(setting: str = "auto") -> Path | None:
    """The PBC folder whose training split calibrates an INT8 classifier."""
    root = calibration_root(setting)
    return root / "pbc" if root is not None and (root / "pbc").is_dir() else None


def _calibrated(cfg: PipelineConfig, runtime: str, find):
    """``find(cfg.calibration_data)`` for an INT8 runtime (RuntimeUnavailable when there is no
    training data), else None."""
    from smear.nn.runtime import INT8_RUNTIMES, RuntimeUnavailable

    if runtime not in INT8_RUNTIMES:
        return None
    found = find(cfg.calibration_data)
    if found is None:
        raise RuntimeUnavailable("no training data to calibrate on: set calibration_data or $SMEAR_DATA")
    return found


Metas = dict[str, ModelMeta]  # stage name (detector, classifier, segmenter) -> its model folder's meta


def build_detector(cfg: PipelineConfig, metas: Metas | None = None, warned: set[str] | None = None) -> Detector:
    """The detector named by ``cfg.detector`` (``metas``: the model folders, read already)."""
    if cfg.detector == "classical":
        from smear.detect.classical import ClassicalDetector

        return ClassicalDetector(**cfg.classical)
    from smear.detect.yolo import YoloDetector

    meta = (metas if metas is not None else model_metas(cfg))["detector"]
    det = _with_fallback(cfg, lambda rt: YoloDetector.from_dir(
        meta, device=cfg.device, runtime=rt, calibration=_calibrated(cfg, rt, detector_calibration)), warned)
    return _checked(det.tiled(), cfg)


def _checked(det: Detector, cfg: PipelineConfig) -> Detector:
    """The detector behind the WBC plausibility check (``wbc_check`` in the pipeline config)."""
    if not cfg.wbc_check.enabled:
        return det
    from smear.detect.plausible import CheckedDetector, WbcCheck

    return CheckedDetector(det, WbcCheck(**cfg.wbc_check.model_dump(exclude={"enabled"})))


def build_segmenter(cfg: PipelineConfig, metas: Metas | None = None, warned: set[str] | None = None
                    ) -> Segmenter | None:
    """The segmenter named by ``cfg.segmenter`` (None for off; ``metas``: the model folders, read already)."""
    if cfg.segmenter == "off":
        return None
    if cfg.segmenter == "unet":
        from smear.segment.model import UnetSegmenter

        meta = (metas if metas is not None else model_metas(cfg))["segmenter"]
        # no INT8 segmenter: the INT8 runtimes run it in fp32 on the same engine
        return _with_fallback(cfg, lambda rt: UnetSegmenter.from_dir(
            meta, device=cfg.device, runtime=rt.removesuffix("-int8")), warned)
    from smear.segment.classical import GrabCutSegmenter, KMeansSegmenter

    return KMeansSegmenter() if cfg.segmenter == "kmeans" else GrabCutSegmenter()


#: pipeline settings that change a field's result (with the model folders in use)
RESULT_SETTINGS = ("detector", "classical", "wbc_check", "segmenter", "classifier", "review_threshold",
                   "mask_background", "runtime", "classify_tta", "device")
#: the names the settings have in a report's audit and in the cache key: ``segmenter`` was called
#: ``segment`` before, and keeps that name there, so the caches and audits made before stay valid
_SETTING_NAMES = {"segmenter": "segment"}


def result_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``RESULT_SETTINGS`` of a config as plain data, under their audit names."""
    dumped = cfg.model_dump(include=set(RESULT_SETTINGS))
    return {_SETTING_NAMES.get(k, k): dumped[k] for k in RESULT_SETTINGS}


#: (config key, stage name, the model folder's stage) of each model a pipeline may run
_MODELS = (("detector_model", "detector", "detect"), ("classifier_model", "classifier", "classify"),
           ("segmenter_model", "segmenter", "segment"))


def _names_in_use(cfg: PipelineConfig) -> list[str]:
    """The stage names whose model folders the config runs (detector, classifier, segmenter)."""
    on = {"detector": cfg.detector == "yolo", "classifier": cfg.classifier != "off", "segmenter": cfg.segmenter == "unet"}
    return [name for _key, name, _stage in _MODELS if on[name]]


def models_in_use(cfg: PipelineConfig) -> list[tuple[str, str, Path]]:
    """(config key, stage name, model folder) of each model folder the config runs."""
    names = _names_in_use(cfg)
    return [(key, name, resolve_model_dir(getattr(cfg, key), name)) for key, name, _stage in _MODELS if name in names]


def model_metas(cfg: PipelineConfig) -> Metas:
    """The typed meta of each model folder the config runs, each read and hashed once."""
    stage_of = {name: stage for _key, name, stage in _MODELS}
    return {name: load_model(model_dir, stage_of[name]) for _key, name, model_dir in models_in_use(cfg)}


def _in_use(cfg: PipelineConfig, metas: Metas) -> list[tuple[str, ModelMeta]]:
    """(config key, meta) of each model folder the config runs, from the metas read already (no
    folder is resolved or read again)."""
    names = _names_in_use(cfg)
    return [(key, metas[name]) for key, name, _stage in _MODELS if name in names]


def stages_version(cfg: PipelineConfig, metas: Metas | None = None) -> str:
    """A short id of everything that decides a field's result: stage choices, settings, device, and
    each model folder's files that run (weights, model.onnx, network YAML, novelty statistics, and
    meta.json: its thresholds, temperature, crop geometry)."""
    from smear import __version__

    metas = model_metas(cfg) if metas is None else metas
    parts: dict[str, Any] = result_settings(cfg)
    parts["smear"] = __version__
    for key, meta in _in_use(cfg, metas):
        parts[key] = meta.files  # every file that runs (weights, ONNX, network YAML, statistics)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audit_info(cfg: PipelineConfig, run_id: str, metas: Metas | None = None) -> dict[str, Any]:
    """What a report states to be traced: each model folder (stage, folder, weights hash, meta.json
    hash, model.onnx hash where it has one, and the hash of all its files that run), the settings
    that change results and the run id (the page adds smear's version and the date)."""
    metas = model_metas(cfg) if metas is None else metas
    names = {key: name for key, name, _stage in _MODELS}
    models = [{"stage": names[key], "folder": str(meta.folder), "name": meta.folder.name, "version": meta.version,
               "meta": meta.meta_hash, "onnx": meta.onnx_hash, "files": meta.files} for key, meta in _in_use(cfg, metas)]
    settings = result_settings(cfg)
    settings.update({f"report.{k}": v for k, v in cfg.report.model_dump(exclude={"gallery_per_class"}).items()})
    return {"run_id": run_id, "models": models, "settings": settings}


def build_stages(cfg: PipelineConfig, metas: Metas | None = None, *, views: bool = False) -> Stages:
    """Stages for a resolved pipeline config; each model folder is read once (``metas``: read already).
    With ``views`` their results keep what the review page shows (``Stages.keep_views``)."""
    from smear.devices import resolve_device

    _runtime(cfg)
    if cfg.runtime == "torch" or str(cfg.device) not in ("auto", "cpu"):
        # a device that is not there is said before any stage loads (the other runtimes run on the
        # CPU: auto or cpu needs no check, and no torch import, a second of start-up)
        resolve_device(str(cfg.device))
    # the INT8 runtimes quantise the detector only: an INT8 classifier failed its gates (ECE, the
    # novelty score held every cell) and ran no faster (README, Runtimes); it runs fp32 on the same engine
    metas = model_metas(cfg) if metas is None else metas
    classifier, warned = None, set()  # a fallback's warning said once for all three stages
    if cfg.classifier == "cnn":
        from smear.classify.model import CnnClassifier

        classifier = _with_fallback(cfg, lambda rt: CnnClassifier.from_dir(
            metas["classifier"], device=cfg.device, batch=cfg.classify_batch, runtime=rt.removesuffix("-int8"),
            tta=cfg.classify_tta), warned)
    return Stages(detector=build_detector(cfg, metas, warned), classifier=classifier,
                  segmenter=build_segmenter(cfg, metas, warned),
                  review_threshold=cfg.review_threshold, mask_background=cfg.mask_background,
                  classify_batch=cfg.classify_batch, field_batch=cfg.field_batch,
                  version=stages_version(cfg, metas),
                  pixel_budget=pixel_budget(cfg.io.max_pixels_in_flight, cfg.io.max_pixels), keep_views=views)


def guard_notice(cfg: PipelineConfig, metas: Metas) -> str | None:
    """One line when the classifier's model folder (its meta, read already) lacks what the slide guard
    needs (it then judges a slide by what it has), else None."""
    meta = metas.get("classifier")
    if meta is None or (meta.novelty and meta.get("guard")):
        return None
    folder = cfg.classifier_model
    if not meta.novelty:
        return (f"{folder}: the classifier model folder has no novelty score and no slide guard statistics, so "
                f"the domain guard judges the differential only (novel_share stays empty); fit them with "
                f"`smear train novelty RUN --model DIR` then `smear train guard RUN --model DIR`, or adapt again "
                f"with `smear adapt` (it keeps the source's guard)")
    return (f"{folder}: the classifier model folder has no slide guard statistics, so the domain guard judges the "
            f"novel share and the differential only; fit them with `smear train guard RUN --model DIR`")


def build_cache(cfg: PipelineConfig, version: str, warn=None):
    """The per-field result cache named by ``cfg.cache_dir`` ('auto', 'off' or a folder);
    ``warn`` (default: the cache module's logger) hears of refused entries and of a cache that cannot be written."""
    from smear.artifacts import cache_setting
    from smear.pipeline.cache import FieldCache

    folder = cache_setting(cfg.cache_dir, "fields")
    return None if folder is None else FieldCache(folder, version, warn=warn)
