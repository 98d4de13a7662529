"""The YOLO detector on onnxruntime or OpenVINO without torch or ultralytics at run time.

The pre- and post-processing are ultralytics' predict path written again in numpy (its
``LetterBox`` with the minimum rectangle for same-shaped dynamic batches, RGB in [0, 1], the
class-offset NMS of ``non_max_suppression``, ``scale_boxes``), so a field gets the boxes it gets
through ``YOLO(model.onnx).predict``; ``tests/test_int8.py`` holds the two side by side. What it
saves is start-up: neither torch nor ultralytics is imported (about 3 s on a 2-core machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from smear.detect.settings import YoloSettings
from smear.taxonomy import CellKind
from smear.types import Detection

STRIDE = 32
PAD = 114
MAX_WH = 7680  # ultralytics' per-class box offset for class-aware NMS
MAX_NMS = 30000


def letterbox(image: np.ndarray, new_shape: tuple[int, int], auto: bool) -> np.ndarray:
    """``image`` resized to fit ``new_shape`` (h, w) keeping its aspect, padded with gray (114)
    centred; ``auto``: padded only up to the next multiple of the stride (ultralytics' LetterBox)."""
    shape = image.shape[:2]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    new_unpad = max(round(shape[1] * r), 1), max(round(shape[0] * r), 1)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, STRIDE), np.mod(dh, STRIDE)
    dw, dh = dw / 2, dh / 2
    if shape[::-1] != new_unpad:
        image = cv2.resize(image, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD, PAD, PAD))


def to_input(images: Sequence[np.ndarray], imgsz: int) -> np.ndarray:
    """RGB uint8 fields -> the network's N x 3 x H x W float32 batch in [0, 1]."""
    auto = len({im.shape for im in images}) == 1
    boxed = [letterbox(im, (imgsz, imgsz), auto) for im in images]
    x = np.stack(boxed).transpose(0, 3, 1, 2).astype(np.float32)
    x *= np.float32(1 / 255)
    return x


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (torchvision.ops.nms: IoU > iou_thres suppresses)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_thres]
    return np.asarray(keep, dtype=np.int64)


