"""The slide guard's statistics: evidence that a whole slide is being misread, fitted per classifier.

Per-cell novelty (``smear.classify.novelty``) holds back a cell unlike every training class. It
cannot see a shift that moves cells, confidently, into a wrong *known* class (another lab's
neutrophils called EO at 0.95 with novelty 0.4-0.8). Over a slide's hundred cells such a shift
leaves traces that one cell does not, and this module measures them against the training data:

- ``features``: the slide's mean feature residual (each cell's pre-logit features, whitened as the
  novelty score whitens them, minus its nearest training class mean), projected on the K
  directions along which acquisition shifts (stain, tint, pallor, blur) move the features of the
  validation cells, in units of the per-cell spread of clean validation cells. Debiased for the
  slide's size: 0 on average for a slide like the training data, whatever its cell count.
- ``novelty_mean``: the mean per-cell novelty ratio (a drift of every cell, below the per-cell
  threshold).
- ``confidence``: one minus the mean calibrated top probability.
- ``colour``: the slide's mean colour and texture statistics of its crops (background and nucleus
  optical density, contrast, sharpness) as a Mahalanobis distance to the nearest training lab.

Each is divided by a threshold fitted on synthetic slides of *validation* cells (clean, and
through random acquisition shifts of several strengths): the 99th percentile of the evidence over
the synthetic slides the classifier still reads at >= 0.90 5-type accuracy. A ratio over 1 fires.
The report adds the evidence that needs no fit (the novel share, an implausible differential;
``smear.report.summary``), and ``domain_score`` is the largest ratio.

Fitted by ``smear.classify.guard_fit`` (``smear train guard``). Stored in the model folder as ``guard.safetensors`` (the projection, the null statistics, each
lab's colour statistics) plus ``meta["guard"]`` (thresholds, what they were fitted on, the fit's own
figures). Per cell the classifier emits one short vector (``cell_vectors``: K projected residuals
then the colour statistics); the pipeline sums them per slide and ``SlideGuard.evidence`` turns the
sums into ratios, so streaming runs need no per-cell memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smear.types import GuardSums

GUARD_FILE = "guard.safetensors"
COLOUR_NAMES = ("background_od_r", "background_od_g", "background_od_b", "nucleus_od_r", "nucleus_od_g",
                "nucleus_od_b", "contrast", "sharpness")
FITTED = ("features", "novelty_mean", "confidence", "colour")
EVIDENCE_NAMES = {
    "features": "the cells' features drift from the training data along the directions a stain or scanner moves them",
    "novelty_mean": "the cells as a whole sit further from the training classes than training-lab cells do",
    "confidence": "the classifier is less sure of this slide's cells than of training-lab cells",
    "colour": "the crops' colour and texture are unlike the training labs'",
}


# ---------------------------------------------------------------- per-cell statistics


def colour_stats(crops: Sequence[np.ndarray]) -> np.ndarray:
    """Colour and texture statistics of each crop (N x 8, ``COLOUR_NAMES``): the background's
    median optical density per channel (the crop's border), the nucleus's (the densest 15% of the
    central disc), the grey-level s.d. and the mean absolute Laplacian in the central disc."""
    import cv2

    out = np.zeros((len(crops), len(COLOUR_NAMES)), np.float32)
    masks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for i, crop in enumerate(crops):
        img = np.asarray(crop)
        h, w = img.shape[:2]
        if (h, w) not in masks:
            yy, xx = np.mgrid[:h, :w]
            b = max(1, min(h, w) // 20)
            ring = (yy < b) | (yy >= h - b) | (xx < b) | (xx >= w - b)
            disc = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (0.35 * min(h, w)) ** 2
            masks[(h, w)] = ring, disc
        ring, disc = masks[(h, w)]
        od = -np.log((img.astype(np.float32) + 1.0) / 256.0)
        out[i, :3] = np.median(od[ring], axis=0)
        centre = od[disc]
        dense = centre.sum(1)
        out[i, 3:6] = centre[dense >= np.quantile(dense, 0.85)].mean(0)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        out[i, 6] = grey[disc].std()
        out[i, 7] = np.abs(cv2.Laplacian(grey, cv2.CV_32F))[disc].mean()
    return out


def residuals(feats: np.ndarray, novelty_stats: dict[str, Any]) -> np.ndarray:
    """Each feature row, whitened as the novelty score does, minus its nearest whitened class mean."""
    z = np.asarray(feats, np.float32) @ np.asarray(novelty_stats["whiten"], np.float32)
    means = np.asarray(novelty_stats["means"], np.float32)
    nearest = ((z[:, None, :] - means[None, :, :]) ** 2).sum(-1).argmin(1)
    return z - means[nearest]


# ---------------------------------------------------------------- the guard


class SlideGuard:
    """A classifier's fitted slide statistics: per-cell vectors in, evidence ratios per slide out."""

    def __init__(self, stats: dict[str, np.ndarray], meta: dict[str, Any]):
        self.projection = np.asarray(stats["projection"], np.float32)  # D x K
        self.null_mean = np.asarray(stats["null_mean"], np.float32)      # K
        self.null_whiten = np.asarray(stats["null_whiten"], np.float32)  # K x K
        self.lab_means = np.asarray(stats["lab_means"], np.float64)      # labs x C
        self.lab_whiten = np.asarray(stats["lab_whiten"], np.float64)    # labs x C x C
        self.meta = meta
        self.thresholds = {k: float(v) for k, v in meta["thresholds"].items()}
        self.k = self.projection.shape[1]
        self.min_cells = int(meta.get("min_cells", 20))

    @classmethod
    def from_dir(cls, model_dir: str | Path, meta: Mapping[str, Any] | None = None) -> SlideGuard | None:
        """The guard of a classifier model folder, or None when it has none."""
        model_dir = Path(model_dir)
        if meta is None:
            from smear.artifacts import META

            meta = json.loads((model_dir / META).read_text(encoding="utf-8"))
        gmeta = meta.get("guard")
        if not gmeta:
            return None
        from safetensors.numpy import load_file

        from smear.errors import ModelError

        path = model_dir / gmeta.get("file", GUARD_FILE)
        if not path.is_file():
            raise ModelError(f"{path}: missing (meta.json names a slide guard)",
                             hint="refit it with smear train guard, or drop 'guard' from meta.json")
        try:
            return cls(load_file(str(path)), gmeta)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, a missing tensor or key
            raise ModelError(f"{path}: not the slide guard's statistics ({type(exc).__name__}: {exc})",
                             hint="refit it with smear train guard, or drop 'guard' from meta.json") from exc

    def cell_vectors(self, feats: np.ndarray, novelty_stats: dict[str, Any], crops: Sequence[np.ndarray]
                     ) -> np.ndarray:
        """Each cell's guard vector: K null-whitened projected residuals, then its colour statistics."""
        u = (residuals(feats, novelty_stats) @ self.projection - self.null_mean) @ self.null_whiten
        return np.concatenate([u, colour_stats(crops)], axis=1).astype(np.float32)

    def evidence(self, sums: GuardSums) -> dict[str, float]:
        """The fitted evidence of one slide, each as a ratio to its threshold (over 1 fires); empty
        when the slide has fewer than ``min_cells`` cells with a guard vector."""
        if sums.n < self.min_cells or sums.vector is None:
            return {}
        raw = raw_evidence(sums, self.k, self.lab_means, self.lab_whiten)
        return {k: round(raw[k] / self.thresholds[k], 4) for k in FITTED if k in raw and self.thresholds.get(k)}


def raw_evidence(sums: GuardSums, k: int, lab_means: np.ndarray, lab_whiten: np.ndarray) -> dict[str, float]:
    """The four fitted statistics of a slide from its sums, before division by their thresholds."""
    mean = sums.vector / sums.n
    u = mean[:k]
    out = {"features": math.sqrt(max(0.0, float(u @ u) - k / sums.n))}
    colour = mean[k:]
    d = [float(np.linalg.norm((colour - m) @ w)) for m, w in zip(lab_means, lab_whiten)]
    out["colour"] = min(d) if d else 0.0
    if sums.n_scored:
        out["novelty_mean"] = sums.novelty / sums.n_scored
    if sums.n_prob:
        out["confidence"] = 1.0 - sums.prob / sums.n_prob
    return out


def save(model_dir: str | Path, stats: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    from smear.io import atomic_path

    path = Path(model_dir) / GUARD_FILE
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in stats.items()}, str(tmp))
    return path


