"""Size of the HTML review page and how fast it opens and works in headless Chromium, for a slide of
N WBCs (synthetic 640x480 fields, the page made exactly as `smear run --report html` makes it: from
the views the pipeline keeps in its results, ``pipeline.run.with_views``).

    python benchmarks/review_page.py --cells 2000 --per-field 6
    python benchmarks/review_page.py --cells 2000 --fields ../shared/data/bccd/test/images

With ``--fields`` the fields are those images in turn (real stain and scanner noise, which sets the
JPEG sizes), each with ``--per-field`` WBC boxes drawn at random places.

Prints the file size, the time to render it in Python, and in Chromium (Debian's chromium and
chromium-driver, through selenium): the load event, "Show every cell", and one reclassification
by key with the live recount.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from smear.config import default_config
from smear.pipeline.run import with_views
from smear.report.html import render_html
from smear.report.tables import differentials
from smear.synth import make_field
from smear.taxonomy import FINE_CLASSES, UNIDENTIFIED, CellKind
from smear.types import CellPrediction, Detection, FieldResult, SlideReport

#: labels drawn for the cells: a normal adult differential with 5% left for review
MIX = {"SNE": 0.55, "LY": 0.28, "MO": 0.06, "EO": 0.03, "BA": 0.01, "BNE": 0.02, UNIDENTIFIED: 0.05}


def _real(image_rgb: np.ndarray, n: int, rng) -> list[Detection]:
    h, w = image_rgb.shape[:2]
    out = []
    for _ in range(n):
        side = float(rng.uniform(60, 90))
        x0, y0 = float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side))
        out.append(Detection((x0, y0, x0 + side, y0 + side), CellKind.WBC, 0.9))
    return out


def slide(folder: Path, n_cells: int, per_field: int, seed: int = 0, real: list[Path] | None = None
          ) -> SlideReport:
    rng = np.random.default_rng(seed)
    labels = list(MIX)
    fields = []
    for k in range(-(-n_cells // per_field)):
        n = min(per_field, n_cells - k * per_field)
        path = folder / f"field_{k:04d}.jpg"
        if real:
            shutil.copy(real[k % len(real)], path)
            image = np.asarray(Image.open(path).convert("RGB"))
            dets = _real(image, n, rng)
        else:
            synth = make_field(seed + k, n_wbc=n)
            image = synth.image_rgb
            Image.fromarray(image).save(path, quality=90)
            dets = list(synth.detections)
        cells = []
        for d in dets:
            if d.kind is not CellKind.WBC:
                continue
            label = labels[rng.choice(len(labels), p=list(MIX.values()))]
            top = "SNE" if label == UNIDENTIFIED else label
            p = 0.4 if label == UNIDENTIFIED else 0.9
            probs = {c: (p if c == top else (1 - p) / (len(FINE_CLASSES) - 1)) for c in FINE_CLASSES}
            cells.append(CellPrediction(d, label, p, probs))
        fr = FieldResult("slide", path.name, image.shape[1], image.shape[0], tuple(dets), tuple(cells), str(path))
        fields.append(with_views(fr, np.asarray(Image.open(path).convert("RGB")), (1.2, 96)))
    return SlideReport("slide", tuple(fields), classified=True)


def open_in_chromium(page: Path, profile: Path) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        t0 = time.perf_counter()
        driver.get(page.as_uri())  # returns after the load event
        wall = time.perf_counter() - t0
        nav = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                                    "return [n.domContentLoadedEventEnd, n.loadEventEnd];")
        show = driver.execute_script("""
            const t = performance.now();
            document.querySelector('.show-every').click();
            document.body.getBoundingClientRect();  // the layout it causes
            return [performance.now() - t, document.querySelectorAll('.cell').length];""")
        key = driver.execute_script("""
            const cells = document.querySelectorAll('.cell'), last = cells[cells.length - 1];
            last.focus();
            const t = performance.now();
            document.dispatchEvent(new KeyboardEvent('keydown', {key: 'l', bubbles: true}));
            document.body.getBoundingClientRect();
            return performance.now() - t;""")
        heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
    finally:
        driver.quit()
    return {"wall_s": wall, "dom_ms": nav[0], "load_ms": nav[1], "show_all_ms": show[0], "cells_on_page": show[1],
            "key_ms": key, "heap_mb": (heap or 0) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[2000])
    ap.add_argument("--per-field", type=int, default=6)
    ap.add_argument("--keep", type=Path, help="also copy each page here")
    ap.add_argument("--fields", type=Path, help="a folder of real field images to use in turn")
    args = ap.parse_args()
    cfg = default_config("pipeline")
    for n in args.cells:
        with tempfile.TemporaryDirectory(prefix="smear-review-") as tmp:
            tmp = Path(tmp)
            (tmp / "slide").mkdir()
            real = sorted(p for p in args.fields.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                          ) if args.fields else None
            rep = slide(tmp / "slide", n, args.per_field, real=real)
            t0 = time.perf_counter()
            html = render_html([rep], differentials([rep], cfg), cfg=cfg)
            render_s = time.perf_counter() - t0
            page = tmp / "slide.html"
            page.write_text(html, encoding="utf-8")
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(page, args.keep / f"review-{n}.html")
            got = open_in_chromium(page, tmp / "profile")
            print(f"{len(rep.cells())} WBCs on {len(rep.fields)} fields: {page.stat().st_size / 1e6:.1f} MB, "
                  f"rendered in {render_s:.1f} s; Chromium: DOM ready {got['dom_ms']:.0f} ms, load event "
                  f"{got['load_ms']:.0f} ms (driver.get {got['wall_s']:.1f} s), show every cell "
                  f"{got['show_all_ms']:.0f} ms ({got['cells_on_page']} cells), one reclassification "
                  f"{got['key_ms']:.0f} ms, JS heap {got['heap_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
