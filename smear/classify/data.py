"""Single-cell datasets as lists of labelled images; a stratified, reproducible split.

Labels follow the taxonomy in ``smear.types``. An item carries its fine class when the dataset
gives one, and always its 8-group. PBC's ``NEUTROPHIL_*`` and ``IG_*`` files (and class folders
named only by a group, e.g. ``neutrophil``) have no fine class: they keep ``fine=None`` and
train through a group-level loss term, the negative log of the summed fine probabilities
inside their group (``-log sum_{c in group} p_c``; see ``smear.classify.train.mixed_loss``), so
they teach "neutrophil, stage unknown" without pretending to know the stage.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smear.io import list_images, read_json, write_text_atomic
from smear.errors import SmearError
from smear.taxonomy import FINE_TO_GROUP8, fine_class, group8_of

SPLIT_NAMES = ("train", "val", "test")

#: how to deal with a class outside the taxonomy (the class list is fixed; a model's meta names it)
CLASS_LIST_HINT = ("rename it to one of SNE, BNE, MMY, MY, PMY, EO, BA, LY, MO, ERB, PLATELET (or a group: "
                   "neutrophil, ig, ...) or move it out of the dataset; to extend the class list, add the class "
                   "to FINE_CLASSES, FINE_NAMES, FINE_TO_GROUP8 (a new group also to GROUPS8), FINE_TO_TYPE5 "
                   "and _FINE_ALIASES in smear/taxonomy.py and train from scratch")


@dataclass(frozen=True)
class Item:
    """One labelled single-cell image: its path, fine class (None: group only) and 8-group."""

    path: Path
    fine: str | None
    group: str

    @property
    def stratum(self) -> str:
        """The fine class, or ``group:<name>`` for group-only items (what splits stratify on)."""
        return self.fine if self.fine is not None else f"group:{self.group}"


def label_from_name(name: str) -> tuple[str | None, str | None]:
    """``(fine, group)`` for a class name, prefix or folder name; ``(None, None)`` if unknown."""
    fine = fine_class(name)
    if fine is not None:
        return fine, FINE_TO_GROUP8[fine]
    return None, group8_of(name)


def pbc_prefix(path: str | Path) -> str:
    """The class prefix of a PBC file name: ``SNE_1234.jpg`` -> ``SNE``."""
    stem = Path(path).stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def load_pbc(root: str | Path) -> list[Item]:
    """PBC as published: ``root/<group>/<PREFIX>_<id>.jpg``; the fine class is the prefix.

    Files whose prefix names only a group (NEUTROPHIL, IG) are kept with ``fine=None``.
    A prefix that is neither a fine class nor a group, or disagrees with its folder, is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise SmearError(f"{root}: PBC folder not found", hint="set data.root to the PBC folder")
    items: list[Item] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        folder_group = group8_of(folder.name)
        for path in list_images(folder):
            prefix = pbc_prefix(path)
            fine, group = label_from_name(prefix)
            if group is None:
                where = f"class folder {folder.name!r}" if folder_group is None else f"{path.name}"
                raise SmearError(f"{root}: {where}: unknown PBC class prefix {prefix!r}, not in the taxonomy",
                                 hint=CLASS_LIST_HINT)
            if folder_group is not None and folder_group != group:
                raise SmearError(f"{path}: prefix {prefix!r} is a {group}, but the folder is {folder.name!r}")
            items.append(Item(path, fine, group))
    if not items:
        raise SmearError(f"{root}: no images found in class folders")
    return items


def load_folders(root: str | Path) -> list[Item]:
    """A class-per-folder dataset: ``root/<class>/*.png``; folder names are fine class or group
    names in any spelling the taxonomy knows (``Lymphocyte``, ``neutrophil``, ``PMY`` ...)."""
    root = Path(root)
    if not root.is_dir():
        raise SmearError(f"{root}: dataset folder not found")
    items: list[Item] = []
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        fine, group = label_from_name(folder.name)
        if group is None:
            unknown.append(folder.name)
            continue
        items.extend(Item(p, fine, group) for p in list_images(folder))
    if unknown:
        raise SmearError(f"{root}: class folder{'s' if len(unknown) > 1 else ''} not in the taxonomy: "
                         f"{', '.join(unknown)}", hint=CLASS_LIST_HINT)
    if not items:
        raise SmearError(f"{root}: no images found in class folders")
    return items


def load_labels_csv(root: str | Path, csv_name: str = "labels.csv", image_dir: str = "images") -> list[Item]:
    """A table-labelled dataset: ``root/labels.csv`` with columns ``image,label`` (image = file
    name or stem inside ``root/images``), labels any class or group name (e.g. wbc-seg's 5 types)."""
    import csv

    root = Path(root)
    table = root / csv_name
    if not table.is_file():
        raise SmearError(f"{table}: label table not found")
    files = {p.stem: p for p in list_images(root / image_dir)} if (root / image_dir).is_dir() else {}
    items: list[Item] = []
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = (row.get("image") or "").strip()
            path = root / image_dir / name if (root / image_dir / name).is_file() else files.get(Path(name).stem)
            if path is None:
                raise SmearError(f"{table}: image {name!r} not found in {root / image_dir}")
            fine, group = label_from_name(row.get("label") or "")
            if group is None:
                raise SmearError(f"{table}: label {row.get('label')!r} of {name!r} is not in the taxonomy")
            items.append(Item(path, fine, group))
    return items


