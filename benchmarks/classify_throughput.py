"""Training-step throughput of candidate architectures on crops: pick a model that fits the time.

Usage: python benchmarks/classify_throughput.py [--arch mobilenetv3_small_100 ...] [--size 128 ...] [--batch 64]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from smear.nn.augment import BatchAugment
from smear.classify.model import build_model
from smear.nn.tensors import Normalize
from smear.classify.train import mixed_loss
from smear.devices import set_threads
from smear.taxonomy import FINE_CLASSES


def train_step_throughput(arch: str, crops_wide: np.ndarray, input_size: int, batch: int = 64,
                          steps: int = 3, warmup: int = 1, augment: bool = True) -> dict[str, Any]:
    """Images/s of augment + forward + backward + AdamW step at ``batch``, and of the model alone.

    ``crops_wide``: uint8 N x S x S x 3 training crops (S >= input_size); batches cycle over them.
    """
    set_threads()
    model = build_model(arch)
    model.train()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    aug = BatchAugment(input_size, seed=0)
    weights = torch.ones(len(FINE_CLASSES))
    rng = np.random.default_rng(0)
    t_aug = t_step = 0.0
    for i in range(warmup + steps):
        idx = np.sort(rng.choice(len(crops_wide), size=batch, replace=len(crops_wide) < batch))
        t0 = time.perf_counter()
        u8 = torch.from_numpy(crops_wide[idx])
        x = aug(u8) if augment else u8.permute(0, 3, 1, 2).float()[..., :input_size, :input_size] / 255
        t1 = time.perf_counter()
        y = torch.from_numpy(rng.integers(0, len(FINE_CLASSES), batch))
        loss = mixed_loss(model(norm(x)), y, torch.zeros_like(y), weights, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            t_aug += t1 - t0
            t_step += t2 - t1
    n = steps * batch
    params = sum(p.numel() for p in model.parameters())
    return {"arch": arch, "input_size": input_size, "batch": batch, "params_m": round(params / 1e6, 2),
            "step_images_per_s": round(n / t_step, 1), "augment_images_per_s": round(n / max(t_aug, 1e-9), 1),
            "total_images_per_s": round(n / (t_step + t_aug), 1)}


def compare(archs: Sequence[str], sizes: Sequence[int], crops_by_size: dict[int, np.ndarray],
            **kw: Any) -> list[dict[str, Any]]:
    """``train_step_throughput`` for every architecture x input size."""
    return [train_step_throughput(a, crops_by_size[s], s, **kw) for s in sizes for a in archs]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", nargs="+", default=["mobilenetv3_small_100"])
    ap.add_argument("--size", type=int, nargs="+", default=[128])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)  # the speed of a step does not depend on what the crops show
    crops = {s: rng.integers(0, 256, (args.batch * 2, round(s * 1.25), round(s * 1.25), 3), dtype=np.uint8)
             for s in args.size}
    for row in compare(args.arch, args.size, crops, batch=args.batch, steps=args.steps):
        print(row)


if __name__ == "__main__":
    main()
