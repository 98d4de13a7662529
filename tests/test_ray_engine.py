"""`--engine ray`: the reports of a local run, from Ray actors on a local Ray instance (loopback only)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fakes import SynthStages
from smear.cli import app
from smear.errors import SmearError
from smear.io import find_slides, write_image_atomic
from smear.pipeline.cache import FieldCache
from smear.pipeline.ray_engine import RayEngine
from smear.pipeline.run import run_slides
from smear.report import tables as rep
from smear.synth import make_field

runner = CliRunner()
CLASSICAL = ["--set", "detector=classical", "--set", "classifier=off", "--set", "cache_dir=off"]
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: 2 CPUs, no dashboard; the workers import smear and the fakes as
    this process does."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    from smear.pipeline.ray_engine import _loopback_only

    with _loopback_only(ray):  # as smear starts its own: reachable from this machine only
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def _slides(root: Path, sizes: dict[str, int], bad: dict[str, int] | None = None) -> list[Path]:
    """Slide folders of small synthetic fields, each field of its own width (the fakes key on it),
    and ``bad[name]`` unreadable fields in a slide."""
    folders, width = [], 160
    for name, n in sizes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(n):
            write_image_atomic(folder / f"f{k:02d}.png", make_field(seed=width, width=width, height=120).image_rgb)
            width += 1
        for k in range((bad or {}).get(name, 0)):
            (folder / f"f{n + k:02d}.png").write_text("text, not a PNG")
        folders.append(folder)
    return folders


def _texts(reports) -> tuple[str, str, str]:
    diffs = rep.differentials(reports)
    return rep.summary_csv(diffs), rep.to_json(reports, diffs), rep.cells_csv(reports)


@pytest.mark.slow
def test_ray_reports_match_local_for_one_and_several_slides(tmp_path, ray_local):
    folders = _slides(tmp_path, {"a": 5, "b": 3, "c": 0}, bad={"b": 1, "c": 2})  # c: every field unreadable
    build = SynthStages()
    for paths in (folders[:1], folders):
        slides = find_slides(paths)
        local = run_slides(slides, build())
        seen = []
        with RayEngine(build, field_batch=build.field_batch, workers=2) as engine:
            remote = run_slides(slides, build(), engine=engine, on_field=lambda s, item: seen.append((s, item)))
        assert _texts(remote) == _texts(local)
        assert [(s, i.field) for s, i in seen] == [(s.name, p.name) for s in slides for p in s.fields]  # in order
    assert [r.n_fields for r in remote] == [5, 3, 0] and [len(r.skipped) for r in remote] == [0, 1, 2]
    assert rep.differentials(remote)[1].n_skipped == 1


@pytest.mark.slow
def test_cli_engine_ray_writes_the_local_reports_byte_for_byte(tmp_path, ray_local):
    folders = [str(f) for f in _slides(tmp_path / "in", {"s1": 3, "s2": 2}, bad={"s2": 1})]
    out = {}
    for engine in ("local", "ray"):
        extra = ["--engine", "ray", "--workers", "2"] if engine == "ray" else []
        csv, cells, js = (tmp_path / f"{engine}.{x}" for x in ("csv", "cells.csv", "json"))
        res = runner.invoke(app, ["run", *folders, "--report", "csv", "--out", str(csv), "--cells", str(cells),
                                  *CLASSICAL, *extra])
        assert res.exit_code == 0, res.output
        warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: skipped")]
        res = runner.invoke(app, ["run", *folders, "--report", "json", "--out", str(js), *CLASSICAL, *extra])
        assert res.exit_code == 0, res.output
        out[engine] = (csv.read_bytes(), cells.read_bytes(), js.read_bytes(), warnings)
    assert out["ray"] == out["local"]
    assert len(out["local"][3]) == 1 and "f02.png" in out["local"][3][0]  # the unreadable field, said once


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_fields_rerun(tmp_path, ray_local):
    folders = _slides(tmp_path, {"a": 4, "b": 4})
    slides = find_slides(folders)
    marker = tmp_path / "killed"
    build = SynthStages(kill_width=165, marker=str(marker))  # b's second field: mid-run, on one of the workers
    with RayEngine(build, field_batch=2, workers=2) as engine:
        remote = run_slides(slides, build(), engine=engine)
    assert marker.exists(), "no worker was killed"
    assert int(marker.read_text()) in engine.pids  # one of the workers started for the run
    assert _texts(remote) == _texts(run_slides(slides, SynthStages()()))


@pytest.mark.slow
def test_resumed_ray_run_after_an_interruption_gives_the_same_report(tmp_path, ray_local):
    folders = _slides(tmp_path / "in", {"a": 4, "b": 4})
    slides = find_slides(folders)
    cache = FieldCache(tmp_path / "cache", "synth")
    with pytest.raises(SmearError, match="fault injected"):  # the run stops at b's last fields
        with RayEngine(SynthStages(fail_width=166), field_batch=2, workers=2, cache=cache) as engine:
            run_slides(slides, SynthStages()(), engine=engine, cache=cache)
    entries = list((tmp_path / "cache").rglob("*.json"))
    assert 0 < len(entries) < 8 and not list((tmp_path / "cache").rglob("*.tmp"))  # whole entries only
    log = tmp_path / "log"
    log.mkdir()
    build = SynthStages(log=str(log))
    with RayEngine(build, field_batch=2, workers=2, cache=cache) as engine:
        resumed = run_slides(slides, build(), engine=engine, cache=cache, resume=True)
    assert _texts(resumed) == _texts(run_slides(slides, SynthStages()()))
    rerun = [w for f in log.iterdir() for w in f.read_text().split()]
    assert len(rerun) == 8 - len(entries)  # the cached fields were not run again


@pytest.mark.slow
def test_html_report_on_ray_shows_the_local_engines_cells_and_outlines(tmp_path, ray_local):
    """`--report html` under `--engine ray`: the workers' stages keep the views (built with them) and
    send them back with the results; the page is the local engine's, every field, crop and outline."""
    from smear.report.html import render_html

    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(3):  # fields with white cells (the small ones of _slides have none to show)
        write_image_atomic(folder / f"f{k}.png", make_field(seed=k, width=320, height=240, n_wbc=2).image_rgb)
    slides = find_slides([folder])
    build = SynthStages(views=True)
    local = run_slides(slides, build())
    with RayEngine(build, field_batch=build.field_batch, workers=1) as engine:
        remote = run_slides(slides, build(), engine=engine)

    def page(reports):
        return render_html(reports, rep.differentials(reports), audit={"date": "today"})

    cells = [c for r in local for c in r.cells()]
    assert cells and all(c.view is not None and c.view.mask_png is not None for c in cells)
    assert page(remote) == page(local)
    assert page(local).count("data:image/jpeg;base64,") >= 3 + len(cells) and "N:C 1.00" in page(local)


