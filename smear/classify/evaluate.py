"""Classifier metrics at the 11-class, 8-group and 5-type levels; ``evaluate`` a model folder.

The metrics of one level are scikit-learn's (confusion matrix, precision/recall/F1, kappa, ROC AUC);
the expected calibration error, which it lacks, and the NLL are ours (two lines each).

Predictions at a coarser level sum the fine probabilities inside each group (8-group) or type
(5-type). A cell is scored at every level its label allows: a PBC ``SNE`` at all three, a
PBC ``IG_*`` (group only) at the 8-group level, a ``neutrophil`` of a 5-type dataset at the
8-group and 5-type levels. The 5-type level scores only cells whose true type is one of the
5 mature types, with the 5 summed probabilities renormalised to 1 (the question there is
"which of the 5", as those datasets ask it).
"""

from __future__ import annotations

import logging
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from smear.taxonomy import (
    FINE_CLASSES, FINE_TO_GROUP8, FINE_TO_TYPE5, GROUPS8, TYPES5, fine_class, group8_of, type5_of,
)

_log = logging.getLogger(__name__)

ECE_BINS = 15


# ---------------------------------------------------------------- plain metrics


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], k: int) -> np.ndarray:
    """k x k counts, rows = true class, columns = predicted class."""
    return skm.confusion_matrix(np.asarray(y_true, int), np.asarray(y_pred, int), labels=list(range(k)))


def expected_calibration_error(probs: np.ndarray, y_true: Sequence[int], bins: int = ECE_BINS) -> float:
    """ECE: bin by top probability into ``bins`` equal-width bins (lo, hi], average |accuracy -
    confidence| weighted by the bin's share of samples."""
    probs = np.asarray(probs, float)
    if len(probs) == 0:
        return float("nan")
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == np.asarray(y_true)).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def nll(probs: np.ndarray, y_true: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true class (the probabilities as given: sklearn's
    log_loss would renormalise the rows of the pooled levels)."""
    p = np.asarray(probs, float)[np.arange(len(probs)), np.asarray(y_true, int)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean()) if len(p) else float("nan")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of one class against the rest; NaN when only one side is present."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.roc_auc_score(positive, np.asarray(scores, float)))


def level_metrics(probs: np.ndarray, y_true: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, kappa, ECE, NLL, one-vs-rest AUC, per-class table and confusion matrix."""
    probs, y = np.asarray(probs, float), np.asarray(y_true, int)
    k = len(classes)
    if len(y) == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "kappa": None, "ece": None, "nll": None,
                "auc_macro": None, "per_class": {}, "confusion": {"labels": list(classes), "matrix": []}}
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=list(range(k)),
                                                                         zero_division=0)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa of a single class everywhere: NaN, said once here
        kappa = float(skm.cohen_kappa_score(y, pred))
    aucs = [roc_auc(probs[:, c], y == c) for c in range(k)]
    valid = [a for a in aucs if not np.isnan(a)]
    per_class = {
        name: {"precision": round(float(precision[c]), 4), "recall": round(float(recall[c]), 4),
               "f1": round(float(f1[c]), 4), "support": int(support[c]),
               "auc": None if np.isnan(aucs[c]) else round(float(aucs[c]), 4)}
        for c, name in enumerate(classes)
    }
    # macro-F1 over the classes in the truth or the predictions, as sklearn's default labels are
    return {"n": len(y), "accuracy": float(skm.accuracy_score(y, pred)),
            "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
            "kappa": kappa, "ece": expected_calibration_error(probs, y), "nll": nll(probs, y),
            "auc_macro": float(np.mean(valid)) if valid else None, "per_class": per_class,
            "confusion": {"labels": list(classes), "matrix": cm.tolist()}}


# ---------------------------------------------------------------- the three levels


