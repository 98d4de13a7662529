"""The classical colour detector and the box matching it is measured with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smear.detect.classical import ClassicalDetector
from smear.detect.evaluate import box_iou, match_boxes
from smear.synth import make_field, make_large_field
from smear.errors import ConfigError
from smear.taxonomy import CellKind
from smear.types import Detection, Detector

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BCCD_TEST = DATA / "bccd" / "test"


def _pr(preds, truths, kind):
    tp = fp = fn = 0
    for p, t in zip(preds, truths):
        a, b, c = match_boxes([d for d in p if d.kind == kind], [d for d in t if d.kind == kind])
        tp, fp, fn = tp + a, fp + b, fn + c
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def test_is_a_detector_and_finds_synthetic_cells():
    fields = [make_field(s) for s in range(12)]
    det = ClassicalDetector()
    assert isinstance(det, Detector)
    preds = det.detect([f.image_rgb for f in fields])
    truths = [f.detections for f in fields]
    precision, recall = _pr(preds, truths, CellKind.WBC)
    assert recall >= 0.9 and precision >= 0.9
    assert _pr(preds, truths, CellKind.RBC)[1] >= 0.8
    for p in preds:
        for d in p:
            assert 0.0 <= d.score <= 1.0 and np.isfinite(d.box_xyxy).all()


@pytest.mark.parametrize("kind", ["SNE", "BNE", "LY", "MO", "BA"])
def test_each_white_cell_kind_found(kind):
    fields = [make_field(s, n_wbc=2, wbc_kinds=(kind,)) for s in range(20, 24)]
    preds = ClassicalDetector().detect([f.image_rgb for f in fields])
    assert _pr(preds, [f.detections for f in fields], CellKind.WBC)[1] >= 0.85


def test_large_mosaic():
    f = make_large_field(3, 1600, 1200)
    [pred] = ClassicalDetector().detect([f.image_rgb])
    precision, recall = _pr([pred], [f.detections], CellKind.WBC)
    assert recall >= 0.9 and precision >= 0.9


@pytest.mark.parametrize("image", [
    np.zeros((1, 1, 3), np.uint8), np.zeros((0, 0, 3), np.uint8), np.full((480, 640, 3), 255, np.uint8),
    np.zeros((480, 640, 3), np.uint8), np.full((480, 640, 3), 128, np.uint8), np.zeros((480, 640), np.uint8),
])
def test_odd_images_give_no_cells(image):
    assert ClassicalDetector().detect([image]) == [[]]


def test_empty_batch_and_empty_field():
    det = ClassicalDetector()
    assert det.detect([]) == []
    empty = make_field(9, n_wbc=0, n_rbc=0, n_platelets=0)
    assert det.detect([empty.image_rgb]) == [[]]


def test_parameters_overridable_and_unknown_named():
    det = ClassicalDetector(merge_px=9, min_blue=50)
    assert det.params.merge_px == 9 and det.config()["min_blue"] == 50
    with pytest.raises(ConfigError, match="min_bleu.*merg_px|merg_px.*min_bleu"):
        ClassicalDetector(min_bleu=3, merg_px=4)
    with pytest.raises(ConfigError):
        ClassicalDetector(min_blue=100, max_blue=50)


def _d(box, kind=CellKind.WBC, score=1.0):
    return Detection(tuple(float(v) for v in box), kind, score)


def test_box_iou_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_match_boxes_greedy_one_to_one():
    truth = [_d((0, 0, 10, 10)), _d((100, 100, 120, 120))]
    # two predictions on the first truth: the higher score takes it, the other is a false positive
    pred = [_d((0, 0, 10, 9), score=0.6), _d((0, 0, 10, 10), score=0.9), _d((200, 200, 210, 210), score=0.8)]
    assert match_boxes(pred, truth) == (1, 2, 1)
    assert match_boxes([], truth) == (0, 0, 2)
    assert match_boxes(pred, []) == (0, 3, 0)
    assert match_boxes([], []) == (0, 0, 0)
    # IoU exactly at the threshold matches; just under does not
    assert match_boxes([_d((5, 0, 15, 10))], [_d((0, 0, 10, 10))], iou=50 / 150) == (1, 0, 0)
    assert match_boxes([_d((5, 0, 15, 10))], [_d((0, 0, 10, 10))], iou=0.5) == (0, 1, 1)
    # kinds never match each other
    assert match_boxes([_d((0, 0, 10, 10), CellKind.RBC)], [_d((0, 0, 10, 10))]) == (0, 1, 1)


def test_match_boxes_takes_best_free_truth():
    truth = [_d((0, 0, 10, 10)), _d((2, 0, 12, 10))]
    pred = [_d((2, 0, 12, 10), score=0.9), _d((0, 0, 10, 10), score=0.5)]
    assert match_boxes(pred, truth) == (2, 0, 0)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not BCCD_TEST.is_dir(), reason=f"real data not present: {BCCD_TEST}")
def test_bccd_test_wbc_precision_recall():
    from smear.detect.data import clean_boxes, read_voc
    from smear.io import read_image

    samples, _ = read_voc(BCCD_TEST)
    samples, _ = clean_boxes(samples)
    det = ClassicalDetector()
    preds = [det.detect([read_image(s.image)])[0] for s in samples]
    truths = [[Detection(b, k) for k, b in s.boxes] for s in samples]
    precision, recall = _pr(preds, truths, CellKind.WBC)
    assert len(samples) == 60
    assert precision >= 0.9 and recall >= 0.9  # measured 0.937 / 0.967 (smear eval detect --detector classical)
