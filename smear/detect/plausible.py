"""A plausibility check on the detector's WBC boxes: a red cell is not a white cell.

On other labs' stains the detector can take red cells for WBCs at low scores; the classifier
then calls them ERB or anything else at high confidence, and the report counts them. A white
cell has a nucleus, the most strongly stained thing on a Romanowsky-stained field. So a "WBC"
box no larger than ``max_rbc_area_ratio`` x the field's median RBC box, in which under
``min_nucleus_fraction`` of the pixels carry nuclear stain, is not counted.

Nuclear stain is measured as in ``smear.crops.stain_score``: ``B - G`` minus its field median,
over ``nucleus_level`` x the field's 99.5th percentile (and at least ``min_stain``, so that a
field with no nucleus at all does not make the palest red cell its nucleus). On the labelled
validation fields (BCCD train, TXL-PBC val) the true WBC boxes have a nuclear fraction of 0.2
or more (5th percentile per source), the RBC boxes under 0.06 (95th percentile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from smear.crops import stain_score
from smear.taxonomy import CellKind
from smear.types import Detection

WORK_SIDE = 320  # the stain map is computed on a copy of the field this many pixels on its long side


@dataclass
class WbcCheck:
    """Drops implausible WBC boxes from a detector's output (see the module doc); built from the
    pipeline config's ``wbc_check`` section, where its defaults are written."""

    max_rbc_area_ratio: float
    min_nucleus_fraction: float
    nucleus_level: float
    min_stain: float
    min_rbcs: int

    def nucleus_fractions(self, image: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]
                          ) -> list[float]:
        """Share of each box's pixels that carry nuclear stain."""
        h, w = image.shape[:2]
        scale = min(1.0, WORK_SIDE / max(h, w))
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else image
        score = stain_score(small)
        level = max(self.nucleus_level * float(np.percentile(score, 99.5)), self.min_stain)
        nuclear = score > level
        out = []
        for x0, y0, x1, y1 in boxes:
            a, b = max(0, int(x0 * scale)), max(0, int(y0 * scale))
            c, d = min(nuclear.shape[1], int(np.ceil(x1 * scale))), min(nuclear.shape[0], int(np.ceil(y1 * scale)))
            patch = nuclear[b:d, a:c]
            out.append(float(patch.mean()) if patch.size else 0.0)
        return out

    def implausible(self, image: np.ndarray, dets: Sequence[Detection]) -> list[bool]:
        """For each detection: True for a WBC box that is red-cell sized and has no nucleus."""
        rbc = [(d.box_xyxy[2] - d.box_xyxy[0]) * (d.box_xyxy[3] - d.box_xyxy[1]) for d in dets
               if d.kind == CellKind.RBC]
        wbc = [i for i, d in enumerate(dets) if d.kind == CellKind.WBC]
        out = [False] * len(dets)
        if not wbc or len(rbc) < self.min_rbcs:
            return out
        median_rbc = float(np.median(rbc))
        fracs = self.nucleus_fractions(image, [dets[i].box_xyxy for i in wbc])
        for i, frac in zip(wbc, fracs):
            x0, y0, x1, y1 = dets[i].box_xyxy
            small = (x1 - x0) * (y1 - y0) <= self.max_rbc_area_ratio * median_rbc
            out[i] = small and frac < self.min_nucleus_fraction
        return out


class CheckedDetector:
    """A detector whose WBC boxes go through ``WbcCheck``; the rest is passed through."""

    def __init__(self, detector, check: WbcCheck):
        self.detector = detector
        self.check = check

    def __getattr__(self, name):  # field_scale, names, ... of the wrapped detector
        return getattr(self.detector, name)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        out = []
        for image, dets in zip(images, self.detector.detect(images)):
            drop = self.check.implausible(image, dets)
            out.append([d for d, x in zip(dets, drop) if not x])
        return out
