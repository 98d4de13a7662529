"""The synthetic smear generator: deterministic, tight boxes inside the image, requested counts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smear.synth import WBC_KINDS, SynthField, make_field, make_large_field
from smear.taxonomy import CellKind


def _count(f: SynthField, kind: CellKind) -> int:
    return sum(d.kind == kind for d in f.detections)


def test_same_seed_same_field_other_seed_differs():
    a, b, c = make_field(3), make_field(3), make_field(4)
    np.testing.assert_array_equal(a.image_rgb, b.image_rgb)
    assert a.detections == b.detections and a.wbc_labels == b.wbc_labels
    assert not np.array_equal(a.image_rgb, c.image_rgb)
    assert a.detections != c.detections


def test_shape_counts_and_labels_as_asked():
    f = make_field(11, width=500, height=400, n_wbc=3, n_rbc=10, n_platelets=4, wbc_kinds=("SNE", "MO"))
    assert f.image_rgb.shape == (400, 500, 3) and f.image_rgb.dtype == np.uint8
    assert (_count(f, CellKind.WBC), _count(f, CellKind.RBC), _count(f, CellKind.PLATELET)) == (3, 10, 4)
    assert f.wbc_labels == ("SNE", "MO", "SNE")  # explicit kinds cycle in order
    assert [d.kind for d in f.detections[:3]] == [CellKind.WBC] * 3  # WBCs first, in label order
    assert all(d.score == 1.0 for d in f.detections)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_inside_image_and_cut_cells_clipped(seed):
    f = make_field(seed, n_rbc=40)  # crowded: some red cells are cut by the border
    h, w = f.image_rgb.shape[:2]
    for d in f.detections:
        x0, y0, x1, y1 = d.box_xyxy
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert all(isinstance(v, float) for v in d.box_xyxy)
    assert any(d.box_xyxy[0] == 0 or d.box_xyxy[2] == w or d.box_xyxy[1] == 0 or d.box_xyxy[3] == h
               for d in f.detections)
    assert set(f.wbc_labels) <= set(WBC_KINDS)


@pytest.mark.parametrize("kind", WBC_KINDS)
def test_box_is_tight_around_the_drawn_cell(kind):
    f = make_field(7, n_wbc=1, n_rbc=0, n_platelets=0, wbc_kinds=(kind,))
    [wbc] = f.detections
    img = f.image_rgb.astype(int)
    x0, y0, x1, y1 = (int(v) for v in wbc.box_xyxy)
    h, w = img.shape[:2]
    wx0, wy0, wx1, wy1 = max(0, x0 - 25), max(0, y0 - 25), min(w, x1 + 25), min(h, y1 + 25)
    win = cv2.blur(f.image_rgb[wy0:wy1, wx0:wx1], (5, 5)).astype(int)  # averages the sensor noise out
    spread = win.max(axis=2) - win.min(axis=2)  # colour, not brightness: the vignette does not move it
    rim = np.concatenate([spread[0], spread[-1], spread[:, 0], spread[:, -1]])
    stained = spread > np.median(rim) + 6
    ys, xs = np.nonzero(stained)
    drawn = (wx0 + xs.min(), wy0 + ys.min(), wx0 + xs.max() + 1, wy0 + ys.max() + 1)
    assert np.allclose(wbc.box_xyxy, drawn, atol=4)  # tight: within blur and noise
    inside = img[y0:y1, x0:x1]
    assert ((inside[..., 2] - inside[..., 0]) > 40).mean() > 0.1  # the violet nucleus is in the box


def test_zero_cells_is_plain_background():
    f = make_field(2, n_wbc=0, n_rbc=0, n_platelets=0)
    assert f.detections == () and f.wbc_labels == ()
    assert f.image_rgb.std(axis=(0, 1)).max() < 8


def test_tiny_field_and_bad_arguments():
    f = make_field(1, width=40, height=30, n_wbc=1, n_rbc=1, n_platelets=1)
    assert f.image_rgb.shape == (30, 40, 3)
    assert _count(f, CellKind.WBC) == 1
    with pytest.raises(ValueError, match="XX"):
        make_field(1, wbc_kinds=("XX",))
    with pytest.raises(ValueError):
        make_field(1, n_rbc=-1)
    with pytest.raises(ValueError):
        make_field(1, width=0)


def test_large_field_keeps_density():
    f = make_large_field(5, 2000, 1500)
    assert f.image_rgb.shape == (1500, 2000, 3)
    scale = 2000 * 1500 / (640 * 480)
    assert 0.5 * 22 * scale < _count(f, CellKind.RBC) < 1.5 * 22 * scale
    assert _count(f, CellKind.WBC) >= 4 and len(f.wbc_labels) == _count(f, CellKind.WBC)