def test_ray_options_without_the_extra_or_the_engine_are_one_line_errors(tmp_path, monkeypatch):
    (folder,) = _slides(tmp_path, {"s": 1})
    res = runner.invoke(app, ["run", str(folder), "--workers", "2", *CLASSICAL])
    assert res.exit_code == 1 and "go with --engine ray" in res.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as it does without the extra
    res = runner.invoke(app, ["run", str(folder), "--engine", "ray", *CLASSICAL])
    assert res.exit_code == 1
    assert res.stderr.strip() == 'error: --engine ray needs Ray, which is not installed: pip install "smear[ray]"'


def _fake_cluster(cpus: float, gpus: float, nodes: int):
    per = {"CPU": cpus / nodes, **({"GPU": gpus / nodes} if gpus else {})}
    return SimpleNamespace(cluster_resources=lambda: {"CPU": cpus, **({"GPU": gpus} if gpus else {})},
                           nodes=lambda: [{"Alive": True, "Resources": per} for _ in range(nodes)])


@pytest.mark.parametrize("cpus, gpus, nodes, workers, per_gpu, shape", [
    (16, 4, 2, None, None, (4, 4.0, 1.0)),   # GPUs: one worker per GPU, the CPUs shared out
    (16, 0, 2, None, None, (2, 8.0, 0.0)),   # CPUs only: one worker per node, all its CPUs
    (16, 0, 2, 3, None, (3, 5.0, 0.0)),
    (2, 0, 1, 2, None, (2, 1.0, 0.0)),
    (16, 4, 2, None, 0.5, (8, 2.0, 0.5)),
    (16, 4, 2, None, 0, (2, 8.0, 0.0)),      # --gpus-per-worker 0: CPU workers on GPU nodes
])
def test_worker_shape_follows_the_cluster(cpus, gpus, nodes, workers, per_gpu, shape):
    engine = RayEngine(SynthStages(), workers=workers, gpus_per_worker=per_gpu)
    assert engine._shape(_fake_cluster(cpus, gpus, nodes)) == shape
    with pytest.raises(SmearError, match="the Ray cluster has 2 CPUs"):
        RayEngine(SynthStages(), workers=3)._shape(_fake_cluster(2, 0, 1))
    with pytest.raises(SmearError, match="has 0 GPUs"):
        RayEngine(SynthStages(), gpus_per_worker=1)._shape(_fake_cluster(2, 0, 1))


