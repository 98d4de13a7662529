"""Large fields: detect on overlapping tiles, merge across seams with shapely, count each cell once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from shapely import STRtree, box as shapely_box

from smear.types import Detection, Detector

EDGE_PX = 2.0  # a box this close to an inner tile edge is taken as cut by it


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) of side ``tile`` covering the field, overlapping by ``overlap`` x tile."""
    stride = max(1, int(round(tile * (1.0 - overlap))))

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        out = list(range(0, length - tile, stride))
        return out + [length - tile]

    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in starts(height) for x in starts(width)]


@dataclass(frozen=True)
class _Piece:
    det: Detection
    cut: bool  # touches a tile edge that lies inside the field


def _pieces(dets: Sequence[Detection], tile: tuple[int, int, int, int], width: int, height: int) -> list[_Piece]:
    tx0, ty0, tx1, ty1 = tile
    out = []
    for d in dets:
        x0, y0, x1, y1 = d.box_xyxy[0] + tx0, d.box_xyxy[1] + ty0, d.box_xyxy[2] + tx0, d.box_xyxy[3] + ty0
        cut = ((tx0 > 0 and x0 - tx0 < EDGE_PX) or (ty0 > 0 and y0 - ty0 < EDGE_PX)
               or (tx1 < width and tx1 - x1 < EDGE_PX) or (ty1 < height and ty1 - y1 < EDGE_PX))
        out.append(_Piece(Detection((x0, y0, x1, y1), d.kind, d.score), cut))
    return out


def merge_pieces(pieces: Sequence[_Piece], min_overlap: float = 0.5) -> list[Detection]:
    """Group same-kind boxes that overlap by ``min_overlap`` of the smaller one; one detection per group.

    A group keeps its best whole (uncut) box; a cell cut in every tile becomes the union of its pieces.
    """
    if not pieces:
        return []
    geoms = [shapely_box(*p.det.box_xyxy) for p in pieces]
    tree = STRtree(geoms)
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = tree.query(geoms, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist()):
        if i >= j or pieces[i].det.kind != pieces[j].det.kind:
            continue
        inter = geoms[i].intersection(geoms[j]).area
        smaller = min(geoms[i].area, geoms[j].area)
        if smaller > 0 and inter / smaller >= min_overlap:
            parent[find(i)] = find(j)
    groups: dict[int, list[_Piece]] = {}
    for i, p in enumerate(pieces):
        groups.setdefault(find(i), []).append(p)
    out = []
    for members in groups.values():
        whole = [p for p in members if not p.cut]
        if whole:
            out.append(max(whole, key=lambda p: p.det.score).det)
            continue
        boxes = np.array([p.det.box_xyxy for p in members])
        union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
        out.append(Detection(tuple(float(v) for v in union), members[0].det.kind,
                             max(p.det.score for p in members)))
    return sorted(out, key=lambda d: (d.box_xyxy[1], d.box_xyxy[0]))


class TiledDetector:
    """Wraps a Detector: fields whose long side exceeds ``tile_above`` are cut into tiles."""

    def __init__(self, inner: Detector, tile: int = 640, overlap: float = 0.25, tile_above: int = 1024,
                 tile_batch: int = 16):
        self.inner, self.tile, self.overlap, self.tile_above = inner, tile, overlap, tile_above
        self.tile_batch = tile_batch  # tiles cut and detected at a time: memory flat in the field's size

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per image; large images go through tiles and seam merging."""
        small = [i for i, im in enumerate(images) if max(im.shape[:2]) <= self.tile_above]
        out: list[list[Detection]] = [[] for _ in images]
        if small:
            for i, dets in zip(small, self.inner.detect([images[i] for i in small])):
                out[i] = dets
        for i, im in enumerate(images):
            if i in small:
                continue
            h, w = im.shape[:2]
            tiles = tile_grid(w, h, self.tile, self.overlap)
            pieces: list[_Piece] = []
            for k in range(0, len(tiles), self.tile_batch):
                chunk = tiles[k:k + self.tile_batch]
                crops = [np.ascontiguousarray(im[y0:y1, x0:x1]) for x0, y0, x1, y1 in chunk]
                for t, dets in zip(chunk, self.inner.detect(crops)):
                    pieces += _pieces(dets, t, w, h)
            out[i] = merge_pieces(pieces)
        return out
