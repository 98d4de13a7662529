"""Resume after an interruption gives the identical report; the HTML report holds what it promises."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from PIL import Image

from fakes import ContentClassifier, FakeDetector, HalfMask, dets
from smear.config import default_config
from smear.io import find_slides, read_image as _read
from smear.pipeline.cache import FieldCache
from smear.report.html import render_html
from smear.report.tables import cells_csv, differentials, summary_csv, to_json
from smear.pipeline.run import Stages, iter_field_results, run_slide

CFG = default_config("pipeline")
LABELS = [("SNE", 0.9), ("LY", 0.8), ("MO", 0.3), ("EO", 0.95)]


def _slide(tmp_path, n=7):
    folder = tmp_path / "slide"
    folder.mkdir()
    widths = []
    for i in range(n):
        w = 100 + i
        img = np.full((80, w, 3), 200, np.uint8)
        img[10:30, 10:30] = (90, 40 + 20 * i, 140)  # each field's cells look different
        Image.fromarray(img).save(folder / f"f{i}.png")
        widths.append(w)
    by_width = {w: dets(1 + i % 3, 2, i % 2) for i, w in enumerate(widths)}
    [slide] = find_slides([folder])
    return slide, by_width


def _stages(by_width):
    return Stages(FakeDetector(by_width), ContentClassifier(LABELS), review_threshold=0.5, field_batch=3,
                  version="v1")


def _texts(rep):
    diffs = differentials([rep], CFG)
    return summary_csv(diffs), to_json([rep], diffs), cells_csv([rep])


def test_interrupted_run_resumes_to_identical_report(tmp_path):
    slide, by_width = _slide(tmp_path)
    full = _texts(run_slide(slide, _stages(by_width)))

    cache = FieldCache(tmp_path / "cache", "v1")
    first = _stages(by_width)
    gen = iter_field_results(slide, first, 10**8, cache, resume=False)
    for _ in range(4):  # "interrupted" after four fields
        next(gen)
    gen.close()
    assert sum(first.detector.batches) == 6  # two batches of three ran

    second = _stages(by_width)
    resumed = run_slide(slide, second, cache=cache, resume=True)
    assert sum(second.detector.batches) == 1  # only the field never finished ran again
    assert [f.field for f in resumed.fields] == [p.name for p in slide.fields]
    assert _texts(resumed) == full  # byte for byte: summary CSV, JSON with per-field results, cells CSV


def test_cache_is_keyed_by_content_and_version(tmp_path):
    slide, by_width = _slide(tmp_path, n=2)
    cache = FieldCache(tmp_path / "cache", "v1")
    run_slide(slide, _stages(by_width), cache=cache)
    assert cache.get(slide.fields[0], "slide") is not None
    assert FieldCache(tmp_path / "cache", "v2").get(slide.fields[0], "slide") is None
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(slide.fields[0])  # content changed
    assert cache.get(slide.fields[0], "slide") is None


def test_resumed_run_makes_the_same_page(tmp_path):
    """Fields from the cache (which keeps no pixels) get their views again, read and masked once more
    by the pipeline: the resumed run's page is the fresh run's, outlines included."""
    slide, by_width = _slide(tmp_path, n=5)

    def stages():
        return dataclasses.replace(_stages(by_width), segmenter=HalfMask(rest=1), keep_views=True)

    cache = FieldCache(tmp_path / "cache", "v1")
    fresh = run_slide(slide, stages(), cache=cache)
    again = stages()
    resumed = run_slide(slide, again, cache=cache, resume=True)
    assert again.detector.batches == []  # every field came from the cache
    page = lambda rep: render_html([rep], differentials([rep], CFG), cfg=CFG, audit={"date": "today"})  # noqa: E731
    assert "N:C 0.50" in page(fresh) and page(resumed) == page(fresh)


class _Counted:
    """A segmenter that counts the crops it masks."""

    def __init__(self, inner):
        self.inner, self.crop_margin, self.input_size, self.masked = inner, inner.crop_margin, inner.input_size, 0

    def segment(self, crops):
        self.masked += len(crops)
        return self.inner.segment(crops)


def test_resumed_page_takes_the_views_from_the_cache_reading_and_masking_nothing(tmp_path, monkeypatch):
    """The views a run kept are stored beside its cache entries (which stay byte for byte those of a run
    without views): a resumed run makes the same page without reading or masking a field again. Views
    that do not fit their entry (tampered, or of another result) are not believed: the field is read
    and masked again for them, and the page is still the same."""
    import smear.pipeline.run as run_mod

    slide, by_width = _slide(tmp_path, n=4)

    def stages(**kw):
        return dataclasses.replace(_stages(by_width), segmenter=_Counted(HalfMask(rest=1)), **kw)

    plain = FieldCache(tmp_path / "plain", "v1")
    run_slide(slide, stages(), cache=plain)
    cache = FieldCache(tmp_path / "cache", "v1")
    fresh = run_slide(slide, stages(keep_views=True), cache=cache)
    entries = sorted(p.relative_to(cache.folder) for p in cache.folder.rglob("*.json"))
    assert [(cache.folder / e).read_bytes() for e in entries] == [(plain.folder / e).read_bytes() for e in entries]
    sidecars = sorted(cache.folder.rglob("*.views"))
    assert len(sidecars) == 4 and not list(plain.folder.rglob("*.views"))

    read = []
    monkeypatch.setattr(run_mod, "read_image", lambda path, **kw: read.append(path) or _read(path, **kw))
    again = stages(keep_views=True)
    resumed = run_slide(slide, again, cache=cache, resume=True)
    page = lambda rep: render_html([rep], differentials([rep], CFG), cfg=CFG, audit={"date": "today"})  # noqa: E731
    assert read == [] and again.segmenter.masked == 0 and again.detector.batches == []
    assert page(resumed) == page(fresh)

    stored = json.loads(sidecars[0].read_text())
    stored["views"]["field"][2] = "0" * 64  # another field's digest, the checksum left as it was
    sidecars[0].write_text(json.dumps(stored))
    sidecars[1].write_text("{not json")
    again = stages(keep_views=True)
    resumed = run_slide(slide, again, cache=cache, resume=True)
    assert len(read) == 2 and again.segmenter.masked > 0 and page(resumed) == page(fresh)

    # a checksum that holds over odd content (no views, views of the wrong shape, JSON nested past
    # Python's recursion limit) is passed over as well: the field is read again, the run goes on
    from smear.pipeline.cache import VIEWS_FORMAT, _checksum

    for odd in (None, {"field": 5}, [[[]]] * 3):
        entry = json.loads(sidecars[2].read_text())["entry"] if sidecars[2].read_text().startswith("{") else None
        body = {"format": VIEWS_FORMAT, "entry": entry, "sha256": _checksum(odd)}
        if odd is not None:
            body["views"] = odd
        sidecars[2].write_text(json.dumps(body))
        read.clear()
        resumed = run_slide(slide, stages(keep_views=True), cache=cache, resume=True)
        assert read and page(resumed) == page(fresh)
    sidecars[3].write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    read.clear()
    resumed = run_slide(slide, stages(keep_views=True), cache=cache, resume=True)
    assert read and page(resumed) == page(fresh)


def test_html_report_is_self_contained(tmp_path):
    slide, by_width = _slide(tmp_path, n=3)
    rep = run_slide(slide, dataclasses.replace(_stages(by_width), keep_views=True))
    page = render_html([rep], differentials([rep], CFG), gallery_per_class=5)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page  # no external script, font or CDN
    assert "<script src" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the page's own CSP: nothing is fetched, even by mistake
    assert page.count("data:image/jpeg;base64,") >= 3 + len(rep.cells())
    assert "95% CI" in page and "too few cells counted" in page and "unidentified (review queue)" in page
    assert page.index('class="group unidentified') < page.index('data-label="SNE"')  # unidentified cells first
