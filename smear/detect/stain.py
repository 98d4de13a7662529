"""Stain jitter for detector training, and the fixed stain shifts the other-labs benchmark applies.

Labs differ in stain (Wright, Giemsa, May-Grunwald-Giemsa, each mixed and timed its own way), in
illumination and in camera white balance. ultralytics' HSV jitter shifts hue, saturation and value
of the whole field the same way; it cannot tint the background while leaving the nuclei as they
are, which is what a blue-cyan or pink background lab looks like. ``StainJitter`` works on optical
density (Beer-Lambert: OD = -log(I / I0)), where stains add: each channel's OD is mixed with the
others' by a random matrix near the identity (stain hue and strength) and a random offset is added
(the background's tint: white glass has OD 0, so the offset is its colour). It is applied to the
training mosaic after ultralytics' own colour jitter.

``SHIFTS`` are fixed transforms of another kind (a blend towards a colour, a hue rotation, a
contrast loss) that the benchmark applies to test fields, to measure how a detector holds on a
stain it has not seen.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def _to_od(img: np.ndarray) -> np.ndarray:
    return -np.log((img.astype(np.float32) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class StainJitter:
    """Random stain mixing and background tint in optical density, on an HxWx3 uint8 image.

    ``scale``: each channel's OD gain is drawn from [1 - scale, 1 + scale]; ``mix``: the s.d. of the
    off-diagonal terms (one channel's stain leaking into another); ``tint``: the background OD offset
    per channel is drawn from [-tint / 4, tint] (mostly darker: a lighter-than-white background
    clips). Channel order does not matter (BGR as ultralytics holds it, or RGB). Built from the
    detect config's ``stain:`` section, where its defaults are written."""

    p: float
    scale: float
    mix: float
    tint: float

    def apply(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = np.diag(rng.uniform(1 - self.scale, 1 + self.scale, 3)).astype(np.float32)
        m += (rng.normal(0.0, self.mix, (3, 3)) * (1 - np.eye(3))).astype(np.float32)
        b = rng.uniform(-self.tint / 4, self.tint, 3).astype(np.float32)
        od = _to_od(img) @ m.T + b
        return _from_od(np.maximum(od, 0.0))

    def __call__(self, labels: dict) -> dict:
        """An ultralytics transform: ``labels["img"]`` replaced, boxes untouched."""
        rng = np.random.default_rng()
        if self.p > 0 and rng.random() < self.p:
            labels["img"] = self.apply(labels["img"], rng)
        return labels


def _blend(img: np.ndarray, colour: tuple[int, int, int], t: float) -> np.ndarray:
    """Multiply towards a colour (a tinted background; dark nuclei stay dark), RGB."""
    tint = (1 - t) + t * np.asarray(colour, np.float32) / 255.0
    return np.clip(img.astype(np.float32) * tint, 0, 255).round().astype(np.uint8)


def _hue(img: np.ndarray, degrees: float) -> np.ndarray:
    import cv2

    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(degrees / 2))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _contrast(img: np.ndarray, k: float) -> np.ndarray:
    """Pale, over-exposed fields: pixel values pulled towards white by a factor k."""
    return np.clip(255 - (255 - img.astype(np.float32)) * k, 0, 255).round().astype(np.uint8)


#: fixed stain shifts on RGB fields, by name (the benchmark's ``--stain`` choices)
SHIFTS = {
    "cyan": functools.partial(_blend, colour=(90, 200, 230), t=0.45),
    "violet": functools.partial(_blend, colour=(200, 120, 230), t=0.35),
    "hue+30": functools.partial(_hue, degrees=30.0),
    "hue-30": functools.partial(_hue, degrees=-30.0),
    "pale": functools.partial(_contrast, k=0.55),
}


def shift(img: np.ndarray, name: str) -> np.ndarray:
    if name not in SHIFTS:
        raise ValueError(f"unknown stain shift {name!r}; choose from {', '.join(SHIFTS)}")
    return SHIFTS[name](img)
