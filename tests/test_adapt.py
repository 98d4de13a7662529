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

from smear.artifacts import ModelMeta, save_model_dir
from smear.classify.adapt import Brakes, Inputs, Recipe, adapt, fine_tune, heldout_split, write_model
from smear.classify.lab_cells import parse_box, read_cells, read_corrections
from smear.classify.model import WEIGHTS, CnnClassifier, build_model
from smear.nn.weights import save_weights
from smear.cli import app
from smear.crops import cut_crop
from smear.errors import SmearError
from smear.taxonomy import FINE_CLASSES

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
    save_model_dir(ModelMeta.of(meta, d), {"model": {"arch": TINY}, "data": {"cache_pad": 1.25},
                                              "train": {"augment": {"hed": 0.1, "scale": 0.2}}})
    return d


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS))


def test_adapt_on_class_folders_writes_a_loadable_folder(tmp_path, source):
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    out = adapt([data], tmp_path / "adapted", source, FAST, Inputs(cache_dir=tmp_path / "cache"),
                Brakes(allow_worse=True), log=lambda m: None)
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
    write_png(tmp_path / "slide1" / "f1.png", field)
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for box, label in rows:
            w.writerow(["slide1", "f1.png", box, "SNE", "0.61", label, "ann", "2026-12-01T10:00"])
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
    rows = [(f"{x + d},{y + d},{x + d + 30},{y + d + 30}", lab) for d, lab in ((0, "LY"), (3, "MO"), (6, "neutrophil"))
            for x, y in ((10, 10), (50, 50), (80, 20), (20, 80))]
    _, path = _field_csv(tmp_path, rows)
    out = adapt([path], tmp_path / "out", source, FAST, Inputs(fields=tmp_path), Brakes(force=True, allow_worse=True),
                log=lambda m: None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["adaptation"]["cells"] == 12 and meta["adaptation"]["brakes"]["forced"]
    assert "Adapted with `--force`" in (out / "MODEL_CARD.md").read_text()


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
                                   "--epochs", "1", "--allow-worse"])
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


# ---------------------------------------------------------------- the brakes


def _lab_csv(tmp_path, counts, predicted="SNE"):
    """A corrections CSV of drawn cells on fields of slide1, ``counts`` cells per corrected label."""
    rows, k = [], 0
    for label, n in counts.items():
        for _ in range(n):
            write_png(tmp_path / "slide1" / f"f{k:03d}.png", draw_cell(60, radius=15, seed=k))
            rows.append(["slide1", f"f{k:03d}.png", "15,15,45,45", predicted, "0.6", label, "ann", "t"])
            k += 1
    path = tmp_path / "slide1_corrections.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    return path


def test_too_few_cells_are_refused_with_the_counts_and_the_force_flag(tmp_path, source):
    path = _lab_csv(tmp_path, {"LY": 6, "MO": 5, "neutrophil": 3})
    with pytest.raises(SmearError) as err:
        adapt([path], tmp_path / "out", source, FAST, Inputs(fields=tmp_path), log=lambda m: None)
    msg = str(err.value)
    assert "14 usable cells (LY 6, MO 5, neutrophil 3)" in msg and "at least 20" in msg and "\n" not in msg
    assert "--force" in err.value.hint and not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["adapt", "--data", str(path), "--out", str(tmp_path / "out"), "--from", str(source),
                                   "--fields", str(tmp_path), "--set", "adapt.min_cells=30"])
    assert res.exit_code == 1 and "at least 30" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.output


def test_too_few_cells_of_a_corrected_class_are_refused(tmp_path, source):
    from smear.classify.adapt import Limits

    path = _lab_csv(tmp_path, {"LY": 10, "MO": 10, "EO": 1})
    with pytest.raises(SmearError, match=r"too few cells of a corrected class \(EO 1\).*at least 2"):
        adapt([path], tmp_path / "out", source, FAST, Inputs(fields=tmp_path), log=lambda m: None)
    # cells the reviewer confirmed (predicted == corrected) do not count as corrected classes
    path = _lab_csv(tmp_path / "b", {"LY": 10, "MO": 10, "EO": 1}, predicted="EO")
    cells = read_cells([path], 1.625, 40, fields=tmp_path / "b")
    from smear.classify.adapt import check_enough

    check_enough(cells, Limits(min_cells=20, min_per_class=2))  # EO confirmed, not corrected: accepted
    with pytest.raises(SmearError, match="LY 10"):
        check_enough(cells, Limits(min_cells=20, min_per_class=11))


def test_cells_are_always_held_out():
    strata = ["LY", "LY", "MO", "MO", "EO", "EO"]  # a fifth of two cells rounds to none in each class
    train, held = heldout_split(strata, 0.2, seed=0)
    assert len(held) == 1 and len(train) == 5
    train, held = heldout_split(["LY", "LY", "LY", "MO"], 0.2, seed=1, groups=[0, 0, 1, 2])
    assert len(held) >= 1 and not ({0, 1} <= set(held) and 0 in train)


def _biased(source, winner):
    """Set the source's classifier layer so that it calls every cell ``winner``."""
    from safetensors.torch import load_file, save_file

    w = load_file(str(source / WEIGHTS))
    w["classifier.weight"].zero_()
    w["classifier.bias"].fill_(-5.0)
    w["classifier.bias"][FINE_CLASSES.index(winner)] = 5.0
    save_file(w, str(source / WEIGHTS))


