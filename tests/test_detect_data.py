"""Detection dataset conversion: VOC, YOLO, COCO in; one YOLO folder out; bad boxes reported."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from smear.detect.data import load_dataset, write_yolo_dataset
from smear.taxonomy import CellKind

VOC_OBJ = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def _img(path, w=100, h=80):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)


def test_voc_cleaning_reports_each_problem(tmp_path):
    root = tmp_path / "voc"
    _img(root / "images" / "f1.jpg")
    (root / "annotations").mkdir()
    objs = "".join([
        VOC_OBJ.format("WBC", 10, 10, 40, 40),        # fine
        VOC_OBJ.format("WBC", 10, 10, 40, 40),        # the same cell labelled again: dropped
        VOC_OBJ.format("RBC", 90, 70, 120, 95),       # crosses the border: clamped
        VOC_OBJ.format("Platelets", 5, 5, 6, 6),      # tiny: dropped
        VOC_OBJ.format("Ghost", 1, 1, 30, 30),        # unknown class: dropped
        VOC_OBJ.format("RBC", 200, 200, 220, 220),    # outside: dropped
    ])
    (root / "annotations" / "f1.xml").write_text(f"<annotation><filename>f1.jpg</filename>{objs}</annotation>")
    (root / "annotations" / "broken.xml").write_text("<annotation><object>")
    samples, problems = load_dataset(root)
    assert len(samples) == 1
    s = samples[0]
    assert [k for k, _ in s.boxes] == [CellKind.WBC, CellKind.RBC]
    assert s.boxes[1][1] == (90.0, 70.0, 100.0, 80.0)
    reasons = " | ".join(str(p) for p in problems)
    assert "broken.xml" in reasons and "Ghost" in reasons and "clamped" in reasons
    assert "repeats an earlier box" in reasons
    assert sum(p.action == "dropped" for p in problems) == 5


def test_yolo_and_coco_to_one_dataset(tmp_path):
    yroot = tmp_path / "y"
    _img(yroot / "images" / "train" / "a.png", 200, 100)
    (yroot / "labels" / "train").mkdir(parents=True)
    (yroot / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.1 0.1 0.05 0.1\nbad row\n")
    (yroot / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [WBC, RBC, Platelets]\n")
    ysamples, yprob = load_dataset(yroot / "data.yaml", split="train")
    assert len(yprob) == 1 and "bad row" in str(yprob[0])
    [ys] = ysamples
    assert ys.boxes[0] == (CellKind.WBC, (80.0, 30.0, 120.0, 70.0))

    croot = tmp_path / "c"
    _img(croot / "b.jpg", 50, 50)
    coco = {"images": [{"id": 1, "file_name": "b.jpg", "width": 50, "height": 50}],
            "categories": [{"id": 7, "name": "platelets"}, {"id": 8, "name": "rbc"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 8, "bbox": [10, 10, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]}]}
    (croot / "ann.json").write_text(json.dumps(coco))
    csamples, _ = load_dataset(croot / "ann.json")
    assert [k for k, _ in csamples[0].boxes] == [CellKind.RBC, CellKind.PLATELET]

    ysamples[0].source, csamples[0].source = "lab-a", "lab-b"
    out = tmp_path / "merged"
    data_yaml = write_yolo_dataset({"train": ysamples, "val": csamples}, out)
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec["names"] == {0: "wbc", 1: "rbc", 2: "platelet"}
    assert spec["train"].startswith("/") and spec["val"].startswith("/")
    labels = sorted((out / "labels" / "train").iterdir())
    assert len(labels) == 1
    rows = labels[0].read_text().split("\n")
    assert rows[0] == "0 0.500000 0.500000 0.200000 0.400000"
    val_label = next((out / "labels" / "val").iterdir()).read_text().split("\n")[0]
    assert val_label == "1 0.400000 0.400000 0.400000 0.400000"
    # the merged dataset reads back with the same boxes
    back, _ = load_dataset(data_yaml, split="train")
    assert back[0].boxes[0][0] == CellKind.WBC
    assert back[0].source == "lab-a"  # source tags survive the merge (per-source validation figures)
    assert [s.source for s in load_dataset(data_yaml, split="val")[0]] == ["lab-b"]
    np.testing.assert_allclose(back[0].boxes[0][1], (80.0, 30.0, 120.0, 70.0), atol=1e-3)