def _pool(probs: np.ndarray, fine_classes: Sequence[str], mapping: dict[str, str | None],
          targets: Sequence[str]) -> np.ndarray:
    """Sum fine probabilities into ``targets`` via ``mapping`` (unmapped classes dropped)."""
    out = np.zeros((len(probs), len(targets)))
    for j, c in enumerate(fine_classes):
        t = mapping.get(c)
        if t is not None:
            out[:, targets.index(t)] += probs[:, j]
    return out


def classification_metrics(probs: np.ndarray, labels: Sequence[str | None],
                           classes: Sequence[str] = FINE_CLASSES) -> dict[str, Any]:
    """Metrics of fine-class probabilities (N x 11, ``classes`` order) against ``labels``: each
    a fine class, 8-group or 5-type name (any alias the taxonomy knows), or None to skip."""
    probs = np.asarray(probs, float)
    classes = list(classes)
    fine = [fine_class(lb) if lb else None for lb in labels]
    group = [group8_of(lb) if lb else None for lb in labels]
    type5 = [type5_of(lb) if lb else None for lb in labels]

    fi = [i for i, f in enumerate(fine) if f is not None and f in classes]
    fine_m = level_metrics(probs[fi], [classes.index(fine[i]) for i in fi], classes)

    p8 = _pool(probs, classes, FINE_TO_GROUP8, list(GROUPS8))
    gi = [i for i, g in enumerate(group) if g is not None]
    g_m = level_metrics(p8[gi], [GROUPS8.index(group[i]) for i in gi], GROUPS8)

    p5 = _pool(probs, classes, FINE_TO_TYPE5, list(TYPES5))
    p5 = p5 / np.clip(p5.sum(1, keepdims=True), 1e-12, None)
    ti = [i for i, t in enumerate(type5) if t is not None]
    t_m = level_metrics(p5[ti], [TYPES5.index(type5[i]) for i in ti], TYPES5)

    out: dict[str, Any] = {"n": len(labels), "n_fine": fine_m["n"]}
    out.update({k: v for k, v in fine_m.items() if k != "n"})
    for prefix, m in (("group8", g_m), ("type5", t_m)):
        out[f"n_{prefix}"] = m["n"]
        for key in ("accuracy", "macro_f1", "kappa", "ece", "auc_macro", "per_class", "confusion"):
            out[f"{prefix}_{key}"] = m[key]
    return out


def summary_line(m: dict[str, Any]) -> str:
    """One line of the headline numbers."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    return (f"n={m['n']} acc={f(m['accuracy'])} macroF1={f(m['macro_f1'])} kappa={f(m['kappa'])} "
            f"ECE={f(m['ece'])} | 8-group acc={f(m['group8_accuracy'])} | 5-type acc={f(m['type5_accuracy'])}")


def plot_confusion(confusion: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Row-normalised confusion matrix as a PNG with counts in the cells (None if empty)."""
    cm = np.asarray(confusion["matrix"], float)
    if cm.size == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = confusion["labels"]
    rows = np.clip(cm.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.5 * len(labels)), dpi=110)
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(metrics: dict[str, Any], out: str | Path, name: str, plots: bool = True) -> None:
    """``<name>_metrics.json`` and (if ``plots``) confusion PNGs at the three levels into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    if not plots:
        return
    plot_confusion(metrics["confusion"], out / f"{name}_confusion.png", f"{name}: 11 classes")
    plot_confusion(metrics["group8_confusion"], out / f"{name}_confusion_group8.png", f"{name}: 8 groups")
    plot_confusion(metrics["type5_confusion"], out / f"{name}_confusion_type5.png", f"{name}: 5 types")


@dataclass(frozen=True)
class EvalData:
    """The labelled cells ``evaluate`` scores: the dataset ``root`` read as ``layout`` (auto | pbc |
    folders | csv), or, with a saved ``split`` JSON of it, that split's ``part`` (train | val | test)."""

    root: str | Path
    layout: str = "auto"
    split: str | Path | None = None
    part: str = "test"


