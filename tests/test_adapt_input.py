"""`smear adapt` input: corrections CSVs that a user (or an attacker) might hand it. Each bad row is
skipped and counted, or the whole input is refused in one line naming the file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from test_classify_data import draw_cell, write_png
from typer.testing import CliRunner

from smear.classify.adapt import heldout_split
from smear.classify.lab_cells import read_cells, read_corrections
from smear.cli import app
from smear.crops import cut_crop
from smear.errors import SmearError

HEADER = ["slide", "field", "box", "predicted_label", "probability", "corrected_label", "reviewer", "time"]


def _csv(path, rows, encoding="utf-8"):
    """A corrections CSV: rows of (slide, field, box, corrected label[, reviewer])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for slide, field, box, label, *rest in rows:
            w.writerow([slide, field, box, "SNE", "0.61", label, rest[0] if rest else "ann", "2026-12-01T10:00"])
    return path


def _slide(tmp_path, name="slide1", seed=7):
    field = draw_cell(120, centre=(60, 60), radius=20, seed=seed)
    write_png(tmp_path / name / "f1.png", field)
    return field


def test_boxes_outside_degenerate_or_non_finite_are_skipped_and_counted(tmp_path):
    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [
        ("slide1", "f1.png", "40,40,80,80", "LY"),
        ("slide1", "f1.png", "500,500,540,540", "LY"),      # fully outside the 120 x 120 field
        ("slide1", "f1.png", "100,100,160,160", "MO"),      # three quarters outside
        ("slide1", "f1.png", "10,10,10.0001,40", "LY"),     # 0.0001 px wide
        ("slide1", "f1.png", "nan,10,30,40", "LY"),
        ("slide1", "f1.png", "10,10,inf,40", "LY"),
    ])
    cells = read_corrections([path], 1.3, 32)
    assert len(cells) == 1 and cells.fine == ["LY"]
    assert cells.skipped == {"box outside its field": 2, "degenerate box": 1, "non-finite box": 2}


def test_huge_boxes_are_skipped_before_any_crop_is_cut(tmp_path):
    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [
        ("slide1", "f1.png", "40,40,80,80", "LY"),
        ("slide1", "f1.png", "0,0,20000,20000", "LY"),
        ("slide1", "f1.png", "0,0,1e12,1e12", "MO"),
        ("slide1", "f1.png", "-1e12,0,100,100", "MO"),
    ])
    cells = read_corrections([path], 1.3, 32)
    assert len(cells) == 1 and cells.skipped == {"box larger than its field": 3}


def test_duplicate_rows_are_removed_and_counted(tmp_path):
    _slide(tmp_path)
    boxes = [("40,40,80,80", "LY"), ("0,0,30,30", "MO"), ("80,10,110,40", "neutrophil")]
    rows = [("slide1", "f1.png", b, lab) for b, lab in boxes] * 4
    rows.append(("slide1", "f1.png", "60,60,90,90", "LY"))
    rows.append(("slide1", "f1.png", "60,60,90,90", "EO"))  # one box, two labels: neither is trusted
    path = _csv(tmp_path / "slide1" / "c.csv", rows)
    cells = read_corrections([path], 1.3, 32)
    assert len(cells) == 3 and cells.labels() == ["LY", "MO", "neutrophil"]
    assert cells.skipped == {"duplicate row": 9, "box given conflicting labels": 2}


def test_duplicate_cells_never_straddle_the_held_out_split(tmp_path):
    _slide(tmp_path)
    rows = []
    for k, x in enumerate((2, 30, 58, 86)):
        for y in (2, 44, 86):
            for shift in (0, 1, 2):  # the same cell boxed three times, a pixel apart
                rows.append(("slide1", "f1.png", f"{x + shift},{y},{x + 30 + shift},{y + 30}", ("LY", "MO")[k % 2]))
    cells = read_corrections([_csv(tmp_path / "slide1" / "c.csv", rows)], 1.3, 32)
    assert len(cells) == 36 and len(set(cells.groups)) == 12
    train, held = heldout_split(cells.strata, 0.25, seed=0, groups=cells.groups)
    assert len(held) and not {cells.groups[i] for i in train} & {cells.groups[i] for i in held}
    assert list(heldout_split(cells.strata, 0.25, seed=0, groups=cells.groups)[1]) == list(held)  # deterministic


def test_rows_over_the_configured_cap_are_refused_in_one_line(tmp_path):
    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [("slide1", "f1.png", f"{i},{i},{i + 30},{i + 30}", "LY")
                                                for i in range(6)])
    with pytest.raises(SmearError) as err:
        read_cells([path], 1.3, 32, max_rows=5)
    assert "over 5 rows" in str(err.value) and str(path) in str(err.value) and "adapt.max_rows" in err.value.hint
    assert len(read_cells([path], 1.3, 32, max_rows=6)) == 6
    res = CliRunner().invoke(app, ["adapt", "--data", str(path), "--out", str(tmp_path / "m"),
                                   "--set", "adapt.max_rows=5"])
    assert res.exit_code == 1 and "over 5 rows" in res.stderr and "Traceback" not in res.output


def test_slide_column_picks_the_slide_folder_and_refuses_another_slides_field(tmp_path):
    field_a = _slide(tmp_path / "slides", "A", seed=1)
    field_b = _slide(tmp_path / "slides", "B", seed=2)
    assert not np.array_equal(field_a, field_b)
    # the CSV sits in slide B's folder but its rows are slide A's: A's field must be cut
    path = _csv(tmp_path / "slides" / "B" / "A_corrections.csv", [("A", "f1.png", "40,40,80,80", "LY"),
                                                                   ("A", "f1.png", "0,0,30,30", "MO")])
    cells = read_corrections([path], 1.3, 32, fields=tmp_path / "slides")
    np.testing.assert_array_equal(cells.crops[0], cut_crop(field_a, (40, 40, 80, 80), 1.3, 32))
    with pytest.raises(SmearError) as err:  # without --fields only B's f1.png is found: refused
        read_corrections([path], 1.3, 32)
    assert "slide 'A'" in str(err.value) and "another slide" in str(err.value) and "\n" not in str(err.value)


def test_cp1252_csv_from_excel_is_read(tmp_path):
    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [("slide1", "f1.png", "40,40,80,80", "LY", "Dr. Müller"),
                                               ("slide1", "f1.png", "0,0,30,30", "MO", "Ségolène")],
                encoding="cp1252")
    logs = []
    cells = read_corrections([path], 1.3, 32, log=logs.append)
    assert cells.labels() == ["LY", "MO"] and any("cp1252" in m for m in logs)


def test_over_long_csv_cell_is_one_error_line(tmp_path):
    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [("slide1", "f1.png", "40,40,80,80", "LY", "x" * 131_073)])
    with pytest.raises(SmearError) as err:
        read_corrections([path], 1.3, 32)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_from_a_detector_folder_is_one_error_line(tmp_path):
    from smear.artifacts import shipped_dir

    _slide(tmp_path)
    path = _csv(tmp_path / "slide1" / "c.csv", [("slide1", "f1.png", "40,40,80,80", "LY")])
    res = CliRunner().invoke(app, ["adapt", "--data", str(path), "--out", str(tmp_path / "m"),
                                   "--from", str(shipped_dir("detector"))])
    assert res.exit_code == 1 and "not a classifier model folder" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "m").exists()
