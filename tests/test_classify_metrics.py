"""Classifier metrics on hand-made predictions, the three label levels, calibration, the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smear.classify.calibrate import calibration_report, fit_temperature
from smear.classify.data import Item
from smear.classify.evaluate import (
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    level_metrics,
    plot_confusion,
    roc_auc,
    summary_line,
)
from smear.classify.train import GROUP_MASK, class_weights, mixed_loss
from smear.taxonomy import FINE_CLASSES, GROUPS8


def _one_hot(pred, k):
    return np.eye(k)[pred]


def test_confusion_f1_kappa_by_hand():
    y, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    cm = confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    m = level_metrics(_one_hot(pred, 3), y, ["a", "b", "c"])
    np.testing.assert_allclose([m["per_class"][c]["precision"] for c in "abc"], [1, 0.5, 0.5])
    np.testing.assert_allclose([m["per_class"][c]["recall"] for c in "abc"], [0.6667, 0.5, 1])
    np.testing.assert_allclose([m["per_class"][c]["f1"] for c in "abc"], [0.8, 0.5, 0.6667])
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # p_o = 4/6, p_e = (3*2 + 2*2 + 1*2) / 36 = 1/3 -> kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert m["kappa"] == pytest.approx(0.5)
    assert level_metrics(_one_hot([0, 1, 2], 3), [0, 1, 2], ["a", "b", "c"])["kappa"] == pytest.approx(1.0)


def test_macro_f1_ignores_classes_never_seen():
    assert level_metrics(_one_hot([0, 1], 5), [0, 1], list("abcde"))["macro_f1"] == 1.0


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = [0, 1, 0, 1]
    # bin (0.8667, 0.9333]: acc 0.5, conf 0.9 -> 0.4 x 1/2; bin (0.5333, 0.6]: acc 1, conf 0.6 -> 0.4 x 1/2
    assert expected_calibration_error(probs, y, bins=15) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), [0]) == pytest.approx(0.0)


def test_auc_by_hand():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(np.array([0.5, 0.2]), np.array([1, 1])))


def _probs(**named: float) -> np.ndarray:
    row = np.zeros(len(FINE_CLASSES))
    for name, p in named.items():
        row[FINE_CLASSES.index(name)] = p
    return row


def test_levels_score_what_each_label_allows():
    probs = np.stack([
        _probs(BNE=0.6, SNE=0.4),   # SNE: fine wrong, group right, type right
        _probs(MY=1.0),             # IG (group only): group right
        _probs(EO=0.7, SNE=0.3),    # neutrophil (5-type style): group wrong, type wrong
        _probs(LY=0.6, ERB=0.4),    # LY: right everywhere; ERB has no 5-type
        _probs(MO=1.0),             # unlabelled: skipped
    ])
    m = classification_metrics(probs, ["SNE", "IG", "neutrophil", "Lymphocyte", None])
    assert (m["n"], m["n_fine"], m["n_group8"], m["n_type5"]) == (5, 2, 4, 3)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["group8_accuracy"] == pytest.approx(0.75)
    assert m["type5_accuracy"] == pytest.approx(2 / 3)
    assert set(m) >= {"accuracy", "macro_f1", "kappa", "ece", "per_class", "group8_accuracy",
                      "type5_accuracy", "n", "confusion", "auc_macro"}
    assert m["per_class"]["LY"]["recall"] == 1.0 and m["per_class"]["SNE"]["support"] == 1
    assert m["group8_confusion"]["labels"] == list(GROUPS8)
    assert "8-group acc=0.750" in summary_line(m)


def test_type5_only_dataset_has_no_fine_scores(tmp_path):
    probs = np.stack([_probs(SNE=0.9, PMY=0.1), _probs(LY=1.0)])
    m = classification_metrics(probs, ["neutrophil", "neutrophil"])
    assert m["n_fine"] == 0 and m["accuracy"] is None
    assert m["type5_accuracy"] == 0.5 and m["group8_accuracy"] == 0.5
    assert plot_confusion(m["confusion"], tmp_path / "empty.png") is None
    assert plot_confusion(m["type5_confusion"], tmp_path / "cm.png").is_file()


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))   # about 70 % right ...
    logits = torch.tensor(np.eye(k)[pred] * 8.0 + rng.normal(0, 0.5, (n, k)))  # ... yet ~99 % sure
    t = fit_temperature(logits, torch.tensor(y))
    assert t > 2.0
    rep = calibration_report(logits, torch.tensor(y), t)
    assert rep["nll_after"] < rep["nll_before"] and rep["ece_after"] < rep["ece_before"]
    # the fitted T is at the NLL minimum
    def nll(tt):
        return F.cross_entropy(logits / tt, torch.tensor(y)).item()
    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1)) + 1e-9


def test_mixed_loss_fine_and_group_terms():
    torch.manual_seed(0)
    logits = torch.randn(4, len(FINE_CLASSES))
    fine = torch.tensor([0, 7, -1, -1])                        # SNE, LY, group-only x 2
    group = torch.tensor([GROUPS8.index("neutrophil"), GROUPS8.index("lymphocyte"),
                          GROUPS8.index("neutrophil"), GROUPS8.index("ig")])
    ones = torch.ones(len(FINE_CLASSES))
    got = mixed_loss(logits[:2], fine[:2], group[:2], ones)
    torch.testing.assert_close(got, F.cross_entropy(logits[:2], fine[:2]))
    got = mixed_loss(logits[:2], fine[:2], group[:2], ones, smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(logits[:2], fine[:2], label_smoothing=0.1))
    p = torch.softmax(logits, 1)
    want = -(torch.log(p[2, :2].sum()) + torch.log(p[3, 2:5].sum())) / 2   # SNE+BNE; MMY+MY+PMY
    torch.testing.assert_close(mixed_loss(logits[2:], fine[2:], group[2:], ones), want)
    assert GROUP_MASK.sum().item() == len(FINE_CLASSES)


def test_class_weights_favour_rare_classes():
    from pathlib import Path
    items = [Item(Path(f"{i}"), "LY", "lymphocyte") for i in range(90)]
    items += [Item(Path(f"b{i}"), "BA", "basophil") for i in range(10)]
    w = class_weights(items, 0.5)
    ly, ba = w[FINE_CLASSES.index("LY")].item(), w[FINE_CLASSES.index("BA")].item()
    assert ba / ly == pytest.approx(3.0)
    assert (90 * ly + 10 * ba) / 100 == pytest.approx(1.0)   # mean weight per image stays 1
    assert torch.allclose(class_weights(items, 0.0)[[7, 6]], torch.ones(2))
