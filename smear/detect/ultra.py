"""The one place that imports ultralytics: offline set-up and thread restoration."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path


def _font_source() -> Path | None:
    try:
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return font if font.exists() else None
    except ImportError:
        return None


def setup_offline() -> None:
    """Keep ultralytics from reaching the network: offline flag and a config dir holding its font."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        cfg_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smear" / "ultralytics"
        os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    font_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    src = _font_source()
    if src is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (font_dir / name).exists():
                font_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, font_dir / name)


def ultralytics():
    """Import ultralytics after the offline set-up, restoring torch's thread count."""
    from smear.devices import set_threads

    setup_offline()
    # ultralytics binds its log handler to sys.stdout when imported (and announces a new settings
    # file on first use): import it with stdout pointed at stderr, so reports on stdout stay clean
    with contextlib.redirect_stdout(sys.stderr):
        import ultralytics as ul  # noqa: PLC0415

    set_threads()
    return ul


def yolo(model: str | Path, task: str = "detect"):
    """An ultralytics YOLO model from a model YAML (no download) or a .pt file of ours."""
    from smear.devices import set_threads

    ul = ultralytics()
    m = ul.YOLO(str(model), task=task)
    set_threads()
    return m


def export_onnx(weights: str | Path, dest: str | Path, imgsz: int, batch: int = 8) -> Path:
    """ONNX of a YOLO .pt (dynamic batch and shape, simplified), written to ``dest``; the export runs
    in a scratch folder beside ``dest`` so the model folder itself is never written to."""
    import tempfile

    from smear.devices import set_threads

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        pt = Path(tmp) / "model.pt"
        shutil.copyfile(weights, pt)
        out = yolo(pt).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, batch=batch, verbose=False)
        set_threads()
        os.replace(out, dest)
    return dest
