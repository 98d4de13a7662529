"""Segmentation data: WBC crops and label masks, cut with the pipeline's crop geometry.

Label values in every mask here: 0 background, 1 cytoplasm, 2 nucleus, and two partial labels:
``NOT_NUCLEUS`` (254, known not to be nucleus, cytoplasm or background unknown: the pixels around
a nucleus in nucleus-only masks) and ``IGNORE`` (255, unknown).

Sources (a folder with ``images/`` and ``masks/``, same stems):
- three-level crops (wbc-seg ``jtsc``, ``cellavision``): mask 0 / 128 / 255 = background /
  cytoplasm / nucleus, one WBC centred; the cell's box is the bounding box of its mask.
- nucleus-only fields (wbc-seg ``bccd-nucleus``): full fields, mask 255 = WBC nucleus. One crop per
  WBC, around the WBC box of the matching Pascal VOC annotation (``boxes_root``, e.g. the bccd
  folder) or, without one, around a group of nucleus components widened by ``NUCLEUS_TO_CELL``.
Which kind a source is, is read from its masks (a three-level mask has mid-grey pixels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from smear.config_models import SegmentData
from smear.crops import cut_crop, pad_value
from smear.io import image_pixels, list_images, read_image
from smear.voc import read_voc_xml
from smear.errors import DataError, ImageReadError

BACKGROUND, CYTOPLASM, NUCLEUS, NOT_NUCLEUS, IGNORE = 0, 1, 2, 254, 255
#: WBC box side / nucleus-group box side, when a field has no box annotation (BCCD median ~1.35)
NUCLEUS_TO_CELL = 1.35
#: nucleus components closer than this fraction of the field's short side are one cell's lobes
LOBE_GAP = 0.04


@dataclass(frozen=True)
class SegItem:
    """A crop, its label mask (same H x W) and where it came from."""

    image: np.ndarray
    mask: np.ndarray
    source: str
    name: str  # image stem (several crops of one field share it)

    @property
    def has_cell_labels(self) -> bool:
        """Whether background and cytoplasm are told apart (three-level masks)."""
        return not bool(np.isin(self.mask, (NOT_NUCLEUS,)).any())


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f"{folder}: expected images/ and masks/ folders")
    by_stem = {p.stem: p for p in list_images(masks)}
    pairs, missing = [], []
    for p in list_images(images):
        (pairs.append((p, by_stem[p.stem])) if p.stem in by_stem else missing.append(p.name))
    if not pairs:
        raise DataError(f"{folder}: no image with a mask of the same name")
    return pairs


def read_mask(path: Path) -> np.ndarray:
    """A grey mask file as uint8 H x W."""
    # OpenCV decodes many more formats than the README lists: the header must be one of those first
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if image_pixels(path) else None
    if m is None:
        raise DataError(f"{path}: cannot read the mask")
    return m


def three_level_labels(grey: np.ndarray) -> np.ndarray:
    """0 / 128 / 255 grey (with compression noise) -> 0 background / 1 cytoplasm / 2 nucleus."""
    return np.digitize(grey, [64, 192]).astype(np.uint8)


def is_three_level(mask_paths: list[Path], probe: int = 5) -> bool:
    """Whether a source's masks mark cytoplasm (mid-grey) as well as nucleus."""
    for p in mask_paths[:probe]:
        m = read_mask(p)
        if ((m > 64) & (m < 192)).mean() > 0.001:
            return True
    return False


def voc_wbc_boxes(root: Path | None, stem: str) -> list[tuple[float, float, float, float]] | None:
    """WBC boxes of ``stem`` from a VOC annotation under ``root`` (any ``annotations/`` below it)."""
    if root is None:
        return None
    for xml in Path(root).glob(f"**/annotations/{stem}.xml"):
        voc = read_voc_xml(xml)
        bad = [name for name, box in voc.objects if name.lower() == "wbc" and box is None]
        if bad:
            raise DataError(f"{xml}: a WBC object without a readable box")
        return [box for name, box in voc.objects if name.lower() == "wbc" and box is not None]
    return None


