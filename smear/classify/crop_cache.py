"""Cell crops cut once with the pipeline's geometry and kept as a uint8 ``.npy`` cache.

Decoding thousands of JPEGs every epoch is too slow on a few CPU cores, so each dataset's crops
are cut once, ``cut_crop(image, find_cell_box(image), margin, size)``, the same function the
pipeline applies to detector boxes, and stored as one N x S x S x 3 array. Training crops are
cut wider (``margin x pad`` at ``input_size x pad`` pixels) so that scale, shift and rotation
jitter have real pixels to use; their central ``input_size`` square is the inference crop.
The cache file is named by a hash of the file list (paths, sizes, mtimes) and the geometry, so
a changed dataset or geometry can never reuse stale crops.
"""

from __future__ import annotations

import hashlib
import logging
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smear.classify.cellbox import CELLBOX_VERSION, find_cell_box_info
from smear.classify.data import Item
from smear.devices import available_cores
from smear.io import atomic_path, read_image, write_text_atomic
from smear.artifacts import cache_setting
from smear.errors import ConfigError, DataError, SmearError
from smear.crops import cut_crop



def cut_cell_crop(image_rgb: np.ndarray, margin: float, size: int | None) -> np.ndarray:
    """The classifier's input for a single-cell image: the pipeline crop around the found cell."""
    box, _ = find_cell_box_info(image_rgb)
    return cut_crop(image_rgb, box, margin, size)


def cache_key(items: Sequence[Item], margin: float, size: int) -> str:
    """A short hash of the file list (path, size, mtime) and the crop geometry."""
    h = hashlib.sha256()
    h.update(f"cellbox={CELLBOX_VERSION};margin={margin:.6f};size={size}\n".encode())
    for it in items:
        st = it.path.stat()
        h.update(f"{it.path.resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:20]


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The crop cache folder: ``~`` expanded; None or ``auto`` means ``$XDG_CACHE_HOME/smear/classify``
    (``~/.cache/smear/classify``). Training needs its crops cached, so ``off`` is refused."""
    folder = cache_setting(cache_dir, "classify")
    if folder is None:
        raise ConfigError(f"data.cache_dir {cache_dir!r}: the classifier's crops need a cache folder",
                          hint="auto, or a folder")
    return folder


class UnreadableImages(DataError):
    """Some images of a dataset could not be read; ``errors`` holds ``(path, message)`` pairs."""

    def __init__(self, errors: list[tuple[Path, str]]):
        super().__init__(f"{len(errors)} unreadable images, e.g. {errors[0][1]}")
        self.errors = errors


def _cut_one(item: Item, margin: float, size: int) -> tuple[np.ndarray | None, tuple[float, ...], bool, str]:
    try:
        image = read_image(item.path)
    except SmearError as exc:
        return None, (), True, str(exc)
    box, fell_back = find_cell_box_info(image)
    return cut_crop(image, box, margin, size), box, fell_back, ""


def build_crops(items: Sequence[Item], margin: float, size: int, workers: int | None = None,
                log: Callable[[str], None] | None = None, out: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[tuple[float, ...]], list[bool]]:
    """Crops of all items (N x size x size x 3 uint8), their cell boxes and fallback flags."""
    n = len(items)
    crops = np.empty((n, size, size, 3), np.uint8) if out is None else out
    boxes: list[tuple[float, ...]] = [()] * n
    fell: list[bool] = [False] * n
    workers = workers or available_cores()
    t0, chunk = time.perf_counter(), 512
    errors: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 and PIL decoding release the GIL
        for start in range(0, n, chunk):
            idx = range(start, min(n, start + chunk))
            for i, (crop, box, fb, err) in zip(idx, pool.map(lambda i: _cut_one(items[i], margin, size), idx)):
                if crop is None:
                    errors.append((items[i].path, err))
                    continue
                crops[i], boxes[i], fell[i] = crop, tuple(round(v, 2) for v in box), fb
            if log is not None and (idx[-1] + 1) % 2048 < chunk:
                rate = (idx[-1] + 1) / max(1e-9, time.perf_counter() - t0)
                log(f"crops: {idx[-1] + 1}/{n} ({rate:.0f} images/s)")
    if errors:
        raise UnreadableImages(errors)
    return crops, boxes, fell


def cached_crops(items: Sequence[Item], margin: float, size: int, cache_dir: str | Path | None = None,
                 workers: int | None = None, log: Callable[[str], None] | None = None) -> np.ndarray:
    """The items' crops from the cache, cutting and saving them first if absent (in RAM, uint8)."""
    folder = resolve_cache_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(items, margin, size)
    path, info_path = folder / f"{key}.npy", folder / f"{key}.json"
    if path.is_file() and info_path.is_file():
        arr = np.load(path)
        if arr.shape == (len(items), size, size, 3) and arr.dtype == np.uint8:
            if log is not None:
                log(f"crops: {len(items)} from cache {path}")
            return arr
    if log is not None:
        log(f"crops: cutting {len(items)} images (margin {margin:g}, {size} px) into {path}")
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3))
        _, boxes, fell = build_crops(items, margin, size, workers, log, out=mm)
        mm.flush()
        del mm
    info = {"n": len(items), "margin": margin, "size": size, "cellbox_version": CELLBOX_VERSION,
            "fallbacks": int(sum(fell)), "files": [str(it.path) for it in items], "boxes": boxes}
    write_text_atomic(info_path, json.dumps(info) + "\n")
    if log is not None and sum(fell):
        log(f"crops: find_cell_box fell back to the central box on {sum(fell)}/{len(items)} images")
    return np.load(path)


def readable_crops(items: Sequence[Item], margin: float, size: int, cache_dir: str | Path | None = None,
                   workers: int | None = None, log: Callable[[str], None] | None = None,
                   warn: Callable[[str], None] | None = None) -> tuple[list[Item], np.ndarray, list[str]]:
    """``cached_crops`` that skips unreadable images (truncated, not an image, ...): each is
    named in a warning and left out. Returns the items kept, their crops and the warnings."""
    try:
        return list(items), cached_crops(items, margin, size, cache_dir, workers, log), []
    except UnreadableImages as exc:
        bad = {str(p) for p, _ in exc.errors}
        msgs = [f"{msg} (skipped)" if str(p) in msg else f"{p}: {msg} (skipped)" for p, msg in exc.errors]
        for m in msgs:
            (warn or log or logging.getLogger(__name__).warning)(m)
        kept = [it for it in items if str(it.path) not in bad]
        if not kept:
            raise DataError(f"none of the {len(items)} images could be read", hint=msgs[0]) from exc
        return kept, cached_crops(kept, margin, size, cache_dir, workers, log), msgs
