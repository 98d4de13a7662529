"""The review page driven in headless chromium through selenium (Debian's chromium and chromium-driver;
.ci/run installs them): the live recount agrees with the Python summary, and a review by click and by
key ends in the two CSV downloads. One browser session for the module; no network."""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import FakeClassifier, FakeDetector, dets
from smear.config import default_config
from smear.io import find_slides, write_text_atomic
from smear.report.html import render_html, slide_base
from smear.report.tables import differentials, summary_csv
from smear.pipeline.run import Stages, run_slide
from smear.taxonomy import FINE_CLASSES
from smear.types import SkippedField, SlideReport, Tally

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="chromium or chromedriver not installed "
                              "(apt-get install chromium chromium-driver; .ci/run does)"),
]
CFG = default_config("pipeline")
FIELD_NAMES = ["f0 <b>&amp;.png", "f1.png", "f2.png"]  # a field name that must stay text
# three fields of three WBCs each, labelled in call order; LY 0.3 and BNE 0.2 are under the review threshold
LABELS = [("SNE", 0.9), ("SNE", 0.8), ("LY", 0.3), ("LY", 0.9), ("MO", 0.85), ("SNE", 0.95), ("EO", 0.7),
          ("ERB", 0.8), ("BNE", 0.2)]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads, tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    # the driver's path given: selenium manager, which could look for drivers online, never runs
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def _report(tmp_path):
    folder = tmp_path / "slideA"
    folder.mkdir()
    by_width = {}
    for i, name in enumerate(FIELD_NAMES):
        img = np.full((120, 160 + i, 3), 215, np.uint8)
        img[20:60, 20:60] = (110, 50 + 30 * i, 150)
        Image.fromarray(img).save(folder / name)
        by_width[160 + i] = dets(3, 20, 1)
    [slide] = find_slides([folder])
    stages = Stages(FakeDetector(by_width), FakeClassifier(list(LABELS)), review_threshold=0.5, keep_views=True)
    return run_slide(slide, stages)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    rep = _report(tmp)
    path = tmp / "report.html"
    write_text_atomic(path, render_html([rep], differentials([rep], CFG), cfg=CFG))
    return rep, path


def _counted(base: dict, counts: dict[str, int], slide: str = "s1") -> SlideReport:
    """A slide report with these label counts (and the base's fixed counts), as a streamed run makes it."""
    tally = Tally(n_fields=base["n_fields"], labels=dict(counts), n_scored=base.get("n_scored", 0),
                  n_novel=base.get("n_novel", 0),
                  kinds={"wbc": base["n_wbc_detected"], "rbc": base["n_rbc"], "platelet": base["n_platelet"]})
    skipped = tuple(SkippedField(slide, f"x{i}", "unreadable") for i in range(base.get("n_skipped", 0)))
    return SlideReport(slide, (), skipped, classified=base.get("classified", True), tally=tally,
                       evidence=base.get("evidence", {}))


def _python_csv(rep: SlideReport, cfg=CFG) -> tuple[str, dict]:
    diffs = differentials([rep], cfg)
    return summary_csv(diffs), diffs[0].row()


JS_ROW = ("const r = smearReview.summarize(arguments[0], arguments[0].counts);"
          "return [smearReview.summaryCsv(r), r.flags, r.warnings, r.domain_warnings];")
