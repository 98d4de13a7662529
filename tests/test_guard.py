"""The slide guard: slide-level evidence that a slide is misread (smear.classify.guard), the
implausible differential and the domain score in every report, on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smear.classify.guard import COLOUR_NAMES, SlideGuard, colour_stats
from smear.classify.guard_fit import random_shift
from smear.config import default_config
from smear.report.summary import differential
from smear.taxonomy import CellKind
from smear.types import CellPrediction, Detection, FieldResult, GuardSums, SlideReport

CFG = default_config("pipeline")
GCFG = CFG.guard


def _slide(labels: list[str], novelty: float = 0.4, prob: float = 0.95, evidence=None, name="s") -> SlideReport:
    dets, cells = [], []
    for label in labels:
        d = Detection((0.0, 0.0, 10.0, 10.0), CellKind.WBC, 0.9)
        dets.append(d)
        cells.append(CellPrediction(d, label, prob, {label: prob}, novelty=novelty))
    dets += [Detection((0.0, 0.0, 5.0, 5.0), CellKind.RBC, 0.9)] * 500
    return SlideReport(name, (FieldResult(name, "f.png", 640, 480, tuple(dets), tuple(cells)),), classified=True,
                       evidence=evidence or {})


NORMAL = ["SNE"] * 60 + ["LY"] * 30 + ["MO"] * 6 + ["EO"] * 3 + ["BA"]


def test_a_normal_differential_passes_and_a_confident_wrong_class_fires():
    """Neutrophils moved into EO at 0.95 with low novelty (the issue's slide): novel share 0, and the
    guard still fires on the differential, first among the warnings, saying which evidence and how much."""
    quiet = differential(_slide(NORMAL), CFG.report, CFG.flags, GCFG).row()
    assert quiet["domain_warnings"] == [] and quiet["domain_score"] < 1.0
    assert quiet["novel_share"] == 0.0 and set(quiet["domain_evidence"]) == {"novel_share", "differential"}
    moved = ["EO"] * 64 + ["LY"] * 30 + ["MO"] * 6  # every neutrophil called EO
    row = differential(_slide(moved), CFG.report, CFG.flags, GCFG).row()
    assert row["novel_share"] == 0.0
    assert row["domain_score"] == pytest.approx(64.0 / 40.0)
    first = row["domain_warnings"][0]
    assert first.startswith("unlike the training data or misread: domain score 1.60 (threshold 1)")
    assert "a differential almost no blood has (EO 64.0% with neutrophils 0.0%): differential 1.60" in first
    assert "eosinophilia" in " ".join(row["flags"])  # the clinical flag is still there, apart from the guard


@pytest.mark.parametrize("labels, seen", [
    (["BA"] * 30 + ["SNE"] * 70, "BA 30.0%"),
    (["PMY"] * 50 + ["SNE"] * 50, "PMY 50.0%"),  # blasts read as confident promyelocytes
    (["MO"] * 70 + ["SNE"] * 30, "MO 70.0%"),    # ... or as monocytes
    (["ERB"] * 60 + ["SNE"] * 100, "60 NRBC per 100 WBC with lymphocytes 0.0%"),
])
def test_implausible_differential_rules(labels, seen):
    row = differential(_slide(labels), CFG.report, CFG.flags, GCFG).row()
    assert row["domain_evidence"]["differential"] > 1.0 and seen in row["domain_warnings"][0]


def test_differential_rules_wait_for_enough_cells_and_follow_the_config():
    few = differential(_slide(["EO"] * 10), CFG.report, CFG.flags, GCFG).row()
    assert "differential" not in few["domain_evidence"] and few["domain_warnings"] == []
    strict = GCFG.model_copy(update={"implausible": GCFG.implausible.model_copy(update={"monocyte_pct": 5.0})})
    assert differential(_slide(NORMAL), CFG.report, CFG.flags, strict).row()["domain_evidence"]["differential"] == 1.2
    lenient = GCFG.model_copy(update={"max_domain_score": 2.0})
    moved = ["EO"] * 64 + ["LY"] * 36
    assert differential(_slide(moved), CFG.report, CFG.flags, lenient).row()["domain_warnings"] == []


def test_fitted_evidence_enters_the_score_csv_and_json():
    from smear.report.tables import summary_csv, to_json

    rep = _slide(NORMAL, evidence={"features": 2.5, "colour": 1.3, "confidence": 0.4})
    d = differential(rep, CFG.report, CFG.flags, GCFG)
    assert d.domain_score == 2.5 and d.domain_evidence["features"] == 2.5
    w = d.domain_warnings[0]
    assert "features 2.50" in w and "colour 1.30" in w and "confidence" not in w
    assert w.index("features 2.50") < w.index("colour 1.30")  # strongest first
    header, line = summary_csv([d]).splitlines()[:2]
    cols = header.split(",")
    assert cols.index("domain_score") == cols.index("novel_share") + 1
    assert line.split(",")[cols.index("domain_score")] == "2.5" and "domain_evidence" not in cols
    data = json.loads(to_json([rep], [d]))
    summary = data["slides"][0]["summary"] if "slides" in data else data[0]
    assert summary["domain_evidence"]["features"] == 2.5 and summary["domain_warnings"][0] == w


# ---------------------------------------------------------------- the fitted statistics


def _guard(k: int = 2, thresholds=None, labs=None) -> SlideGuard:
    labs = labs if labs is not None else np.zeros((1, len(COLOUR_NAMES)))
    stats = {"projection": np.eye(4, k, dtype=np.float32), "null_mean": np.zeros(k, np.float32),
             "null_whiten": np.eye(k, dtype=np.float32), "lab_means": np.asarray(labs, np.float32),
             "lab_whiten": np.stack([np.eye(len(COLOUR_NAMES), dtype=np.float32)] * len(labs))}
    return SlideGuard(stats, {"thresholds": thresholds or {"features": 0.5, "novelty_mean": 0.8, "confidence": 0.2,
                                                           "colour": 1.0}})


def test_slide_evidence_from_sums_is_debiased_and_needs_enough_cells():
    g = _guard()
    rng = np.random.default_rng(0)
    sums = GuardSums()
    for u in rng.normal(0, 1, (400, 2)):  # cells like the validation cells: u ~ N(0, I)
        sums.add(CellPrediction(Detection((0, 0, 1, 1), CellKind.WBC), "SNE", 0.9, {"SNE": 0.9}, novelty=0.5,
                                guard=(*u, *[0.0] * len(COLOUR_NAMES))))
    ev = g.evidence(sums)
    assert ev["features"] < 1.0 and ev["colour"] == 0.0
    assert ev["novelty_mean"] == pytest.approx(0.5 / 0.8) and ev["confidence"] == pytest.approx(0.1 / 0.2)
    drift = GuardSums()
    for u in rng.normal(1.0, 1, (100, 2)):  # every cell moved by 1 s.d. along both directions
        drift.add(CellPrediction(Detection((0, 0, 1, 1), CellKind.WBC), "EO", 0.95, {"EO": 0.95}, novelty=0.5,
                                 guard=(*u, *[2.0] * len(COLOUR_NAMES))))
    ev = g.evidence(drift)
    assert ev["features"] == pytest.approx(np.sqrt(2 - 2 / 100) / 0.5, rel=0.2)
    assert ev["colour"] == pytest.approx(np.sqrt(8 * 4.0), rel=1e-4)
    few = GuardSums()
    few.add(CellPrediction(Detection((0, 0, 1, 1), CellKind.WBC), "EO", 0.9, {"EO": 0.9}, guard=(9.0,) * 10))
    assert g.evidence(few) == {}


def test_colour_stats_see_a_stain_shift():
    from smear.synth import make_field

    f = make_field(3, 320, 240, n_wbc=3)
    crops = [f.image_rgb[int(d.box_xyxy[1]):int(d.box_xyxy[3]), int(d.box_xyxy[0]):int(d.box_xyxy[2])]
             for d in f.detections if d.kind == CellKind.WBC]
    plain = colour_stats(crops)
    assert plain.shape == (len(crops), len(COLOUR_NAMES)) and np.isfinite(plain).all()
    pink = colour_stats([np.clip(c * np.array([1.0, 0.7, 0.8]), 0, 255).astype(np.uint8) for c in crops])
    assert (pink[:, 4] > plain[:, 4] + 0.1).all() and (pink[:, 0] <= plain[:, 0] + 1e-6).all()  # green OD up
    shift = random_shift(np.random.default_rng(0), 0.0)
    assert np.array_equal(shift(crops[0]), crops[0])  # strength 0: the crop as it was


# ---------------------------------------------------------------- through the pipeline


class _ShiftFooledClassifier:
    """A classifier that a pink stain fools the way another lab's stain fooled the shipped one: its
    neutrophils become confident EO with low novelty. Its guard vectors are real (colour statistics
    of the crops; the feature part is the mean redness, standing in for the drift of the features)."""

    crop_margin, input_size = 1.3, 32
    classes = ("SNE", "EO")

    def __init__(self, guard: SlideGuard):
        self.guard = guard

    def classify(self, crops):
        from smear.types import ClassScores

        red = np.array([c[..., 0].mean() - c[..., 1].mean() for c in crops]) / 40.0
        pink = red > 0.6
        probs = np.where(pink[:, None], [[0.04, 0.96]], [[0.96, 0.04]])
        u = np.stack([red - 0.3, np.zeros(len(crops))], 1)
        return ClassScores(self.classes, probs, np.full(len(crops), 0.4), np.concatenate([u, colour_stats(crops)], 1))


def _pink(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float32) * np.array([1.0, 0.55, 0.75]) + np.array([20.0, 0, 0]),
                   0, 255).astype(np.uint8)


@pytest.mark.slow
def test_pipeline_guard_fires_on_a_shift_that_keeps_novelty_low(tmp_path):
    """Plain drawn fields pass; the same fields through a pink cast are read as EO with novelty 0.4:
    the novel share stays 0, and the guard fires on the differential, the colour and the features,
    the same whether the slide is streamed or kept, and from the field cache."""
    from smear.io import Slide, write_image_atomic
    from smear.pipeline.cache import field_from_dict, field_to_dict
    from smear.pipeline.run import Stages, run_slide
    from smear.crops import cut_crop
    from smear.synth import make_field

    fields = [make_field(s, 320, 240, n_wbc=4) for s in range(1, 13)]
    truth = {}

    class TruthDetector:
        def detect(self, images):
            return [truth[im.tobytes()[:4096]] for im in images]

    plain_crops = [cut_crop(f.image_rgb, d.box_xyxy, 1.3, 32) for f in fields for d in f.detections
                   if d.kind == CellKind.WBC]
    lab = colour_stats(plain_crops)
    stats = {"projection": np.eye(4, 2, dtype=np.float32), "null_mean": np.zeros(2, np.float32),
             "null_whiten": np.eye(2, dtype=np.float32), "lab_means": lab.mean(0)[None],
             "lab_whiten": np.linalg.cholesky(np.linalg.inv(np.cov(lab, rowvar=False) + 1e-4 * np.eye(8)))[None]}
    guard = SlideGuard(stats, {"thresholds": {"features": 0.3, "novelty_mean": 0.8, "confidence": 0.2, "colour": 3.0},
                               "min_cells": 20})
    stages = Stages(detector=TruthDetector(), classifier=_ShiftFooledClassifier(guard))
    rows, reports = {}, {}
    for name, shift in (("plain", lambda im: im), ("pink", _pink)):
        paths = []
        for k, f in enumerate(fields):
            image = shift(f.image_rgb)
            truth[image.tobytes()[:4096]] = list(f.detections)
            paths.append(write_image_atomic(tmp_path / name / f"{k:02d}.png", image))
        slide = Slide(name, tuple(sorted(paths)))
        reports[name] = run_slide(slide, stages)
        streamed = run_slide(slide, stages, keep_fields=False)
        assert streamed.evidence == reports[name].evidence
        # drawn fields have few red cells per white cell: that check is not what this test is about
        rows[name] = differential(reports[name], CFG.report, CFG.flags, GCFG.model_copy(update={"max_wbc_per_rbc": 10.0})).row()
    assert rows["plain"]["domain_warnings"] == [] and rows["plain"]["domain_score"] < 1.0
    pink = rows["pink"]
    assert pink["novel_share"] == 0.0 and pink["EO_pct"] == 100.0
    ev = pink["domain_evidence"]
    assert ev["differential"] > 1 and ev["colour"] > 1 and ev["features"] > 1 and ev["novelty_mean"] < 1
    assert pink["domain_warnings"][0].startswith("unlike the training data or misread: domain score")
    fr = reports["pink"].fields[0]
    back = field_from_dict(json.loads(json.dumps(field_to_dict(fr))), fr.slide, fr.field, fr.path)
    assert [c.guard for c in back.cells] == [c.guard for c in fr.cells] and fr.cells[0].guard is not None


# ---------------------------------------------------------------- fitting from a run folder


@pytest.mark.slow
def test_train_guard_fits_a_run_and_the_model_runs_with_and_without_it(tmp_path):
    """``smear train guard RUN`` on a tiny run: guard.safetensors, meta["guard"] and the card section
    are written; the loaded classifier emits guard vectors; without the statistics it still runs and
    the pipeline says so once; a model without a novelty score is refused with the command to fit it."""
    from test_classify_data import make_pbc
    from typer.testing import CliRunner

    from smear.classify.guard import GUARD_FILE
    from smear.classify.model import CnnClassifier
    from smear.cli import app
    from smear.pipeline.build import guard_notice, model_metas

    pbc = make_pbc(tmp_path / "pbc", {p: 14 for p in ("SNE", "LY", "MO")}, size=40)
    run = tmp_path / "run"
    args = ["train", "classify", "--out", str(run)]
    for s in ("model.arch=test_efficientnet", "model.input_size=32", f"data.root={pbc}", "model.tta=1",
              f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch=8", "train.device=cpu",
              "train.patience=0", "model.novelty_quantile=null"):
        args += ["--set", s]
    assert CliRunner().invoke(app, args).exit_code == 0
    model = run / "model"
    refused = CliRunner().invoke(app, ["train", "guard", str(run), "--draws", "4"])
    assert refused.exit_code != 0 and "needs the model's novelty score" in refused.stderr
    assert f"smear train novelty {run}" in refused.stderr
    assert CliRunner().invoke(app, ["train", "novelty", str(run), "--quantile", "0.9"]).exit_code == 0
    res = CliRunner().invoke(app, ["train", "guard", str(run), "--draws", "4"])
    assert res.exit_code == 0, res.output
    assert "slide guard thresholds" in res.stdout
    meta = json.loads((model / "meta.json").read_text())
    g = meta["guard"]
    assert (model / GUARD_FILE).is_file() and set(g["thresholds"]) == {"features", "novelty_mean", "confidence", "colour"}
    assert all(v > 0 for v in g["thresholds"].values()) and g["k"] == 4 and g["temperature_shift"] > 0
    assert g["fit"]["one_source_slides"] == {} and g["fit"]["slides"] == 200 + 4 * 8  # too few val cells for one-source slides
    assert "## Slide guard" in (model / "MODEL_CARD.md").read_text()
    clf = CnnClassifier.from_dir(model, device="cpu")
    crops = [np.full((32, 32, 3), 200, np.uint8)] * 3
    vectors = clf.classify(crops).guard
    assert vectors.shape == (3, 4 + len(COLOUR_NAMES)) and np.isfinite(vectors).all()
    cfg = CFG.model_copy(update={"classifier_model": str(model)})
    assert guard_notice(cfg, model_metas(cfg)) is None
    del meta["guard"]
    (model / "meta.json").write_text(json.dumps(meta))
    bare = CnnClassifier.from_dir(model, device="cpu")
    assert bare.guard is None and bare.classify(crops).guard is None
    notice = guard_notice(cfg, model_metas(cfg))
    assert "no slide guard statistics" in notice and "smear train guard" in notice


def test_a_broken_guard_file_is_one_model_error(tmp_path):
    from smear.errors import ModelError

    meta = {"guard": {"file": "guard.safetensors", "thresholds": {"features": 1.0}}}
    with pytest.raises(ModelError, match="missing"):
        SlideGuard.from_dir(tmp_path, meta)
    (tmp_path / "guard.safetensors").write_text('{"stats": [1, 2, 3]}')
    with pytest.raises(ModelError, match="not the slide guard's statistics"):
        SlideGuard.from_dir(tmp_path, meta)
    assert SlideGuard.from_dir(tmp_path, {}) is None


def test_the_guard_fit_draws_clean_slides_of_each_training_source_alone(tmp_path):
    """A slide of one training lab alone is read well but sits further from the mixture: the fit draws
    clean slides of each source with enough validation cells, found by the root that holds each file."""
    from types import SimpleNamespace

    from smear.classify.guard_fit import clean_slide_pools, sources_of

    (tmp_path / "pbc").mkdir()
    (tmp_path / "raabin").mkdir()
    specs = [{"name": "pbc", "root": str(tmp_path / "pbc")}, {"name": "raabin", "root": str(tmp_path / "raabin")}]
    items = [SimpleNamespace(path=tmp_path / "pbc" / "LY" / "a.jpg"), SimpleNamespace(path=tmp_path / "raabin" / "b.jpg"),
             SimpleNamespace(path=tmp_path / "elsewhere" / "c.jpg")]
    assert sources_of(items, specs) == ["pbc", "raabin", "?"]
    pools, counts = clean_slide_pools(["pbc"] * 30 + ["raabin"] * 10 + ["pbc"] * 5)
    assert counts == {"pbc": 100} and len(pools) == 300 and pools[:200] == [None] * 200
    assert all(set(p.tolist()) == set(range(30)) | set(range(40, 45)) for p in pools[200:])
    assert clean_slide_pools(None) == ([None] * 200, {})
