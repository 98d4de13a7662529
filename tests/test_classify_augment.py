"""Batch augmentations: shapes, dtype, range, identities at zero strength, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_classify_data import draw_cell

from smear.nn.augment import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    BatchAugment,
    affine_warp,
    center_crop,
    colour_jitter,
    eval_batch,
    gaussian_blur,
    gaussian_noise,
    hed_jitter,
    to_float,
)


@pytest.fixture
def batch_u8() -> torch.Tensor:
    return torch.from_numpy(np.stack([draw_cell(40, radius=10, seed=i) for i in range(6)]))


def test_full_augment_keeps_shape_dtype_range(batch_u8):
    aug = BatchAugment(32, {"hed": 0.2, "blur_p": 1.0, "noise": 0.1, "rotate_deg": 30}, seed=0)
    x = aug(batch_u8)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and torch.isfinite(x).all()
    assert not torch.allclose(x, eval_batch(batch_u8, 32))


def test_same_seed_same_batch(batch_u8):
    a = BatchAugment(32, seed=5)(batch_u8)
    b = BatchAugment(32, seed=5)(batch_u8)
    torch.testing.assert_close(a, b)
    aug = BatchAugment(32, seed=5)
    state = aug.state()
    first = aug(batch_u8)
    aug.set_state(state)
    torch.testing.assert_close(aug(batch_u8), first)


def test_no_jitter_warp_is_the_centre_crop(batch_u8):
    x = to_float(batch_u8)
    warped = affine_warp(x, 32, scale=0, shift=0, rotate_deg=0, dihedral=False)
    torch.testing.assert_close(warped, center_crop(x, 32), atol=1e-5, rtol=0)


def test_dihedral_warp_is_a_rotation_or_flip(batch_u8):
    x = to_float(batch_u8)[:, :, 4:36, 4:36]
    out = affine_warp(x, 32, dihedral=True, gen=torch.Generator().manual_seed(0))
    for i in range(len(x)):
        img = x[i]
        candidates = [torch.rot90(im, k, dims=(1, 2)) for im in (img, img.flip(2)) for k in range(4)]
        assert min(float((out[i] - c).abs().max()) for c in candidates) < 1e-4


def test_zero_strength_colour_ops_are_identity(batch_u8):
    x = to_float(batch_u8)
    torch.testing.assert_close(hed_jitter(x, 0.0), x)
    torch.testing.assert_close(colour_jitter(x, 0, 0, 0, 0), x)
    torch.testing.assert_close(gaussian_blur(x, 0.0, 1.0), x)
    torch.testing.assert_close(gaussian_noise(x, 0.0), x)


def test_hed_matrices_invert_and_round_trip():
    np.testing.assert_allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3), atol=1e-12)
    x = torch.rand(2, 3, 8, 8) * 0.9 + 0.05
    # alpha = 1, beta = 0 exactly: a tiny strength barely moves the pixels
    y = hed_jitter(x, 1e-6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)
    z = hed_jitter(x, 0.3, torch.Generator().manual_seed(0))
    assert float((z - x).abs().mean()) > 1e-3


def test_blur_smooths_but_keeps_mean():
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = gaussian_blur(x, 1.0, 1.5, torch.Generator().manual_seed(0))
    assert float(y.max()) < 1.0
    torch.testing.assert_close(y.sum(dim=(2, 3)), x.sum(dim=(2, 3)), atol=1e-4, rtol=0)


def test_unknown_strength_key_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        BatchAugment(32, {"bogus": 1})