@pytest.mark.slow
def test_a_whole_slide_on_ray_counts_as_the_local_engine_stops_at_n_and_resumes(tmp_path, ray_local):
    """The only whole-slide Ray test (one engine start): the same report as the local engine, tiles
    given out in the finder's order, few tiles run past the target (the tiles in flight shrink as the
    count nears it), and a resumed run takes every counted tile from the cache the workers wrote."""
    pytest.importorskip("openslide", reason="the wsi extra is not installed")
    pytest.importorskip("imagecodecs", reason="imagecodecs encodes the test slide's tiles (the test extra)")
    import dataclasses

    from wsi_synth import BLOCK, gradient_slide

    from smear.pipeline.wsi_run import SlideOutputs, WsiSettings, run_whole_slide
    from smear.taxonomy import WBC_CLASSES

    def same(rep):  # every report text (the JSON's less the seconds it took), and each tile's place
        info = dataclasses.replace(rep.whole_slide, finder_s=0.0, read_s=0.0, detect_s=0.0, tiles_from_cache=0)
        return _texts([dataclasses.replace(rep, whole_slide=info)]), [f.region for f in rep.fields]

    slide = gradient_slide(tmp_path / "gradient.tif")
    settings = WsiSettings(tile_px=BLOCK, margin_px=64)
    local = run_whole_slide(slide, SynthStages()(), settings, target_wbc=7)
    info = local.whole_slide
    assert info.reached_target and info.skipped["not_reached"] > 0
    assert sum(n for label, n in local.label_counts().items() if label in WBC_CLASSES) == 7  # stopped at N
    log = tmp_path / "log"
    log.mkdir()
    seen = []
    workers = 2
    with RayEngine(SynthStages(log=str(log)), workers=workers, cache=FieldCache(tmp_path / "cache", "synth")) as engine:
        remote = run_whole_slide(slide, None, settings, target_wbc=7, engine=engine,
                                 outputs=SlideOutputs(on_field=seen.append))
        ran = len(list(log.iterdir()))  # tiles the workers ran the models on so far
        resumed = run_whole_slide(slide, None, settings, target_wbc=7, engine=engine, resume=True)
    assert same(remote) == same(local)
    assert [f.field for f in seen] == [f.field for f in local.fields]  # in the finder's order
    run_here = info.tiles_read - info.skipped["blurred_on_read"]
    # at most 1 tile run past the last one counted (the fixed window of 2 calls of 2 tiles a worker ran 3-4)
    assert run_here <= ran <= run_here + 1
    assert ran < info.tiles_read + info.skipped["not_reached"]  # not the whole path
    assert same(resumed) == same(local)
    assert resumed.whole_slide.tiles_from_cache == run_here > 0  # per tile, written by the workers


class _Ref:
    """A fake Ray object ref: the call ran when it was sent (the worst case: nothing sent is ever
    cancelled in time)."""

    def __init__(self, value):
        self.value = value


def _fake_ray():
    errors = SimpleNamespace(RayActorError=type("RayActorError", (Exception,), {}),
                             RayTaskError=type("RayTaskError", (Exception,), {}))
    return SimpleNamespace(wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]),
                           get=lambda ref: ref.value, cancel=lambda ref: None, exceptions=errors)


def _tile_worker(wbc: list[int], ran: list[int]):
    """A fake worker: the tile of ``index`` i holds ``wbc[i]`` white cells; ``ran`` gets the index of
    each tile it runs."""
    from smear.pipeline.wsi_tiles import TileOutcome
    from smear.taxonomy import CellKind
    from smear.types import Detection, FieldResult

    def run_tiles(job, tiles, resume):
        ran.extend(t.index for t in tiles)
        return _Ref(([TileOutcome(t, None if wbc[t.index] is None else FieldResult(job.name, t.name, 64, 64, tuple(
            Detection((4.0 * k, 0.0, 4.0 * k + 3, 3.0), CellKind.WBC) for k in range(wbc[t.index]))))
            for t in tiles], []))
    return SimpleNamespace(run_tiles=SimpleNamespace(remote=run_tiles))


def _dispatch(wbc: list[int | None], target: int | None):
    """(what ``count_until`` counted, its Counter, the tiles run in the order run) over a fake-Ray
    engine of 2 workers on a path whose tile i holds ``wbc[i]`` white cells (None: blurred when read)."""
    from smear.pipeline.wsi_tiles import Counter, count_until

    job = SimpleNamespace(name="s", geo=SimpleNamespace(tile_mm2=0.0236))
    path = [SimpleNamespace(name=f"t{i}", index=i) for i in range(len(wbc))]
    ran: list[int] = []
    engine = RayEngine(SynthStages(), classified=False)
    engine.actors = [_tile_worker(wbc, ran), _tile_worker(wbc, ran)]
    counter = Counter()
    counted = list(count_until(engine.tiles(job, path, False, target_wbc=target), target, False, counter))
    return counted, counter, ran


