"""Whole-slide files: pyramidal TIFFs written with tifffile from smear.synth fields laid out with a
density gradient; the finder picks the monolayer, counting stops at the target, reports carry the slide."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is not installed")
pytest.importorskip("tifffile", reason="tifffile writes the test slides (the test extra)")
pytest.importorskip("imagecodecs", reason="imagecodecs encodes the test slides' JPEG and LZW tiles (the test extra)")

from fakes import ContentClassifier  # noqa: E402
from wsi_synth import BLOCK, COLUMNS, MPP, ROWS, gradient_slide, kind_of  # noqa: E402

from smear.pipeline.run import Stages  # noqa: E402
from smear.pipeline.wsi_run import SlideOutputs, WsiSettings, geometry, read_tile, run_whole_slide  # noqa: E402
from smear.report.summary import differential  # noqa: E402
from smear.taxonomy import CellKind  # noqa: E402
from smear.wsi import finder  # noqa: E402
from smear.wsi.slide import WholeSlide, is_whole_slide, thumbnail  # noqa: E402
from smear.wsi.write import TiffTiles, write_pyramid  # noqa: E402

SETTINGS = WsiSettings(tile_px=BLOCK, margin_px=64)  # one reading tile per block of the synthetic slide
LABELS = [("LY", 0.9), ("SNE", 0.85), ("MO", 0.8)]
TEST_SET = ["--set", f"wsi.tile_px={BLOCK}", "--set", "wsi.margin_px=64", "--set", "detector=classical",
            "--set", "classifier=off"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return gradient_slide(tmp_path_factory.mktemp("wsi") / "gradient.tif")


def _stages():
    from smear.detect.classical import ClassicalDetector

    return Stages(detector=ClassicalDetector(), classifier=ContentClassifier(LABELS), version="wsi-test")


def _block(name: str) -> tuple[int, int]:
    x, y = (int(v[1:]) for v in name.split("_"))
    return y // BLOCK, x // BLOCK


def _flat(value: int):
    def render(x0, y0, w, h, ds):
        out = np.full((h, w, 3), value, np.uint8)
        out[..., 0] = (np.arange(x0, x0 + w) // 7 % 200)[None, :]
        return out
    return render


@pytest.mark.parametrize("compression", ["jpeg", "lzw"])
def test_pyramid_levels_mpp_and_regions(tmp_path, compression):
    path = write_pyramid(tmp_path / "p.tif", 1200, 900, _flat(180), mpp=0.25, levels=3,
                         tiles=TiffTiles(compression=compression))
    assert is_whole_slide(path)
    with WholeSlide(path) as s:
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
        assert (s.width, s.height) == (1200, 900)
        assert s.file_mpp() == pytest.approx(0.25)
        region = s.read(100, 50, 300, 200)
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        want = (np.arange(100, 400) // 7 % 200)
        tol = 0 if compression == "lzw" else 8
        assert np.abs(region[100, :, 0].astype(int) - want).max() <= tol
        assert s.level_for(3.0).index == 1 and s.level_for(0.5).index == 0
        assert thumbnail(s, 10).shape == (90, 120, 3)
        outside = s.read(1150, 850, 100, 100)  # past the edge: white, not black
        assert outside[-1, -1].tolist() == [255, 255, 255]


def test_a_field_tiff_is_not_a_whole_slide(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "f.tif")
    assert not is_whole_slide(tmp_path / "f.tif")
    assert not is_whole_slide(tmp_path)


def test_serpentine_starts_at_the_thin_end_and_alternates():
    def t(r, c, d, kind="monolayer"):
        return finder.TileScore(r, c, c * 10, r * 10, 10, d, 0.0, 0.0, None, kind)
    # density falls along x: thick at col 0, feathered edge at col 3
    tiles = [t(r, 0, 2.0, "thick") for r in range(3)] + [t(r, 1, 0.6) for r in range(3)]
    tiles += [t(r, 2, 0.4) for r in range(3)] + [t(r, 3, 0.1, "edge") for r in range(3)]
    path = finder.serpentine(tiles)
    assert [(p.row, p.col) for p in path] == [(0, 2), (1, 2), (2, 2), (2, 1), (1, 1), (0, 1)]


def test_sharpness_tells_blur_apart():
    import cv2
    from smear.synth import make_field

    img = make_field(3, 384, 384, n_rbc=20, n_wbc=1, flat=True).image_rgb
    assert finder.sharpness(img) > 0.45
    assert finder.sharpness(cv2.GaussianBlur(img, (0, 0), 4.0)) < 0.36
    assert finder.sharpness(np.full((64, 64, 3), 200, np.uint8)) == 0.0


@pytest.mark.slow
def test_finder_picks_the_monolayer_and_skips_blurred_and_empty(slide):
    with WholeSlide(slide) as s:  # its speed is a benchmark's (benchmarks/wsi.py --finder), not a test's
        geo = geometry(s, SETTINGS)
        ds = SETTINGS.finder_mpp / geo.mpp
        plan = finder.plan(thumbnail(s, ds), ds, geo.tile_l0, s.width, s.height, SETTINGS.finder,
                           lambda t: read_tile(s, geo, t.x0 + 64, t.y0 + 64, 384)[0])
    assert len(plan.tiles) == ROWS * len(COLUMNS)
    kinds = [kind_of(*_block(t.name)) for t in plan.path]
    assert kinds.count("mono") / len(kinds) >= 0.95
    on_path = {_block(t.name) for t in plan.path}
    for r in range(ROWS):
        for c in range(len(COLUMNS)):
            if kind_of(r, c) in ("blurred", "empty", "bare", "thick", "edge"):
                assert (r, c) not in on_path, (r, c, kind_of(r, c))
    judged = {_block(t.name): t.kind for t in plan.tiles}
    assert all(judged[b] == "blurred" for b in [(1, 4), (1, 5)])
    assert judged[(2, 6)] == "empty" and all(judged[(r, 0)] == "thick" for r in range(ROWS))
    # a lab's order: from the feathered edge's side of the monolayer towards the thick end, column by column
    cols = [t.col for t in plan.path]
    assert cols == sorted(cols, reverse=True)


@pytest.mark.slow
def test_count_stops_at_the_target_then_all_reads_every_monolayer_tile(slide, tmp_path):
    rep = run_whole_slide(slide, _stages(), SETTINGS, target_wbc=7, outputs=SlideOutputs(quality_map_dir=tmp_path))
    d = differential(rep)
    info = rep.whole_slide
    assert d.n_wbc == 7 and info.reached_target
    assert all(kind_of(*_block(f.field)) == "mono" for f in rep.fields)
    assert info.tiles_counted == rep.n_fields < 15 and info.skipped["not_reached"] > 0
    assert info.skipped["blurred"] == 2 and info.skipped["empty"] >= 1
    assert info.area_mm2 == pytest.approx(rep.n_fields * (BLOCK * MPP) ** 2 / 1e6, rel=1e-3)
    assert info.platelets_per_hpf is not None and info.platelets_1e9_per_l == pytest.approx(
        info.platelets_per_hpf * 20, abs=0.1)
    assert Path(info.quality_map).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    every = run_whole_slide(slide, _stages(), SETTINGS, target_wbc=None)
    assert every.n_fields == 15 and every.whole_slide.skipped["not_reached"] == 0
    assert differential(every).n_wbc > 7
    # a cell is counted once: no two WBC boxes (level-0 px) of different tiles are the same cell
    boxes = [f.region.level0(d.box_xyxy) for f in every.fields for d in f.detections if d.kind == CellKind.WBC]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            iw = min(a[2], b[2]) - max(a[0], b[0])
            ih = min(a[3], b[3]) - max(a[1], b[1])
            smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            assert iw <= 0 or ih <= 0 or iw * ih < 0.5 * smaller


@pytest.mark.slow
def test_pixel_size_from_config_else_estimated(tmp_path):
    path = gradient_slide(tmp_path / "nompp.tif", mpp=None, compression="lzw", levels=2)
    with WholeSlide(path) as s:
        assert s.file_mpp() is None
        geo = geometry(s, WsiSettings(mpp=0.1))
        assert (geo.mpp, geo.mpp_source) == (0.1, "config")
        warned = []
        geo = geometry(s, WsiSettings(), warned.append)
        # smear.synth draws red cells ~84 px across: 7.5 um / 84 px
        assert geo.mpp_source == "estimated" and geo.mpp == pytest.approx(7.5 / 84, rel=0.12)
        assert "estimated" in warned[0]
    rep = run_whole_slide(path, _stages(), WsiSettings(tile_px=BLOCK, margin_px=64), target_wbc=3)
    assert rep.whole_slide.platelets_1e9_per_l is None  # not from an estimated pixel size


@pytest.mark.slow
def test_resume_reads_no_tile_again(slide, tmp_path):
    from smear.pipeline.cache import FieldCache

    cache = FieldCache(tmp_path / "cache", "wsi-test")
    first = run_whole_slide(slide, _stages(), SETTINGS, target_wbc=9, cache=cache)
    again = run_whole_slide(slide, _stages(), SETTINGS, target_wbc=9, cache=cache, resume=True)
    assert first.whole_slide.tiles_from_cache == 0
    assert again.whole_slide.tiles_from_cache == again.whole_slide.tiles_read == first.whole_slide.tiles_read > 0
    assert [f.field for f in again.fields] == [f.field for f in first.fields]
    assert [f.detections for f in again.fields] == [f.detections for f in first.fields]
    assert [f.region for f in again.fields] == [f.region for f in first.fields]
    assert differential(again).row() == differential(first).row()


def _run(args, tmp_path):
    from typer.testing import CliRunner

    from smear.cli import app

    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


@pytest.mark.slow
def test_cli_writes_every_report_of_a_whole_slide(slide, tmp_path):
    out = tmp_path / "out"
    res = _run([str(slide), "--report", "csv", "--out", str(out / "r.csv"), "--cells", str(out / "cells.csv"),
                "--target-wbc", "6", *TEST_SET], tmp_path)
    assert res.exit_code == 0, res.output
    row = next(csv.DictReader((out / "r.csv").open()))
    assert row["slide"] == "gradient" and row["n_wbc"] == "6" and row["wsi_mpp_source"] == "file"
    assert int(row["wsi_tiles_counted"]) >= 2 and row["wsi_skipped_blurred"] == "2"
    assert (out / "gradient.quality.png").is_file()
    cells = list(csv.DictReader((out / "cells.csv").open()))
    wbc = [c for c in cells if c["kind"] == "wbc"]
    assert len(wbc) == 6
    from smear.wsi.slide import WholeSlide

    with WholeSlide(slide) as ws:
        width, height = ws.width, ws.height
    for c in cells:
        x, y = (int(v[1:]) for v in c["field"].split("_"))
        assert x <= (float(c["x0_l0"]) + float(c["x1_l0"])) / 2 < x + BLOCK  # the tile owns its cells
        assert 0 <= float(c["x0_l0"]) <= float(c["x1_l0"]) <= width  # on the slide, margins or not
        assert 0 <= float(c["y0_l0"]) <= float(c["y1_l0"]) <= height
        assert float(c["x_um"]) == pytest.approx((float(c["x0_l0"]) + float(c["x1_l0"])) / 2 * MPP, abs=0.02)
    res = _run([str(slide), "--report", "json", "--out", str(out / "r.json"), "--all", *TEST_SET], tmp_path)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "r.json").read_text())["slides"][0]
    assert data["whole_slide"]["target_wbc"] is None and data["whole_slide"]["tiles_counted"] == 15
    assert data["fields"][0]["region"]["scale"] == pytest.approx(1.0)
    res = _run([str(slide), "--target-wbc", "3", *TEST_SET], tmp_path)  # the table on stdout
    assert res.exit_code == 0 and "whole slide 5632x1536 px at 0.08 um/px (file)" in res.output
    assert "target 3 WBC reached" in res.output and "2 blurred" in res.output


@pytest.mark.slow
def test_html_page_shows_the_quality_map_and_links_crops_to_their_place(slide, tmp_path):
    import cv2

    from smear.pipeline.cache import FieldCache
    from smear.report.html import render_html

    stages = dataclasses.replace(_stages(), keep_views=True)
    cache = FieldCache(tmp_path / "cache", "wsi-test")
    rep = run_whole_slide(slide, stages, SETTINGS, target_wbc=5, cache=cache)
    page = render_html([rep], [differential(rep)])
    assert 'id="qmap-0"' in page and "data:image/png;base64," in page
    assert page.count('id="s0-x') == rep.n_fields  # every counted tile is on the page, with its anchor
    first = rep.fields[0]
    assert 'class="pos" href="#s0-x' in page
    assert f"{first.field} <small>x " in page  # the tile's place on the slide
    assert "tiles counted of 33" in page and "per HPF" in page
    shown = cv2.imdecode(np.frombuffer(first.view.image_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert shown.shape == (first.height, first.width, 3)  # the tile as the run read it
    again = run_whole_slide(slide, stages, SETTINGS, target_wbc=5, cache=cache, resume=True)
    assert again.whole_slide.tiles_from_cache == again.n_fields == rep.n_fields
    assert [f.view.digest for f in again.fields] == [f.view.digest for f in rep.fields]  # from beside the cache entries
    assert [c.view for c in again.cells()] == [c.view for c in rep.cells()]


class _LocalTileEngine:
    """Stands in for RayEngine in ``smear run --engine ray`` (no Ray): builds the stages as a worker
    would and runs the tiles it is handed here, counting them."""

    handed: list[str] = []

    def __init__(self, build, cache=None, classified=True, guard=None, **_options):
        from smear.pipeline.build import build_stages

        self.stages = build_stages(build.cfg, views=build.keep_views)
        self.cache, self.classified, self.guard = cache, classified, guard
        self.crop_geometry = self.stages.crop_geometry

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return None

    def tiles(self, job, tiles, resume, target_wbc=None):
        from smear.pipeline.wsi_tiles import tile_outcomes

        with WholeSlide(job.path) as s:
            for out in tile_outcomes(s, job, tiles, self.stages, self.cache, resume):
                type(self).handed.append(out.tile.name)
                yield out


@pytest.mark.slow
def test_cli_engine_ray_hands_a_whole_slides_tiles_to_the_engine(slide, tmp_path, monkeypatch):
    import smear.pipeline.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "require_ray", lambda: None)
    monkeypatch.setattr(ray_engine, "RayEngine", _LocalTileEngine)
    _LocalTileEngine.handed = []
    out = {}
    for engine in ("local", "ray"):
        csv_out, cells = tmp_path / f"{engine}.csv", tmp_path / f"{engine}.cells.csv"
        res = _run([str(slide), "--engine", engine, "--target-wbc", "6", "--report", "csv", "--out", str(csv_out),
                    "--cells", str(cells), *TEST_SET], tmp_path)
        assert res.exit_code == 0, res.output
        out[engine] = (csv_out.read_bytes(), cells.read_bytes())
    assert out["ray"] == out["local"]
    counted = [row["field"] for row in csv.DictReader(out["local"][1].decode().splitlines())]
    assert set(counted) <= set(_LocalTileEngine.handed) and len(_LocalTileEngine.handed) >= 2


def test_cli_refuses_target_with_all(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", 800, 600, _flat(200), mpp=0.25, levels=2)
    res = _run([str(path), "--target-wbc", "5", "--all"], tmp_path)
    assert res.exit_code != 0 and "exclude each other" in res.output


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    path = write_pyramid(tmp_path / "s.tif", 800, 600, _flat(200), mpp=0.25, levels=2)
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    res = _run([str(path)], tmp_path)
    assert res.exit_code != 0
    assert 'pip install "smear[wsi]"' in res.output


def test_a_folder_of_slide_files_and_fields(tmp_path):
    from PIL import Image

    from smear.cli.wsi import check_whole_slides
    from smear.io import find_slides

    scans = tmp_path / "scans"
    (scans / "more").mkdir(parents=True)
    a = write_pyramid(scans / "a.tif", 800, 600, _flat(200), mpp=0.25, levels=2)
    b = write_pyramid(scans / "more" / "b.tif", 800, 600, _flat(200), mpp=0.25, levels=2)
    whole, rest = check_whole_slides([scans], None, False, recursive=True)
    assert whole.paths == [a, b] and rest == []  # a folder of slide files only: no field slide
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(scans / "field.png")
    whole, rest = check_whole_slides([scans], None, False, recursive=False)
    assert whole.paths == [a] and rest == [scans]
    [fields] = find_slides(rest)
    assert [p.name for p in fields.fields] == ["field.png"]  # the pyramid is not read as a field


def test_tile_budget_keeps_in_flight_what_the_missing_white_cells_need():
    from smear.pipeline.wsi_tiles import TileBudget, TileOutcome
    from smear.types import Detection, FieldResult

    def tile(n_wbc: int) -> TileOutcome:
        dets = tuple(Detection((4.0 * k, 0.0, 4.0 * k + 3, 3.0), CellKind.WBC) for k in range(n_wbc))
        return TileOutcome(None, FieldResult("s", "t", 64, 64, dets))

    budget = TileBudget(target_wbc=100, classified=False, most=8, start=4, prior_wbc=0.5)
    assert budget.window() == 4  # before the first results: one call a worker, the target far at the prior
    for _ in range(4):
        budget.took(tile(10))
    assert budget.window() == 6  # 60 missing at 10 a tile
    budget.took(tile(0))
    budget.took(TileOutcome(None, None))  # blurred when read: no result, says nothing of the rate
    assert budget.wbc == 40 and budget.tiles == 5 and budget.window() == 8  # 60 missing at 40 / 5 a tile
    assert budget.taken == 6  # every outcome leaves the tiles in flight
    for _ in range(5):
        budget.took(tile(11))
    assert budget.window() == 1  # 5 missing at 95 / 11 a tile
    assert TileBudget(5, False, 8, 4, prior_wbc=2.0).window() == 3  # a near target at the prior
    assert TileBudget(5, False, 8, 4, prior_wbc=0.0).window() == 4  # no prior: the first calls
    assert TileBudget(None, False, 8, 4, prior_wbc=2.0).window() == 8  # --all
    blurred_first = TileBudget(5, False, 8, 4, prior_wbc=2.0)
    blurred_first.took(TileOutcome(None, None))
    assert blurred_first.window() == 3  # still the prior's window, not the widest one


def test_run_job_counts_a_whole_slides_tiles_as_finished(slide):
    from smear.cli.wsi import WholeSlideRun
    from smear.config import load_config
    from smear.pipeline.job import JobOutputs, run_job

    cfg = load_config("pipeline", None, [f"wsi.tile_px={BLOCK}", "wsi.margin_px=64", "detector=classical",
                                         "classifier=off", "cache_dir=off"])
    seen = []
    result = run_job([], cfg, whole=WholeSlideRun([slide]).options(cfg, 6, False, None, None),
                     outputs=JobOutputs(on_field=lambda _name, item: seen.append(item)))
    (rep,) = result.reports
    assert rep.whole_slide.tiles_counted == len(seen) > 1
    assert result.finished == (len(seen), len(seen))  # the tiles, as a field slide's fields would be


def test_a_box_in_a_tile_margin_past_the_slide_edge_is_clipped_to_the_slide():
    """A top-left tile's margin reaches past the slide (read as white): its boxes stay on the slide."""
    from smear.types import SlideRegion

    region = SlideRegion(-40.0, -40.0, 2.0, 0.25, extent=(1000, 800))
    assert region.level0((10.0, 15.0, 60.0, 70.0)) == (0.0, 0.0, 80.0, 100.0)
    assert region.level0((500.0, 400.0, 530.0, 430.0)) == (960.0, 760.0, 1000.0, 800.0)
    assert SlideRegion(-40.0, -40.0, 2.0).level0((10.0, 15.0, 60.0, 70.0)) == (-20.0, -10.0, 80.0, 100.0)
