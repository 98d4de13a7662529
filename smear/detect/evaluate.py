"""Detector evaluation: COCO-style AP per class, mAP50 and mAP50-95, P/R at a threshold, per source."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from smear.detect.data import DET_CLASSES, Sample
from smear.io import read_image
from smear.errors import DataError, ImageReadError
from smear.taxonomy import CellKind
from smear.types import Detection, Detector

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4 xyxy) with every box in ``b`` (M x 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _greedy(ious: np.ndarray, order: np.ndarray, thr: float) -> np.ndarray:
    """TP flag per prediction: in ``order``, each takes the free truth of highest IoU >= thr."""
    tp = np.zeros(ious.shape[0], bool)
    taken = np.zeros(ious.shape[1], bool)
    for i in order:
        cand = np.where(~taken & (ious[i] >= thr))[0]
        if len(cand):
            taken[cand[np.argmax(ious[i, cand])]] = True
            tp[i] = True
    return tp


def _match(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, thr: float = 0.5) -> np.ndarray:
    """TP flag per prediction at IoU ``thr`` by greedy one-to-one matching, highest score first."""
    if len(pred) == 0 or len(truth) == 0:
        return np.zeros(len(pred), bool)
    return _greedy(iou_matrix(pred, truth), np.argsort(-scores, kind="stable"), thr)


def coco_ap(preds: Sequence[Sequence[Detection]], truths: Sequence[Sequence[Detection]]) -> dict[CellKind, np.ndarray]:
    """COCO AP of each class at the 10 IoU thresholds 0.5:0.95 (NaN for a class without truth
    boxes), by pycocotools, as detectron2's COCOEvaluator does: 101-point interpolation, every
    prediction counted (no per-image cap), no area ranges."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(d: Detection) -> list[float]:
        x0, y0, x1, y1 = d.box_xyxy
        return [x0, y0, x1 - x0, y1 - y0]

    def records(fields: Sequence[Sequence[Detection]], scored: bool) -> list[dict[str, Any]]:
        rows = [(i, d) for i, dets in enumerate(fields) for d in dets]
        return [{"id": n + 1, "image_id": i + 1, "category_id": DET_CLASSES.index(d.kind) + 1, "bbox": xywh(d),
                 "area": d.width * d.height, "iscrowd": 0, **({"score": d.score} if scored else {})}
                for n, (i, d) in enumerate(rows)]

    cats = [{"id": i + 1, "name": k.value} for i, k in enumerate(DET_CLASSES)]
    images = [{"id": i + 1} for i in range(len(truths))]
    dt = records(preds, scored=True)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": cats, "annotations": records(truths, scored=False)}
        coco_dt.dataset = {"images": images, "categories": cats, "annotations": dt}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = IOU_THRESHOLDS
        ev.params.maxDets = [max(1, len(dt))]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, float("inf")]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class; -1 where a class has no truth
    return {kind: (np.where(precision[:, :, k] > -1, precision[:, :, k], 0).mean(1)
                   if (precision[:, :, k] > -1).any() else np.full(len(IOU_THRESHOLDS), np.nan))
            for k, kind in enumerate(DET_CLASSES)}


def _arrays(dets: Sequence[Detection], kind: CellKind) -> tuple[np.ndarray, np.ndarray]:
    sel = [d for d in dets if d.kind == kind]
    return (np.array([d.box_xyxy for d in sel], float).reshape(-1, 4),
            np.array([d.score for d in sel], float))


