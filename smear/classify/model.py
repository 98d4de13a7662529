"""The classifier network (a timm CNN trained from scratch) and ``CnnClassifier``, the pipeline stage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smear.artifacts import ModelMeta, load_model
from smear.errors import ModelError
from smear.taxonomy import FINE_CLASSES
from smear.types import ClassScores

WEIGHTS = "model.safetensors"


NORMS = ("batch", "group", "frozen")
GROUPS = 8  # GroupNorm groups (gcd with the channel count, so every layer divides)


def to_group_norm(module, groups: int = GROUPS):
    """Replace every BatchNorm (timm's BatchNormAct2d keeps its activation) by GroupNorm, in place.

    BatchNorm's running statistics are the training lab's colour and contrast, frozen into the
    network; GroupNorm normalises each image by its own statistics, which is what carried a
    Raabin-trained ResNet to other labs in Tsutsui et al. (ICASSP 2023)."""
    import torch

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


class _StatsFrozen:
    """Mixed into a BatchNorm layer's class: it stays in eval mode (normalising with its loaded running
    statistics, which it never updates) while its scale and shift still train."""

    def train(self, mode: bool = True):
        return super().train(False)


_FROZEN_CLASSES: dict[type, type] = {}


def freeze_norm_stats(module):
    """``model.norm: frozen``: every BatchNorm keeps the statistics it holds (ImageNet's after an
    ImageNet init) through training, in place; the state dict is a plain BatchNorm's."""
    import torch

    for child in module.modules():
        cls = type(child)
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, _StatsFrozen):
            child.__class__ = _FROZEN_CLASSES.setdefault(cls, type(f"StatsFrozen{cls.__name__}", (_StatsFrozen, cls), {}))
            child.eval()
    return module


HEADS = ("flat", "hierarchical")
#: The lineages a hierarchical head decides first: the neutrophil line (its stages second) and the rest.
NEUTROPHIL_LINE = ("SNE", "BNE", "MMY", "MY", "PMY")


def hierarchical_head(in_features: int, classes: tuple[str, ...] = FINE_CLASSES):
    """A lineage-first head: log p(lineage) over the neutrophil line and each other class, plus
    log p(stage | neutrophil line) over its stages; returns the 11 fine log-probabilities in
    ``classes`` order (log p(lineage) + log p(stage) on the line), so every consumer of logits
    (loss, temperature, TTA averaging, ONNX) takes it unchanged."""
    import torch

    line = [classes.index(c) for c in NEUTROPHIL_LINE]
    rest = [i for i in range(len(classes)) if i not in line]

    class LineageFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lineage = torch.nn.Linear(in_features, 1 + len(rest))
            self.stage = torch.nn.Linear(in_features, len(line))
            order = torch.empty(len(classes), dtype=torch.long)  # fine class -> column of [line stages, rest]
            order[line] = torch.arange(len(line))
            order[rest] = torch.arange(len(line), len(classes))
            self.register_buffer("order", order, persistent=False)

        def forward(self, x):
            lin = torch.log_softmax(self.lineage(x), dim=1)
            stage = torch.log_softmax(self.stage(x), dim=1) + lin[:, :1]
            return torch.cat([stage, lin[:, 1:]], dim=1).index_select(1, self.order)

    return LineageFirst()


def build_model(arch: str, num_classes: int = len(FINE_CLASSES), drop_rate: float = 0.0,
                norm: str = "batch", head: str = "flat"):
    """A timm model by name with random weights (nothing is ever downloaded); ``norm='group'``
    swaps its BatchNorm layers for GroupNorm, ``norm='frozen'`` keeps their statistics fixed in training;
    ``head='hierarchical'`` puts a lineage-first head on it (``hierarchical_head``)."""
    import timm

    if norm not in NORMS:
        raise ModelError(f"unknown normalisation layer {norm!r}", hint=f"one of {', '.join(NORMS)}")
    if head not in HEADS or (head == "hierarchical" and num_classes != len(FINE_CLASSES)):
        raise ModelError(f"unknown classifier head {head!r} for {num_classes} classes", hint=f"one of {', '.join(HEADS)}")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ModelError(f"unknown timm architecture {arch!r}", hint="see timm.list_models()") from exc
    if head == "hierarchical":
        setattr(model, model.pretrained_cfg.get("classifier", "classifier"),
                hierarchical_head(model.get_classifier().in_features))
    return to_group_norm(model) if norm == "group" else freeze_norm_stats(model) if norm == "frozen" else model


