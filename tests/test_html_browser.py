"""The HTML report rendered by a real headless browser (Debian's chromium; .ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fakes import ContentClassifier, FakeDetector, dets
from smear.config import default_config
from smear.io import find_slides, write_text_atomic
from smear.report.html import render_html
from smear.report.tables import differentials
from smear.pipeline.run import Stages, run_slide

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_chromium(tmp_path):
    folder = tmp_path / "slide"
    folder.mkdir()
    by_width = {}
    for i in range(3):
        img = np.full((120, 160 + i, 3), 215, np.uint8)
        img[20:60, 20:60] = (110, 50 + 30 * i, 150)
        Image.fromarray(img).save(folder / f"f{i}.png")
        by_width[160 + i] = dets(3, 4, 1)
    [slide] = find_slides([folder])
    stages = Stages(FakeDetector(by_width), ContentClassifier([("SNE", 0.9), ("LY", 0.3), ("ERB", 0.8)]),
                    keep_views=True)
    rep = run_slide(slide, stages)
    page = tmp_path / "report.html"
    write_text_atomic(page, render_html([rep], differentials([rep], default_config("pipeline"))))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = run("--dump-dom").stdout
    assert "<table class=\"summary\">" in dom and "SNE" in dom
    assert "Flags" in dom and "too few cells counted" in dom
    assert 'id="gallery"' in dom and dom.count("<img") >= 3 + len(rep.cells())
    shot = tmp_path / "shot.png"
    run(f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.exists() and shot.stat().st_size > 10_000
