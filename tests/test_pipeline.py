"""The pipeline with fake stages: counts, unidentified cells, skipped fields, golden CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fakes import FakeClassifier, FakeDetector, dets
from smear.io import find_slides
from smear.report.tables import cells_csv, differentials, summary_csv, summary_frame, to_csv, to_json
from smear.pipeline.run import Stages, run_slide
from smear.taxonomy import UNIDENTIFIED

GOLDEN = Path(__file__).parent / "golden"


def _slide(tmp_path: Path) -> Path:
    folder = tmp_path / "slideA"
    folder.mkdir()
    Image.fromarray(np.full((60, 100, 3), 220, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((60, 90, 3), 220, np.uint8)).save(folder / "b.png")
    (folder / "c.png").write_text("not an image")
    return folder


def _stages(classified: bool) -> tuple[Stages, FakeDetector, FakeClassifier]:
    det = FakeDetector({100: dets(3, 5, 1), 90: dets(2, 4, 0)})
    clf = FakeClassifier([("SNE", 0.9), ("LY", 0.8), ("SNE", 0.4), ("MO", 0.95), ("ERB", 0.7)])
    return Stages(det, clf if classified else None, review_threshold=0.5, field_batch=2), det, clf


def test_detector_only_counts_and_skip(tmp_path):
    [slide] = find_slides([_slide(tmp_path)])
    stages, det, _ = _stages(classified=False)
    rep = run_slide(slide, stages)
    assert [f.field for f in rep.fields] == ["a.png", "b.png"]
    assert [s.field for s in rep.skipped] == ["c.png"] and "c.png" in rep.skipped[0].reason
    assert det.batches == [2]  # the unreadable field's batch still ran the two good ones together
    assert summary_csv(differentials([rep])) == (GOLDEN / "detector_only.csv").read_text()


def test_classified_counts_unidentified_and_golden(tmp_path):
    [slide] = find_slides([_slide(tmp_path)])
    stages, _, clf = _stages(classified=True)
    rep = run_slide(slide, stages)
    assert all(shape == (16, 16, 3) for shape in clf.crop_shapes) and len(clf.crop_shapes) == 5
    assert clf.calls == [5]  # the crops of both fields went to the classifier in one batch
    labels = [c.label for c in rep.cells()]
    assert labels == ["SNE", "LY", UNIDENTIFIED, "MO", "ERB"]
    df = summary_frame(differentials([rep]))
    row = df.iloc[0]
    assert row["n_wbc"] == 3 and row["n_unidentified"] == 1 and row["ERB_n"] == 1
    wbc_pcts = [row[f"{c}_pct"] for c in ("SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO")]
    assert abs(sum(wbc_pcts) - 100.0) < 0.02
    assert pd.isna(row["ERB_pct"]) and pd.isna(row["PLATELET_pct"])
    assert to_csv(df) == (GOLDEN / "classified.csv").read_text()


def test_cells_csv_and_json(tmp_path):
    [slide] = find_slides([_slide(tmp_path)])
    stages, _, _ = _stages(classified=True)
    rep = run_slide(slide, stages)
    cells = pd.read_csv(__import__("io").StringIO(cells_csv([rep])))
    assert list(cells.columns) == ["slide", "field", "x0", "y0", "x1", "y1", "kind", "det_score", "label", "prob", "novelty"]
    assert len(cells) == 15
    assert cells["kind"].value_counts().to_dict() == {"rbc": 9, "wbc": 5, "platelet": 1}
    assert cells.loc[cells.kind == "wbc", "label"].tolist() == ["SNE", "LY", UNIDENTIFIED, "MO", "ERB"]
    assert cells.loc[cells.kind == "rbc", "label"].isna().all()
    js = to_json([rep], differentials([rep]))
    assert '"reason"' in js and "c.png" in js and "NaN" not in js


def test_streamed_slide_keeps_counts_not_fields(tmp_path):
    """keep_fields=False: no FieldResult kept, the same summary (golden) as a slide that kept them."""
    [slide] = find_slides([_slide(tmp_path)])
    seen = []
    stages, _, _ = _stages(classified=True)
    rep = run_slide(slide, stages, on_field=seen.append, keep_fields=False)
    assert rep.fields == () and rep.n_fields == 2 and len(seen) == 3
    assert rep.label_counts()["SNE"] == 1 and rep.label_counts()[UNIDENTIFIED] == 1
    assert summary_csv(differentials([rep])) == (GOLDEN / "classified.csv").read_text()


def test_cells_writer_matches_cells_csv_and_is_atomic(tmp_path):
    from smear.report.tables import CellsWriter

    [slide] = find_slides([_slide(tmp_path)])
    stages, _, _ = _stages(classified=True)
    rep = run_slide(slide, stages)
    out = tmp_path / "cells.csv"
    w = CellsWriter(out)
    for fr in rep.fields:
        w.write(rep.slide, fr)
    assert not out.exists()  # nothing at the destination until close()
    w.close()
    assert out.read_text() == cells_csv([rep])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    w2 = CellsWriter(tmp_path / "other.csv")
    w2.abort()
    assert not (tmp_path / "other.csv").exists() and not list(tmp_path.glob(".other*"))