def nucleus_groups(nucleus: np.ndarray, gap_frac: float = LOBE_GAP, min_px: int = 30
                   ) -> list[tuple[float, float, float, float]]:
    """WBC boxes guessed from a nucleus mask: components within ``gap_frac`` of the short side of
    each other are one cell; the group's box is widened by ``NUCLEUS_TO_CELL``."""
    gap = max(3, int(round(gap_frac * min(nucleus.shape))))
    grown = cv2.dilate(nucleus.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (gap, gap)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(grown)
    boxes = []
    for k in range(1, n):
        ys, xs = np.nonzero((lab == k) & (nucleus > 0))
        if len(xs) < min_px:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * NUCLEUS_TO_CELL / 2
        boxes.append((cx - half, cy - half, cx + half, cy + half))
    return boxes


def load_source(folder: str | Path, margin: float, size: int | None = None, boxes_root: str | Path | None = None,
                source: str | None = None, skipped: list[str] | None = None) -> list[SegItem]:
    """Crops and masks of one source folder, each cut ``margin`` x the cell's box (``size`` px
    square, or native size when ``None``); the source name defaults to the folder name. With a
    ``skipped`` list, an image that cannot be read is left out and its reason added to the list."""
    folder = Path(folder)
    pairs = _pairs(folder)
    source = source or folder.name
    three = is_three_level([m for _, m in pairs])
    items = []
    for img_path, mask_path in pairs:
        try:
            image = read_image(img_path)
        except ImageReadError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            continue
        grey = read_mask(mask_path)
        if grey.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask is {grey.shape[1]}x{grey.shape[0]}, "
                            f"image is {image.shape[1]}x{image.shape[0]}")
        fill = pad_value(image)
        if three:
            labels = three_level_labels(grey)
            ys, xs = np.nonzero(labels)
            if len(xs) == 0:
                continue
            boxes = [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]
            pad_label = BACKGROUND
        else:
            labels = np.where(grey > 127, NUCLEUS, NOT_NUCLEUS).astype(np.uint8)
            boxes = voc_wbc_boxes(Path(boxes_root) if boxes_root else None, img_path.stem)
            if boxes is None:
                boxes = nucleus_groups(grey > 127)
            pad_label = NOT_NUCLEUS
        for box in boxes:
            items.append(SegItem(cut_crop(image, box, margin, size, fill),
                                 cut_crop(labels, box, margin, size, pad_label, nearest=True),
                                 source, img_path.stem))
    if not items:
        raise DataError(f"{folder}: no cell found in the masks")
    return items


def find_sources(path: str | Path) -> list[Path]:
    """The source folders under ``path``: itself when it holds images/ and masks/, else its
    subfolders that do."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder")
    if (path / "images").is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())
    if not found:
        raise DataError(f"{path}: no images/ + masks/ folder in it or below it")
    return found


def split_names(names: list[str], fractions: tuple[float, float], seed: int) -> dict[str, str]:
    """Assign each distinct name to 'val' or 'test' (by the two fractions) or 'train', seeded."""
    uniq = sorted(set(names))
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_val, n_test = (int(round(f * len(uniq))) for f in fractions)
    part = {}
    for rank, i in enumerate(order):
        part[uniq[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return part


def assign_parts(items: list[SegItem], val: float, test: float, seed: int,
                 test_names: set[str] | None = None) -> dict[str, list[SegItem]]:
    """Split one source's items by image: ``test_names`` (when given) are the test part and the rest
    is split into val/train; otherwise seeded val/test fractions. Crops of one image stay together."""
    names = [it.name for it in items]
    if test_names is not None:
        part = split_names([n for n in names if n not in test_names], (val, 0.0), seed)
        part.update({n: "test" for n in names if n in test_names})
    else:
        part = split_names(names, (val, test), seed)
    out: dict[str, list[SegItem]] = {"train": [], "val": [], "test": []}
    for it in items:
        out[part[it.name]].append(it)
    return out


def names_in(folder: str | Path | None) -> set[str] | None:
    """Stems of the images in a folder (e.g. bccd/test/images: fields kept out of training)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (data.test_fields)")
    return {p.stem for p in list_images(folder)}


def load_parts(d: SegmentData, margin: float, size: int | None, log: Callable[[str], None] | None = None,
               skipped: list[str] | None = None) -> dict[str, list[SegItem]]:
    """train / val / test items of every source named by a ``data:`` config section (the holdout
    source: all in test), cut ``margin`` x the cell box at ``size`` px (``None``: native). Images
    that cannot be read are skipped, logged and added to ``skipped``."""
    log = log or (lambda _m: None)
    skipped = [] if skipped is None else skipped
    root = Path(os.path.expanduser(str(d.root)))
    sources = find_sources(root)
    if d.sources:
        wanted = set(d.sources) | ({d.holdout} if d.holdout else set())
        unknown = wanted - {s.name for s in sources}
        if unknown:
            raise DataError(f"{root}: no source {', '.join(sorted(unknown))}",
                            hint=f"sources here: {', '.join(s.name for s in sources)}")
        sources = [s for s in sources if s.name in wanted]
    if d.holdout and d.holdout not in {s.name for s in sources}:
        raise DataError(f"{root}: holdout source {d.holdout!r} not found")
    test_fields = names_in(os.path.expanduser(str(d.test_fields))) if d.test_fields else None
    boxes = os.path.expanduser(str(d.boxes_root)) if d.boxes_root else None
    parts: dict[str, list[SegItem]] = {"train": [], "val": [], "test": []}
    for src in sources:
        before = len(skipped)
        items = load_source(src, margin, size, boxes, skipped=skipped)
        for reason in skipped[before:]:
            log(f"warning: skipped {reason}")
        if src.name == d.holdout:
            parts["test"] += items
            log(f"data: {src.name}: {len(items)} crops, all held out for test")
            continue
        nucleus_only = not items[0].has_cell_labels
        split = assign_parts(items, float(d.val_fraction), float(d.test_fraction), int(d.split_seed),
                             test_fields if nucleus_only else None)
        for k in parts:
            parts[k] += split[k]
        log(f"data: {src.name}: {len(split['train'])} train, {len(split['val'])} val, {len(split['test'])} test crops")
    return parts
