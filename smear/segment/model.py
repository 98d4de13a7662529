"""The U-Net (segmentation-models-pytorch, random init) and ``UnetSegmenter``, the pipeline stage."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from smear.artifacts import ModelMeta, load_model
from smear.nn.onnx import load_network
from smear.nn.tensors import crops_to_tensor, place
from smear.nn.weights import load_weights
from smear.errors import ModelError

WEIGHTS = "model.safetensors"
LABELS = ("background", "cytoplasm", "nucleus")


def build_unet(encoder: str, decoder_channels: Sequence[int] = (128, 64, 32, 16, 16), arch: str = "Unet"
               ) -> torch.nn.Module:
    """A 3-class smp network with random weights (``encoder_weights=None``: nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import segmentation_models_pytorch as smp

    try:
        cls = getattr(smp, arch)
        return cls(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=len(LABELS),
                   decoder_channels=tuple(decoder_channels))
    except (AttributeError, KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build {arch} with encoder {encoder!r}: {exc}") from exc


class UnetSegmenter:
    """The segment stage: WBC crops -> masks (0 background, 1 cytoplasm, 2 nucleus) at crop size.

    Crops of any size are resized to the model's input (``input_size``, a multiple of 32) and the
    class probabilities are resized back before the arg-max, so masks follow the crop's pixels."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, device: str = "auto", batch: int = 32):
        if meta.crop_margin is None or meta.input_size is None:
            raise ModelError(f"{meta.folder}: the segmenter's meta names no crop_margin or input_size")
        self.meta = meta
        self.crop_margin = float(meta.crop_margin)
        self.input_size = int(meta.input_size)
        self.batch = int(batch)
        self.device, self.normalize, self.model = place(model, meta, device)

    @classmethod
    def from_dir(cls, model_dir: str | Path | ModelMeta, device: str = "auto", batch: int = 32,
                 runtime: str = "torch") -> UnetSegmenter:
        """Load a segmenter model folder (or its meta, read already); ``runtime='onnx'`` runs it with onnxruntime."""
        meta = load_model(model_dir, "segment", required=("encoder", "input_size", "crop_margin"))

        def torch_model() -> torch.nn.Module:
            model = build_unet(str(meta.encoder), meta.decoder_channels, meta.arch or "Unet")
            return load_weights(model, meta.weights_path)

        net = load_network(meta, "segment", torch_model, runtime)
        return cls(net, meta, device="cpu" if runtime != "torch" else device, batch=batch)

    @torch.no_grad()
    def probabilities(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Softmax over (background, cytoplasm, nucleus), N x 3 x input_size x input_size, CPU."""
        outs = [torch.zeros(0, len(LABELS), self.input_size, self.input_size)]
        for i in range(0, len(crops), self.batch):
            x = crops_to_tensor(crops[i:i + self.batch], self.input_size).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                outs.append(torch.softmax(self.model(self.normalize(x)).float(), 1).cpu())
        return torch.cat(outs)

    def segment(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(crops), self.batch):
            part = crops[i:i + self.batch]
            probs = self.probabilities(part)
            for p, crop in zip(probs, part):
                h, w = crop.shape[:2]
                if (h, w) != p.shape[1:]:
                    p = torch.nn.functional.interpolate(p[None], size=(h, w), mode="bilinear",
                                                        align_corners=False)[0]
                out.append(p.argmax(0).numpy().astype(np.uint8))
        return out
