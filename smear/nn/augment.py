"""Batch augmentations on CPU tensors, aimed at other labs' stains, scanners and detectors.

Everything works on a whole batch at once (one ``grid_sample`` for all geometry, matrix products
for colour), so augmenting costs little next to a training step on a few cores. Inputs are the
cached uint8 crops (B x S x S x 3, cut wider than the model input); the output is float
B x 3 x size x size in [0, 1], not yet normalised.

- geometry: 90-degree rotations and flips (a cell has no up), small arbitrary rotations, scale
  jitter (detector boxes are loose or tight) and shifts (boxes off-centre), in one affine warp;
- stain: perturbation in HED colour-deconvolution space (Ruifrok & Johnston 2001; Tellez et al.
  2018) - each stain's optical density scaled and shifted - as between labs' staining;
- colour: hue, saturation, brightness, contrast, as between cameras and white balances;
- optics: Gaussian blur (focus) and Gaussian noise (sensor);
- scale and camera: random down-resolution (the cell drawn with fewer pixels, as by a lower
  magnification or a phone camera, then resized back), JPEG artefacts and random grayscale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from smear.config_models import Augment

#: Stain optical-density vectors (rows: haematoxylin, eosin, DAB), Ruifrok & Johnston 2001, as
#: used by scikit-image's ``rgb2hed``.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)

def strengths_of(strengths: Augment | Mapping[str, Any] | None = None) -> Augment:
    """The augmentation settings: an ``Augment`` as it is, or the keys of a mapping over the
    classifier's default ``train.augment`` (smear/configs/classify.yaml, the one place they are written)."""
    from smear.config import default_config
    from smear.config_models import Augment

    if isinstance(strengths, Augment):
        return strengths
    unknown = set(strengths or {}) - set(Augment.model_fields)
    if unknown:
        raise ValueError(f"unknown augmentation keys: {', '.join(sorted(unknown))}")
    base = default_config("classify").train.augment
    return Augment.model_validate({**base.model_dump(), **(strengths or {})})

#: Optical-density directions of a Wright-like cast: eosin's pink (absorbs green) and a red one
#: (absorbs green and blue), unit vectors; a cast draws a direction between the two.
PINK_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
RED_OD = np.array([0.05, 0.70, 0.70]) / np.linalg.norm([0.05, 0.70, 0.70])


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W float in [0, 1] -> B x H x W x 3 uint8 (the inverse of ``to_float``)."""
    return (x.clamp(0.0, 1.0).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` square of B x C x H x W (resized when smaller than ``size``)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def affine_theta(shape: tuple[int, int, int], size: int, scale: float = 0.0, shift: float = 0.0,
                 rotate_deg: float = 0.0, dihedral: bool = True,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Random B x 2 x 3 sampling maps (``F.affine_grid``) from a ``size`` output square to a batch of
    ``shape`` (B, H, W): rotation (k x 90 deg + small angle), flip, scale and shift of each image about
    its centre."""
    b, h, w = shape
    angle = _uniform(b, -rotate_deg, rotate_deg, gen) * (math.pi / 180.0)
    if dihedral:
        angle = angle + torch.randint(0, 4, (b,), generator=gen).float() * (math.pi / 2)
    flip = (torch.rand(b, generator=gen) < 0.5).float() * 2 - 1 if dihedral else torch.ones(b)
    s = torch.exp(_uniform(b, -math.log1p(scale), math.log1p(scale), gen)) if scale > 0 else torch.ones(b)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output coords (normalised to the output) -> input coords (normalised to the input)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * flip * s * (size / w)
    theta[:, 0, 1] = -sin * s * (size / w)
    theta[:, 1, 0] = sin * flip * s * (size / h)
    theta[:, 1, 1] = cos * s * (size / h)
    if shift > 0:
        theta[:, :, 2] = _uniform(2 * b, -shift, shift, gen).view(b, 2)
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Sample the ``size`` square of each image of B x C x H x W through ``theta`` (edges reflected)."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)


