"""Detection datasets: read Pascal VOC, YOLO and COCO; clean boxes; write one YOLO dataset folder."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml
from PIL import Image

from smear.io import IMAGE_FORMATS, list_images, write_text_atomic
from smear.voc import read_voc_xml
from smear.errors import DataError, SmearError
from smear.taxonomy import CellKind, cell_kind

#: Detector class order (YOLO class ids).
DET_CLASSES: tuple[CellKind, ...] = (CellKind.WBC, CellKind.RBC, CellKind.PLATELET)
MIN_BOX_PX = 3.0


@dataclass
class Sample:
    """One annotated field: image path, size, boxes as (kind, xyxy), source tag."""

    image: Path
    width: int
    height: int
    boxes: list[tuple[CellKind, tuple[float, float, float, float]]] = field(default_factory=list)
    source: str = ""


@dataclass
class Problem:
    """A malformed annotation and what was done with it."""

    file: str
    reason: str
    action: str  # "clamped" | "dropped"

    def __str__(self) -> str:
        return f"{self.file}: {self.reason} ({self.action})"


class Loaded(NamedTuple):
    """What a dataset reader returns: the samples, and the annotation problems met (each fixed or
    dropped); it unpacks as ``samples, problems``."""

    samples: list[Sample]
    problems: list[Problem]


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when it is not a readable image."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def read_voc(folder: Path, source: str = "") -> Loaded:
    """A folder with ``images/`` and ``annotations/`` (Pascal VOC XML, one per image)."""
    folder = Path(folder)
    samples, problems = [], []
    for xml_path in sorted((folder / "annotations").glob("*.xml")):
        try:
            voc = read_voc_xml(xml_path)
        except DataError as exc:
            problems.append(Problem(str(xml_path), str(exc).removeprefix(f"{xml_path}: "), "dropped"))
            continue
        image = folder / "images" / Path(voc.filename).name
        if not image.exists():
            hits = [p for p in (folder / "images").glob(xml_path.stem + ".*")]
            if not hits:
                problems.append(Problem(str(xml_path), "image file not found", "dropped"))
                continue
            image = hits[0]
        size = _image_size(image)
        if size is None:
            problems.append(Problem(str(image), "not a readable image", "dropped"))
            continue
        w, h = size
        sample = Sample(image, w, h, source=source or folder.parent.name)
        for label, xyxy in voc.objects:
            try:
                kind = cell_kind(label)
            except SmearError:
                xyxy = None
            if xyxy is None:
                problems.append(Problem(str(xml_path), f"unknown class or bad box {label!r}", "dropped"))
                continue
            sample.boxes.append((kind, xyxy))
        samples.append(sample)
    return Loaded(samples, problems)


def _read_yolo_names(data_yaml: Path) -> dict[int, str]:
    spec = yaml.safe_load(data_yaml.read_text())
    names = spec.get("names", {})
    return dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}


def _source_map(root: Path) -> dict[str, str]:
    """Image file name -> source tag: TXL-PBC's metadata.csv, or the sources.csv of a converted folder."""
    mapping: dict[str, str] = {}
    for name, key, value in (("metadata.csv", 0, 1), ("sources.csv", 1, 2)):
        if (root / name).exists():
            with (root / name).open(newline="") as fh:
                rows = list(csv.reader(fh))
            mapping.update({r[key]: r[value] for r in rows[1:] if len(r) > value})
    return mapping


def read_yolo_images(images: Path, names: dict[int, str], source: str = "",
                     sources: dict[str, str] | None = None) -> Loaded:
    """A folder of images whose labels sit in the parallel ``labels`` folder (YOLO txt rows)."""
    images = Path(images)
    labels = Path(str(images).replace(f"{os.sep}images", f"{os.sep}labels", 1))
    if labels == images:
        labels = images
    samples, problems = [], []
    for image in list_images(images):
        size = _image_size(image)
        if size is None:
            problems.append(Problem(str(image), "not a readable image", "dropped"))
            continue
        w, h = size
        src = (sources or {}).get(image.name, source)
        sample = Sample(image, w, h, source=src)
        txt = labels / (image.stem + ".txt")
        rows = txt.read_text().split("\n") if txt.exists() else []
        for i, row in enumerate(r for r in rows if r.strip()):
            parts = row.split()
            try:
                cls = int(float(parts[0]))
                cx, cy, bw, bh = (float(v) for v in parts[1:5])
                kind = cell_kind(names[cls])
            except (ValueError, IndexError, KeyError, SmearError):
                problems.append(Problem(f"{txt}:{i + 1}", f"bad row {row.strip()!r}", "dropped"))
                continue
            sample.boxes.append((kind, ((cx - bw / 2) * w, (cy - bh / 2) * h,
                                        (cx + bw / 2) * w, (cy + bh / 2) * h)))
        samples.append(sample)
    return Loaded(samples, problems)