class CnnClassifier:
    """The classify stage: crops -> calibrated probabilities over FINE_CLASSES (``Classifier``)."""

    def __init__(self, model: Any, meta: ModelMeta, device: str = "auto", batch: int = 64,
                 tta: int | None = None):
        if meta.crop_margin is None or meta.input_size is None:
            raise ModelError(f"{meta.folder}: the classifier's meta names no crop_margin or input_size")
        self.meta = meta
        self.classes: tuple[str, ...] = tuple(meta.classes)
        self.crop_margin = float(meta.crop_margin)
        self.input_size = int(meta.input_size)
        self.temperature = float(meta.temperature)
        # views averaged per crop (1-8); the temperature was fitted with the meta's own
        self.tta = int(meta.tta if tta is None else tta)
        if not 1 <= self.tta <= 8:
            raise ModelError(f"tta {self.tta}: must be 1 to 8")
        # selective TTA: the extra views only for crops whose one-view top probability is under this
        # margin (the unsure ones, where views change answers); None or 0: every crop gets every view
        self.tta_margin = float(meta.tta_margin)
        self.batch = int(batch)
        norm = meta.normalize or {"mean": [0.0] * 3, "std": [1.0] * 3}
        self.mean = np.asarray(norm["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(norm["std"], np.float32).reshape(1, 3, 1, 1)
        # a network run by onnxruntime/OpenVINO without colour normalisation: numpy only, no torch
        self.numpy_only = hasattr(model, "run") and not meta.colour_norm
        if self.numpy_only:
            self.device, self.normalize, self.model = None, None, model
        else:
            from smear.nn.tensors import place

            self.device, self.normalize, self.model = place(model, meta, device)
        self.half = self.device is not None and self.device.type == "cuda"  # autocast to fp16 on CUDA
        self.novelty_stats: dict[str, Any] | None = None  # set by from_dir when meta names one
        self.novelty_threshold = float((meta.novelty or {}).get("threshold", 0.0))
        self.guard = None  # the slide guard's statistics (smear.classify.guard.SlideGuard), set by from_dir

    @classmethod
    def from_dir(cls, model_dir: str | Path | ModelMeta, device: str = "auto", batch: int = 64,
                 runtime: str = "torch", tta: int | None = None, calibration: str | Path | None = None
                 ) -> CnnClassifier:
        """Load a classifier model folder (meta.json + safetensors weights; or its meta, read already);
        any ``runtime`` but torch runs the network's ONNX export (onnxruntime or OpenVINO, fp32 or INT8;
        see smear.nn.runtime); ``calibration``: the PBC folder whose training split calibrates the INT8 runtimes."""
        meta = load_model(model_dir, "classify", required=("arch", "input_size", "crop_margin"))
        novelty = bool(meta.novelty)

        def torch_model():
            from smear.nn.weights import load_weights

            model = build_model(str(meta.arch), num_classes=len(meta.classes), norm=meta.norm,
                                head=meta.head or "flat")
            model = load_weights(model, meta.weights_path)
            if novelty:
                from smear.classify.novelty import WithFeatures

                return WithFeatures(model)  # logits and features in one pass
            return model

        from smear.nn.onnx import load_network

        calib = None
        if calibration is not None:
            from smear.classify.int8 import calibration_crops

            def calib():
                return calibration_crops(calibration, meta)
        net = load_network(meta, "classify-feat" if novelty else "classify", torch_model, runtime, calib)
        clf = cls(net, meta, device="cpu" if runtime != "torch" else device, batch=batch, tta=tta)
        if novelty:
            from smear.classify import novelty as nov

            clf.novelty_stats = nov.load(meta.folder)
            from smear.classify.guard import SlideGuard

            clf.guard = SlideGuard.from_dir(meta.folder, meta)
        return clf

    @property
    def has_novelty(self) -> bool:
        return self.novelty_stats is not None and self.novelty_threshold > 0

    def inputs(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Crops -> the network's normalised N x 3 x S x S float32 batch (numpy, the identity view)."""
        out = np.empty((len(crops), self.input_size, self.input_size, 3), np.uint8)
        for i, crop in enumerate(crops):
            crop = np.asarray(crop)
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
                raise ValueError(f"crop {i}: expected RGB uint8 HxWx3, got {crop.dtype} {crop.shape}")
            if crop.shape[:2] != (self.input_size, self.input_size):
                import cv2

                interp = cv2.INTER_AREA if max(crop.shape[:2]) > self.input_size else cv2.INTER_LINEAR
                crop = cv2.resize(crop, (self.input_size, self.input_size), interpolation=interp)
            out[i] = crop
        x = out.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def _views_numpy(self, crops: Sequence[np.ndarray], n_views: int) -> np.ndarray:
        """The network's raw output rows, mean over ``n_views`` views (numpy path, no torch)."""
        outs = []
        for i in range(0, len(crops), self.batch):
            x = self.inputs(crops[i:i + self.batch])
            views = [_dihedral_np(x, v) for v in range(n_views)]
            y = self.model.run(np.concatenate(views)).astype(np.float32)
            outs.append(y.reshape(len(views), len(x), -1).mean(0))
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)

    def _views(self, crops: Sequence[np.ndarray], n_views: int) -> np.ndarray:
        """The network's raw output rows (logits, then features if any), mean over ``n_views`` views."""
        if self.numpy_only:
            return self._views_numpy(crops, n_views)
        import torch

        from smear.nn.tensors import crops_to_tensor, dihedral

        outs: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(0, len(crops), self.batch):
                x = self.normalize(crops_to_tensor(crops[i:i + self.batch], self.input_size).to(self.device))
                views = [dihedral(x, v) for v in range(n_views)]
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
                    y = self.model(torch.cat(views)).float().cpu()  # half precision on CUDA
                outs.append(y.view(len(views), len(x), -1).mean(0))
        return (torch.cat(outs) if outs else torch.zeros(0, len(self.classes))).numpy()

    def _raw(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Raw output rows (logits, then features if any), N x outputs, with the TTA the model asks for:
        every view for every crop, or with ``tta_margin`` the extra views only for the unsure crops."""
        k = len(self.classes)
        if self.tta > 1 and self.tta_margin > 0 and len(crops):
            out = self._views(crops, 1)
            top = _softmax(out[:, :k] / np.float32(self.temperature)).max(1)
            unsure = np.flatnonzero(top < self.tta_margin).tolist()
            if unsure:
                out[unsure] = self._views([crops[i] for i in unsure], self.tta)
            return out
        return self._views(crops, self.tta)

    def outputs(self, crops: Sequence[np.ndarray]):
        """Raw logits (before temperature), N x classes, on the CPU, and the pre-logit features when
        the network gives them (None otherwise), as torch tensors; with ``tta`` > 1 both are the mean
        over that many of the crop's 8 rotations and flips (test-time augmentation)."""
        import torch

        k = len(self.classes)
        out = torch.from_numpy(self._raw(crops))
        return out[:, :k], (out[:, k:] if out.shape[1] > k else None)

    def classify(self, crops: Sequence[np.ndarray]) -> ClassScores:
        """Calibrated probabilities (N x classes, in ``self.classes`` order) and, with a novelty score
        in the model, each crop's novelty as a ratio to its threshold (over 1: unlike every training class)
        and, with a fitted slide guard, each crop's guard vector."""
        k = len(self.classes)
        out = self._raw(crops)
        logits, feats = out[:, :k], (out[:, k:] if out.shape[1] > k else None)
        probs = _softmax(logits / np.float32(self.temperature)).astype(np.float64)
        if not self.has_novelty or feats is None:
            return ClassScores(self.classes, probs)
        from smear.classify.novelty import distances

        ratio = distances(feats, self.novelty_stats) / self.novelty_threshold
        guard = self.guard.cell_vectors(feats, self.novelty_stats, crops) if self.guard is not None else None
        return ClassScores(self.classes, probs, ratio, guard)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _dihedral_np(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations/flips of an N x C x H x W batch (as smear.nn.tensors.dihedral)."""
    y = np.rot90(x, k % 4, axes=(2, 3))
    return np.ascontiguousarray(y[..., ::-1] if k >= 4 else y)


def adapt_batchnorm(clf: CnnClassifier, crops: Sequence[np.ndarray], batch: int = 128) -> int:
    """AdaBN (Li et al. 2016): replace the BatchNorm running statistics of a torch classifier by
    those of ``crops`` (one slide or one lab's cells), all views the classifier averages included.
    Returns the number of BatchNorm layers adapted (0 for a GroupNorm network)."""
    import torch

    from smear.nn.tensors import crops_to_tensor, dihedral

    if clf.numpy_only:
        return 0
    bns = [m for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns or not len(crops):
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        with torch.no_grad():
            for i in range(0, len(crops), batch):
                x = clf.normalize(crops_to_tensor(crops[i:i + batch], clf.input_size).to(clf.device))
                clf.model(torch.cat([dihedral(x, k) for k in range(clf.tta)]))
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)
