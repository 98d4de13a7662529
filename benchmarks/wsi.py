"""Whole slides: a pyramidal TIFF of >= 1 gigapixel stitched from real fields, counted by smear.

Usage: nice -n 10 python benchmarks/wsi.py [--sizes 0.1 0.3 1.0] [--out /tmp/smear-wsi] [--target 200]
       [--all-sizes 0.1 0.3 1.0] [--keep]
       python benchmarks/wsi.py --finder SLIDE   (the finder's wall and CPU seconds on one slide file)
       python benchmarks/wsi.py --write-only --sizes 1.0 --out /tmp/smear-wsi   (write the slide, keep it)
       python benchmarks/wsi.py --slide SLIDE [--target 200 | --all] [--engine ray [--workers 2]]
                                                          (count a slide written before)

Fields of BCCD train and TXL-PBC train (../shared/data) are scaled so that their median red-cell box
is BCCD's (102 px), cut or padded to 640x480, and laid in a grid with 12 px of glass between them on
the left three quarters of the slide (the right quarter is bare glass, and a band of fields across
the middle is blurred, sigma 4 px, as an out-of-focus strip). The slide is written under --out (never
in the repository) as a 6-level tiled JPEG TIFF with the pixel size (0.08 um, the detector's) in its
tags. For each size a fresh process counts it with the shipped models (runtime onnx, cache off):
`--all` (every monolayer tile, the CSV streamed) at the sizes of --all-sizes, for the peak resident
memory and tiles/s, and at the largest size `--target-wbc 200` for the time to the first 100 WBC and
to the 200-WBC differential, split into finder, reading (in the reader thread, overlapped) and
detection + classification. Each time is given as wall-clock seconds and as CPU seconds of the
process (all its threads): on a shared machine the wall clock says more about the other jobs than
about smear. The stitched files are deleted at the end unless --keep.

`--slide SLIDE --engine ray` counts on a local Ray instance of --workers CPUs (one worker a CPU,
SMEAR_THREADS=1 in each) as `smear run --engine ray` does. The CPU seconds are then those of every
process under the driver (Ray's daemons and the workers, from psutil), the workers' own apart; the
peak memory is each process's VmHWM (the driver's, each worker's, the daemons' sum); the workers say
how many tiles they ran, so that the tiles run past the target show.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELL_W, CELL_H, GAP = 640, 480, 12
RBC_PX = 102.0  # BCCD's median red-cell box side
MPP = 0.08
GLASS = (226, 222, 220)


def _sources() -> list[tuple[Path, float]]:
    """(image, scale to BCCD's red-cell size) of every BCCD train and TXL-PBC train field."""
    from smear.voc import read_voc_xml

    out = []
    for xml in sorted((DATA / "bccd" / "train" / "annotations").glob("*.xml")):
        ann = read_voc_xml(xml)
        sides = [((b[2] - b[0]) * (b[3] - b[1])) ** 0.5 for n, b in ann.objects if n == "RBC" and b]
        image = xml.parent.parent / "images" / ann.filename
        if image.exists():
            out.append((image, RBC_PX / np.median(sides) if len(sides) >= 5 else 1.0))
    from PIL import Image

    for label in sorted((DATA / "txl-pbc" / "labels" / "train").glob("*.txt")):
        images = list((DATA / "txl-pbc" / "images" / "train").glob(label.stem + ".*"))
        if not images:
            continue
        w, h = Image.open(images[0]).size
        sides = []
        for line in label.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 5 and parts[0] == "1":
                sides.append((float(parts[3]) * w * float(parts[4]) * h) ** 0.5)
        out.append((images[0], RBC_PX / np.median(sides) if len(sides) >= 3 else 1.0))
    return [(p, float(np.clip(s, 0.6, 1.8))) for p, s in out]


class Stitched:
    """The slide's layout: which field (and flip) each grid cell holds, rendered at any level."""

    def __init__(self, width: int, height: int, sources: list[tuple[Path, float]], seed: int = 0):
        self.width, self.height, self.sources = width, height, sources
        self.cols = int(0.75 * width) // (CELL_W + GAP)
        self.rows = height // (CELL_H + GAP)
        rng = np.random.default_rng(seed)
        self.pick = rng.integers(0, len(sources), (self.rows, self.cols))
        self.flip = rng.integers(0, 4, (self.rows, self.cols))
        self.blur_rows = set(range(int(0.45 * self.rows), int(0.45 * self.rows) + max(1, self.rows // 12)))
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def n_fields(self) -> int:
        return self.rows * self.cols

    def _base(self, src: int, ds: int) -> np.ndarray:
        """A source field scaled to the slide's red-cell size, cut or padded to a cell, at level ``ds``
        (each source decoded once: about 1 GB for the 1,042 fields at level 0)."""
        key = (src, ds)
        if key not in self._cache:
            if ds > 1:
                self._cache[key] = cv2.resize(self._base(src, 1), (CELL_W // ds, CELL_H // ds),
                                              interpolation=cv2.INTER_AREA)
                return self._cache[key]
            from smear.io import read_image

            path, scale = self.sources[src]
            img = read_image(path)
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            cell = np.empty((CELL_H, CELL_W, 3), np.uint8)
            cell[:] = GLASS
            h, w = min(CELL_H, img.shape[0]), min(CELL_W, img.shape[1])
            y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
            cy, cx = (CELL_H - h) // 2, (CELL_W - w) // 2
            cell[cy:cy + h, cx:cx + w] = img[y0:y0 + h, x0:x0 + w]
            self._cache[key] = cell
        return self._cache[key]

    def _cell(self, r: int, c: int, ds: int) -> np.ndarray:
        cell = self._base(int(self.pick[r, c]), ds)
        f = int(self.flip[r, c])
        if f & 1:
            cell = cell[:, ::-1]
        if f & 2:
            cell = cell[::-1]
        if r in self.blur_rows:
            cell = cv2.GaussianBlur(np.ascontiguousarray(cell), (0, 0), 4.0 / ds)
        return cell

    def render(self, x0: int, y0: int, w: int, h: int, ds: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS
        pw, ph = (CELL_W + GAP) // ds, (CELL_H + GAP) // ds
        cw, ch = CELL_W // ds, CELL_H // ds
        for r in range(max(0, y0 // ph), min(self.rows, (y0 + h) // ph + 1)):
            for c in range(max(0, x0 // pw), min(self.cols, (x0 + w) // pw + 1)):
                cx, cy = c * pw, r * ph
                ix0, iy0 = max(cx, x0), max(cy, y0)
                ix1, iy1 = min(cx + cw, x0 + w), min(cy + ch, y0 + h)
                if ix1 <= ix0 or iy1 <= iy0:
                    continue
                cell = self._cell(r, c, ds)
                out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = cell[iy0 - cy:iy1 - cy, ix0 - cx:ix1 - cx]
        return out


def write_slide(path: Path, gigapixels: float, sources) -> dict:
    from smear.wsi.write import TiffTiles, write_pyramid

    height = int(round((gigapixels * 1e9 / 1.6) ** 0.5 / 256)) * 256
    width = int(round(gigapixels * 1e9 / height / 256)) * 256
    st = Stitched(width, height, sources)
    start = time.perf_counter()
    write_pyramid(path, width, height, st.render, MPP, levels=6, tiles=TiffTiles(512, "jpeg", quality=90))
    seconds = time.perf_counter() - start
    return {"gigapixels": round(width * height / 1e9, 3), "width": width, "height": height, "fields": st.n_fields,
            "write_s": round(seconds, 1), "fields_per_s_written": round(st.n_fields / seconds, 1),
            "bytes": path.stat().st_size}


CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
import psutil
from smear.config import load_config
from smear.pipeline.build import build_stages
from smear.pipeline.wsi_run import SlideOutputs, WsiSettings, run_whole_slide
from smear.report.tables import CellsWriter
from smear.taxonomy import WBC_CLASSES
path, target, cells, engine_name, workers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
cfg = load_config("pipeline", None, ["cache_dir=off", "runtime=onnx", "device=cpu"])
settings = WsiSettings.from_config(cfg.wsi)
me = psutil.Process()


def cpu_by_pid():
    # user + system seconds of this process and every process under it (Ray's daemons and workers)
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def hwm_mb(pid):
    # a process's peak resident memory (VmHWM), MB
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


engine = stages = None
if engine_name == "ray":
    import ray
    import smear.pipeline.ray_engine as ray_engine

    class CountingWorker(ray_engine.FieldWorker):
        # a worker that also says how many tiles it ran
        n_tiles = 0

        def run_tiles(self, job, tiles, resume):
            out = super().run_tiles(job, tiles, resume)
            self.n_tiles += len(tiles)
            return out

        def ran(self):
            return self.n_tiles

    ray_engine.FieldWorker = CountingWorker
    env = {"SMEAR_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with ray_engine._loopback_only(ray):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    engine = ray_engine.RayEngine(ray_engine.BuildFromConfig(cfg), workers=workers).__enter__()
else:
    stages = build_stages(cfg)
writer = CellsWriter(cells, slide_coords=True)
marks, cpu_marks = {}, {}
n = [0]
start, cpu0 = time.perf_counter(), cpu_by_pid()


def cpu_since(now):
    return sum(now.values()) - sum(v for pid, v in cpu0.items() if pid in now)


def on_field(fr):
    if hasattr(fr, "cells"):
        writer.write("bench", fr)
        n[0] += sum(1 for c in fr.cells if c.label in WBC_CLASSES)
        for k in (100, 200):
            if n[0] >= k and k not in marks:
                marks[k] = round(time.perf_counter() - start, 1)
                cpu_marks[k] = round(cpu_since(cpu_by_pid()), 1)
rep = run_whole_slide(Path(path), stages, settings, target_wbc=None if target == "all" else int(target),
                      outputs=SlideOutputs(on_field=on_field, keep_fields=False), engine=engine)
total = time.perf_counter() - start
extra = {}
if engine is not None:
    ran = sum(ray.get([a.ran.remote() for a in engine.actors]))  # queued behind the calls still running
    now = cpu_by_pid()
    extra = {"workers": workers, "tiles_run_by_workers": ran, "ray_cpu_s_workers": round(sum(
        now.get(pid, 0) - cpu0.get(pid, 0) for pid in engine.pids), 1), "ray_cpu_s_driver": round(now[me.pid] - cpu0[me.pid], 1),
        "workers_peak_rss_mb": [hwm_mb(pid) for pid in engine.pids],
        "ray_daemons_peak_rss_mb": sum(hwm_mb(pid) for pid in now if pid != me.pid and pid not in engine.pids)}
cpu = cpu_since(cpu_by_pid())
if engine is not None:
    engine.__exit__(None, None, None)
    ray.shutdown()
writer.close()
w = rep.whole_slide
print(json.dumps({"target": target, "engine": engine_name, "total_s": round(total, 1), "cpu_s": round(cpu, 1),
                  "first_100_s": marks.get(100), "first_100_cpu_s": cpu_marks.get(100),
                  "first_200_s": marks.get(200), "first_200_cpu_s": cpu_marks.get(200), "wbc": n[0],
                  "finder_s": w.finder_s, "read_s": w.read_s,
                  "detect_s": w.detect_s, "tiles_total": w.tiles_total, "tiles_counted": w.tiles_counted,
                  "tiles_read": w.tiles_read, "skipped": w.skipped, "area_mm2": w.area_mm2,
                  "platelets_per_hpf": w.platelets_per_hpf, "platelets_1e9_per_l": w.platelets_1e9_per_l,
                  "peak_rss_mb": hwm_mb(me.pid), "load_avg": [round(x, 2) for x in os.getloadavg()], **extra}))
"""


def count(path: Path, target: str, cells: Path, engine: str = "local", workers: int = 2) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    load = [round(x, 2) for x in os.getloadavg()]
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), target, str(cells), engine, str(workers)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_avg_before": load}


def time_finder(path: Path) -> str:
    """Wall and CPU seconds of the finder on a slide file: the thumbnail, then the scores and probes."""
    from smear.config import load_config
    from smear.pipeline.wsi_run import MAX_THUMB_SIDE, WsiSettings, geometry, read_tile
    from smear.wsi import finder
    from smear.wsi.slide import WholeSlide, thumbnail

    st = WsiSettings.from_config(load_config("pipeline", None, []).wsi)
    with WholeSlide(path) as s:
        w0, c0 = time.perf_counter(), time.process_time()
        geo = geometry(s, st)
        ds = max(1.0, st.finder_mpp / geo.mpp, max(s.width, s.height) / MAX_THUMB_SIDE)
        th = thumbnail(s, ds)
        w1, c1 = time.perf_counter(), time.process_time()
        side = int(round(st.probe_px * geo.scale))
        plan = finder.plan(th, ds, geo.tile_l0, s.width, s.height, st.finder,
                           lambda t: read_tile(s, geo, t.x0 + (t.size - side) // 2, t.y0 + (t.size - side) // 2, side)[0])
        w2, c2 = time.perf_counter(), time.process_time()
    n_probes = plan.counts.get("monolayer", 0) + plan.counts.get("blurred", 0)
    return (f"{path.name} {s.width}x{s.height}: thumbnail {th.shape[1]}x{th.shape[0]} {w1 - w0:.2f} s wall, "
            f"{c1 - c0:.2f} CPU s; scores and {n_probes} focus probes {w2 - w1:.2f} s wall, {c2 - c1:.2f} CPU s; "
            f"{plan.counts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="gigapixels")
    ap.add_argument("--all-sizes", type=float, nargs="*", default=None, help="sizes counted with --all "
                    "(default: every size)")
    ap.add_argument("--target", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/smear-wsi"))
    ap.add_argument("--keep", action="store_true", help="keep the stitched slides")
    ap.add_argument("--finder", type=Path, default=None, help="only time the finder on this slide file")
    ap.add_argument("--write-only", action="store_true", help="write the stitched slides (kept), count nothing")
    ap.add_argument("--slide", type=Path, default=None, help="count this slide file, written before")
    ap.add_argument("--all", action="store_true", help="with --slide: count every monolayer tile")
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="with --slide: count here, or on "
                    "Ray workers (a local Ray of --workers CPUs, one worker a CPU, 1 thread each)")
    ap.add_argument("--workers", type=int, default=2, help="with --engine ray: workers")
    args = ap.parse_args()
    if args.finder is not None:
        print(time_finder(args.finder))
        return
    if args.slide is not None:
        target = "all" if args.all else str(args.target)
        args.out.mkdir(parents=True, exist_ok=True)
        cells = args.out / f"cells_{args.slide.stem}_{target}_{args.engine}.csv"
        print(json.dumps(count(args.slide, target, cells, args.engine, args.workers)), flush=True)
        return
    if not (DATA / "bccd").exists():
        raise SystemExit(f"real data not present: {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    print(f"{len(sources)} fields (BCCD train + TXL-PBC train); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    for gp in args.sizes:
        path = args.out / f"stitched_{gp:g}gp.tif"
        info = write_slide(path, gp, sources)
        print("wrote", path, json.dumps(info), flush=True)
        if args.write_only:
            continue
        row = {"size": info}
        if args.all_sizes is None or gp in args.all_sizes:
            row["all"] = count(path, "all", args.out / f"cells_{gp:g}_all.csv")
            print("  --all", json.dumps(row["all"]), flush=True)
        if gp == max(args.sizes):
            row["target"] = count(path, str(args.target), args.out / f"cells_{gp:g}_{args.target}.csv")
            print(f"  --target-wbc {args.target}", json.dumps(row["target"]), flush=True)
        rows.append(row)
        if not args.keep:
            path.unlink()
    if args.write_only:
        return
    print("\n| slide | fields | written fields/s | --all: tiles counted / total | WBC | wall s | CPU s | "
          "field-equivalents/s (wall) | per CPU s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, a = row["size"], row.get("all")
        if a is None:
            continue
        fe = a["tiles_counted"] * (1920 * 1920) / (CELL_W * CELL_H) / a["total_s"]
        fe_cpu = fe * a["total_s"] / a["cpu_s"]
        print(f"| {s['gigapixels']} GP ({s['width']}x{s['height']}) | {s['fields']} | {s['fields_per_s_written']} | "
              f"{a['tiles_counted']} / {a['tiles_total']} | {a['wbc']} | {a['total_s']} | {a['cpu_s']} | "
              f"{fe:.2f} | {fe_cpu:.2f} | {a['peak_rss_mb']} MB |")
    t = rows[-1].get("target")
    if t:
        print(f"\n--target-wbc {args.target} on {rows[-1]['size']['gigapixels']} GP: first 100 WBC at "
              f"{t['first_100_s']} s ({t['first_100_cpu_s']} CPU s), {args.target}-WBC differential at {t['total_s']} s "
              f"({t['cpu_s']} CPU s; finder {t['finder_s']} s, "
              f"reading {t['read_s']} s in the reader thread, detection + classification {t['detect_s']} s), "
              f"{t['tiles_counted']} tiles counted, skipped {t['skipped']}, peak RSS {t['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