BASE = {"n_fields": 4, "n_wbc_detected": 12, "n_rbc": 300, "n_platelet": 9}
VECTORS = [
    ({}, BASE),  # classified, no cells at all
    ({"UNIDENTIFIED": 5}, BASE),
    ({"SNE": 3, "LY": 1, "ARTEFACT": 2, "SMUDGE": 1, "UNIDENTIFIED": 1}, BASE),
    ({"SNE": 1, "LY": 7}, BASE),  # 12.5% and 87.5%: halves that Python rounds to even
    ({"SNE": 1, "LY": 31}, BASE),  # 3.125%
    ({"SNE": 40, "BNE": 9, "MMY": 2, "MY": 3, "PMY": 1, "EO": 8, "BA": 3, "LY": 15, "MO": 14, "ERB": 4,
      "PLATELET": 6, "UNIDENTIFIED": 7, "ARTEFACT": 3}, BASE),  # every flag there is
    ({"LY": 2, "ERB": 9}, {**BASE, "n_rbc": 60, "n_wbc_detected": 40, "n_scored": 20, "n_novel": 9,
                           "n_skipped": 1}),  # every domain warning
    ({"SNE": 250, "LY": 61, "MO": 19}, {**BASE, "n_fields": 0, "n_rbc": 0}),
    # the slide guard: an implausible differential and the fitted evidence
    ({"EO": 30, "LY": 10, "SNE": 2}, {**BASE, "evidence": {"features": 1.7, "colour": 0.4, "confidence": 1.7}}),
    ({"PMY": 12, "MO": 20, "BA": 10, "SNE": 4, "ERB": 30, "LY": 1}, {**BASE, "n_scored": 40, "n_novel": 3}),
    ({"SNE": 20, "LY": 10}, {**BASE, "evidence": {"novelty_mean": 0.9}}),
]


def _random_vectors(n: int = 300, seed: int = 23) -> list[tuple[dict, dict]]:
    """Seeded random label counts and fixed counts: sparse and even mixes, from no cell to 400, with
    and without novelty scores, fitted evidence, red cells and skipped fields."""
    rng = np.random.default_rng(seed)
    labels = [*FINE_CLASSES, "UNIDENTIFIED", "ARTEFACT", "SMUDGE"]
    out = []
    for _ in range(n):
        total = int(rng.choice([0, 1, 2, 7, 30, 99, 100, 150, 400]))
        mix = rng.dirichlet(np.full(len(labels), float(rng.choice([0.1, 0.4, 2.0]))))
        counts = {label: int(k) for label, k in zip(labels, rng.multinomial(total, mix)) if k}
        n_scored = int(rng.choice([0, 10, 60]))
        base = {"n_fields": int(rng.integers(0, 6)), "n_wbc_detected": int(rng.integers(0, 300)),
                "n_rbc": int(rng.choice([0, 20, 150, 2000])), "n_platelet": int(rng.integers(0, 30)),
                "n_scored": n_scored, "n_novel": int(rng.integers(0, n_scored + 1)),
                "n_skipped": int(rng.integers(0, 2))}
        if rng.random() < 0.3:
            base["evidence"] = {name: float(rng.uniform(0.0, 3.0)) for name in ("features", "colour", "confidence")
                                if rng.random() < 0.6}
        out.append((counts, base))
    return out


JS_ROWS = ("return arguments[0].map((b) => { const r = smearReview.summarize(b, b.counts);"
           "return [smearReview.summaryCsv(r), r.flags, r.warnings, r.domain_warnings]; });")


def test_live_recount_agrees_with_python(browser, page):
    browser.get(page[1].as_uri())
    for counts, base in VECTORS:
        rep = _counted(base, counts)
        want_csv, row = _python_csv(rep)
        got = browser.execute_script(JS_ROW, slide_base(rep))
        assert got == [want_csv, row["flags"], row["warnings"], row["domain_warnings"]], counts
    # a slide the classifier never saw (detector only)
    rep = _counted({**BASE, "classified": False}, {})
    want_csv, row = _python_csv(rep)
    assert browser.execute_script(JS_ROW, slide_base(rep))[0] == want_csv
    # a few hundred seeded random vectors, recounted in one call: the rules and messages the page
    # interprets (summary.FLAG_RULES, IMPLAUSIBLE_RULES, MESSAGES) give Python's rows to the byte
    reps = [_counted(base, counts) for counts, base in _random_vectors()]
    got = browser.execute_script(JS_ROWS, [slide_base(r) for r in reps])
    said = []
    for rep, row_js in zip(reps, got):
        want_csv, row = _python_csv(rep)
        assert row_js == [want_csv, row["flags"], row["warnings"], row["domain_warnings"]], slide_base(rep)
        said += row["flags"] + row["domain_warnings"] + row["warnings"]
    every = ("too few cells counted", "immature granulocytes present", "left shift", "NRBC present (",
             "eosinophilia", "basophilia", "monocytosis", "lymphocytosis", "lymphopenia", "domain score",
             "(ceiling", "WBC boxes to", "WBCs identified (minimum", "a differential almost no blood has (",
             "WBCs unlike every class", "the cells' features drift")
    assert len(got) == 300 and all(any(m in text for text in said) for m in every)  # every message was filled


