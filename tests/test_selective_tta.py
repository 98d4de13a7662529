"""Selective test-time augmentation: the extra views go only to crops the first view is unsure of."""

from __future__ import annotations

import numpy as np
import torch

from smear.artifacts import ModelMeta
from smear.classify.model import CnnClassifier
from smear.taxonomy import FINE_CLASSES


class Asymmetric(torch.nn.Module):
    """Logits from where the bright pixels lie, so rotations and flips change the answer; counts calls."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        h = x.shape[-1] // 2
        quads = torch.stack([x[..., :h, :h].mean((1, 2, 3)), x[..., :h, h:].mean((1, 2, 3)),
                             x[..., h:, :h].mean((1, 2, 3)), x[..., h:, h:].mean((1, 2, 3))], 1)
        out = torch.zeros(x.shape[0], len(FINE_CLASSES))
        out[:, :4] = quads * 20
        return out


def _crops() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    crops = []
    for i in range(6):
        c = np.zeros((16, 16, 3), np.uint8)
        if i < 3:  # a confident crop: one bright quadrant
            c[:8, :8] = 255
        else:      # an unsure one: dim noise everywhere
            c[:] = rng.integers(0, 40, (16, 16, 3))
        crops.append(c)
    return crops


def _clf(margin: float | None) -> CnnClassifier:
    meta = {"classes": list(FINE_CLASSES), "crop_margin": 1.3, "input_size": 16, "tta": 8, "temperature": 1.0,
            "tta_margin": margin}
    return CnnClassifier(Asymmetric(), ModelMeta.of(meta), device="cpu")


def test_margin_sends_only_unsure_crops_through_every_view():
    full, one = _clf(None), _clf(None)
    one.tta = 1
    sel = _clf(0.5)
    want_full, want_one = full.outputs(_crops())[0], one.outputs(_crops())[0]
    got = sel.outputs(_crops())[0]
    top1 = torch.softmax(want_one, 1).max(1).values
    sure = top1 >= 0.5
    assert bool(sure[:3].all()) and not bool(sure[3:].any())
    assert torch.allclose(got[sure], want_one[sure]) and torch.allclose(got[~sure], want_full[~sure])
    assert not torch.allclose(want_full[:3], want_one[:3])  # the views do change the confident crops
    assert sel.model.seen == 6 + 3 * 8 < full.model.seen == 6 * 8


def test_no_margin_is_plain_tta():
    a, b = _clf(None), _clf(0.0)
    assert torch.allclose(a.outputs(_crops())[0], b.outputs(_crops())[0])
