"""Box matching for detection figures: IoU and greedy one-to-one matching at one IoU threshold."""

from __future__ import annotations

from collections.abc import Sequence

from smear.types import Detection

Box = tuple[float, float, float, float]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes (0.0 when either is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(pred: Sequence[Detection], truth: Sequence[Detection], iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one field at an IoU threshold.

    Greedy one-to-one: predictions in order of falling score each take the free truth box of the
    same kind with the highest IoU, if that IoU is at least ``iou``.
    """
    free = list(range(len(truth)))
    tp = 0
    for d in sorted(pred, key=lambda d: -d.score):
        best, best_iou = -1, iou
        for j in free:
            if truth[j].kind != d.kind:
                continue
            v = box_iou(d.box_xyxy, truth[j].box_xyxy)
            if v >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            free.remove(best)
            tp += 1
    return tp, len(pred) - tp, len(truth) - tp
