"""The classifier's INT8 calibration set: training crops only, as the network sees them at inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smear.artifacts import ModelMeta

#: crops an INT8 classifier is calibrated on (spread evenly over the training items), in batches of 32
CALIBRATION_CROPS = 256
BATCH = 32


def training_items(root: str | Path) -> list:
    """The training items of a dataset folder: PBC's training split (stratified, seed 0,
    0.7/0.15/0.15: the split every shipped classifier was trained around), or every item of a
    class-folder or labels.csv set (one given as training data)."""
    from smear.classify.data import load_items, stratified_split

    root = Path(root)
    items = load_items(root, "auto")
    pbc = items and all(it.path.parent.parent == root for it in items) and (root / "neutrophil").is_dir()
    return stratified_split(items, (0.7, 0.15, 0.15), 0)[0] if pbc else list(items)


def calibration_crops(root: str | Path, meta: ModelMeta, n: int = CALIBRATION_CROPS):
    """A ``smear.nn.runtime.Calibration`` of ``n`` training crops from ``root``: each cut as the
    pipeline cuts cells (crop margin, input size), normalised, in one of the 8 views the TTA averages."""
    from smear.nn.runtime import Calibration, RuntimeUnavailable

    items = sorted(training_items(root), key=lambda it: str(it.path))
    if not items:
        raise RuntimeUnavailable(f"{root}: no training crops to calibrate the INT8 classifier on")
    picked = [items[round(i)] for i in np.linspace(0, len(items) - 1, min(n, len(items)))]
    margin, size = float(meta.crop_margin), int(meta.input_size)  # type: ignore[arg-type]
    norm = meta.normalize or {"mean": [0.0] * 3, "std": [1.0] * 3}
    mean = np.asarray(norm["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(norm["std"], np.float32).reshape(1, 3, 1, 1)

    def batches() -> list[np.ndarray]:
        from smear.classify.crop_cache import build_crops

        crops, _, _ = build_crops(picked, margin, size, workers=1)
        x = crops.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        if meta.colour_norm:  # the per-image colour normalisation runs before mean/std, as at inference
            import torch

            from smear.nn.tensors import Normalize

            x = Normalize(norm["mean"], norm["std"], meta.colour_norm)(torch.from_numpy(x)).numpy()
        else:
            x = (x - mean) / std
        views = [np.ascontiguousarray(_view(v, k % 8)) for k, v in enumerate(x)]  # crop i in view i mod 8
        return [np.stack(views[i:i + BATCH]) for i in range(0, len(views), BATCH)]

    names = tuple(f"{it.path.parent.name}/{it.path.name}" for it in picked)
    return Calibration(names + (f"margin={margin:g}", f"size={size}"), batches)


def _view(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th rotation/flip of one C x H x W image (as smear.nn.tensors.dihedral)."""
    y = np.rot90(x, k % 4, axes=(1, 2))
    return y[..., ::-1] if k >= 4 else y
