"""Hardening of the tables smear writes (smear/report/tables.py): no spreadsheet formula runs."""

from __future__ import annotations

import io

import pandas as pd

from hostile import CLASSICAL, runner, slide
from smear.cli import app


def test_csv_cells_that_start_a_formula_are_quoted(tmp_path):
    folder = tmp_path / "=1+1"
    slide(folder, seeds=(1,))
    (folder / "field_01.png").rename(folder / "@SUM(A1).png")
    cells = tmp_path / "cells.csv"
    res = runner.invoke(app, ["run", str(folder), "--report", "csv", "--cells", str(cells), *CLASSICAL])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(io.StringIO(res.stdout), dtype=str)
    assert summary.loc[0, "slide"] == "'=1+1"
    table = pd.read_csv(cells, dtype=str)
    assert set(table["slide"]) == {"'=1+1"} and set(table["field"]) == {"'@SUM(A1).png"}
