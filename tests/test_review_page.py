"""The HTML review page without a browser: escaping, audit header, package data, the CLI's refusal."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fakes import FakeClassifier, FakeDetector, HalfMask, dets
from smear.config import default_config
from smear.io import find_slides
from smear.report.html import render_html
from smear.report.tables import differentials
from smear.pipeline.run import Stages, run_slide

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "smear" / "report" / "templates"
CFG = default_config("pipeline")
NASTY = "<script>alert(1)</script>"


def _page(tmp_path, slide_name="s1", field_name="f0.png", tint=(100, 60, 150), **kw):
    folder = tmp_path / "s1"
    folder.mkdir(parents=True)
    img = np.full((80, 120, 3), 210, np.uint8)
    img[10:30, 10:30] = tint
    Image.fromarray(img).save(folder / field_name)
    [slide] = find_slides([folder])
    stages = Stages(FakeDetector({120: dets(2, 3, 1)}), FakeClassifier([("SNE", 0.9), ("LY", 0.2)]),
                    **{"keep_views": True, **kw})
    rep = dataclasses.replace(run_slide(slide, stages), slide=slide_name)  # any name, "/" included
    return rep, render_html([rep], differentials([rep], CFG), cfg=CFG)


def test_every_string_is_escaped(tmp_path):
    _, page = _page(tmp_path, slide_name=f"{NASTY}&'\"", field_name="<img src=x onerror=alert(2)>.png")
    assert NASTY not in page and "<img src=x" not in page and "onerror=alert(2)>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page  # shown as text in the headings
    blob = re.search(r'<script type="application/json" id="smear-data">(.*?)</script>', page, re.DOTALL)[1]
    data = json.loads(blob)  # the data block cannot be closed early: < > & ' are \u-escaped in it
    assert data["slides"][0]["base"]["slide"] == f"{NASTY}&'\""
    assert data["slides"][0]["cells"][0]["field"].startswith("<img src=x")
    assert page.count("</script>") == 2  # the data block's and the script's


def test_script_and_styles_are_inlined_verbatim():
    """The template includes its JS and CSS as they are: no jinja syntax hides in them."""
    page = render_html([], [], cfg=CFG)
    for name in ("recount.js", "review.js", "review.css"):
        assert (TEMPLATES / name).read_text(encoding="utf-8").strip() in page


def test_audit_header_names_models_settings_and_version(tmp_path):
    from smear import __version__
    from smear.pipeline.build import audit_info, stages_version

    rep, _ = _page(tmp_path)
    audit = audit_info(CFG, stages_version(CFG))
    page = render_html([rep], differentials([rep], CFG), cfg=CFG, audit=audit)
    assert {m["stage"] for m in audit["models"]} == {"detector", "classifier"}  # segment is off by default
    for m in audit["models"]:
        assert m["name"] in page and m["version"] in page and len(m["version"]) == 12
    assert audit["run_id"] in page and f"<td>{__version__}</td>" in page
    assert re.search(r"<th>made</th><td>20\d\d-\d\d-\d\d \d\d:\d\d UTC</td>", page)
    assert "review_threshold</code>=0.5" in page and "report.ci_method</code>=wilson" in page
    assert 'id="reviewer"' in page and 'class="signoff"' in page


def _crops(page: str) -> list[np.ndarray]:
    import base64

    import cv2

    srcs = re.findall(r'<figure class="cell".*?src="data:image/jpeg;base64,([^"]+)"', page, re.DOTALL)
    return [cv2.imdecode(np.frombuffer(base64.b64decode(s), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            for s in srcs]


def test_segmented_cells_show_their_outline_and_nc_ratio(tmp_path):
    """The crops and the masks' outlines are the pipeline's: the page is made with the fields gone."""
    _, plain = _page(tmp_path / "plain")
    rep, _ = _page(tmp_path / "masked", segmenter=HalfMask(rest=1))
    for path in (tmp_path / "masked" / "s1").iterdir():
        path.unlink()
    page = render_html([rep], differentials([rep], CFG), cfg=CFG)  # no image read, no model run
    assert page.count("N:C 0.50") == 2
    plain, drawn = _crops(plain), _crops(page)
    assert len(plain) == len(drawn) == 2
    cyan = lambda im: ((im[..., 0] < 120) & (im[..., 1] > 180) & (im[..., 2] > 180)).sum()  # noqa: E731
    assert cyan(plain[0]) == 0 and cyan(drawn[0]) > 50  # the nucleus outline (the left half of the crop)
    assert page.count('<img alt="f0.png" src="data:image/jpeg;base64,') == 1  # the field, as the run kept it


def test_a_page_needs_the_runs_views(tmp_path):
    """Results made without views (Stages.keep_views off) are refused by name, not shown empty."""
    rep, _ = _page(tmp_path, slide_name="s7")
    bare = dataclasses.replace(rep, fields=tuple(dataclasses.replace(f, view=None) for f in rep.fields))
    with pytest.raises(ValueError, match="s7: its field results hold no views"):
        render_html([bare], differentials([bare], CFG), cfg=CFG)


def test_templates_ship_as_package_data():
    """A non-editable install carries the templates: pyproject's package-data globs cover each file."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = meta["tool"]["setuptools"]["package-data"]["smear"]
    files = [p.relative_to(ROOT / "smear").as_posix() for p in TEMPLATES.iterdir() if p.is_file()]
    assert {"report/templates/review.html.j2", "report/templates/recount.js"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
    assert "jinja2" in " ".join(meta["project"]["dependencies"])


def test_html_to_a_terminal_is_refused(tmp_path, monkeypatch):
    from smear import cli
    from smear.cli import run as cli_run

    _page(tmp_path)
    monkeypatch.setattr(cli_run, "_stdout_is_terminal", lambda: True)
    args = ["run", str(tmp_path / "s1"), "--report", "html", "--set", "detector=classical",
            "--set", "classifier=off"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 1 and "pass --out" in res.output and len(res.output.strip().splitlines()) == 1
    out = tmp_path / "r.html"
    res = CliRunner().invoke(cli.app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text(encoding="utf-8").startswith("<!doctype html>")


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="smear-data">(.*?)</script>', page, re.DOTALL)[1])


def test_saved_state_is_keyed_by_the_fields_content(tmp_path):
    """Two slides with one name, field count and cell count but other images get other storage keys."""
    rep_a, page_a = _page(tmp_path / "a")
    rep_b, page_b = _page(tmp_path / "b", tint=(90, 70, 160))
    assert len(rep_a.cells()) == len(rep_b.cells()) and rep_a.slide == rep_b.slide
    key_a, key_b = (_data(p)["slides"][0]["storage_key"] for p in (page_a, page_b))
    assert key_a != key_b
    assert _data(_page(tmp_path / "c")[1])["slides"][0]["storage_key"] == key_a  # the same content: the same key


def test_every_cell_is_on_the_page_once(tmp_path):
    """Cells past gallery_per_class are data the page shows on demand; each crop is in the file once."""
    rep, _ = _page(tmp_path)
    page = render_html([rep], differentials([rep], CFG), gallery_per_class=0, cfg=CFG)
    data = _data(page)["slides"][0]
    assert len(data["cells"]) == len(rep.cells()) == 2
    figures = re.findall(r'<figure class="cell"[^>]*data-id="([^"]+)"', page)
    assert not figures and set(data["more"]) == {c["id"] for c in data["cells"]} - set(figures)
    assert all(v["src"].startswith("data:image/jpeg;base64,") for v in data["more"].values())
    assert page.count("data:image/jpeg;base64,") == 2 + len(rep.fields)  # two crops and the field
