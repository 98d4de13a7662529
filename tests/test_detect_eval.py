"""Detector metrics on hand-made boxes: AP, mAP, precision/recall, tuned thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from smear.detect.evaluate import coco_ap, iou_matrix, score_detections, tune_conf
from smear.detect.data import Sample
from smear.taxonomy import CellKind
from smear.types import Detection

W, R, P = CellKind.WBC, CellKind.RBC, CellKind.PLATELET


def _d(x, kind=W, s=0.9, size=20):
    return Detection((x, 0.0, x + size, float(size)), kind, s)


def test_iou_matrix_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 5, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 101, 101]], float)
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1] == pytest.approx(50 / 150) and m[0, 2] == 0
    assert m[1, 0] == pytest.approx(0.5) and m[1, 1] == pytest.approx(0.0)


def test_perfect_predictions_score_one():
    truth = [[_d(0), _d(50, R), _d(100, P)], [_d(0, R)]]
    res = score_detections(truth, truth, {W: 0.5, R: 0.5, P: 0.5})
    assert res["map50"] == 1.0 and res["map50_95"] == 1.0
    assert res["per_class"]["wbc"]["precision"] == 1.0 and res["per_class"]["rbc"]["recall"] == 1.0


def test_half_found_and_false_positives():
    truth = [[_d(0), _d(100)]]
    preds = [[_d(0, s=0.9), _d(300, s=0.8)]]  # one hit, one false positive
    res = score_detections(preds, truth, {W: 0.5})
    wbc = res["per_class"]["wbc"]
    assert wbc["precision"] == 0.5 and wbc["recall"] == 0.5
    assert wbc["ap50"] == pytest.approx(51 / 101, abs=1e-3)  # recall 0..0.5 at precision 1
    # a false positive scored below every hit does not lower AP
    low_fp = [[_d(0, s=0.9), _d(100, s=0.8), _d(300, s=0.1)]]
    assert score_detections(low_fp, truth, {W: 0.05})["per_class"]["wbc"]["ap50"] == 1.0


def test_shifted_box_counts_at_50_not_at_95():
    truth = [[_d(0, size=100)]]
    preds = [[Detection((10.0, 0.0, 110.0, 100.0), W, 0.9)]]  # IoU = 90/110 = 0.818
    res = score_detections(preds, truth, {W: 0.5})
    assert res["per_class"]["wbc"]["ap50"] == 1.0
    assert res["per_class"]["wbc"]["ap50_95"] == pytest.approx(0.7, abs=1e-3)  # 0.5..0.8 of 10 thresholds


def test_average_precision_no_truth_is_nan_and_no_preds_zero():
    ap = coco_ap([[]], [[_d(0)]])
    assert np.isnan(ap[R]).all() and (ap[W] == 0).all()
    assert np.isnan(coco_ap([[_d(0)]], [[]])[W]).all()


def test_tune_conf_picks_threshold_between_hits_and_noise():
    samples = [Sample(image=None, width=400, height=50, boxes=[(W, (0, 0, 20, 20)), (W, (50, 0, 70, 20))])]
    preds = [[_d(0, s=0.8), _d(50, s=0.7), _d(200, s=0.3), _d(250, s=0.2)]]
    conf = tune_conf(samples, preds)
    assert conf[W] == pytest.approx(0.7)
