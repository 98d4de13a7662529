"""Torch code both networks (classifier and U-Net) share; it imports no stage."""
