"""The synthetic smear generator: deterministic, exact boxes, requested counts."""

from __future__ import annotations

import numpy as np

from smear.synth import make_field
from smear.types import CellKind


def test_same_seed_same_field_other_seed_differs():
    a, b, c = make_field(3), make_field(3), make_field(4)
    np.testing.assert_array_equal(a.image_rgb, b.image_rgb)
    assert a.detections == b.detections
    assert not np.array_equal(a.image_rgb, c.image_rgb)


def test_shape_boxes_inside_and_counts():
    f = make_field(11, width=500, height=400, n_wbc=2, n_rbc=10, n_platelets=3, wbc_kinds=("LY",))
    assert f.image_rgb.shape == (400, 500, 3) and f.image_rgb.dtype == np.uint8
    kinds = [d.kind for d in f.detections]
    assert kinds.count(CellKind.WBC) == 2 and f.wbc_labels == ("LY", "LY")
    assert kinds.count(CellKind.RBC) <= 10 and kinds.count(CellKind.PLATELET) <= 3
    for d in f.detections:
        x0, y0, x1, y1 = d.box_xyxy
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 400


def test_cells_are_where_the_boxes_say():
    f = make_field(5, n_wbc=1, wbc_kinds=("SNE",), n_platelets=0)
    [wbc] = [d for d in f.detections if d.kind == CellKind.WBC]
    x0, y0, x1, y1 = (int(v) for v in wbc.box_xyxy)
    img = f.image_rgb.astype(int)
    inside = img[y0:y1, x0:x1]
    blue_inside = ((inside[..., 2] - inside[..., 0]) > 50).mean()
    blue_all = ((img[..., 2] - img[..., 0]) > 50).mean()
    assert blue_inside > 0.15 and blue_inside > 5 * blue_all  # the violet nucleus is in the WBC box