def _matched(preds: Sequence[Sequence[Detection]], truths: Sequence[Sequence[Detection]], kind: CellKind
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """Over all fields, for one class: the TP flag (IoU 0.5) and score of every prediction, and the
    number of truth boxes."""
    tps, scores, n_truth = [np.zeros(0, bool)], [np.zeros(0)], 0
    for p, t in zip(preds, truths):
        pb, ps = _arrays(p, kind)
        tb, _ = _arrays(t, kind)
        tps.append(_match(pb, ps, tb))
        scores.append(ps)
        n_truth += len(tb)
    return np.concatenate(tps), np.concatenate(scores), n_truth


def truth_detections(sample: Sample) -> list[Detection]:
    """A sample's ground-truth boxes as Detections."""
    return [Detection(b, k, 1.0) for k, b in sample.boxes]


def score_detections(preds: Sequence[Sequence[Detection]], truths: Sequence[Sequence[Detection]],
                     conf: dict[CellKind, float]) -> dict[str, Any]:
    """mAP50, mAP50-95, AP per class; precision/recall/F1 at IoU 0.5 at the ``conf`` of each class."""
    per_class: dict[str, Any] = {}
    aps50, aps = [], []
    ap_of = coco_ap(preds, truths)
    for kind in DET_CLASSES:
        tp, sc, n_truth = _matched(preds, truths, kind)
        ap = ap_of[kind]
        keep = sc >= conf.get(kind, 0.0)
        n_tp = int(tp[keep].sum())
        n_pred = int(keep.sum())
        prec = n_tp / n_pred if n_pred else float("nan")
        rec = n_tp / n_truth if n_truth else float("nan")
        per_class[kind.value] = {
            "ap50": _f(ap[0]), "ap50_95": _f(np.nanmean(ap)) if n_truth else None,
            "precision": _f(prec), "recall": _f(rec), "n_truth": n_truth, "n_pred": n_pred,
            "conf": conf.get(kind, 0.0),
        }
        if n_truth:
            aps50.append(ap[0])
            aps.append(np.mean(ap))
    return {"map50": _f(np.mean(aps50)) if aps50 else None, "map50_95": _f(np.mean(aps)) if aps else None,
            "per_class": per_class}


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def predict_samples(detector: Detector, samples: Sequence[Sample], batch: int = 8,
                    on_batch: Callable[[int], None] | None = None,
                    skipped: list[str] | None = None) -> list[list[Detection] | None]:
    """Run a detector over samples' images in batches. With a ``skipped`` list, an image that cannot
    be read gets None and its reason is added to the list (without one, the read error is raised)."""
    preds: list[list[Detection] | None] = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        images = []
        for s in chunk:
            try:
                images.append(read_image(s.image))
            except ImageReadError as exc:
                if skipped is None:
                    raise
                skipped.append(str(exc))
                images.append(None)
        got = iter(detector.detect([im for im in images if im is not None]) if any(im is not None for im in images)
                   else [])
        preds += [None if im is None else next(got) for im in images]
        if on_batch:
            on_batch(len(chunk))
    return preds


def evaluate_predictions(samples: Sequence[Sample], preds: Sequence[Sequence[Detection]],
                         conf: dict[CellKind, float]) -> dict[str, Any]:
    """Overall and per-source figures for predictions on samples."""
    truths = [truth_detections(s) for s in samples]
    out = score_detections(preds, truths, conf)
    out["n_images"] = len(samples)
    by_src: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_src[s.source or "unknown"].append(i)
    out["per_source"] = {src: {**score_detections([preds[i] for i in idx], [truths[i] for i in idx], conf),
                               "n_images": len(idx)} for src, idx in sorted(by_src.items())}
    return out


def tune_conf(samples: Sequence[Sample], preds: Sequence[Sequence[Detection]]) -> dict[CellKind, float]:
    """Per-class confidence threshold maximising F1 at IoU 0.5 (fit on validation data only)."""
    truths = [truth_detections(s) for s in samples]
    out = {}
    for kind in DET_CLASSES:
        tp, sc, n_truth = _matched(preds, truths, kind)
        if n_truth == 0 or len(sc) == 0:
            out[kind] = 0.25
            continue
        order = np.argsort(-sc, kind="stable")
        tpc = np.cumsum(tp[order])
        prec = tpc / np.arange(1, len(sc) + 1)
        rec = tpc / n_truth
        f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-9)
        best = int(np.argmax(f1))
        out[kind] = round(float(max(sc[order][best], 0.05)), 3)
    return out


def evaluate_detector(detector: Detector, samples: Sequence[Sample], conf: dict[CellKind, float],
                      batch: int = 8, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Predict on samples and score: overall, per class and per source. Images that cannot be read
    are left out, named in ``skipped`` and counted in ``n_skipped``."""
    skipped: list[str] = []
    preds = predict_samples(detector, samples, batch, on_batch, skipped)
    kept = [(s, p) for s, p in zip(samples, preds) if p is not None]
    if not kept:
        raise DataError(f"none of the {len(samples)} images could be read", hint=skipped[0] if skipped else "")
    out = evaluate_predictions([s for s, _ in kept], [p for _, p in kept], conf)
    return {**out, "n_skipped": len(skipped), "skipped": skipped}


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two xyxy boxes (0.0 when either is empty)."""
    return float(iou_matrix(np.array([a], float), np.array([b], float))[0, 0])


def match_boxes(pred: Sequence[Detection], truth: Sequence[Detection], iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one field at one IoU threshold.

    Greedy one-to-one, highest score first, each prediction taking the free truth box of its own
    kind with the highest IoU (the same matching as the AP figures).
    """
    tp = 0
    for kind in {d.kind for d in pred} | {t.kind for t in truth}:
        pb, ps = _arrays(pred, kind)
        tb, _ = _arrays(truth, kind)
        if len(pb) and len(tb):
            tp += int(_greedy(iou_matrix(pb, tb), np.argsort(-ps, kind="stable"), iou).sum())
    return tp, len(pred) - tp, len(truth) - tp


def wbc_rows(samples: Sequence[Sample], preds: Sequence[Sequence[Detection]], conf: float,
             iou: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per source (and ``all``): WBC precision and recall at IoU ``iou`` for the WBC boxes scoring
    at least ``conf``, and how many of the false WBC boxes sit on a true red cell (IoU >= ``iou``
    with an RBC box): the red cells taken for white cells, counted on their own."""
    by_src: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_src[s.source or "unknown"].append(i)
        by_src["all"].append(i)
    out: dict[str, dict[str, Any]] = {}
    for src, idx in sorted(by_src.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        tp = fp = fn = rbc_fp = 0
        for i in idx:
            pb, ps = _arrays([d for d in preds[i] if d.score >= conf], CellKind.WBC)
            tb, _ = _arrays(truth_detections(samples[i]), CellKind.WBC)
            rb, _ = _arrays(truth_detections(samples[i]), CellKind.RBC)
            hit = (_greedy(iou_matrix(pb, tb), np.argsort(-ps, kind="stable"), iou)
                   if len(pb) and len(tb) else np.zeros(len(pb), bool))
            tp += int(hit.sum())
            fp += int((~hit).sum())
            fn += len(tb) - int(hit.sum())
            if len(rb) and (~hit).any():
                rbc_fp += int((iou_matrix(pb[~hit], rb).max(1) >= iou).sum())
        out[src] = {"n_images": len(idx), "n_wbc": tp + fn, "n_pred": tp + fp,
                    "precision": _f(tp / (tp + fp)) if tp + fp else None,
                    "recall": _f(tp / (tp + fn)) if tp + fn else None, "false_wbc": fp, "rbc_as_wbc": rbc_fp}
    return out
