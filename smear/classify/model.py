"""The classifier network (a timm CNN trained from scratch) and ``CnnClassifier``, the pipeline stage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from smear.artifacts import load_meta
from smear.devices import resolve_device
from smear.types import FINE_CLASSES, ModelError

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


def save_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the model's state dict as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return Path(path)


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a safetensors state dict into ``model`` (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model


class Normalize(torch.nn.Module):
    """(x - mean) / std per channel, for x in [0, 1]; with ``colour`` (``{"method": "reinhard",
    "mean": [...], "std": [...]}``) each image is first colour-normalised to that reference."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], colour: dict | None = None):
        super().__init__()
        from smear.classify.colour import ColourNorm

        if colour and colour.get("method", "reinhard") != "reinhard":
            raise ModelError(f"unknown colour normalisation {colour.get('method')!r}", hint="use reinhard")
        self.colour = ColourNorm(colour or None)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.colour(x) - self.mean) / self.std


def place(model, meta: dict[str, Any], device: str = "auto"):
    """The resolved device, the meta's input normalisation on it, and the network on it in eval mode."""
    dev = resolve_device(device)
    norm = meta.get("normalize", {"mean": [0.0] * 3, "std": [1.0] * 3})
    return dev, Normalize(norm["mean"], norm["std"], meta.get("colour_norm")).to(dev), model.to(dev).eval()


def crops_to_tensor(crops: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 HxWx3 crops -> float B x 3 x size x size in [0, 1], resized where needed."""
    out = np.empty((len(crops), size, size, 3), np.uint8)
    for i, crop in enumerate(crops):
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected RGB uint8 HxWx3, got {crop.dtype} {crop.shape}")
        if crop.shape[:2] != (size, size):
            interp = cv2.INTER_AREA if max(crop.shape[:2]) > size else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (size, size), interpolation=interp)
        out[i] = crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 rotations/flips of a B x C x H x W batch (k = 0: unchanged)."""
    y = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(y, dims=(3,)) if k >= 4 else y


class CnnClassifier:
    """The classify stage: crops -> calibrated probabilities over FINE_CLASSES (``Classifier``)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: str = "auto", batch: int = 64):
        self.meta = meta
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.crop_margin = float(meta["crop_margin"])
        self.input_size = int(meta["input_size"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.tta = int(meta.get("tta", 1))  # views averaged per crop (1-8); the temperature was fitted with it
        if not 1 <= self.tta <= 8:
            raise ModelError(f"meta tta {self.tta}: must be 1 to 8")
        self.batch = int(batch)
        self.device, self.normalize, self.model = place(model, meta, device)
        self.novelty_stats: dict[str, Any] | None = None  # set by from_dir when meta names one
        self.novelty_threshold = float(meta.get("novelty", {}).get("threshold", 0.0))

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", batch: int = 64,
                 runtime: str = "torch") -> CnnClassifier:
        """Load a classifier model folder (meta.json + safetensors weights); ``runtime='onnx'`` runs
        the network with onnxruntime (see smear.runtime)."""
        meta = load_meta(model_dir)
        if meta.get("stage") != "classify":
            raise ModelError(f"{model_dir}: not a classifier model folder (stage {meta.get('stage')!r})")
        missing = [k for k in ("arch", "input_size", "crop_margin") if k not in meta]
        if missing:
            raise ModelError(f"{model_dir}/meta.json: missing keys {', '.join(missing)}")

        novelty = meta.get("novelty")

        def torch_model() -> torch.nn.Module:
            model = build_model(meta["arch"], num_classes=len(meta["classes"]), norm=meta.get("norm", "batch"))
            model = load_weights(model, Path(model_dir) / meta["weights"])
            if novelty:
                from smear.classify.novelty import WithFeatures

                return WithFeatures(model)  # logits and features in one pass
            return model

        from smear.runtime import load_network

        net = load_network(model_dir, "classify-feat" if novelty else "classify", torch_model, runtime)
        clf = cls(net, meta, device="cpu" if runtime == "onnx" else device, batch=batch)
        if novelty:
            from smear.classify import novelty as nov

            clf.novelty_stats = nov.load(model_dir)
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
        outs: list[torch.Tensor] = []
        for i in range(0, len(crops), self.batch):
            x = self.normalize(crops_to_tensor(crops[i:i + self.batch], self.input_size).to(self.device))
            views = [dihedral(x, v) for v in range(self.tta)]
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                y = self.model(torch.cat(views)).float().cpu()  # half precision on CUDA
            outs.append(y.view(len(views), len(x), -1).mean(0))
        out = torch.cat(outs) if outs else torch.zeros(0, k)
        return out[:, :k], (out[:, k:] if out.shape[1] > k else None)

    def logits(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Raw logits (before temperature), N x classes (see ``outputs``)."""
        return self.outputs(crops)[0]

    def predict(self, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities (N x classes) and, with a novelty score in the model, each
        crop's novelty as a ratio to its threshold (over 1: unlike every training class)."""
        logits, feats = self.outputs(crops)
        probs = torch.softmax(logits / self.temperature, dim=1).double().numpy()
        if not self.has_novelty or feats is None:
            return probs, None
        from smear.classify.novelty import distances

        return probs, distances(feats.numpy(), self.novelty_stats) / self.novelty_threshold

    def predict_proba(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities, N x classes, rows summing to 1, columns in ``self.classes`` order."""
        return self.predict(crops)[0]

    def classify(self, crops: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Calibrated probability of each fine class for each crop."""
        probs = self.predict_proba(crops)
        return [{c: float(p) for c, p in zip(self.classes, row)} for row in probs]


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