def is_pbc_layout(root: str | Path) -> bool:
    """True when some image's file-name prefix names a class (PBC style)."""
    root = Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in list_images(folder)[:5]:
            if label_from_name(pbc_prefix(path))[1] is not None and "_" in path.stem:
                return True
    return False


def load_items(root: str | Path, layout: str = "auto") -> list[Item]:
    """Items of a dataset; ``layout``: ``pbc``, ``folders``, ``csv`` (labels.csv + images/) or ``auto``."""
    root = Path(root)
    if layout == "auto":
        if not root.is_dir():
            raise SmearError(f"{root}: dataset folder not found")
        layout = ("csv" if (root / "labels.csv").is_file() else
                  "pbc" if is_pbc_layout(root) else "folders")
    if layout == "pbc":
        return load_pbc(root)
    if layout == "folders":
        return load_folders(root)
    if layout == "csv":
        return load_labels_csv(root)
    raise SmearError(f"unknown dataset layout {layout!r}", hint="use pbc, folders, csv or auto")


def class_counts(items: Sequence[Item]) -> dict[str, int]:
    """Counts per stratum (fine class, or ``group:<name>`` for group-only items)."""
    return dict(sorted(Counter(it.stratum for it in items).items()))


def stratified_split(items: Sequence[Item], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> tuple[list[Item], list[Item], list[Item]]:
    """Train/val/test lists, each stratum (fine class, or group for group-only items) split by
    ``fractions`` after a seeded shuffle; independent of the input order."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SmearError(f"split fractions {tuple(fractions)} must be 3 non-negative numbers summing to 1")
    by_stratum: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_stratum[it.stratum].append(it)
    rng = np.random.default_rng(seed)
    out: tuple[list[Item], list[Item], list[Item]] = ([], [], [])
    for stratum in sorted(by_stratum):
        group = sorted(by_stratum[stratum], key=lambda it: str(it.path))
        order = rng.permutation(len(group))
        n_val = int(round(len(group) * fractions[1]))
        n_test = int(round(len(group) * fractions[2]))
        n_train = len(group) - n_val - n_test
        for k, idx in enumerate(order):
            part = 0 if k < n_train else (1 if k < n_train + n_val else 2)
            out[part].append(group[idx])
    return tuple(sorted(part, key=lambda it: str(it.path)) for part in out)  # type: ignore[return-value]


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root``: as written first (a class folder may be a symbolic link to
    elsewhere), else with links resolved."""
    for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (Path(path).resolve(), Path(root).resolve())):
        try:
            return p.relative_to(r).as_posix()
        except ValueError:
            continue
    raise SmearError(f"{path}: not under the data root {root}")


def split_to_json(splits: Sequence[Sequence[Item]], root: str | Path, **info) -> str:
    """The split as JSON text: per split, ``[relative path, fine or null, group]`` rows."""
    root = Path(root)
    head = json.dumps({"format": "smear-classify-split/1", **info})[:-1]
    parts = []
    for name, part in zip(SPLIT_NAMES, splits):
        rows = ",\n  ".join(json.dumps([_rel(it.path, root), it.fine, it.group]) for it in part)
        parts.append(f'"{name}": [\n  {rows}\n ]' if rows else f'"{name}": []')
    return head + ",\n " + ",\n ".join(parts) + "\n}"  # one row per line: diffable, compact


def save_split(path: str | Path, splits: Sequence[Sequence[Item]], root: str | Path, **info) -> Path:
    """Write the split JSON (paths relative to ``root``, so it works from any checkout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, split_to_json(splits, root, **info) + "\n")
    return path


def load_split(path: str | Path, root: str | Path, check: bool = True
               ) -> tuple[list[Item], list[Item], list[Item]]:
    """Read a split JSON written by ``save_split``; paths are joined to ``root``."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise SmearError(f"{path}: split file not found")
    doc = read_json(path)
    parts = []
    for name in SPLIT_NAMES:
        if name not in doc:
            raise SmearError(f"{path}: split {name!r} missing")
        parts.append([Item(root / rel, fine, group) for rel, fine, group in doc[name]])
    if check:
        missing = [str(it.path) for part in parts for it in part if not it.path.is_file()]
        if missing:
            raise SmearError(f"{path}: {len(missing)} files of the split are missing under {root}, "
                             f"e.g. {missing[0]}", hint="is data.root the folder the split was made on?")
    return parts[0], parts[1], parts[2]


def subsample(items: Sequence[Item], n: int | None, seed: int = 0) -> list[Item]:
    """About ``n`` items, drawn stratified (each stratum keeps roughly its share)."""
    if n is None or n >= len(items):
        return list(items)
    frac = n / len(items)
    keep, _, _ = stratified_split(items, (frac, 1 - frac, 0.0), seed=seed)
    return keep
