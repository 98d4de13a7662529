"""Segmentation stage on synthetic cells: data loading, baselines, loss, U-Net training, CLI, pipeline."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from smear.cli import app
from smear.crops import cut_crop
from smear.segment import data as sdata
from smear.segment.evaluate import crop_scores, dice_iou, evaluate_segmenter
from smear.synth import make_field
from smear.taxonomy import CellKind

runner = CliRunner()


def _cell(seed: int, kind: str = "LY"):
    """A synthetic field with one WBC; its crop (margin 1.3, native size) and 0/1/2 truth."""
    f = make_field(seed, 320, 240, n_wbc=1, n_rbc=4, n_platelets=0, wbc_kinds=[kind])
    box = next(d.box_xyxy for d in f.detections if d.kind == CellKind.WBC)
    return f, box


def _three_level_source(folder, n=8, kinds=("LY", "SNE", "MO", "EO")):
    """A jtsc-like folder: crops around one WBC, masks 0 / 128 / 255."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        f, box = _cell(100 + i, kinds[i % len(kinds)])
        crop = cut_crop(f.image_rgb, box, 1.15, None)
        lab = cut_crop(f.wbc_mask, box, 1.15, None, 0, nearest=True)
        cv2.imwrite(str(folder / "images" / f"{i:03d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"{i:03d}.png"), (lab * 127.5).round().astype(np.uint8))
    return folder


def _nucleus_source(folder, n=3):
    """A bccd-nucleus-like folder: whole fields, mask 255 on WBC nuclei only."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    n_cells = 0
    for i in range(n):
        f = make_field(200 + i, 480, 360, n_wbc=2, wbc_kinds=["SNE", "LY"])
        n_cells += sum(d.kind == CellKind.WBC for d in f.detections)
        cv2.imwrite(str(folder / "images" / f"F{i}.jpg"), cv2.cvtColor(f.image_rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"F{i}.png"), ((f.wbc_mask == 2) * 255).astype(np.uint8))
    return folder, n_cells


def test_cut_crop_cuts_a_label_mask_like_the_image():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 2
    out = cut_crop(mask, (10, 10, 20, 20), 2.0, 40, 7, nearest=True)
    assert out.shape == (40, 40)
    assert set(np.unique(out)) == {0, 2}  # nearest: no blended labels; no fill (inside the field)
    edge = cut_crop(mask, (0, 0, 10, 10), 2.0, None, 7, nearest=True)
    assert edge[0, 0] == 7 and edge.shape == (20, 20)


def test_three_level_source_loads_crops_with_labels(tmp_path):
    src = _three_level_source(tmp_path / "lab")
    items = sdata.load_source(src, 1.3, 64)
    assert len(items) == 8 and {it.source for it in items} == {"lab"}
    it = items[0]
    assert it.image.shape == (64, 64, 3) and it.mask.shape == (64, 64)
    assert set(np.unique(it.mask)) == {0, 1, 2} and it.has_cell_labels
    # the cell box is the mask's box: the cell fills about 1/1.3 of the crop's side
    ys, xs = np.nonzero(it.mask)
    assert 0.65 < (xs.max() - xs.min() + 1) / 64 < 0.85


def test_nucleus_only_fields_give_one_crop_per_wbc(tmp_path):
    src, n_cells = _nucleus_source(tmp_path / "nuc")
    items = sdata.load_source(src, 1.3, 96)
    assert len(items) == n_cells
    for it in items:
        assert not it.has_cell_labels
        assert set(np.unique(it.mask)) <= {sdata.NUCLEUS, sdata.NOT_NUCLEUS}
        assert (it.mask == sdata.NUCLEUS).mean() > 0.05  # a nucleus near the centre
        c = it.mask[30:66, 30:66]
        assert (c == sdata.NUCLEUS).any()


def test_lobes_of_one_nucleus_are_one_cell():
    m = np.zeros((240, 320), bool)
    cv2.circle(m.view(np.uint8), (100, 100), 10, 1, -1)
    cv2.circle(m.view(np.uint8), (122, 100), 10, 1, -1)  # a second lobe 2 px away
    cv2.circle(m.view(np.uint8), (250, 180), 12, 1, -1)  # another cell
    boxes = sdata.nucleus_groups(m)
    assert len(boxes) == 2
    x0, y0, x1, y1 = min(boxes)
    assert x0 < 90 and x1 > 132  # spans both lobes, widened


def test_source_without_masks_is_a_clear_error(tmp_path):
    from smear.errors import DataError

    (tmp_path / "s" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="images/ and masks/"):
        sdata.load_source(tmp_path / "s", 1.3)


def test_split_keeps_crops_of_one_field_together_and_uses_test_names(tmp_path):
    src, _ = _nucleus_source(tmp_path / "nuc", n=4)
    items = sdata.load_source(src, 1.3, 64)
    parts = sdata.assign_parts(items, 0.25, 0.0, 0, test_names={"F1"})
    assert {it.name for it in parts["test"]} == {"F1"}
    names = {k: {it.name for it in v} for k, v in parts.items()}
    assert not (names["train"] & names["val"])


def test_dice_and_crop_scores():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)
    b = np.zeros_like(a)
    b[:, :5] = True
    d, i = dice_iou(a, b)
    assert d == pytest.approx(0.5) and i == pytest.approx(25 / 75)
    truth = np.full((4, 4), sdata.NOT_NUCLEUS, np.uint8)
    truth[0, 0] = sdata.NUCLEUS
    pred = np.zeros((4, 4), np.uint8)
    pred[0, 0] = 2
    s = crop_scores(pred, truth, has_cell=False)
    assert s["nucleus_dice"] == 1.0 and np.isnan(s["cell_dice"])


@pytest.mark.parametrize("method,min_cell", [("kmeans", 0.7), ("grabcut", 0.85)])
def test_classical_baselines_find_synthetic_cells(tmp_path, method, min_cell):
    from smear.segment.classical import GrabCutSegmenter, KMeansSegmenter

    items = sdata.load_source(_three_level_source(tmp_path / "lab"), 1.3, None)
    seg = KMeansSegmenter() if method == "kmeans" else GrabCutSegmenter()
    m = evaluate_segmenter(seg, items)
    assert m["n"] == 8
    assert m["cell_dice"] > min_cell, m
    assert m["nucleus_dice"] > 0.6, m


def test_seg_loss_uses_partial_labels():
    from smear.segment.train import seg_loss

    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 2], [sdata.NOT_NUCLEUS, sdata.IGNORE]]], dtype=torch.uint8)
    seg_loss(logits, target, dice_weight=0.0).backward()
    g = logits.grad[0]
    assert torch.all(g[:, 1, 1] == 0)  # unknown pixel: no gradient
    assert g[2, 1, 0] > 0  # not-nucleus pixel: pushes the nucleus logit down
    assert g[0, 1, 0] == pytest.approx(g[1, 1, 0])  # ... and says nothing about background vs cytoplasm
    assert g[2, 0, 1] < 0  # nucleus pixel: pushes the nucleus logit up


def test_augment_pairs_move_mask_with_image():
    from smear.nn.augment import BatchAugment

    img = np.zeros((2, 40, 40, 3), np.uint8)
    mask = np.zeros((2, 40, 40), np.uint8)
    img[:, 5:15, 20:35] = 255
    mask[:, 5:15, 20:35] = 2
    aug = BatchAugment(32, {k: 0 for k in ("hed", "hue", "saturation", "brightness", "contrast", "blur_p",
                                           "noise")} | {"scale": 0.2, "rotate_deg": 20.0}, seed=3)
    x, m = aug.pairs(torch.from_numpy(img), torch.from_numpy(mask))
    assert x.shape == (2, 3, 32, 32) and m.shape == (2, 32, 32) and m.dtype == torch.uint8
    assert set(torch.unique(m).tolist()) <= {0, 2}
    bright = x[:, 0] > 0.5
    agree = (bright == (m == 2)).float().mean()
    assert agree > 0.97


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A U-Net trained for 2 epochs on synthetic crops (the CLI path), and its data folder."""
    root = tmp_path_factory.mktemp("seg")
    data = root / "data"
    _three_level_source(data / "lab", n=10)
    _nucleus_source(data / "nuc", n=3)
    args = ["train", "segment", "--out", str(root / "run"), "--set", f"data.root={data}",
            "--set", "data.boxes_root=null", "--set", "data.test_fields=null", "--set", "data.val_fraction=0.2",
            "--set", "data.test_fraction=0.2", "--set", "model.input_size=64", "--set", "train.epochs=2",
            "--set", "train.batch=4", "--set", "model.decoder_channels=[32,16,16,8,8]"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return root, data, args


def test_train_segment_writes_model_folder_and_metrics(tiny_unet):
    root, _, _ = tiny_unet
    meta = json.loads((root / "run" / "model" / "meta.json").read_text())
    assert meta["stage"] == "segment" and meta["classes"] == ["background", "cytoplasm", "nucleus"]
    assert meta["input_size"] == 64 and meta["crop_margin"] == 1.3
    assert set(meta["metrics"]["test"]["per_source"]) == {"lab", "nuc"}
    log = (root / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,")


def test_train_segment_resume_continues(tiny_unet, tmp_path):
    import shutil

    root, _, args = tiny_unet
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    more = [a if a != str(root / "run") else str(run) for a in args]
    more[more.index("train.epochs=2")] = "train.epochs=3"
    res = runner.invoke(app, more)
    assert res.exit_code != 0 and "not empty" in res.output
    res = runner.invoke(app, [*more, "--resume"])
    assert res.exit_code == 0, res.output
    assert "resume: from epoch 2" in res.output
    assert len((run / "log.csv").read_text().splitlines()) == 4


def test_unet_masks_come_back_at_crop_size(tiny_unet):
    from smear.segment.model import UnetSegmenter

    root, _, _ = tiny_unet
    seg = UnetSegmenter.from_dir(root / "run" / "model", device="cpu")
    crops = [np.full((50, 70, 3), 200, np.uint8), np.zeros((129, 129, 3), np.uint8)]
    masks = seg.segment(crops)
    assert [m.shape for m in masks] == [(50, 70), (129, 129)]
    assert all(m.dtype == np.uint8 and m.max() <= 2 for m in masks)


def test_eval_segment_json(tiny_unet):
    root, data, _ = tiny_unet
    res = runner.invoke(app, ["eval", "segment", "--model", str(root / "run" / "model"), "--data", str(data),
                              "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert {"cell_dice", "nucleus_dice", "per_source"} <= set(m)
    assert m["per_source"]["nuc"]["cell_dice"] is None  # nucleus-only truth: no cell score
    assert 0.0 <= m["per_source"]["lab"]["cell_dice"] <= 1.0
    res = runner.invoke(app, ["eval", "segment", "--method", "kmeans", "--data", str(data / "lab"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["per_source"]["lab"]["cell_dice"] > 0.7


def test_eval_segment_missing_model_is_one_line_error(tmp_path):
    res = runner.invoke(app, ["eval", "segment", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert res.exit_code != 0
    assert "nope" in res.output and "Traceback" not in res.output


def test_run_with_segment_adds_mask_columns(tmp_path):
    from smear.io import write_image_atomic

    slide = tmp_path / "slide"
    slide.mkdir()
    f = make_field(7, n_wbc=2, wbc_kinds=["LY", "SNE"])
    write_image_atomic(slide / "f.png", f.image_rgb)
    cells = tmp_path / "cells.csv"
    res = runner.invoke(app, ["run", str(slide), "--report", "csv", "--set", "detector=classical",
                              "--segment", "kmeans", "--cells", str(cells)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(cells)
    assert {"cell_area_px", "nucleus_area_px", "nc_ratio"} <= set(df.columns)
    wbc = df[df.kind == "wbc"]
    assert len(wbc) == 2
    # areas are in field pixels: near the drawn cell's area
    n, _, stats, _ = cv2.connectedComponentsWithStats((f.wbc_mask > 0).astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA]
    assert n - 1 == 2
    assert wbc.cell_area_px.between(0.5 * areas.min(), 2.0 * areas.max()).all()
    assert ((wbc.nc_ratio > 0.1) & (wbc.nc_ratio < 0.95)).all()
    assert (df[df.kind != "wbc"].cell_area_px.isna()).all()
    plain = tmp_path / "plain.csv"
    res = runner.invoke(app, ["run", str(slide), "--report", "csv", "--set", "detector=classical",
                              "--cells", str(plain)])
    assert "cell_area_px" not in pd.read_csv(plain).columns


def test_mask_background_paints_out_background():
    from fakes import FakeDetector, HalfMask
    from smear.pipeline.run import Stages, classify_cells
    from smear.types import Detection

    class Recorder:
        crop_margin, input_size = 2.0, 32
        guard = None

        def __init__(self):
            self.crops = []

        def classify(self, crops):
            from fakes import scores

            self.crops += list(crops)
            return scores([("LY", 1.0)] * len(crops))

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    det = Detection((16, 16, 48, 48), CellKind.WBC, 0.9)
    rec = Recorder()
    stages = Stages(FakeDetector({}), classifier=rec, segmenter=HalfMask(), mask_background=True)
    cells = classify_cells([img], [[det]], stages)
    crop = rec.crops[0]
    right = crop[:, 16:].reshape(-1, 3)
    assert (right == right[0]).all()  # painted with one colour
    assert len(np.unique(crop[:, :16].reshape(-1, 3), axis=0)) > 50  # the cell half is untouched
    assert cells[0][0].mask.nucleus_area_px == pytest.approx(64 * 64 / 2, rel=0.02)
