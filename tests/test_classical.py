"""The classical colour detector: finds synthetic white cells, survives odd inputs, rejects bad keys."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need_data
from smear.detect.classical import ClassicalDetector
from smear.detect.evaluate import score_detections
from smear.synth import make_field
from smear.types import CellKind, ConfigError, Detector


def test_finds_synthetic_cells():
    fields = [make_field(s) for s in range(12)]
    det = ClassicalDetector()
    assert isinstance(det, Detector)
    preds = det.detect([f.image_rgb for f in fields])
    res = score_detections(preds, [list(f.detections) for f in fields], {k: 0.0 for k in CellKind})
    assert res["per_class"]["wbc"]["recall"] >= 0.9 and res["per_class"]["wbc"]["precision"] >= 0.9
    assert res["per_class"]["rbc"]["recall"] >= 0.8


@pytest.mark.parametrize("image", [np.zeros((1, 1, 3), np.uint8), np.full((480, 640, 3), 255, np.uint8),
                                   np.zeros((480, 640, 3), np.uint8)])
def test_odd_images_give_no_cells(image):
    assert ClassicalDetector().detect([image]) == [[]]
    assert ClassicalDetector().detect([]) == []


def test_unknown_parameter_named():
    with pytest.raises(ConfigError, match="min_bleu"):
        ClassicalDetector(min_bleu=3)
    assert ClassicalDetector(merge_px=9).params.merge_px == 9


@pytest.mark.realdata
def test_bccd_test_wbc_figures():
    from smear.detect.data import load_dataset
    from smear.detect.evaluate import evaluate_detector

    samples, _ = load_dataset(need_data("bccd", "test"))
    res = evaluate_detector(ClassicalDetector(), samples, {k: 0.0 for k in CellKind})
    wbc = res["per_class"]["wbc"]
    assert wbc["precision"] >= 0.9 and wbc["recall"] >= 0.9  # README: 0.937 / 0.967
