"""Moved to ``smear.nn.augment`` (shared by the classifier and the U-Net); kept so old imports work."""

from smear.nn.augment import *  # noqa: F403
from smear.nn.augment import DEFAULTS, BatchAugment, center_crop, eval_batch, to_float, to_uint8  # noqa: F401
