"""The detector network: ultralytics YOLO objects from smear's model files, and weights without a pickle: a safetensors state dict plus the network's YAML, both written
by smear. Loading one builds the network from the checked YAML (plain layer names and literal
arguments, no ``activation`` string for ultralytics to eval) and copies the tensors in: nothing in the
model folder is ever run. ``python -m smear.detect.network FOLDER`` converts a folder holding an
ultralytics ``.pt`` once (restricted unpickling, after the pickle check)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from smear.errors import ModelError

NETWORK = "network.yaml"
WEIGHTS = "detector.safetensors"
#: the keys of an ultralytics detection model YAML that smear writes and reads
_KEYS = frozenset({"nc", "scales", "scale", "backbone", "head", "yaml_file", "channels", "ch", "depth_multiple",
                   "width_multiple", "reg_max", "end2end"})


def _literal(value: Any) -> bool:
    """Whether a layer argument is a plain literal (numbers, bools, None, short strings, lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 64)


def _layer_class(name: str):
    """The ``torch.nn.Module`` subclass a layer name stands for in ultralytics' parse_model, else None."""
    import torch

    from ultralytics.nn import tasks

    if name.startswith("nn."):
        obj = getattr(torch.nn, name[3:], None)
    elif name.isidentifier():
        obj = vars(tasks).get(name)
    else:
        obj = None
    return obj if isinstance(obj, type) and issubclass(obj, torch.nn.Module) else None


def check_network(cfg: Any, where: str | Path) -> dict[str, Any]:
    """``cfg`` if it is a detection network YAML smear would write: known keys only (no ``activation``),
    every layer ``[from, repeats, LayerClass, [literal args]]`` naming a torch or ultralytics layer
    class; else ModelError naming ``where`` and the key."""
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: not a network YAML mapping")
    extra = sorted(set(cfg) - _KEYS)
    if extra:
        raise ModelError(f"{where}: key {extra[0]!r} is not one smear writes; refusing the network",
                         hint="a detector's network.yaml holds layers and sizes only (an activation string would be run)")
    for part in ("backbone", "head"):
        layers = cfg.get(part)
        if not isinstance(layers, list) or not layers:
            raise ModelError(f"{where}: key {part!r} missing or not a list of layers")
        for i, layer in enumerate(layers):
            ok = (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)
                  and isinstance(layer[1], int) and isinstance(layer[3], list) and _literal(layer[0])
                  and _literal(layer[3]) and _layer_class(layer[2]) is not None)
            if not ok:
                raise ModelError(f"{where}: key {part!r}, layer {i} is not [from, n, LayerClass, [literal args]]"
                                 f" with a torch or ultralytics layer: {str(layer)[:80]}")
    for key in ("scales",):
        if key in cfg and not (isinstance(cfg[key], dict) and all(_literal(v) for v in cfg[key].values())):
            raise ModelError(f"{where}: key {key!r} is not a mapping of numbers")
    for key in ("nc", "channels", "ch", "reg_max"):
        if key in cfg and not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] > 0):
            raise ModelError(f"{where}: key {key!r} must be a positive integer")
    return cfg


def read_network(path: str | Path) -> dict[str, Any]:
    """A checked network YAML (``yaml.safe_load``: no Python tags)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: network YAML missing (a safetensors detector needs its {NETWORK})")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from exc
    return check_network(cfg, path)


def build_network(cfg: dict[str, Any], nc: int):
    """An ultralytics DetectionModel built from a checked ``cfg`` with ``nc`` classes (random weights),
    under ultralytics' restricted model construction where it has one (no eval of YAML strings)."""
    from smear.detect.ultralytics_adapter import ultralytics

    ultralytics()
    from ultralytics.nn import tasks

    cfg = json.loads(json.dumps(cfg))  # parse_model edits the layer lists in place
    safe = getattr(tasks, "_SafeLoad", None)
    local = getattr(safe, "_local", None)
    before = getattr(local, "active", False)
    if local is not None:
        local.active = True
    try:
        model = tasks.DetectionModel(cfg, ch=int(cfg.get("channels", 3)), nc=nc, verbose=False)
    finally:
        if local is not None:
            local.active = before
    return model


def load_network(weights: str | Path, network: str | Path, classes: list[str] | tuple[str, ...]):
    """The detector network of a safetensors state dict and its network YAML, in float32 and eval mode;
    ModelError naming the file when the tensors do not fit the network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(weights)
    model = build_network(read_network(network), len(classes))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ModelError(f"{weights}: tensors do not fit {Path(network).name} with {len(classes)} classes "
                         f"({first[1].strip()[:120] if len(first) > 1 else first[0][:120]})") from exc
    model = model.float().eval()
    model.names = dict(enumerate(classes))
    model.pt_path = str(weights)
    return model


def save_network(model, folder: str | Path, name: str = WEIGHTS) -> Path:
    """Write a DetectionModel's state dict (dtypes as they are) and its network YAML into ``folder``."""
    from safetensors.torch import save_file

    from smear.io import atomic_path, write_text_atomic

    folder = Path(folder)
    cfg = {k: v for k, v in dict(model.yaml).items() if k in _KEYS}
    check_network(cfg, folder / NETWORK)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / name) as tmp:
        save_file(state, str(tmp))
    write_text_atomic(folder / NETWORK, yaml.safe_dump(cfg, sort_keys=False))
    return folder / name