def postprocess(pred: np.ndarray, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
    """Raw N x (4 + classes) x anchors output -> per image K x 6 (x0, y0, x1, y1, score, class) in
    network-input pixels (ultralytics' non_max_suppression, one label per box)."""
    out = []
    for p in pred:
        p = p.T  # anchors x (4 + nc)
        cls = p[:, 4:]
        best = cls.max(1)
        p = p[best > conf]
        if not len(p):
            out.append(np.zeros((0, 6), np.float32))
            continue
        xy, wh = p[:, :2], p[:, 2:4] / 2
        box = np.concatenate([xy - wh, xy + wh], 1)
        score = p[:, 4:].max(1)
        j = p[:, 4:].argmax(1).astype(np.float32)
        if len(p) > MAX_NMS:
            top = np.argsort(-score, kind="stable")[:MAX_NMS]
            box, score, j = box[top], score[top], j[top]
        keep = nms(box + j[:, None] * np.float32(MAX_WH), score, iou)[:max_det]
        out.append(np.concatenate([box[keep], score[keep, None], j[keep, None]], 1))
    return out


def scale_boxes(input_hw: tuple[int, int], boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Boxes in network-input pixels -> the original image's pixels, clipped (ultralytics' scale_boxes)."""
    gain = min(input_hw[0] / image_hw[0], input_hw[1] / image_hw[1])
    new_h, new_w = (max(round(x * gain), 1) for x in image_hw)
    gain_y, gain_x = new_h / image_hw[0], new_w / image_hw[1]
    pad_x, pad_y = round((input_hw[1] - new_w) / 2 - 0.1), round((input_hw[0] - new_h) / 2 - 0.1)
    boxes = boxes.copy()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad_x) / gain_x).clip(0, image_hw[1])
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad_y) / gain_y).clip(0, image_hw[0])
    return boxes


class NetYoloDetector:
    """The Detector protocol on a YOLO network run by ``smear.nn.runtime`` (no torch, no ultralytics);
    same settings, border and per-class thresholds as ``YoloDetector``."""

    def __init__(self, net: Any, names: Sequence[str], settings: YoloSettings, path: Path | None = None):
        s = settings
        self.net, self.path = net, path
        self.kinds = [CellKind(n) for n in names]
        self.imgsz, self.conf, self.iou = s.imgsz, s.conf, s.iou
        self.max_det, self.batch = s.max_det, s.batch
        self.per_class_conf = {CellKind(k): float(v) for k, v in s.per_class_conf.items()}
        self.border = s.border
        self.field_scale, self.tile_above, self.tile_overlap = s.field_scale, s.tile_above, s.tile_overlap

    def tiled(self):
        """This detector behind the tiler its meta asks for (as ``YoloDetector.tiled``)."""
        from smear.detect.tiling import TiledDetector

        return TiledDetector(self, tile=self.field_scale, overlap=self.tile_overlap,
                             tile_above=int(self.field_scale * self.tile_above))

    def bordered(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """The RGB image with ``border`` network pixels of gray (114) round it, and that border in image px."""
        px = round(self.border * max(image.shape[:2]) / self.imgsz)
        if px <= 0:
            return np.ascontiguousarray(image), 0
        return cv2.copyMakeBorder(image, px, px, px, px, cv2.BORDER_CONSTANT, value=(PAD, PAD, PAD)), px

    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The network batch for RGB fields (border and letterbox), as ``detect`` makes it."""
        return to_input([self.bordered(im)[0] for im in images], self.imgsz)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per RGB image, boxes in that image's pixels."""
        out: list[list[Detection]] = []
        for i in range(0, len(images), self.batch):
            shown = images[i:i + self.batch]
            bordered, borders = zip(*(self.bordered(im) for im in shown))
            x = to_input(bordered, self.imgsz)
            rows = postprocess(self.net.run(x), self.conf, self.iou, self.max_det)
            for im, big, px, r in zip(shown, bordered, borders, rows):
                boxes = scale_boxes(x.shape[2:], r[:, :4], big.shape[:2])
                out.append(self._detections(boxes, r[:, 4], r[:, 5].astype(int), px, im.shape[1], im.shape[0]))
        return out

    def _detections(self, xyxy: np.ndarray, scores: np.ndarray, cls: np.ndarray, px: int, width: int,
                    height: int) -> list[Detection]:
        xyxy = xyxy.astype(float) - px
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
        dets = []
        for b, c, s in zip(xyxy, cls, scores.astype(float)):
            kind = self.kinds[c]
            if s < self.per_class_conf.get(kind, self.conf) or b[2] - b[0] < 1 or b[3] - b[1] < 1:
                continue  # under its class threshold, or lying in the border only
            dets.append(Detection((float(b[0]), float(b[1]), float(b[2]), float(b[3])), kind, float(s)))
        return dets


#: score shift of an INT8 detector: pairs whose fp32 score lies this near their class threshold, and
#: the fewest pairs a class needs for its shift (fewer: no shift)
SHIFT_NEAR, SHIFT_MIN_PAIRS = 0.1, 20


def score_shift(fp32_rows: Sequence[np.ndarray], int8_rows: Sequence[np.ndarray],
                thresholds: dict[int, float]) -> dict[int, float]:
    """Per class id, the median change of score from fp32 to INT8 of the same box (same class, IoU >
    0.5) among boxes whose fp32 score lies within SHIFT_NEAR of the class's threshold: where INT8 moves
    the scores that decide the counts (0.0 for a class with under SHIFT_MIN_PAIRS such pairs). Rows as
    ``postprocess`` gives them, per image, fp32 and INT8 of the same calibration images."""
    from smear.detect.evaluate import iou_matrix

    diffs: dict[int, list[float]] = {c: [] for c in thresholds}
    for a, b in zip(fp32_rows, int8_rows):
        for c, t in thresholds.items():
            near = a[(a[:, 5] == c) & (np.abs(a[:, 4] - t) <= SHIFT_NEAR)]
            other = b[b[:, 5] == c]
            if not len(near) or not len(other):
                continue
            iou = iou_matrix(near[:, :4], other[:, :4])
            best = iou.argmax(1)
            keep = iou[np.arange(len(near)), best] > 0.5
            diffs[c] += list(other[best[keep], 4] - near[keep, 4])
    return {c: float(np.median(d)) if len(d) >= SHIFT_MIN_PAIRS else 0.0 for c, d in diffs.items()}


def head_nodes(onnx_path: str | Path) -> list[str]:
    """Nodes of the YOLO Detect head after its convolutions (box decoding, DFL, sigmoid, concat): the
    ones INT8 leaves in fp32, as ultralytics' own OpenVINO INT8 export does."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    heads = {n.name.split("/")[1] for n in graph.node if n.name.startswith("/model.") and n.name.count("/") > 1}
    last = max(heads, key=lambda h: int(h.split(".")[1]) if h.split(".")[1].isdigit() else -1)
    return [n.name for n in graph.node
            if n.name.startswith(f"/{last}/") and (n.op_type != "Conv" or "/dfl/" in n.name)]