def _tiles_past_the_stop(wbc: list[int], target: int | None) -> int:
    """Tiles run past the last one counted by ``count_until`` over a fake-Ray engine of 2 workers on a
    path whose tile i holds ``wbc[i]`` white cells; the count is checked to stop at exactly N in path
    order."""
    counted, counter, ran = _dispatch(wbc, target)
    assert [f.field for f in counted] == [f"t{i}" for i in range(len(counted))]
    assert counter.identified == (sum(wbc) if target is None else target)
    assert sorted(ran) == list(range(len(ran)))  # each tile once, in path order
    return len(ran) - len(counted)


def test_ray_tiles_in_flight_shrink_as_the_count_nears_the_target(monkeypatch):
    """Without Ray: calls complete in the order sent and every tile sent is run (none is cancelled in
    time). The fixed window of PER_WORKER calls of TILES_PER_CALL tiles a worker ran 6-7 tiles past
    the stop on these paths with 2 workers; the window that follows the count runs none on an even
    path (2 white cells a tile), and 1.25 on average, at most 5, on uneven ones (0 to 5 a tile)."""
    import numpy as np

    import smear.pipeline.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "require_ray", _fake_ray)
    even = [_tiles_past_the_stop([2] * 60, target) for target in (7, 40, 101)]
    assert even == [0, 0, 0], even
    uneven = [_tiles_past_the_stop(list(np.random.default_rng(seed).integers(0, 6, 80)), target)
              for seed in range(12) for target in (7, 40, 101)]
    assert np.mean(uneven) <= 1.5 and max(uneven) <= 5, uneven  # 1.25 when measured
    assert _tiles_past_the_stop([1] * 30, None) == 0  # no target: every tile, once


def test_ray_tiles_blurred_when_read_do_not_stall_the_dispatch(monkeypatch):
    """Tiles that come back without a result (blurred or unreadable when read) leave the tiles in flight
    too: a path that starts with a dozen of them still counts to exactly N."""
    import smear.pipeline.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "require_ray", _fake_ray)
    _, counter, ran = _dispatch([None] * 12 + [2] * 30, 20)
    assert counter.identified == 20 and sorted(ran) == list(range(len(ran))) and len(ran) <= 12 + 10 + 2


class _WorkerInThisProcess:
    """Stands in for RayEngine in ``run_job(..., ray=...)`` (no Ray): keeps what the driver hands it and
    runs the fields on the stages a worker builds (here SynthStages', not the config's models)."""

    made: list[_WorkerInThisProcess] = []

    def __init__(self, build, field_batch: int = 8, cache=None, classified: bool = True, guard=None, **_options):
        self.build, self.classified, self.guard = build, classified, guard
        self.stages = SynthStages()()
        self.crop_geometry = self.stages.crop_geometry
        type(self).made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return None

    def results(self, slides, max_pixels, resume):
        from smear.pipeline.run import iter_field_results

        for s in slides:
            yield from iter_field_results(s, self.stages, max_pixels, None, resume)


def test_with_the_ray_engine_the_driver_builds_no_stage(tmp_path, monkeypatch):
    """run_job with ``ray``: the driver reads the model folders' metas (the version, the audit, the slide
    guard's statistics) but builds no stage and loads no network; the workers build from the config."""
    import smear.nn.onnx
    import smear.pipeline.ray_engine as ray_engine
    from smear.classify.model import CnnClassifier
    from smear.config import load_config
    from smear.detect.yolo import YoloDetector
    from smear.pipeline import build
    from smear.pipeline.job import RayOptions, run_job
    from smear.segment.model import UnetSegmenter

    def refuse(*_args, **_kwargs):
        raise AssertionError("the driver built a stage")

    monkeypatch.setattr(build, "build_stages", refuse)
    for stage in (YoloDetector, CnnClassifier, UnetSegmenter):
        monkeypatch.setattr(stage, "from_dir", classmethod(refuse))
    monkeypatch.setattr(smear.nn.onnx, "load_network", refuse)
    monkeypatch.setattr(ray_engine, "RayEngine", _WorkerInThisProcess)
    _WorkerInThisProcess.made = []
    (folder,) = _slides(tmp_path, {"s": 2})
    cfg = load_config("pipeline", None, ["segmenter=unet", "cache_dir=off", "runtime=onnx"])
    result = run_job(find_slides([folder]), cfg, ray=RayOptions(workers=1))
    (engine,) = _WorkerInThisProcess.made
    assert isinstance(engine.build, ray_engine.BuildFromConfig) and engine.build.cfg == cfg  # the workers build
    assert engine.classified and engine.guard is not None  # the shipped classifier's slide guard, read here
    assert result.reports[0].n_fields == 2 and result.geometry is not None
    assert [m["stage"] for m in result.audit["models"]] == ["detector", "classifier", "segmenter"]
