"""Segmentation metrics: Dice and IoU of the whole cell (nucleus + cytoplasm) and of the nucleus.

Each figure is the mean over crops of the per-crop score (a crop where both masks are empty scores
1). The cell score is taken only on crops whose truth tells cytoplasm from background (three-level
masks); the nucleus score on every crop, over the pixels whose nucleus/not-nucleus truth is known.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smear.config_models import SegmentData
from smear.segment.data import IGNORE, NUCLEUS, SegItem, load_parts
from smear.errors import DataError
from smear.types import Segmenter


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1, 1 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    a, b = float(pred.sum()), float(truth.sum())
    if a + b == 0:
        return 1.0, 1.0
    return 2 * inter / (a + b), inter / (a + b - inter)


def crop_scores(pred: np.ndarray, truth: np.ndarray, has_cell: bool) -> dict[str, float]:
    """Per-crop Dice/IoU; cell scores are NaN when the truth has no cell labels."""
    known = truth != IGNORE
    nd, ni = dice_iou((pred == NUCLEUS) & known, (truth == NUCLEUS) & known)
    cd = ci = float("nan")
    if has_cell:
        cd, ci = dice_iou((pred > 0) & known, np.isin(truth, (1, 2)) & known)
    return {"cell_dice": cd, "cell_iou": ci, "nucleus_dice": nd, "nucleus_iou": ni}


def _mean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x == x]
    return float(np.mean(v)) if v else None


def summarize(scores: Sequence[dict[str, float]]) -> dict[str, Any]:
    keys = ("cell_dice", "cell_iou", "nucleus_dice", "nucleus_iou")
    out: dict[str, Any] = {k: _mean([s[k] for s in scores]) for k in keys}
    out["n"] = len(scores)
    out["n_with_cell_labels"] = sum(1 for s in scores if s["cell_dice"] == s["cell_dice"])
    return out


def evaluate_segmenter(segmenter: Segmenter, items: Sequence[SegItem], batch: int = 32,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Scores overall and per source, plus seconds per crop."""
    scores, by_source = [], defaultdict(list)
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        preds = segmenter.segment([it.image for it in part])
        for it, pred in zip(part, preds):
            if pred.shape != it.mask.shape:
                raise ValueError(f"{it.source}/{it.name}: mask {pred.shape} for a crop of {it.mask.shape}")
            s = crop_scores(pred, it.mask, it.has_cell_labels)
            scores.append(s)
            by_source[it.source].append(s)
    secs = time.perf_counter() - t0
    out = summarize(scores)
    out["per_source"] = {src: summarize(v) for src, v in sorted(by_source.items())}
    out["ms_per_crop"] = 1000 * secs / max(1, len(items))
    if log:
        log(summary_line(out))
    return out


def summary_line(m: dict[str, Any]) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    parts = [f"all: cell Dice {f(m['cell_dice'])}, nucleus Dice {f(m['nucleus_dice'])} (n={m['n']})"]
    for src, s in m.get("per_source", {}).items():
        parts.append(f"{src}: cell Dice {f(s['cell_dice'])} IoU {f(s['cell_iou'])}, nucleus Dice "
                     f"{f(s['nucleus_dice'])} IoU {f(s['nucleus_iou'])} (n={s['n']})")
    return "; ".join(parts)


def evaluate_path(segmenter: Segmenter, data: str | Path, data_cfg: SegmentData, part: str = "all",
                  margin: float = 1.3, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score a segmenter on a source folder (or a folder of sources): crops cut ``margin`` x each
    cell's box at native size. ``part``: all, or train / val / test of the split ``data_cfg`` defines
    (seeded fractions; nucleus-only sources: the ``test_fields`` list)."""
    if part not in ("all", "train", "val", "test"):
        raise ValueError(f"part must be all, train, val or test, not {part!r}")
    d = data_cfg.model_copy(update={"root": str(data), "sources": None, "holdout": None,
                                    **({"test_fields": None} if part == "all" else {})})
    skipped: list[str] = []
    parts = load_parts(d, margin, None, log, skipped)
    items = [*parts["train"], *parts["val"], *parts["test"]] if part == "all" else parts[part]
    if not items:
        raise DataError(f"{data}: no crops in part {part!r}")
    return {**evaluate_segmenter(segmenter, items, log=log), "n_skipped": len(skipped), "skipped": skipped}
