"""A network's weights as safetensors: the one save/load round trip of every model folder's torch weights."""

from __future__ import annotations

from pathlib import Path

import torch


def save_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the model's state dict as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return Path(path)


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a safetensors state dict into ``model`` (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model