def read_coco(json_path: Path, images_dir: Path | None = None, source: str = "") -> Loaded:
    """A COCO detection JSON; image files are looked up beside it or in ``images_dir``."""
    json_path = Path(json_path)
    spec = json.loads(json_path.read_text())
    base = Path(images_dir) if images_dir else json_path.parent
    cats = {c["id"]: c["name"] for c in spec.get("categories", [])}
    by_id: dict[int, Sample] = {}
    for im in spec.get("images", []):
        path = base / im["file_name"]
        if not path.exists() and (base / "images" / im["file_name"]).exists():
            path = base / "images" / im["file_name"]
        by_id[im["id"]] = Sample(path, int(im["width"]), int(im["height"]), source=source)
    problems = []
    for ann in spec.get("annotations", []):
        sample = by_id.get(ann.get("image_id"))
        try:
            kind = cell_kind(cats[ann["category_id"]])
            x, y, bw, bh = (float(v) for v in ann["bbox"])
        except (KeyError, ValueError, SmearError):
            problems.append(Problem(str(json_path), f"annotation {ann.get('id')}: bad class or box", "dropped"))
            continue
        if sample is None:
            problems.append(Problem(str(json_path), f"annotation {ann.get('id')}: unknown image", "dropped"))
            continue
        sample.boxes.append((kind, (x, y, x + bw, y + bh)))
    return Loaded(list(by_id.values()), problems)


def load_dataset(path: str | Path, split: str = "test") -> Loaded:
    """Read VOC folder, YOLO data.yaml (its ``split``), COCO JSON, or a YOLO images folder."""
    path = Path(path)
    if not path.exists():
        raise SmearError(f"{path}: no such dataset")
    if path.suffix == ".json":
        samples, problems = read_coco(path)
    elif path.suffix in (".yaml", ".yml"):
        spec = yaml.safe_load(path.read_text())
        root = Path(spec.get("path") or ".")
        root = root if root.is_absolute() else (path.parent / root)
        if split not in spec:
            raise SmearError(f"{path}: no split {split!r}", hint=f"splits: {[k for k in spec if k != 'names']}")
        images = Path(spec[split])
        images = images if images.is_absolute() else root / images
        samples, problems = read_yolo_images(images, _read_yolo_names(path), sources=_source_map(root))
    elif (path / "annotations").is_dir():
        samples, problems = read_voc(path)
    elif path.is_dir():
        yaml_up = [p for p in (path.parent.parent / "data.yaml", path / "data.yaml") if p.exists()]
        names = _read_yolo_names(yaml_up[0]) if yaml_up else {0: "WBC", 1: "RBC", 2: "Platelets"}
        root = yaml_up[0].parent if yaml_up else path
        images = path / "images" if (path / "images").is_dir() else path
        samples, problems = read_yolo_images(images, names, source=path.name, sources=_source_map(root))
    else:
        raise SmearError(f"{path}: not a detection dataset",
                         hint="give a VOC folder, a YOLO data.yaml, a COCO .json or a YOLO images folder")
    cleaned, more = clean_boxes(samples)
    return Loaded(cleaned, problems + more)


def clean_boxes(samples: list[Sample], min_px: float = MIN_BOX_PX) -> Loaded:
    """Clamp boxes to the image; drop tiny, empty and repeated ones; report each fix."""
    problems = []
    for s in samples:
        kept = []
        for kind, (x0, y0, x1, y1) in s.boxes:
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            cx0, cy0 = max(0.0, x0), max(0.0, y0)
            cx1, cy1 = min(float(s.width), x1), min(float(s.height), y1)
            if cx1 - cx0 < min_px or cy1 - cy0 < min_px:
                problems.append(Problem(str(s.image), f"{kind.value} box {x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}"
                                        f" is empty, tiny or outside the image", "dropped"))
                continue
            overshoot = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1)
            if overshoot >= 1.0:  # sub-pixel overshoots are rounding in normalised labels
                problems.append(Problem(str(s.image), f"{kind.value} box {x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}"
                                        f" crosses the image border", "clamped"))
            box = (cx0, cy0, cx1, cy1)
            if any(k == kind and max(abs(a - b) for a, b in zip(box, other)) < 1.0 for k, other in kept):
                problems.append(Problem(str(s.image), f"{kind.value} box {x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}"
                                        f" repeats an earlier box of the same cell", "dropped"))
                continue  # a cell labelled twice would count as a miss for any detector
            kept.append((kind, box))
        s.boxes = kept
    return Loaded(samples, problems)


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A fixed, seeded split of samples into (rest, holdout)."""
    order = sorted(samples, key=lambda s: s.image.name)
    random.Random(seed).shuffle(order)
    n = int(round(len(order) * fraction))
    return order[n:], order[:n]


def write_yolo_dataset(splits: dict[str, list[Sample]], out: Path) -> Path:
    """Write images (symlinked), labels and a data.yaml with absolute paths; returns data.yaml."""
    out = Path(out).resolve()
    rows = [("split", "image", "source", "original")]
    for split, samples in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for s in samples:
            tag = (s.source or "data").replace(" ", "_").replace(os.sep, "_")
            name = f"{tag}__{s.image.name}"
            link = out / "images" / split / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(s.image.resolve())
            lines = []
            for kind, (x0, y0, x1, y1) in s.boxes:
                cls = DET_CLASSES.index(kind)
                lines.append(f"{cls} {(x0 + x1) / 2 / s.width:.6f} {(y0 + y1) / 2 / s.height:.6f} "
                             f"{(x1 - x0) / s.width:.6f} {(y1 - y0) / s.height:.6f}")
            write_text_atomic(out / "labels" / split / (Path(name).stem + ".txt"), "\n".join(lines) + "\n")
            rows.append((split, name, s.source, str(s.image)))
    write_text_atomic(out / "sources.csv", "\n".join(",".join(r) for r in rows) + "\n")
    spec = {"path": str(out), **{k: str(out / "images" / k) for k in splits},
            "names": {i: k.value for i, k in enumerate(DET_CLASSES)}}
    return write_text_atomic(out / "data.yaml", yaml.safe_dump(spec, sort_keys=False))