def affine_warp(x: torch.Tensor, size: int, scale: float = 0.0, shift: float = 0.0,
                rotate_deg: float = 0.0, dihedral: bool = True,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation (k x 90 deg + small angle), flip, scale and shift of each image, sampling
    the central ``size`` square (scale 1 = the same pixels as ``center_crop``)."""
    b, _, h, w = x.shape
    return warp(x, affine_theta((b, h, w), size, scale, shift, rotate_deg, dihedral, gen), size)


def hed_jitter(x: torch.Tensor, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Scale each HED stain's optical density by U(1-s, 1+s) and shift it by U(-s/2, s/2)."""
    if strength <= 0:
        return x
    b = x.shape[0]
    hed_from_rgb = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype)
    rgb_from_hed = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype)
    alpha = _uniform(3 * b, 1 - strength, 1 + strength, gen).view(b, 1, 3)
    beta = _uniform(3 * b, -strength / 2, strength / 2, gen).view(b, 1, 3)
    # with OD as a row vector (scikit-image's convention): hed = od @ H; od' = (hed * a + beta) @ R,
    # i.e. one per-image affine map of OD, applied as a single batched matrix product
    k = (hed_from_rgb[None] * alpha) @ rgb_from_hed                 # (b, 3, 3): H diag(a) R
    off = (beta @ rgb_from_hed).transpose(1, 2)                     # (b, 3, 1)
    od = -torch.log(x.clamp(min=1.0 / 255.0)).reshape(b, 3, -1)      # optical density per channel
    od = torch.baddbmm(off, k.transpose(1, 2), od)
    return torch.exp(od.neg_()).clamp_(0.0, 1.0).view_as(x)


