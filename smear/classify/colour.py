"""Moved to ``smear.nn.colour`` (the input normalisation both networks share); kept so old imports work."""

from smear.nn.colour import ColourNorm, lab_stats, lab_to_rgb, reference_stats, reinhard, rgb_to_lab  # noqa: F401
