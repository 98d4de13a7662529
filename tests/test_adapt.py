"""`smear adapt`: fine-tune a tiny classifier folder on drawn cells, from class folders and from
corrections CSVs; the model folder it writes, and its refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_classify_data import draw_cell, make_folders, write_png
from typer.testing import CliRunner

from smear.artifacts import save_model_dir
from smear.classify.adapt import Recipe, adapt, fine_tune, heldout_split, write_model
from smear.classify.lab_cells import parse_box, read_cells, read_corrections
from smear.classify.model import WEIGHTS, CnnClassifier, build_model
from smear.nn.weights import save_weights
from smear.cli import app
from smear.crops import cut_crop
from smear.types import FINE_CLASSES, SmearError

TINY = "test_efficientnet"
FAST = Recipe(epochs=2, batch=8, heldout=0.25)
CLASSES = {"LY": 6, "MO": 6, "neutrophil": 6, "EO": 4}
HEADER = ["slide", "field", "box", "predicted_label", "probability", "corrected_label", "reviewer", "time"]


@pytest.fixture()
def source(tmp_path):
    """A tiny classifier model folder, as `smear train classify` writes one."""
    torch.manual_seed(0)
    d = tmp_path / "source"
    d.mkdir()
    save_weights(build_model(TINY), d / WEIGHTS)
    meta = {"stage": "classify", "weights": WEIGHTS, "classes": list(FINE_CLASSES), "arch": TINY,
            "input_size": 32, "crop_margin": 1.3, "temperature": 1.5, "tta": 2, "trained": "2026-01-01",
            "normalize": {"mean": [0.8, 0.7, 0.75], "std": [0.2, 0.2, 0.2]}}
    save_model_dir(d, meta, {"model": {"arch": TINY}, "data": {"cache_pad": 1.25},
                             "train": {"augment": {"hed": 0.1, "scale": 0.2}}})
    return d


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS))


def test_adapt_on_class_folders_writes_a_loadable_folder(tmp_path, source):
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    out = adapt([data], tmp_path / "adapted", source, seed=0, cache_dir=tmp_path / "cache",
                recipe=FAST, log=lambda m: None)
    before, after = _weights(source), _weights(out)
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and any("classifier" in k for k in trained)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("conv_stem"))  # frozen
    meta = json.loads((out / "meta.json").read_text())
    a = meta["adaptation"]
    assert meta["adapted_from"]["model"] == str(source) and a["cells"] == sum(CLASSES.values())
    assert a["n_train"] + a["n_heldout"] == a["cells"] and a["per_class"]["neutrophil"] == 6
    assert set(meta["metrics"]["heldout"]) == {"before", "after"} and "novelty" not in meta
    card = (out / "MODEL_CARD.md").read_text()
    assert str(source) in card and f"{a['cells']} labelled cells" in card and "LY 6" in card
    clf = CnnClassifier.from_dir(out, device="cpu")
    probs = clf.classify([draw_cell(32, seed=i) for i in range(3)]).probs
    assert probs.shape == (3, len(FINE_CLASSES)) and np.allclose(probs.sum(1), 1)
    assert not list(tmp_path.glob(".adapted*"))  # no temporary folder left


def test_heldout_split_is_stratified_and_keeps_a_training_cell():
    strata = ["LY"] * 10 + ["MO"] * 5 + ["BA"]
    train, held = heldout_split(strata, 0.2, seed=3)
    assert sorted([*train, *held]) == list(range(16))
    assert [strata[i] for i in held].count("LY") == 2 and [strata[i] for i in held].count("MO") == 1
    assert 15 in train  # a class of one cell is trained on, not held out
    assert list(heldout_split(strata, 0.2, seed=3)[1]) == list(held)


def _field_csv(tmp_path, rows, name="slide1_corrections.csv"):
    field = draw_cell(120, centre=(60, 60), radius=20, seed=7)
    field[:10, :10] = (0, 255, 0)  # a mark in the corner, to check where crops come from
    write_png(tmp_path / "fields" / "f1.png", field)
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for box, label in rows:
            w.writerow(["slide1", "fields/f1.png", box, "SNE", "0.61", label, "ann", "2026-12-01T10:00"])
    return field, path


def test_corrections_csv_crops_fields_at_the_boxes(tmp_path):
    boxes = ["40,40,80,80", "0,0,30,30", "90.5,20,119,50", "10,60,50,100"]
    field, path = _field_csv(tmp_path, [(boxes[0], "LY"), (boxes[1], "neutrophil"), (boxes[2], "artefact"),
                                        (boxes[3], "Smudge"), ("5,5,25,25", "MO"),
                                        (boxes[0], "NOT_A_WBC"), (boxes[0], "")])
    logs = []
    cells = read_corrections([path], 1.625, 40, log=logs.append)
    assert len(cells) == 3 and cells.fine == ["LY", None, "MO"] and cells.group[1] == "neutrophil"
    assert cells.skipped == {"artefact or smudge": 3, "no corrected label": 1} and "3 artefact or smudge" in logs[0]
    np.testing.assert_array_equal(cells.crops[0], cut_crop(field, parse_box(boxes[0]), 1.625, 40))
    np.testing.assert_array_equal(cells.crops[1], cut_crop(field, (0, 0, 30, 30), 1.625, 40))
    assert tuple(cells.crops[1][12, 12]) == (0, 255, 0)  # the corner mark, padded around


def test_adapt_from_corrections_csv(tmp_path, source):
    rows = [(f"{x},{y},{x + 30},{y + 30}", lab) for lab in ("LY", "MO", "neutrophil")
            for x, y in ((10, 10), (50, 50), (80, 20), (20, 80))]
    _, path = _field_csv(tmp_path, rows)
    out = adapt([path], tmp_path / "out", source, recipe=FAST, log=lambda m: None)
    assert json.loads((out / "meta.json").read_text())["adaptation"]["cells"] == 12


@pytest.mark.parametrize("case, message", [
    ("empty", "no images found"),
    ("unknown", "not in the taxonomy: blast"),
    ("unreadable", "bad.png"),
    ("column", "missing column(s) corrected_label"),
    ("label", "corrected label 'blast' is not a class"),
    ("box", "expected x1 < x2"),
    ("field", "no such file"),
])
def test_bad_input_is_one_error_naming_the_file(tmp_path, case, message):
    if case in ("empty", "unknown", "unreadable"):
        data = tmp_path / "lab"
        (data / "LY").mkdir(parents=True)
        if case != "empty":
            make_folders(data, {"LY": 2, "MO": 2} if case == "unreadable" else {"LY": 2, "blast": 2})
        if case == "unreadable":
            (data / "LY" / "bad.png").write_bytes(b"not a png")
    else:
        data = tmp_path / "c.csv"
        header = [h for h in HEADER if h != "corrected_label"] if case == "column" else HEADER
        row = {"slide": "s", "field": "missing.png" if case == "field" else "f.png",
               "box": "5,5,3,3" if case == "box" else "1,1,9,9", "corrected_label": "blast" if case == "label" else "LY"}
        write_png(tmp_path / "f.png", draw_cell(20))
        with open(data, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            w.writeheader()
            w.writerow(row)
    with pytest.raises(SmearError) as err:
        read_cells([data], 1.625, 40, cache_dir=tmp_path / "cache")
    text = str(err.value)
    assert message in text and "\n" not in text
    assert (case not in ("unreadable", "column", "label", "box")) or str(data if case != "unreadable" else
                                                                       data / "LY" / "bad.png") in text


def test_out_that_holds_files_is_refused(tmp_path, source):
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    cells = read_cells([data], 1.625, 40, cache_dir=tmp_path / "cache")
    adapted = fine_tune(cells, source, Recipe(epochs=1, batch=8), log=lambda m: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(SmearError, match="not empty"):
        write_model(adapted, tmp_path / "full")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert (write_model(adapted, tmp_path / "empty") / "meta.json").is_file()


def test_cli_prints_the_run_line_and_errors_in_one_line(tmp_path, source, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the crop cache goes under ~/.cache
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    res = CliRunner().invoke(app, ["adapt", "--data", str(data), "--out", str(tmp_path / "m"), "--from", str(source),
                                   "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert f"smear run SLIDE_FOLDER --set classifier_model={tmp_path / 'm'}" in res.stdout
    res = CliRunner().invoke(app, ["adapt", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2"),
                                   "--from", str(source)])
    assert res.exit_code == 1 and "nowhere" in res.stderr and "Traceback" not in res.output


def test_training_the_classifier_layer_only_keeps_the_novelty_score(tmp_path, source):
    from smear.classify import novelty as nov

    dim = build_model(TINY).num_features
    rng = np.random.default_rng(0)
    nov.save(source, nov.fit(rng.normal(size=(40, dim)), rng.integers(0, 11, 40)))
    meta = json.loads((source / "meta.json").read_text())
    meta["novelty"] = {"threshold": 5.0, "quantile": 0.97, "file": nov.NOVELTY_FILE}
    (source / "meta.json").write_text(json.dumps(meta))
    cells = read_cells([make_folders(tmp_path / "lab", CLASSES, size=40)], 1.625, 40, cache_dir=tmp_path / "c")
    out = write_model(fine_tune(cells, source, Recipe(epochs=1, batch=8, train_blocks=0), log=lambda m: None),
                      tmp_path / "out")
    before, after = _weights(source), _weights(out)
    assert {k for k in before if not torch.equal(before[k], after[k])} <= {"classifier.weight", "classifier.bias"}
    assert CnnClassifier.from_dir(out, device="cpu").has_novelty
    assert "kept" in json.loads((out / "meta.json").read_text())["adaptation"]["novelty"]


def test_refit_all_trains_the_folder_model_on_every_cell(tmp_path, source):
    cells = read_cells([make_folders(tmp_path / "lab", CLASSES, size=40)], 1.625, 40, cache_dir=tmp_path / "c")
    recipe = Recipe(epochs=1, batch=8, heldout=0.25, refit_all=True, augment="mild")
    out = write_model(fine_tune(cells, source, recipe, log=lambda m: None), tmp_path / "out")
    a = json.loads((out / "meta.json").read_text())["adaptation"]
    assert a["n_train"] == a["cells"] == len(cells) and a["n_heldout"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert f"trained again, on all {len(cells)} cells" in card and "mild augmentation" in card
    with pytest.raises(SmearError, match="use source or mild"):
        fine_tune(cells, source, Recipe(epochs=1, augment="none"), log=lambda m: None)