def colour_jitter(x: torch.Tensor, hue: float = 0.0, saturation: float = 0.0, brightness: float = 0.0,
                  contrast: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-image hue rotation (fraction of a turn), saturation, brightness and contrast factors,
    folded into one affine colour map per image."""
    b = x.shape[0]
    if hue <= 0 and saturation <= 0 and brightness <= 0 and contrast <= 0:
        return x
    ang = _uniform(b, -hue, hue, gen) * (2 * math.pi)
    sat = _uniform(b, 1 - saturation, 1 + saturation, gen)
    bri = _uniform(b, 1 - brightness, 1 + brightness, gen)
    con = _uniform(b, 1 - contrast, 1 + contrast, gen)
    cos, sin = torch.cos(ang) * sat, torch.sin(ang) * sat
    rot = torch.zeros(b, 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.as_tensor(_YIQ2RGB, dtype=x.dtype) @ rot @ torch.as_tensor(_RGB2YIQ, dtype=x.dtype)
    m = m * bri.view(b, 1, 1)
    # contrast about the image's mean grey after the map: c * (m x - g) + g, g = mean(m @ mean(x))
    grey = (m @ x.mean(dim=(2, 3)).unsqueeze(2)).mean(dim=(1, 2))  # (b,)
    off = ((1 - con) * grey).view(b, 1, 1).expand(b, 3, 1)
    y = torch.baddbmm(off, m * con.view(b, 1, 1), x.reshape(b, 3, -1))
    return y.clamp_(0.0, 1.0).view_as(x)


def gaussian_blur(x: torch.Tensor, p: float, max_sigma: float, gen: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Blur a random fraction ``p`` of the images, each with sigma ~ U(0.3, max_sigma)."""
    if p <= 0 or max_sigma <= 0:
        return x
    b, c, h, w = x.shape
    on = torch.rand(b, generator=gen) < p
    if not bool(on.any()):
        return x
    sigma = _uniform(b, min(0.3, max_sigma), max_sigma, gen)[on]
    radius = max(1, int(math.ceil(2 * max_sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    n = int(on.sum())
    y = F.pad(x[on].reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    out = x.clone()
    out[on] = y.view(n, c, h, w)
    return out


def gaussian_noise(x: torch.Tensor, max_std: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std) noise, std ~ U(0, max_std) per image."""
    if max_std <= 0:
        return x
    std = _uniform(x.shape[0], 0.0, max_std, gen).view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).mul_(std)
    return noise.add_(x).clamp_(0.0, 1.0)


def down_resolution(x: torch.Tensor, p: float, min_factor: float, gen: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Resample a random fraction ``p`` of the images down by a log-uniform factor in
    ``[min_factor, 1]`` (area filter) and back up (bilinear): the same cell with fewer pixels."""
    if p <= 0 or min_factor >= 1:
        return x
    b, _, h, w = x.shape
    on = torch.rand(b, generator=gen) < p
    factors = torch.exp(_uniform(b, math.log(max(min_factor, 1e-3)), 0.0, gen))
    out = x.clone() if bool(on.any()) else x
    for i in torch.nonzero(on).flatten().tolist():
        side = max(8, int(round(h * float(factors[i]))))
        small = F.interpolate(x[i:i + 1], size=(side, side), mode="area")
        out[i:i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def jpeg_artefacts(x: torch.Tensor, p: float, min_quality: int, gen: torch.Generator | None = None
                   ) -> torch.Tensor:
    """JPEG-compress a random fraction ``p`` of the images at a quality U(min_quality, 95)."""
    if p <= 0:
        return x
    import cv2

    b = x.shape[0]
    on = torch.rand(b, generator=gen) < p
    quality = torch.randint(int(min_quality), 96, (b,), generator=gen)
    out = x.clone() if bool(on.any()) else x
    for i in torch.nonzero(on).flatten().tolist():
        img = (x[i].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality[i])])
        if ok:
            dec = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
            out[i] = torch.from_numpy(dec).permute(2, 0, 1).float().div_(255.0)
    return out


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Replace a random fraction ``p`` of the images by their luma in all three channels."""
    if p <= 0:
        return x
    on = (torch.rand(x.shape[0], generator=gen) < p).view(-1, 1, 1, 1)
    luma = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.where(on, luma.expand_as(x), x)


def channel_shuffle(x: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Permute the RGB channels of a random fraction ``p`` of the images (one of the 5 other orders):
    the same morphology in colours no stain gives, so that colour alone cannot decide a class."""
    if p <= 0:
        return x
    b = x.shape[0]
    on = torch.rand(b, generator=gen) < p
    if not bool(on.any()):
        return x
    orders = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    pick = orders[torch.randint(0, len(orders), (b,), generator=gen)]
    out = x.clone()
    idx = torch.nonzero(on).flatten()
    out[idx] = torch.stack([x[i, pick[i]] for i in idx.tolist()])
    return out


def wright_cast(x: torch.Tensor, p: float, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Add a pink-to-red optical density U(0.1, 1) x ``strength`` to a random fraction ``p`` of the
    images, everywhere (background, red cells and cytoplasm alike), as a Wright stain or a warm
    white balance does: a neutrophil on a pink background must still read as a neutrophil."""
    if p <= 0 or strength <= 0:
        return x
    b = x.shape[0]
    on = (torch.rand(b, generator=gen) < p).to(x.dtype)
    t = torch.rand(b, generator=gen, dtype=torch.float64).view(b, 1)
    direction = (1 - t) * torch.as_tensor(PINK_OD)[None] + t * torch.as_tensor(RED_OD)[None]
    direction = direction / direction.norm(dim=1, keepdim=True)
    amount = _uniform(b, 0.1 * strength, strength, gen).to(x.dtype) * on
    od = -torch.log(x.clamp(min=1.0 / 255.0))
    od = od + (direction.to(x.dtype) * amount.view(b, 1)).view(b, 3, 1, 1)
    return torch.exp(-od).clamp_(0.0, 1.0)


def artefacts(x: torch.Tensor, gen: torch.Generator | None = None, tiles: int = 4) -> torch.Tensor:
    """Non-cells made from cell crops (outlier exposure, nothing from another lab): each image becomes
    one of a jigsaw of its own tiles (the stain and texture, no cell shape), a smudge (drawn with 5-10%
    of its pixels, then smoothly enlarged), or a cut cell (shifted by 0.45-0.7 of the side, the edge
    repeated: a cell cut by the field's border)."""
    b, c, h, w = x.shape
    kind = torch.randint(0, 3, (b,), generator=gen)
    out = x.clone()
    th, tw = h // tiles, w // tiles
    for i in torch.nonzero(kind == 0).flatten().tolist():
        grid = x[i, :, :th * tiles, :tw * tiles].reshape(c, tiles, th, tiles, tw).permute(1, 3, 0, 2, 4)
        grid = grid.reshape(tiles * tiles, c, th, tw)[torch.randperm(tiles * tiles, generator=gen)]
        grid = torch.rot90(grid, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
        out[i, :, :th * tiles, :tw * tiles] = grid.reshape(tiles, tiles, c, th, tw).permute(2, 0, 3, 1, 4).reshape(
            c, th * tiles, tw * tiles)
    for i in torch.nonzero(kind == 1).flatten().tolist():  # area-sampled down to 5-10% of the side, back up
        small = max(2, int(h * float(_uniform(1, 0.05, 0.1, gen))))
        out[i] = F.interpolate(F.interpolate(x[i:i + 1], size=(small, small), mode="area"), size=(h, w),
                               mode="bilinear", align_corners=False)[0]
    for i in torch.nonzero(kind == 2).flatten().tolist():
        dy, dx = (float(v) for v in _uniform(2, 0.45, 0.7, gen) * torch.where(torch.rand(2, generator=gen) < 0.5, -1, 1))
        sy, sx = int(dy * h), int(dx * w)
        shifted = torch.roll(x[i], shifts=(sy, sx), dims=(1, 2))
        ys = slice(0, sy) if sy > 0 else slice(h + sy, h)  # the rows rolled round: the edge row repeated instead
        xs = slice(0, sx) if sx > 0 else slice(w + sx, w)
        shifted[:, ys, :] = shifted[:, sy if sy > 0 else h + sy - 1, :][:, None, :]
        shifted[:, :, xs] = shifted[:, :, sx if sx > 0 else w + sx - 1][:, :, None]
        out[i] = shifted
    return out


class BatchAugment:
    """Training augmentation: uint8 B x S x S x 3 crops -> float B x 3 x size x size in [0, 1]."""

    def __init__(self, size: int, strengths: Augment | Mapping[str, Any] | None = None, seed: int = 0):
        self.size = size
        self.s = strengths_of(strengths)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch_u8: torch.Tensor) -> torch.Tensor:
        s, g = self.s, self.gen
        x = affine_warp(to_float(batch_u8), self.size, s.scale, s.shift, s.rotate_deg,
                        bool(s.dihedral), g)
        return self._photometric(x)

    def pairs(self, batch_u8: torch.Tensor, masks_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and their label masks (B x H x W uint8) through the same geometric warp (masks
        sampled nearest), then photometric jitter of the images only."""
        s, g = self.s, self.gen
        theta = affine_theta(tuple(masks_u8.shape), self.size, s.scale, s.shift, s.rotate_deg, bool(s.dihedral), g)
        x = warp(to_float(batch_u8), theta, self.size)
        m = warp(masks_u8[:, None].float(), theta, self.size, mode="nearest")[:, 0].round().to(torch.uint8)
        return self._photometric(x), m

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        s, g = self.s, self.gen
        x = hed_jitter(x.clamp(0.0, 1.0), s.hed, g)
        x = colour_jitter(x, s.hue, s.saturation, s.brightness, s.contrast, g)
        x = wright_cast(x, s.cast_p, s.cast_strength, g)
        x = channel_shuffle(x, s.shuffle_p, g)
        x = random_grayscale(x, s.gray_p, g)
        x = down_resolution(x, s.downres_p, s.downres_min, g)
        x = gaussian_blur(x, s.blur_p, s.blur_sigma, g)
        x = gaussian_noise(x, s.noise, g)
        return jpeg_artefacts(x, s.jpeg_p, s.jpeg_quality, g)

    def state(self) -> torch.Tensor:
        """The random generator's state (saved in checkpoints so a resumed run draws the same)."""
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


def eval_batch(batch_u8: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation input: uint8 crops -> float B x 3 x size x size, the central square, no jitter."""
    return center_crop(to_float(batch_u8), size)
