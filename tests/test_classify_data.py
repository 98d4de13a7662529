"""Classifier datasets: PBC prefixes (incl. group-only NEUTROPHIL/IG), class folders, the split.

Also home of the synthetic single-cell images the other classify tests import.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from smear.classify.data import (
    Item,
    class_counts,
    load_folders,
    load_items,
    load_pbc,
    load_split,
    save_split,
    stratified_split,
    subsample,
)
from smear.errors import SmearError

BACKGROUND = (248, 232, 205)
RBC = (222, 160, 160)
CYTOPLASM = (205, 185, 215)
NUCLEUS = (95, 45, 150)

# prefix -> PBC group folder, as in the public download
PBC_FOLDERS = {"SNE": "neutrophil", "BNE": "neutrophil", "NEUTROPHIL": "neutrophil", "MMY": "ig", "MY": "ig",
               "PMY": "ig", "IG": "ig", "EO": "eosinophil", "BA": "basophil", "LY": "lymphocyte",
               "MO": "monocyte", "ERB": "erythroblast", "PLATELET": "platelet"}


def draw_cell(size: int = 64, centre: tuple[int, int] | None = None, radius: int | None = None,
              nucleus_scale: float = 0.6, lobes: int = 1, rbcs: int = 4, seed: int = 0) -> np.ndarray:
    """A Romanowsky-like single-cell image: cream background, pink RBC discs with pallor, one WBC
    (lilac cytoplasm disc, purple nucleus in ``lobes`` blobs). RGB uint8."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    cx, cy = centre or (size // 2, size // 2)
    radius = radius or size // 5
    for _ in range(rbcs):  # red cells away from the WBC
        for _try in range(20):
            x, y = rng.integers(0, size, 2)
            if np.hypot(x - cx, y - cy) > radius + size // 8:
                break
        r = max(2, size // 10)
        cv2.circle(img, (int(x), int(y)), r, RBC, -1)
        cv2.circle(img, (int(x), int(y)), max(1, r // 2), (235, 200, 190), -1)
    cv2.circle(img, (cx, cy), radius, CYTOPLASM, -1)
    rn = max(1, int(radius * nucleus_scale))
    if lobes == 1:
        cv2.circle(img, (cx, cy), rn, NUCLEUS, -1)
    else:
        for k in range(lobes):
            a = 2 * np.pi * k / lobes
            p = (int(cx + 0.45 * radius * np.cos(a)), int(cy + 0.45 * radius * np.sin(a)))
            cv2.circle(img, p, max(1, rn // 2), NUCLEUS, -1)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image_rgb[..., ::-1])


def make_pbc(root: Path, per_class: dict[str, int] | None = None, size: int = 48, ext: str = ".jpg") -> Path:
    """A PBC-style tree ``root/<group>/<PREFIX>_<id>.jpg``; every prefix by default, 3 images each."""
    per_class = per_class or {p: 3 for p in PBC_FOLDERS}
    i = 0
    for prefix, n in per_class.items():
        for _ in range(n):
            i += 1
            radius = size // 5 + (i % 3)
            write_png(root / PBC_FOLDERS[prefix] / f"{prefix}_{1000 + i}{ext}",
                      draw_cell(size, radius=radius, lobes=3 if prefix == "SNE" else 1, seed=i))
    return root


def make_folders(root: Path, names: dict[str, int], size: int = 40) -> Path:
    """A class-per-folder tree ``root/<name>/<i>.png``."""
    for k, (name, n) in enumerate(names.items()):
        for i in range(n):
            write_png(root / name / f"{i:03d}.png", draw_cell(size, seed=100 * k + i))
    return root


def test_pbc_prefixes_map_to_fine_and_group(tmp_path):
    root = make_pbc(tmp_path / "pbc")
    items = load_pbc(root)
    assert len(items) == 3 * len(PBC_FOLDERS)
    by_prefix = {it.path.name.rsplit("_", 1)[0]: it for it in items}
    assert (by_prefix["SNE"].fine, by_prefix["SNE"].group) == ("SNE", "neutrophil")
    assert (by_prefix["PMY"].fine, by_prefix["PMY"].group) == ("PMY", "ig")
    assert (by_prefix["PLATELET"].fine, by_prefix["PLATELET"].group) == ("PLATELET", "platelet")
    # stage not given: group level only
    assert (by_prefix["NEUTROPHIL"].fine, by_prefix["NEUTROPHIL"].group) == (None, "neutrophil")
    assert (by_prefix["IG"].fine, by_prefix["IG"].group) == (None, "ig")
    assert by_prefix["IG"].stratum == "group:ig"


def test_pbc_rejects_unknown_prefix_and_folder_mismatch(tmp_path):
    root = make_pbc(tmp_path / "a", {"LY": 1})
    write_png(root / "lymphocyte" / "XYZ_1.jpg", draw_cell(32))
    with pytest.raises(SmearError, match="unknown PBC class prefix 'XYZ'"):
        load_pbc(root)
    root = make_pbc(tmp_path / "b", {"LY": 1})
    write_png(root / "lymphocyte" / "EO_5.jpg", draw_cell(32))
    with pytest.raises(SmearError, match="folder is 'lymphocyte'"):
        load_pbc(root)
    with pytest.raises(SmearError, match="not found"):
        load_pbc(tmp_path / "missing")


def test_class_folders_map_through_the_taxonomy(tmp_path):
    root = make_folders(tmp_path / "ds", {"Lymphocyte": 2, "neutrophil": 2, "PMY": 1, "Eosinophils": 1})
    items = load_folders(root)
    got = Counter((it.fine, it.group) for it in items)
    assert got == {("LY", "lymphocyte"): 2, (None, "neutrophil"): 2, ("PMY", "ig"): 1, ("EO", "eosinophil"): 1}
    assert load_items(root) == items  # auto: no class prefixes in the file names -> folders
    (root / "mystery").mkdir()
    shutil.copy(next((root / "PMY").iterdir()), root / "mystery" / "x.png")
    with pytest.raises(SmearError, match="mystery"):
        load_folders(root)


def test_auto_layout_detects_pbc(tmp_path):
    root = make_pbc(tmp_path / "pbc", {"MO": 2, "IG": 1})
    assert load_items(root) == load_pbc(root)


def _many(n_per: dict[str, int]) -> list[Item]:
    items = []
    for stratum, n in n_per.items():
        fine, group = (None, stratum[6:]) if stratum.startswith("group:") else (stratum, {
            "LY": "lymphocyte", "EO": "eosinophil", "PMY": "ig"}[stratum])
        items += [Item(Path(f"/d/{group}/{stratum.replace(':', '_')}_{i}.jpg"), fine, group) for i in range(n)]
    return items


def test_split_is_deterministic_stratified_and_complete():
    items = _many({"LY": 100, "EO": 40, "PMY": 20, "group:neutrophil": 10})
    a = stratified_split(items, (0.7, 0.15, 0.15), seed=0)
    shuffled = list(items)
    random.Random(3).shuffle(shuffled)
    assert stratified_split(shuffled, (0.7, 0.15, 0.15), seed=0) == a  # input order does not matter
    assert stratified_split(items, (0.7, 0.15, 0.15), seed=1) != a
    train, val, test = a
    assert sorted(map(str, (it.path for it in train + val + test))) == sorted(str(it.path) for it in items)
    assert not set(train) & set(val) and not set(val) & set(test)
    assert class_counts(val) == {"EO": 6, "LY": 15, "PMY": 3, "group:neutrophil": 2}
    assert class_counts(test) == class_counts(val)
    assert class_counts(train) == {"EO": 28, "LY": 70, "PMY": 14, "group:neutrophil": 6}
    with pytest.raises(SmearError):
        stratified_split(items, (0.5, 0.2, 0.2))


def test_split_json_round_trip_with_relative_paths(tmp_path):
    root = make_pbc(tmp_path / "pbc", {"LY": 6, "NEUTROPHIL": 3, "EO": 6})
    parts = stratified_split(load_pbc(root), (0.5, 0.25, 0.25), seed=0)
    path = save_split(tmp_path / "split.json", parts, root, seed=0)
    doc = json.loads(path.read_text())
    assert all(not Path(row[0]).is_absolute() for row in doc["train"])
    assert load_split(path, root) == parts
    moved = tmp_path / "elsewhere"
    shutil.move(str(root), moved)  # the same split works from another location
    assert [it.path.name for it in load_split(path, moved)[0]] == [it.path.name for it in parts[0]]
    with pytest.raises(SmearError, match="missing"):
        load_split(path, root)


def test_class_folders_that_are_symlinks_are_accepted(tmp_path):
    """A dataset assembled from links to class folders kept elsewhere splits and reads back."""
    store = make_folders(tmp_path / "store", {"Lymphocyte": 4, "Eosinophil": 4})
    root = tmp_path / "ds"
    root.mkdir()
    for name in ("Lymphocyte", "Eosinophil"):
        (root / name).symlink_to(store / name, target_is_directory=True)
    items = load_folders(root)
    assert Counter(it.fine for it in items) == {"LY": 4, "EO": 4}
    parts = stratified_split(items, (0.5, 0.25, 0.25), seed=0)
    path = save_split(tmp_path / "split.json", parts, root, seed=0)
    assert {row[0].split("/")[0] for row in json.loads(path.read_text())["train"]} == {"Lymphocyte", "Eosinophil"}
    assert load_split(path, root) == parts
    outside = make_folders(tmp_path / "other", {"Monocyte": 1})
    with pytest.raises(SmearError, match="not under the data root"):
        save_split(tmp_path / "bad.json", ([Item(outside / "Monocyte" / "000.png", "MO", "monocyte")], [], []), root)


def test_subsample_keeps_class_shares():
    items = _many({"LY": 100, "EO": 50})
    sub = subsample(items, 30, seed=0)
    assert class_counts(sub) == {"EO": 10, "LY": 20}
    assert subsample(items, None) == items


def test_labels_csv_dataset(tmp_path):
    root = tmp_path / "seg"
    for i in range(3):
        write_png(root / "images" / f"{i:03d}.png", draw_cell(32, seed=i))
    (root / "labels.csv").write_text("image,label\n000,neutrophil\n001,lymphocyte\n002.png,Monocyte\n")
    items = load_items(root)  # auto: labels.csv present
    assert [(it.path.name, it.fine, it.group) for it in items] == [
        ("000.png", None, "neutrophil"), ("001.png", "LY", "lymphocyte"), ("002.png", "MO", "monocyte")]
    (root / "labels.csv").write_text("image,label\n000,alien\n")
    with pytest.raises(SmearError, match="alien"):
        load_items(root, "csv")
