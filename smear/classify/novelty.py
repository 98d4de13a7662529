"""Per-cell novelty: how far a crop's features lie from every class the classifier was trained on.

A calibrated top probability says how sure the model is *between its classes*; it says nothing
about a cell of no class it knows (a blast, a smudge cell, an artefact, a red cell the detector
let through), which other labs' slides showed being called PMY or ERB at 0.9+. The score here is
the Mahalanobis distance of the network's pre-logit features to the nearest training class mean,
under one covariance shared by the classes (Lee et al., NeurIPS 2018), fitted on training crops
only. Its threshold is a quantile of the in-distribution validation scores, so about
``1 - quantile`` of familiar cells are held back; a cell above it goes to UNIDENTIFIED.

Stored in the model folder as ``novelty.safetensors``: ``whiten`` (D x D, the Cholesky factor of
the shared precision) and ``means`` (classes x D, already whitened), plus ``meta["novelty"]``
with the threshold, the quantile and what it was fitted on. Scores are reported as a ratio to the
threshold: over 1 is novel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NOVELTY_FILE = "novelty.safetensors"


def _with_features_class():
    import torch

    class WithFeatures(torch.nn.Module):
        """A timm classifier that returns ``[logits | pre-logit features]`` in one tensor (one pass,
        so the ONNX runtime gets both too)."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
            return torch.cat([self.net.get_classifier()(feats), feats], dim=1)

    WithFeatures.__module__ = __name__
    return WithFeatures


def __getattr__(name: str):
    # WithFeatures is a torch module: defined on first use, so scoring novelty (numpy) imports no torch
    if name == "WithFeatures":
        cls = _with_features_class()
        globals()["WithFeatures"] = cls
        return cls
    raise AttributeError(name)


def fit(features: np.ndarray, labels: np.ndarray, shrinkage: float | None = None) -> dict[str, np.ndarray]:
    """Class means and the whitening of the shared (within-class) covariance, shrunk towards its
    mean variance so that it stays invertible with few cells per dimension: by ``shrinkage``, or
    by default D / (D + N) (0.05 for 1,024 features from 19,000 cells; near 1, i.e. a scaled
    Euclidean distance, when there are fewer cells than features)."""
    f = np.asarray(features, np.float64)
    if shrinkage is None:
        shrinkage = max(0.01, f.shape[1] / (f.shape[1] + len(f)))
    y = np.asarray(labels, int)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(1, len(f) - len(classes))
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    whiten = np.linalg.cholesky(np.linalg.inv(cov))  # P = L L^T, so |x L|^2 = x P x^T
    return {"whiten": whiten.astype(np.float32), "means": (means @ whiten).astype(np.float32),
            "classes": classes.astype(np.int64)}


def distances(features: Any, stats: dict[str, Any]) -> np.ndarray:
    """Mahalanobis distance of each feature row to its nearest class mean."""
    z = np.asarray(features, np.float32) @ np.asarray(stats["whiten"], np.float32)
    means = np.asarray(stats["means"], np.float32)
    d2 = ((z[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d2.min(1)).astype(np.float64)


def save(model_dir: str | Path, stats: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    from smear.io import atomic_path

    path = Path(model_dir) / NOVELTY_FILE
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in stats.items()}, str(tmp))
    return path


def load(model_dir: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from smear.errors import ModelError

    path = Path(model_dir) / NOVELTY_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing (meta.json names a novelty score)",
                         hint="refit it with smear train novelty, or drop 'novelty' from meta.json")
    # float16 on disk (the shipped folders are halved to fit the package) is float32 in memory once,
    # not at every batch: the 1280 x 1280 whitening matrix is most of a batch's novelty time
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in load_file(str(path)).items()}
