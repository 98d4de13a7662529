"""Grad-CAM (Selvaraju et al. 2017) for the classifier: where in a crop the evidence for a class lies.

Written here with two torch hooks rather than taken from the ``grad-cam`` package: that package
requires ``opencv-python-headless``, which clashes with the ``opencv-python`` ultralytics needs
(both install the same ``cv2`` module). The map is the ReLU of the activation channels weighted by
their mean gradient, at the layer picked by ``pick_layer``, upsampled to the crop.

``cam_in_box`` is the share of the map's mass inside the cell box (the central 1/crop_margin of
the crop): about (1/margin)^2 for a map spread evenly, near 1 when the model looks at the cell.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from smear.classify.model import CnnClassifier
from smear.nn.tensors import crops_to_tensor

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanation:
    """One crop's Grad-CAM for one class."""

    target: str          # class the map explains
    predicted: str       # the classifier's top class (calibrated)
    prob: float          # calibrated probability of ``predicted``
    cam: np.ndarray      # float32 H x W in [0, 1], at the model's input size
    cam_in_box: float    # share of the map's mass inside the cell box


def pick_layer(model: torch.nn.Module, input_size: int, min_side: int | None = None) -> str:
    """Name of the last module whose output is a feature map at least ``min_side`` px across
    (default input_size / 16: stride 16, finer than the last stride-32 stage on small crops)."""
    min_side = min_side or max(2, input_size // 16)
    found: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: found.append((name, tuple(out.shape)))
                                     if isinstance(out, torch.Tensor) and out.dim() == 4 else None)
             for name, m in model.named_modules() if name and not list(m.children())]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    good = [name for name, shape in found if min(shape[2:]) >= min_side]
    if not good:
        raise ValueError(f"no feature map of at least {min_side} px in the model")
    return good[-1]


def box_share(cam: np.ndarray, margin: float) -> float:
    """Share of ``cam``'s mass inside the central square of side 1/margin."""
    h, w = cam.shape
    bh, bw = h / margin, w / margin
    y0, x0 = int(round((h - bh) / 2)), int(round((w - bw) / 2))
    inside = cam[y0:y0 + int(round(bh)), x0:x0 + int(round(bw))].sum()
    total = cam.sum()
    return float(inside / total) if total > 0 else float("nan")


def grad_cam(clf: CnnClassifier, crops: Sequence[np.ndarray], targets: Sequence[str | None] | None = None,
             layer: str | None = None) -> list[Explanation]:
    """Grad-CAM of each crop for its target class (None: the predicted class)."""
    model = getattr(clf.model, "net", clf.model)  # the bare network, without the novelty features
    layer = layer or pick_layer(model, clf.input_size)
    module = dict(model.named_modules())[layer]
    store: dict[str, torch.Tensor] = {}

    def fwd(_m, _i, out):
        out.retain_grad()
        store["act"] = out

    handle = module.register_forward_hook(fwd)
    out: list[Explanation] = []
    try:
        for k, crop in enumerate(crops):
            x = crops_to_tensor([crop], clf.input_size).to(clf.device)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = model(clf.normalize(x))
                probs = torch.softmax(logits.detach() / clf.temperature, 1)[0]
                pred = int(probs.argmax())
                want = targets[k] if targets is not None and targets[k] else clf.classes[pred]
                if want not in clf.classes:
                    raise ValueError(f"unknown class {want!r}; one of {', '.join(clf.classes)}")
                logits[0, clf.classes.index(want)].backward()
            act, grad = store["act"].detach()[0], store["act"].grad[0]
            cam = torch.relu((grad.mean(dim=(1, 2))[:, None, None] * act).sum(0)).cpu().numpy()
            cam = cv2.resize(cam.astype(np.float32), (clf.input_size, clf.input_size), interpolation=cv2.INTER_LINEAR)
            cam = cam / cam.max() if cam.max() > 0 else cam
            out.append(Explanation(want, clf.classes[pred], float(probs[pred]), cam,
                                   box_share(cam, clf.crop_margin)))
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return out


def overlay(crop: np.ndarray, cam: np.ndarray, alpha: float = 0.45, scale: int = 2) -> np.ndarray:
    """RGB picture: the crop (at the map's size) and the map in a jet palette, side by side, enlarged."""
    size = cam.shape[0]
    base = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = (base * (1 - alpha) + heat * alpha).astype(np.uint8)
    pair = np.concatenate([base, blend], axis=1)
    return cv2.resize(pair, (pair.shape[1] * scale, pair.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def explain_files(clf: CnnClassifier, paths: Sequence[Path], out: Path, target: str | None = None,
                  skip_unreadable: bool = False) -> list[dict]:
    """Grad-CAM overlays of single-cell images (the cell is found as in training, then cut with the
    model's geometry), written as ``out/<stem>_gradcam.png``; one summary row per image. An image that
    cannot be read is an error, or with ``skip_unreadable`` a logged warning and no row."""
    from smear.classify.crop_cache import cut_cell_crop
    from smear.io import read_image, write_image_atomic
    from smear.errors import SmearError

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        try:
            image = read_image(path)
        except SmearError as exc:
            if not skip_unreadable:
                raise
            _log.warning(f"skipped {exc}")
            continue
        crop = cut_cell_crop(image, clf.crop_margin, clf.input_size)
        ex = grad_cam(clf, [crop], [target])[0]
        dest = out / f"{Path(path).stem}_gradcam.png"
        write_image_atomic(dest, overlay(crop, ex.cam))
        rows.append({"image": str(path), "predicted": ex.predicted, "prob": round(ex.prob, 4),
                     "target": ex.target, "cam_in_box": round(ex.cam_in_box, 4), "overlay": str(dest)})
    return rows