def evaluate(model_dir: str | Path, data: EvalData | str | Path, out: str | Path | None = None,
             device: str = "auto", cache_dir: str | Path | None = None,
             log: Callable[[str], None] | None = _log.info, segmenter: Any = None,
             warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Metrics of a classifier model folder on a dataset (a path: all of it, read as ``auto``), crops
    cut with the model's own geometry; writes JSON and confusion PNGs into ``out`` if given.
    With a ``segmenter`` each crop's background is painted out before classification."""
    from smear.classify.crop_cache import readable_crops
    from smear.classify.data import load_items, load_split
    from smear.classify.model import CnnClassifier

    data = data if isinstance(data, EvalData) else EvalData(data)
    clf = CnnClassifier.from_dir(model_dir, device=device)
    if data.split is not None:
        parts = dict(zip(("train", "val", "test"), load_split(data.split, data.root)))
        items = parts[data.part]
    else:
        items = load_items(data.root, data.layout)
    items, crops_arr, skipped = readable_crops(items, clf.crop_margin, clf.input_size, cache_dir, log=log,
                                               warn=warn)
    crops = list(crops_arr)
    if segmenter is not None:
        from smear.crops import paint_background

        masks = [m for i in range(0, len(crops), 256) for m in segmenter.segment(crops[i:i + 256])]
        crops = [paint_background(c, m) for c, m in zip(crops, masks)]
    probs = clf.classify(crops).probs
    m = classification_metrics(probs, [it.fine or it.group for it in items], clf.classes)
    m["data"] = str(data.root) if data.split is None else f"{data.root} ({data.part} of {data.split})"
    m["n_skipped"] = len(skipped)
    if log is not None:
        log(summary_line(m))
    if out is not None:
        write_report(m, out, Path(str(data.root)).name if data.split is None else data.part)
    return m


# ---------------------------------------------------------------- other labs


def lab_row(probs: np.ndarray, labels: Sequence[str | None], review_threshold: float = 0.5,
            held: np.ndarray | None = None, classes: Sequence[str] = FINE_CLASSES) -> dict[str, Any]:
    """One row of the other-lab table at the 5-type level: n, accuracy, balanced accuracy (mean
    recall over the types present), macro-F1, the majority-type baseline, the share of cells the
    pipeline would leave UNIDENTIFIED (top fine probability under ``review_threshold``, or ``held``
    by the novelty score) and ECE. PBC-style rows also carry the 11-class accuracy."""
    probs = np.asarray(probs, float)
    m = classification_metrics(probs, labels, classes)
    recalls = [p["recall"] for p in m["type5_per_class"].values() if p["support"] > 0]
    supports = [p["support"] for p in m["type5_per_class"].values()]
    unident = probs.max(1) < review_threshold
    if held is not None:
        unident = unident | np.asarray(held, bool)
    # the confusion that reads stain for class: true neutrophils whose top 5-type is eosinophil
    type5 = [type5_of(lb) if lb else None for lb in labels]
    neut = [i for i, t in enumerate(type5) if t == "neutrophil"]
    p5 = _pool(probs, classes, FINE_TO_TYPE5, list(TYPES5))
    neut_as_eo = (float(np.mean(p5[neut].argmax(1) == TYPES5.index("eosinophil"))) if neut else None)
    return {"n": m["n_type5"], "type5_accuracy": m["type5_accuracy"], "neutrophil_as_eo": neut_as_eo,
            "type5_balanced_accuracy": float(np.mean(recalls)) if recalls else None,
            "type5_macro_f1": m["type5_macro_f1"],
            "majority_baseline": (max(supports) / sum(supports)) if sum(supports) else None,
            "unidentified": float(unident.mean()) if len(unident) else None,
            "type5_ece": m["type5_ece"], "n_fine": m["n_fine"], "accuracy": m["accuracy"], "ece": m["ece"]}
