"""YOLO inference behind the Detector protocol: batched, on the configured device, RGB in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from smear.artifacts import ModelMeta, load_model
from smear.detect.settings import YoloSettings
from smear.taxonomy import CellKind
from smear.types import Detection


def onnx_weights(model: str | Path | ModelMeta, imgsz: int, batch: int) -> Path:
    """The folder's ``model.onnx``, or one exported from its weights into the cache on first use
    (``model``: the folder, or its meta read already)."""
    from smear.detect.network import export_onnx
    from smear.nn.onnx import ONNX_NAME, cached_onnx, check_onnx, onnx_cache_dir

    meta = load_model(model, "detect")  # a meta read already is not read again
    own = meta.folder / ONNX_NAME
    if own.is_file():
        return check_onnx(own)  # one that does not load: torch, with a warning (not a traceback mid-run)
    # the export's input shape is fixed: a new imgsz or batch (meta or --set) needs its own file
    return cached_onnx(onnx_cache_dir() / f"detect-{meta.files}-{imgsz}px-b{batch}.onnx",
                       lambda path: export_onnx(meta.weights_path, path, imgsz, batch, classes=list(meta.classes)))


class YoloDetector:
    """An ultralytics detector; ``names[i]`` is the CellKind value of class id i."""

    def __init__(self, weights: str | Path, settings: YoloSettings | None = None,
                 names: Sequence[str] = ("wbc", "rbc", "platelet"), device: str = "auto"):
        from smear.detect.network import yolo
        from smear.devices import resolve_device, set_threads

        s = YoloSettings.of() if settings is None else settings
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            set_threads()
        self.model = yolo(weights, classes=tuple(names))
        self.half = self.device.type == "cuda"  # fp16 on CUDA (benchmarks/gpu_speed.py sets it to compare fp32)
        self.kinds = [CellKind(n) for n in names]
        self.imgsz, self.conf, self.iou = s.imgsz, s.conf, s.iou
        self.max_det, self.batch = s.max_det, s.batch
        self.per_class_conf = {CellKind(k): float(v) for k, v in s.per_class_conf.items()}
        # Gray border (px at the network's input scale) put round each field before it is resized:
        # ultralytics' own validation letterbox adds half a stride (16 px), and the trained model
        # draws its boxes to fit cells only when that border is there (see the model card).
        self.border = s.border
        # Tiling of large fields: fields over tile_above x field_scale are cut into field_scale tiles.
        self.field_scale, self.tile_above, self.tile_overlap = s.field_scale, s.tile_above, s.tile_overlap

    @classmethod
    def from_dir(cls, model_dir: str | Path | ModelMeta, device: str = "auto", runtime: str = "torch",
                 calibration: Sequence[Path] | None = None, **overrides: Any):
        """Load a detector model folder (weights + meta.json with classes and thresholds; or its meta,
        read already). Any ``runtime`` but torch runs its ONNX export without torch or ultralytics
        (``NetYoloDetector``, same pre/post-processing), converted or quantised as the runtime asks;
        ``calibration``: the training fields the INT8 runtimes are calibrated on (without them they run in fp32)."""
        meta = load_model(model_dir, "detect")
        infer = dict(meta.infer) | overrides
        if overrides.get("conf") is not None and "per_class_conf" not in overrides:
            infer.pop("per_class_conf", None)  # an explicit conf replaces the tuned ones
        settings = YoloSettings.of(infer)
        if runtime != "torch":
            return net_detector(meta, settings, runtime, calibration)
        return cls(meta.weights_path, settings, names=meta.classes, device=device)

    def tiled(self):
        """This detector behind the tiler its meta asks for: fields over ``tile_above`` x the
        training field scale are cut into overlapping tiles of that scale."""
        from smear.detect.tiling import TiledDetector

        return TiledDetector(self, tile=self.field_scale, overlap=self.tile_overlap,
                             tile_above=int(self.field_scale * self.tile_above))

    def _bordered(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """The BGR image with ``border`` network pixels of gray (114) round it, and that border in image px."""
        bgr = np.ascontiguousarray(image[..., ::-1])
        px = round(self.border * max(image.shape[:2]) / self.imgsz)
        if px <= 0:
            return bgr, 0
        return cv2.copyMakeBorder(bgr, px, px, px, px, cv2.BORDER_CONSTANT, value=(114, 114, 114)), px

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per RGB image, boxes in that image's pixels."""
        from smear.devices import torch_threads

        out: list[list[Detection]] = []
        extra = {"half": True} if self.half and self.device.type == "cuda" else {}
        for i in range(0, len(images), self.batch):
            shown = images[i:i + self.batch]
            chunk, borders = zip(*(self._bordered(im) for im in shown))
            with torch_threads():  # ultralytics lowers torch's threads while it predicts
                results = self.model.predict(list(chunk), imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                             max_det=self.max_det, device=str(self.device), verbose=False,
                                             **extra)
            for im, px, res in zip(shown, borders, results):
                out.append(self._detections(res, px, im.shape[1], im.shape[0]))
        return out

    def _detections(self, res: Any, px: int, width: int, height: int) -> list[Detection]:
        """One ultralytics result as Detections in the unbordered image, per-class thresholds applied."""
        boxes = res.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(float) - px
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
        cls = boxes.cls.cpu().numpy().astype(int)
        scores = boxes.conf.cpu().numpy().astype(float)
        dets = []
        for b, c, s in zip(xyxy, cls, scores):
            kind = self.kinds[c]
            if s < self.per_class_conf.get(kind, self.conf) or b[2] - b[0] < 1 or b[3] - b[1] < 1:
                continue  # under its class threshold, or lying in the border only
            dets.append(Detection((float(b[0]), float(b[1]), float(b[2]), float(b[3])), kind, float(s)))
        return dets


