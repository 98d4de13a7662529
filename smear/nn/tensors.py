"""Crops to network input: uint8 crops -> float tensors, per-channel normalisation, dihedral views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from smear.artifacts import ModelMeta
from smear.devices import resolve_device, set_threads
from smear.errors import ModelError


class Normalize(torch.nn.Module):
    """(x - mean) / std per channel, for x in [0, 1]; with ``colour`` (``{"method": "reinhard",
    "mean": [...], "std": [...]}``) each image is first colour-normalised to that reference."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], colour: dict | None = None):
        super().__init__()
        from smear.nn.colour import ColourNorm

        if colour and colour.get("method", "reinhard") != "reinhard":
            raise ModelError(f"unknown colour normalisation {colour.get('method')!r}", hint="use reinhard")
        self.colour = ColourNorm(colour or None)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.colour(x) - self.mean) / self.std


class Placed(NamedTuple):
    """A network ready to run: its device, the input normalisation on it, the network in eval mode."""

    device: torch.device
    normalize: Normalize
    model: Any


def place(model, meta: ModelMeta | Mapping[str, Any], device: str = "auto") -> Placed:
    """The resolved device, the meta's input normalisation on it, and the network on it in eval mode."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        set_threads()
    meta = ModelMeta.of(meta)
    norm = meta.normalize or {"mean": [0.0] * 3, "std": [1.0] * 3}
    return Placed(dev, Normalize(norm["mean"], norm["std"], meta.colour_norm).to(dev), model.to(dev).eval())


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


def channel_stats(crops: np.ndarray, max_images: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of crops in [0, 1] (on a sample): the model's normalisation."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(crops), size=min(len(crops), max_images), replace=False))
    x = crops[idx].reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in x.mean(0)], [round(float(v), 4) for v in np.maximum(x.std(0), 1e-3)]
