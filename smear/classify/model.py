"""The classifier network (a timm CNN trained from scratch) and ``CnnClassifier``, the pipeline stage."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smear.artifacts import ModelMeta, load_model
from smear.nn.onnx import load_network
from smear.nn.tensors import crops_to_tensor, dihedral, place
from smear.nn.weights import load_weights
from smear.types import FINE_CLASSES, ClassScores, ModelError

WEIGHTS = "model.safetensors"


NORMS = ("batch", "group")
GROUPS = 8  # GroupNorm groups (gcd with the channel count, so every layer divides)


def to_group_norm(module: torch.nn.Module, groups: int = GROUPS) -> torch.nn.Module:
    """Replace every BatchNorm (timm's BatchNormAct2d keeps its activation) by GroupNorm, in place.

    BatchNorm's running statistics are the training lab's colour and contrast, frozen into the
    network; GroupNorm normalises each image by its own statistics, which is what carried a
    Raabin-trained ResNet to other labs in Tsutsui et al. (ICASSP 2023)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            c = child.num_features
            gn = torch.nn.GroupNorm(math.gcd(c, groups), c)
            if child.affine:  # keep a loaded (e.g. ImageNet) scale and shift; fresh ones are 1 and 0 in both
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            act = getattr(child, "act", None)
            setattr(module, name, torch.nn.Sequential(gn, child.drop, act) if act is not None else gn)
        else:
            to_group_norm(child, groups)
    return module


def build_model(arch: str, num_classes: int = len(FINE_CLASSES), drop_rate: float = 0.0,
                norm: str = "batch") -> torch.nn.Module:
    """A timm model by name with random weights (nothing is ever downloaded); ``norm='group'``
    swaps its BatchNorm layers for GroupNorm."""
    import timm

    if norm not in NORMS:
        raise ModelError(f"unknown normalisation layer {norm!r}", hint=f"one of {', '.join(NORMS)}")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ModelError(f"unknown timm architecture {arch!r}", hint="see timm.list_models()") from exc
    return to_group_norm(model) if norm == "group" else model


class CnnClassifier:
    """The classify stage: crops -> calibrated probabilities over FINE_CLASSES (``Classifier``)."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta | Mapping[str, Any], device: str = "auto",
                 batch: int = 64, tta: int | None = None):
        self.meta = meta = ModelMeta.of(meta)
        self.classes: tuple[str, ...] = meta.classes
        self.crop_margin = float(meta.crop_margin)
        self.input_size = int(meta.input_size)
        self.temperature = meta.temperature
        # views averaged per crop (1-8); the temperature was fitted with the meta's own
        self.tta = int(meta.tta if tta is None else tta)
        if not 1 <= self.tta <= 8:
            raise ModelError(f"tta {self.tta}: must be 1 to 8")
        # selective TTA: the extra views only for crops whose one-view top probability is under this
        # margin (the unsure ones, where views change answers); None or 0: every crop gets every view
        self.tta_margin = meta.tta_margin
        self.batch = int(batch)
        self.device, self.normalize, self.model = place(model, meta, device)
        self.novelty_stats: dict[str, Any] | None = None  # set by from_dir when meta names one
        self.novelty_threshold = float((meta.novelty or {}).get("threshold", 0.0))

    @classmethod
    def from_dir(cls, model_dir: str | Path | ModelMeta, device: str = "auto", batch: int = 64,
                 runtime: str = "torch", tta: int | None = None) -> CnnClassifier:
        """Load a classifier model folder (meta.json + safetensors weights; or its ModelMeta, read
        already); ``runtime='onnx'`` runs the network with onnxruntime (see smear.nn.onnx)."""
        meta = load_model(model_dir, "classify", required=("arch", "input_size", "crop_margin"))
        novelty = meta.novelty

        def torch_model() -> torch.nn.Module:
            model = build_model(meta.arch, num_classes=len(meta.classes), norm=meta.norm)
            model = load_weights(model, meta.weights_path)
            if novelty:
                from smear.classify.novelty import WithFeatures

                return WithFeatures(model)  # logits and features in one pass
            return model

        net = load_network(meta, "classify-feat" if novelty else "classify", torch_model, runtime)
        clf = cls(net, meta, device="cpu" if runtime == "onnx" else device, batch=batch, tta=tta)
        if novelty:
            from smear.classify import novelty as nov

            clf.novelty_stats = nov.load(meta.folder)
        return clf

    @property
    def has_novelty(self) -> bool:
        return self.novelty_stats is not None and self.novelty_threshold > 0

    @torch.no_grad()
    def outputs(self, crops: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits (before temperature), N x classes, on the CPU, and the pre-logit features when
        the network gives them (None otherwise); with ``tta`` > 1 both are the mean over that many
        of the crop's 8 rotations and flips (test-time augmentation)."""
        k = len(self.classes)
        if self.tta > 1 and self.tta_margin > 0 and len(crops):
            out = self._views(crops, 1)
            top = torch.softmax(out[:, :k] / self.temperature, dim=1).max(1).values
            unsure = torch.nonzero(top < self.tta_margin).flatten().tolist()
            if unsure:
                out[unsure] = self._views([crops[i] for i in unsure], self.tta)
        else:
            out = self._views(crops, self.tta)
        return out[:, :k], (out[:, k:] if out.shape[1] > k else None)

    def _views(self, crops: Sequence[np.ndarray], n_views: int) -> torch.Tensor:
        """The network's raw output rows (logits, then features if any), mean over ``n_views`` views."""
        outs: list[torch.Tensor] = []
        for i in range(0, len(crops), self.batch):
            x = self.normalize(crops_to_tensor(crops[i:i + self.batch], self.input_size).to(self.device))
            views = [dihedral(x, v) for v in range(n_views)]
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                y = self.model(torch.cat(views)).float().cpu()  # half precision on CUDA
            outs.append(y.view(len(views), len(x), -1).mean(0))
        return torch.cat(outs) if outs else torch.zeros(0, len(self.classes))

    def classify(self, crops: Sequence[np.ndarray]) -> ClassScores:
        """Calibrated probabilities (N x classes, in ``self.classes`` order) and, with a novelty score
        in the model, each crop's novelty as a ratio to its threshold (over 1: unlike every training class)."""
        logits, feats = self.outputs(crops)
        probs = torch.softmax(logits / self.temperature, dim=1).double().numpy()
        if not self.has_novelty or feats is None:
            return ClassScores(self.classes, probs)
        from smear.classify.novelty import distances

        return ClassScores(self.classes, probs, distances(feats.numpy(), self.novelty_stats) / self.novelty_threshold)


@torch.no_grad()
def adapt_batchnorm(clf: CnnClassifier, crops: Sequence[np.ndarray], batch: int = 128) -> int:
    """AdaBN (Li et al. 2016): replace the BatchNorm running statistics of a torch classifier by
    those of ``crops`` (one slide or one lab's cells), all views the classifier averages included.
    Returns the number of BatchNorm layers adapted (0 for a GroupNorm network)."""
    bns = [m for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns or not len(crops):
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for i in range(0, len(crops), batch):
            x = clf.normalize(crops_to_tensor(crops[i:i + batch], clf.input_size).to(clf.device))
            clf.model(torch.cat([dihedral(x, k) for k in range(clf.tta)]))
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)
