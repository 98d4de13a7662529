"""Hardening of `smear run`'s outputs and messages (smear/cli/run.py, smear/io.check_outputs)."""

from __future__ import annotations

import errno
import os

import pytest

from hostile import CLASSICAL, no_models, one_line_error, runner, slide
from smear.cli import app


@pytest.mark.parametrize("option", ["--out", "--cells"])
def test_an_output_that_is_a_fifo_or_a_device_is_not_replaced(tmp_path, option, monkeypatch):
    slide(tmp_path / "s", seeds=(1,))
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", option, str(fifo), *CLASSICAL])
    one_line_error(res, "out.csv", "not a regular file")
    assert fifo.exists() and not fifo.is_file()  # still the FIFO
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", option, "/dev/null", *CLASSICAL])
    one_line_error(res, "/dev/null", "not a regular file")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_a_cells_write_failing_partway_says_how_many_fields_are_cached(tmp_path, monkeypatch):
    from smear.report import tables

    slide(tmp_path / "s", seeds=(1, 2, 3))
    calls = []
    real = tables.CellsWriter.write

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tables.CellsWriter, "write", fail_second)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(tmp_path / "c.csv"),
                              "--set", "field_batch=1", *CLASSICAL, "--set", f"cache_dir={tmp_path / 'cache'}"])
    one_line_error(res, "c.csv")
    assert "every field" not in res.stderr
    assert "2 of 3 fields" in res.stderr, res.stderr  # the second field's result was cached before its row failed