def test_exact_intervals_agree_with_python(browser, tmp_path):
    cfg = CFG.model_copy(update={"report": CFG.report.model_copy(update={"ci_method": "exact", "confidence": 0.9})})
    rep = _counted(BASE, {"SNE": 40, "BNE": 9, "MY": 1, "EO": 8, "LY": 15, "MO": 14, "UNIDENTIFIED": 2})
    path = tmp_path / "exact.html"
    write_text_atomic(path, render_html([rep], differentials([rep], cfg), cfg=cfg))
    browser.get(path.as_uri())
    for counts in ({"SNE": 40, "BNE": 9, "MY": 1, "EO": 8, "LY": 15, "MO": 14}, {"LY": 3},
                   {"SNE": 1, "LY": 1}):
        rep = _counted(BASE, counts)
        assert browser.execute_script(JS_ROW, slide_base(rep))[0] == _python_csv(rep, cfg)[0], counts


def _wait_for(fn, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def _table(browser) -> dict[str, tuple[str, str, str]]:
    return {tr.get_attribute("data-code"): tuple(td.text for td in tr.find_elements("css selector", "td")[2:])
            for tr in browser.find_elements("css selector", "table.summary tbody tr")}


def _expected_table(row) -> dict[str, tuple[str, str, str]]:
    out = {}
    for c in FINE_CLASSES:
        pct = row[f"{c}_pct"]
        out[c] = (str(row[f"{c}_n"]), "" if pct is None else f"{pct:.1f}",
                  "" if pct is None else f"{row[f'{c}_ci_low']:.1f} – {row[f'{c}_ci_high']:.1f}")
    return out


def test_review_by_click_and_key_then_sign_off_and_export(browser, page, downloads, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    rep, path = page
    base = slide_base(rep)
    browser.get(path.as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    css = lambda sel: browser.find_elements("css selector", sel)  # noqa: E731
    assert _table(browser) == _expected_table(differentials([rep], CFG)[0].row())  # as Python printed it
    assert css(".n-left")[0].text == "9"
    queue = [c.get_attribute("data-id") for c in css(".cell")]
    first, second, third, fourth = queue[:4]
    labels = [c.get_attribute("data-label") for c in css(".cell")]
    assert labels[:3] == ["UNIDENTIFIED", "UNIDENTIFIED", "SNE"]

    # 1: click the first unidentified cell, then LY in the menu
    browser.find_element("css selector", f'.cell[data-id="{first}"]').click()
    assert browser.find_element("id", "menu").is_displayed()
    browser.find_element("css selector", '#menu button[data-label="LY"]').click()
    # 2: the next unreviewed cell has focus: the key for BNE; 3: then the key for "not a WBC"
    assert browser.switch_to.active_element.get_attribute("data-id") == second
    ActionChains(browser).send_keys("b").perform()
    assert browser.switch_to.active_element.get_attribute("data-id") == third
    ActionChains(browser).send_keys("x").perform()
    ActionChains(browser).send_keys(Keys.ENTER).perform()  # the fourth cell confirmed as predicted (SNE)
    assert browser.switch_to.active_element.get_attribute("data-id") == queue[4]
    ActionChains(browser).send_keys("k").perform()  # previous
    assert browser.switch_to.active_element.get_attribute("data-id") == fourth

    def gallery_of(cid):
        cell = browser.find_element("css selector", f'.cell[data-id="{cid}"]')
        return cell.find_element("xpath", "ancestor::div[@data-label]").get_attribute("data-label")

    assert [gallery_of(c) for c in (first, second, third, fourth)] == ["LY", "BNE", "ARTEFACT", "SNE"]
    assert css(".n-left")[0].text == "5"
    counts = dict(base["counts"])
    for pred, new in (("UNIDENTIFIED", "LY"), ("UNIDENTIFIED", "BNE"), ("SNE", "ARTEFACT")):
        counts[pred] -= 1
        counts[new] = counts.get(new, 0) + 1
    fixed = {**base, "n_platelet": base["n_platelet_detected"]}
    want_csv, row = _python_csv(_counted(fixed, counts, "slideA"))
    assert _table(browser) == _expected_table(row)
    assert _table(browser)["SNE"][:2] == ("2", "28.6") and _table(browser)["LY"][:2] == ("2", "28.6")
    assert _table(browser)["BNE"][:2] == ("1", "14.3")  # 7 WBC: the artefact left, two unidentified came in
    assert [li.text for li in css(".flags li")] == row["flags"]
    headings = {g.get_attribute("data-label"): g.find_element("css selector", "h4").text
                for g in css(".group") if g.is_displayed()}
    assert "UNIDENTIFIED" not in headings and headings["ARTEFACT"].endswith("1 of 1 shown")
    assert headings["SNE"].startswith("SNE segmented neutrophil") and headings["SNE"].endswith("2 of 2 shown")

    # sign off: refused without a name, stamped with one
    css(".signoff")[0].click()
    assert css(".signed")[0].text == ""
    browser.find_element("id", "reviewer").send_keys("Dr <Q>")
    css(".signoff")[0].send_keys(Keys.ENTER)  # Enter on a button presses it, it does not confirm a cell
    assert css(".signed")[0].text.startswith("Signed off by Dr <Q> at 20")
    assert css(".signed")[0].text.endswith("4 of 9 cells reviewed, 3 changed; 0 never shown, 5 never reviewed")

    css(".dl-reviewed")[0].click()
    css(".dl-corrections")[0].click()
    reviewed = _wait_for(lambda: [p for p in downloads.glob("slideA_reviewed.csv")])[0]
    corrections = _wait_for(lambda: [p for p in downloads.glob("slideA_corrections.csv")])[0]
    _wait_for(lambda: not list(downloads.glob("*.crdownload")))
    got_header, got_row = reviewed.read_text(encoding="utf-8").splitlines()
    want_header, want_row = want_csv.splitlines()
    assert got_header.startswith(want_header + ",") and got_row.startswith(want_row + ",")  # the CSV report first
    [audit] = list(csv.DictReader(io.StringIO(reviewed.read_text(encoding="utf-8"))))
    assert audit["reviewer"] == "Dr <Q>" and audit["signed_off_utc"].endswith("Z")
    assert (audit["cells_total"], audit["cells_reviewed"], audit["cells_changed"], audit["cells_never_shown"],
            audit["cells_never_reviewed"]) == ("9", "4", "3", "0", "5")
    from smear import __version__

    assert audit["smear_version"] == __version__
    rows = list(csv.DictReader(io.StringIO(corrections.read_text(encoding="utf-8"))))
    assert [(r["predicted_label"], r["corrected_label"]) for r in rows] == [
        ("UNIDENTIFIED", "LY"), ("UNIDENTIFIED", "BNE"), ("SNE", "ARTEFACT"), ("SNE", "SNE")]
    assert {r["slide"] for r in rows} == {"slideA"} and {r["reviewer"] for r in rows} == {"Dr <Q>"}
    assert rows[2]["field"] == FIELD_NAMES[0] and rows[2]["prob"] == "0.9"
    assert (rows[2]["x0"], rows[2]["y0"], rows[2]["x1"], rows[2]["y1"]) == ("2.0", "2.0", "10.0", "10.0")
    assert all(r["time"].startswith("20") and r["time"].endswith("Z") for r in rows)

    # the corrections file is what smear adapt reads: cut from the slide's fields, the artefact skipped
    from smear.classify.lab_cells import read_corrections

    slide_dir = tmp_path / "slides" / "slideA"
    slide_dir.mkdir(parents=True)
    for name in FIELD_NAMES:
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(slide_dir / name)
    cells = read_corrections([corrections], 1.3, 16, fields=slide_dir.parent)
    assert cells.labels() == ["LY", "BNE", "SNE"] and cells.skipped == {"artefact or smudge": 1}
    assert cells.crops.shape == (3, 16, 16, 3)

    # work in progress survives a reload; reset clears it
    browser.refresh()
    assert gallery_of(first) == "LY" and css(".n-left")[0].text == "5"
    assert _table(browser) == _expected_table(row)
    assert css(".signed")[0].text.startswith("Signed off by Dr <Q>")
    browser.execute_script("window.confirm = () => true")
    browser.find_element("id", "reset").click()
    assert gallery_of(first) == "UNIDENTIFIED" and css(".n-left")[0].text == "9"
    assert _table(browser) == _expected_table(differentials([rep], CFG)[0].row()) and css(".signed")[0].text == ""
    captions = css(".cell figcaption .fname")
    assert any(c.text == FIELD_NAMES[0] for c in captions)  # the field name stayed text
    assert not browser.find_elements("css selector", "figcaption b")


def _big_page(tmp_path) -> tuple[SlideReport, Path]:
    """A slide of 80 WBCs: 5 unidentified, 5 EO and 70 SNE (more than the 60 a class shows at first);
    the page made with report.signoff_requires_review on."""
    folder = tmp_path / "big"
    folder.mkdir()
    by_width = {}
    for i in range(4):
        img = np.full((40, 220 + i, 3), 215, np.uint8)
        img[2:10, :, 0] = np.arange(220 + i) % 200  # every crop its own
        Image.fromarray(img).save(folder / f"f{i}.png")
        by_width[220 + i] = dets(20, 0, 0)
    [slide] = find_slides([folder])
    labels = [("LY", 0.3)] * 5 + [("EO", 0.9)] * 5 + [("SNE", 0.9)] * 70
    rep = run_slide(slide, Stages(FakeDetector(by_width), FakeClassifier(labels), review_threshold=0.5,
                                  keep_views=True))
    cfg = CFG.model_copy(update={"report": CFG.report.model_copy(update={"signoff_requires_review": True})})
    path = tmp_path / "big.html"
    write_text_atomic(path, render_html([rep], differentials([rep], cfg), cfg=cfg))
    return rep, path


def test_every_cell_reachable_and_sign_off_counts(browser, tmp_path, downloads):
    """More than 60 cells of one class: the rest a click away, the last one reclassified, j/k in screen
    order, the tooltip beside the crop, sign-off held until the required cells are reviewed, its counts
    in the reviewed CSV, and the saved state refused when it does not fit the page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    rep, path = _big_page(tmp_path)
    browser.get(path.as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    css = lambda sel: browser.find_elements("css selector", sel)  # noqa: E731
    keys = lambda *k: ActionChains(browser).send_keys(*k).perform()  # noqa: E731
    active = lambda: browser.switch_to.active_element.get_attribute("data-id")  # noqa: E731
    sne = browser.find_element("css selector", '.group[data-label="SNE"]')
    assert sne.find_element("css selector", "h4").text.endswith("60 of 70 shown show all")
    assert css(".n-hidden")[0].text == "10" and css(".n-left")[0].text == "80"
    queue = browser.execute_script("return smearReview.slides[0].cells.map(c => c.id)")
    last = queue[74]  # unidentified first, then SNE, then EO: the 70th SNE cell
    assert not css(f'.cell[data-id="{last}"]')  # not on the page yet

    # the top-3 tooltip does not cover the crop it describes
    first = css(".cell")[0]
    first.click()
    keys(Keys.ESCAPE)
    img, tip = first.find_element("css selector", "img").rect, first.find_element("css selector", ".tip").rect
    assert tip["height"] > 0 and tip["y"] >= img["y"] + img["height"]

    # sign-off held: 5 unidentified and 5 EO (eosinophilia) cells not reviewed
    browser.find_element("id", "reviewer").send_keys("@Dr Q")
    css(".signoff")[0].click()
    assert css(".signed")[0].text.startswith("Not signed off") and "(10 left: 5 UNIDENTIFIED, 5 EO)" in css(".signed")[0].text

    # show all: the 70th SNE cell, reclassified as LY with its key
    sne.find_element("css selector", ".show-all").click()
    assert sne.find_element("css selector", "h4").text.endswith("70 of 70 shown")
    assert css(".n-hidden")[0].text == "0" and not css(".show-every")[0].is_displayed()
    browser.find_element("css selector", f'.cell[data-id="{last}"]').click()
    keys(Keys.ESCAPE, "l")
    assert _table(browser)["SNE"][0] == "69" and _table(browser)["LY"][0] == "1"
    moved = browser.find_element("css selector", f'.cell[data-id="{last}"]')
    assert moved.find_element("xpath", "ancestor::div[@data-label]").get_attribute("data-label") == "LY"
    # j/k follow the screen: from the cell after it (the first EO), k goes to the SNE now last on screen
    eo_ids = [c.get_attribute("data-id") for c in css('.group[data-label="EO"] .cell')]
    assert active() == eo_ids[0]
    keys("k")
    assert active() == queue[73]
    keys("j", "j", "j", "j", "j", "j")
    assert active() == last  # past the 5 EO cells: the LY group, below EO on screen

    # review the required cells: Enter confirms each and goes on to the next on screen
    css(".cell")[0].click()
    keys(Keys.ESCAPE, *[Keys.ENTER] * 5)
    browser.find_element("css selector", f'.cell[data-id="{eo_ids[0]}"]').click()
    keys(Keys.ESCAPE, *[Keys.ENTER] * 5)
    css(".signoff")[0].click()
    signed = css(".signed")[0].text
    assert signed.startswith("Signed off by @Dr Q at 20")
    assert signed.endswith("11 of 80 cells reviewed, 1 changed; 0 never shown, 69 never reviewed")

    css(".dl-reviewed")[0].click()
    css(".dl-corrections")[0].click()
    reviewed = _wait_for(lambda: list(downloads.glob("big_reviewed.csv")))[0]
    corrections = _wait_for(lambda: list(downloads.glob("big_corrections.csv")))[0]
    _wait_for(lambda: not list(downloads.glob("*.crdownload")))
    [row] = list(csv.DictReader(io.StringIO(reviewed.read_text(encoding="utf-8"))))
    assert (row["SNE_n"], row["LY_n"], row["reviewer"]) == ("69", "1", "'@Dr Q")  # text cells formula-quoted
    assert (row["cells_total"], row["cells_reviewed"], row["cells_changed"], row["cells_never_shown"],
            row["cells_never_reviewed"]) == ("80", "11", "1", "0", "69")
    fixes = list(csv.DictReader(io.StringIO(corrections.read_text(encoding="utf-8"))))
    assert len(fixes) == 11 and {r["reviewer"] for r in fixes} == {"'@Dr Q"}
    assert [(r["predicted_label"], r["corrected_label"]) for r in fixes if r["corrected_label"] == "LY"] == [
        ("SNE", "LY")]

    # the work survives a reload (the expanded class included); a forged or foreign state is refused
    browser.refresh()
    assert css(".signed")[0].text == signed and css(".n-hidden")[0].text == "0"
    key = browser.execute_script("return smearReview.slides[0].storage_key")
    state = browser.execute_script("return JSON.parse(localStorage.getItem(arguments[0]))", key)
    assert browser.execute_script("return smearReview.validState(0, arguments[0])", state)
    forged = [{**state, "page": "smear-review:another-slide"},
              {**state, "labels": {**state["labels"], "s0f9c9": "LY"}},
              {**state, "labels": {**state["labels"], queue[0]: "<img>"}},
              {**state, "reviewed": {**state["reviewed"], queue[20]: "=cmd()"}},
              {**state, "signoff": {**state["signoff"], "never_reviewed": 0}},
              {**state, "labels": {}}]  # a sign-off whose corrections were taken out
    assert [browser.execute_script("return smearReview.validState(0, arguments[0])", f) for f in forged] == [
        False] * len(forged)
    browser.execute_script("localStorage.setItem(arguments[0], JSON.stringify(arguments[1]))", key, forged[1])
    browser.refresh()
    assert css(".signed")[0].text == "" and css(".n-left")[0].text == "80" and _table(browser)["LY"][0] == "0"
    assert "was not restored" in browser.find_element("id", "refused").text