#: calibration fields an INT8 detector is built from (spread evenly over the training fields given)
CALIBRATION_FIELDS = 96


def net_detector(meta: ModelMeta, settings: YoloSettings, runtime: str, calibration: Sequence[Path] | None = None):
    """A ``NetYoloDetector`` on the ONNX of the folder whose meta (read already) is ``meta``
    (exported on first use), for ``runtime``."""
    from smear.detect.onnx_yolo import NetYoloDetector, head_nodes
    from smear.nn.runtime import INT8_RUNTIMES, Calibration, manifest_of, open_net, runtime_model

    imgsz, batch = settings.imgsz, settings.batch
    fp32 = onnx_weights(meta, imgsz, batch)
    det = NetYoloDetector(None, meta.classes, settings)
    if runtime in INT8_RUNTIMES and not calibration:
        runtime = runtime.removesuffix("-int8")  # no training fields to calibrate on: fp32 (the caller warns)
    calib = None
    if runtime in INT8_RUNTIMES:
        paths = sorted(Path(p) for p in calibration)  # type: ignore[union-attr]
        picked = [paths[round(i)] for i in np.linspace(0, len(paths) - 1, min(CALIBRATION_FIELDS, len(paths)))]

        def batches() -> list[np.ndarray]:
            from smear.io import read_image

            return [det.inputs([read_image(p) for p in picked[i:i + 8]]) for i in range(0, len(picked), 8)]

        names = tuple(f"{p.parent.parent.name}/{p.parent.name}/{p.name}" for p in picked)
        calib = lambda: Calibration(names, batches)  # noqa: E731
    path = runtime_model(fp32, runtime, f"detect-{meta.files}-{imgsz}px", calib, exclude_onnx=head_nodes,
                         ignored_openvino=OPENVINO_HEAD, tune=lambda model, batches: _tune(meta, fp32, model, runtime,
                                                                                           batches))
    det.net, det.path = open_net(path, runtime), path
    shift = manifest_of(path).get("score_shift") or {}
    det.per_class_conf = {k: max(det.conf, t + float(shift.get(k.value, 0.0))) for k, t in det.per_class_conf.items()}
    return det


def _tune(meta: ModelMeta, fp32: Path, model: Path, runtime: str, batches: list[np.ndarray]) -> dict[str, Any]:
    """The INT8 detector's score shift per class (``score_shift`` on the calibration batches, at the
    model's own thresholds, whatever a run overrides: the cached model is the same for every run):
    INT8 lowers the scores near the thresholds a little, and a run's per-class thresholds follow, so
    that it keeps the boxes fp32 keeps (measured on training fields only)."""
    from smear.detect.onnx_yolo import postprocess, score_shift
    from smear.nn.runtime import open_net

    own = YoloSettings.of(meta.infer)
    per_class = {CellKind(k): float(t) for k, t in own.per_class_conf.items()}
    nets = open_net(fp32, "onnx"), open_net(model, runtime)
    rows = [[r for x in batches for r in postprocess(net.run(x), own.conf, own.iou, own.max_det)] for net in nets]
    shift = score_shift(*rows, {i: per_class.get(CellKind(name), own.conf) for i, name in enumerate(meta.classes)})
    return {"score_shift": {name: round(shift[i], 6) for i, name in enumerate(meta.classes)}}


#: the Detect head's decoding kept fp32 by NNCF (the ignored scope of ultralytics' own INT8 export)
OPENVINO_HEAD = {"patterns": [r".*model\.23/.*/Add", r".*model\.23/.*/Sub.*", r".*model\.23/.*/Mul.*",
                              r".*model\.23/.*/Div.*", r".*model\.23/dfl.*"], "types": ["Sigmoid"]}