def read_pt(path: str | Path):
    """The network of an ultralytics ``.pt`` of smear's (a training run's best.pt): pickle-checked,
    then unpickled with torch's ``weights_only`` loader and ultralytics' restricted model construction."""
    import torch

    from smear.artifacts import check_torch_file
    from smear.detect.ultralytics_adapter import allowed_global, ultralytics

    ultralytics()
    from ultralytics.nn import tasks

    check_torch_file(path, allowed_global)
    try:
        ckpt, _ = tasks.torch_safe_load(str(path), safe_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler raises several kinds
        raise ModelError(f"{path}: refusing to load it under restricted unpickling ({str(exc).splitlines()[0][:160]})",
                         hint="model folders are loaded without running code they hold") from exc
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path}: holds no detector network")
    return model  # tensors kept as trained (half precision): the loader makes them float32


def convert_folder(folder: str | Path) -> Path:
    """Convert a detector model folder whose weights are an ultralytics ``.pt`` into
    ``detector.safetensors`` + ``network.yaml`` (the .pt is removed, meta.json's ``weights`` and
    ``head_hash`` updated); a folder already converted only gets its head hash."""
    from smear.artifacts import META, ModelMeta, add_head_hash, save_model_dir

    folder = Path(folder)
    meta = ModelMeta.of(json.loads((folder / META).read_text(encoding="utf-8")), folder)
    if meta.stage != "detect":
        raise ModelError(f"{folder}: not a detector model folder")
    pt = meta.weights_path
    if pt.suffix == ".pt":
        save_network(read_pt(pt), folder)
        save_model_dir(meta.updated(weights=WEIGHTS, network=NETWORK))  # with its head hash
        pt.unlink()
    else:
        add_head_hash(folder)
    return folder


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".onnx", ".yaml", ".yml")


def _wrapped(ul, network, task: str):
    """An ultralytics YOLO object around a network built by smear (``smear.detect.network``)."""

    class _Built(ul.YOLO):
        def _new(self, cfg, task=None, verbose=False):
            from ultralytics.cfg import DEFAULT_CFG_DICT

            self.cfg, self.task, self.model, self.model_name = cfg, task or "detect", network, cfg
            self.overrides.update(model=cfg, task=self.task)
            self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}
            self.model.task = self.task

    return _Built(str(Path(network.pt_path).with_suffix(".yaml")), task=task)


def yolo(model: str | Path, task: str = "detect", classes=("wbc", "rbc", "platelet")):
    """An ultralytics YOLO model from a model YAML (no download), from smear's safetensors weights and
    their network YAML (no pickle), from a training run's .pt (pickle-checked, then unpickled with
    torch's weights_only loader) or from an ONNX file."""
    from smear.artifacts import check_torch_file
    from smear.detect.ultralytics_adapter import allowed_global, ultralytics
    from smear.devices import set_threads

    path = Path(model)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: detector weights must be a .safetensors, .pt, .onnx or model .yaml file",
                         hint="other formats ultralytics reads (TorchScript, ...) can run code")
    if suffix in (".safetensors", ".pt", ".onnx") and not path.is_file():
        raise ModelError(f"{path}: detector weights not found")  # ultralytics would try to download it
    ul = ultralytics()
    if suffix == ".safetensors":
        m = _wrapped(ul, load_network(path, path.with_name(NETWORK), list(classes)), task)
    else:
        if suffix == ".pt":
            check_torch_file(path, allowed_global)
        m = ul.YOLO(str(model), task=task)
    set_threads()
    return m


def export_onnx(weights: str | Path, dest: str | Path, imgsz: int, batch: int = 8,
                classes=("wbc", "rbc", "platelet")) -> Path:
    """ONNX of a detector's weights (dynamic batch and shape, simplified), written to ``dest``; the
    export runs in a scratch folder beside ``dest`` so the model folder itself is never written to."""
    import tempfile

    from smear.devices import set_threads

    dest = Path(dest)
    model = yolo(weights, classes=classes)  # checked and built from the model folder's own files
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        model.model.pt_path = str(Path(tmp) / "model.pt")  # ultralytics writes the export beside this name
        out = model.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, batch=batch, verbose=False)
        set_threads()
        os.replace(out, dest)  # atomic: the scratch folder is beside dest
    return dest


def main(argv: list[str]) -> int:
    """``python -m smear.detect.network FOLDER...``: convert each detector folder (see convert_folder)."""
    if not argv:
        print("usage: python -m smear.detect.network DETECTOR_FOLDER...", file=sys.stderr)
        return 2
    for arg in argv:
        print(convert_folder(arg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