@pytest.mark.slow
def test_a_worse_model_is_refused_and_nothing_is_written(tmp_path, source, monkeypatch):
    import smear.classify.adapt as adapt_mod

    _biased(source, "LY")  # the source calls every cell LY: right on most of this lab's cells
    data = make_folders(tmp_path / "lab", {"LY": 20, "MO": 4}, size=40)

    def worse(net, *args, **kwargs):  # a training run that ruins the head: every cell called BA
        with torch.no_grad():
            net.get_classifier().bias[FINE_CLASSES.index("BA")] = 50.0

    monkeypatch.setattr(adapt_mod, "_train", worse)
    with pytest.raises(SmearError) as err:
        adapt([data], tmp_path / "out", source, FAST, Inputs(cache_dir=tmp_path / "c"), log=lambda m: None)
    msg = str(err.value)
    assert "worse than its source on the 5 held-out cells" in msg and "0.800 -> 0.000" in msg
    assert "nothing written" in msg and "--allow-worse" in err.value.hint and "\n" not in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    out = adapt([data], tmp_path / "out", source, FAST, Inputs(cache_dir=tmp_path / "c"), Brakes(allow_worse=True),
                log=lambda m: None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metrics"]["heldout"]["after"]["type5_accuracy"] == 0.0 and meta["adaptation"]["brakes"]["allow_worse"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "Before and after, on the 5 held-out cells" in card and "| 0.800 | 0.000 |" in card


def _with_novelty(source, extra_guard=True):
    from smear.classify import novelty as nov

    dim = build_model(TINY).num_features
    rng = np.random.default_rng(0)
    nov.save(source, nov.fit(rng.normal(size=(40, dim)), rng.integers(0, 11, 40)))
    meta = json.loads((source / "meta.json").read_text())
    meta["novelty"] = {"threshold": 5.0, "quantile": 0.97, "file": nov.NOVELTY_FILE, "method": "mahalanobis"}
    if extra_guard:  # a slide guard's statistics, as smear.classify.guard stores them
        from smear.classify import guard

        k, c = 2, len(guard.COLOUR_NAMES)
        guard.save(source, {"projection": rng.normal(size=(dim, k)), "null_mean": np.zeros(k),
                            "null_whiten": np.eye(k), "lab_means": np.zeros((1, c)), "lab_whiten": np.eye(c)[None]})
        meta["guard"] = {"file": guard.GUARD_FILE, "thresholds": {"features": 1.0}}
    (source / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_adapting_without_source_data_keeps_the_source_guard(tmp_path, source):
    _with_novelty(source)
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    logs = []
    out = adapt([data], tmp_path / "out", source, FAST, Inputs(cache_dir=tmp_path / "c"), Brakes(allow_worse=True),
                log=logs.append)
    before, after = _weights(source), _weights(out)
    assert {k for k in before if not torch.equal(before[k], after[k])} <= {"classifier.weight", "classifier.bias"}
    assert (out / "novelty.safetensors").read_bytes() == (source / "novelty.safetensors").read_bytes()
    assert (out / "guard.safetensors").read_bytes() == (source / "guard.safetensors").read_bytes()
    assert json.loads((out / "meta.json").read_text())["guard"] == {"file": "guard.safetensors",
                                                                    "thresholds": {"features": 1.0}}
    assert any("classifier layer only" in m for m in logs)
    clf = CnnClassifier.from_dir(out, device="cpu")
    novelty = clf.classify([draw_cell(32, seed=i) for i in range(3)]).novelty
    assert clf.has_novelty and novelty is not None and np.isfinite(novelty).all() and clf.guard is not None
    assert "kept" in (out / "MODEL_CARD.md").read_text().split("## Guard")[1]


@pytest.mark.slow
def test_adapting_with_source_data_refits_the_novelty_score(tmp_path, source):
    _with_novelty(source)
    data = make_folders(tmp_path / "lab", CLASSES, size=40)
    src = make_folders(tmp_path / "src", {"SNE": 8, "LY": 8, "MO": 8, "EO": 8, "BA": 8}, size=40)
    out = adapt([data], tmp_path / "out", source, FAST, Inputs(cache_dir=tmp_path / "c", source_data=[src]),
                Brakes(allow_worse=True), log=lambda m: None)
    before, after = _weights(source), _weights(out)
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("blocks.") for k in trained)  # the last blocks trained, not only the head
    meta = json.loads((out / "meta.json").read_text())
    nv = meta["novelty"]
    assert "smear adapt" in nv["fitted_on"] and nv["threshold"] > 0 and nv["threshold"] != 5.0
    assert nv["n_fit"] == 30 + meta["adaptation"]["n_train"]  # 8 - round(8 x 0.2) of each source class + the lab
    assert (out / "novelty.safetensors").read_bytes() != (source / "novelty.safetensors").read_bytes()
    assert "refitted" in meta["adaptation"]["novelty"]
    assert not (out / "guard.safetensors").exists() and "guard" not in meta  # fitted on the source's features
    clf = CnnClassifier.from_dir(out, device="cpu")
    novelty = clf.classify([draw_cell(32, seed=i) for i in range(4)]).novelty
    assert clf.has_novelty and np.isfinite(novelty).all()


@pytest.mark.slow
def test_run_warns_once_when_the_classifier_has_no_guard(tmp_path, source):
    from smear.io import write_image_atomic
    from smear.synth import make_field

    slide = tmp_path / "slide"
    slide.mkdir()
    for i in range(2):
        write_image_atomic(slide / f"f{i}.png", make_field(i, n_wbc=2).image_rgb)
    args = ["run", str(slide), "--report", "csv", "--set", "detector=classical", "--set", "classifier=cnn",
            "--set", "cache_dir=off", "--set", f"classifier_model={source}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("no novelty score") == 1 and "domain guard" in res.stderr
    _with_novelty(source, extra_guard=False)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "no novelty score" not in res.stderr
