"""Per-image colour normalisation: Reinhard et al. (2001) transfer in l-alpha-beta to a fixed reference.

Each image's three decorrelated colour channels (``lab = M2 log10(M1 rgb)``, Reinhard's
l-alpha-beta) are shifted and scaled to the reference mean and standard deviation, then mapped
back to RGB. The same function runs on the training crops (after the stain and colour jitter,
so the network learns on what the normalisation leaves of another lab's colour) and on every
crop at inference; the reference statistics travel in the model's meta.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64)
_EPS = 1.0 / 255.0


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W RGB in [0, 1] -> Reinhard's l-alpha-beta (same shape)."""
    m1 = torch.as_tensor(_RGB2LMS, dtype=x.dtype)
    m2 = torch.as_tensor(_LMS2LAB, dtype=x.dtype)
    lms = torch.einsum("ij,bjhw->bihw", m1, x.clamp(min=0.0)).clamp(min=_EPS)
    return torch.einsum("ij,bjhw->bihw", m2, torch.log10(lms))


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    m1 = torch.as_tensor(np.linalg.inv(_RGB2LMS), dtype=lab.dtype)
    m2 = torch.as_tensor(np.linalg.inv(_LMS2LAB), dtype=lab.dtype)
    lms = torch.pow(10.0, torch.einsum("ij,bjhw->bihw", m2, lab))
    return torch.einsum("ij,bjhw->bihw", m1, lms).clamp(0.0, 1.0)


def lab_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean and std of each l-alpha-beta channel: two B x 3 tensors."""
    lab = rgb_to_lab(x).flatten(2)
    return lab.mean(2), lab.std(2).clamp(min=1e-4)


def reinhard(x: torch.Tensor, ref_mean: Sequence[float], ref_std: Sequence[float]) -> torch.Tensor:
    """Each image's l-alpha-beta channels moved to the reference mean and std (RGB in, RGB out)."""
    lab = rgb_to_lab(x)
    mean, std = lab_stats(x)
    rm = torch.as_tensor(ref_mean, dtype=x.dtype).view(1, 3, 1, 1)
    rs = torch.as_tensor(ref_std, dtype=x.dtype).view(1, 3, 1, 1)
    return lab_to_rgb((lab - mean[..., None, None]) / std[..., None, None] * rs + rm)


def reference_stats(crops_u8: np.ndarray, max_images: int = 2000, seed: int = 0
                    ) -> tuple[list[float], list[float]]:
    """The reference: median per-image l-alpha-beta mean and std over (a sample of) uint8 crops."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(crops_u8), size=min(len(crops_u8), max_images), replace=False))
    x = torch.from_numpy(crops_u8[idx]).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = lab_stats(x)
    return ([round(float(v), 5) for v in mean.median(0).values],
            [round(float(v), 5) for v in std.median(0).values])


class ColourNorm(torch.nn.Module):
    """``reinhard`` to a fixed reference as a module (identity when ``ref`` is None)."""

    def __init__(self, ref: dict | None = None):
        super().__init__()
        self.ref = ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ref:
            return x
        return reinhard(x, self.ref["mean"], self.ref["std"])
