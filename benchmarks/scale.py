"""Time per field and peak memory of `smear run` from 100 to 10,000 fields.

Usage: python benchmarks/scale.py [--data ../shared/data/bccd/test/images] [--sizes 100 1000 10000]
       [--runtime torch] [--classifier cnn]

Real fields are repeated (hard or symbolic links, so no disk is used) into a temporary slide folder of each size;
each size runs in a fresh process that loads the models, runs 8 fields untimed (one-off start-up),
then times `run_slide` over all of them (streamed, cache off) with the per-cell CSV written as it goes, and reports its peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from smear.devices import available_cores

CHILD = r"""
import json, resource, sys, time
from pathlib import Path

from smear.devices import available_cores
from smear.config import load_config
from smear.io import find_slides
from smear.pipeline.build import build_stages
from smear.report.tables import CellsWriter
from smear.pipeline.run import run_slide
folder, runtime, classifier, cells = sys.argv[1:5]
cfg = load_config("pipeline", None, [f"classifier={classifier}", "cache_dir=off", f"runtime={runtime}", "device=cpu"])
stages = build_stages(cfg)
[slide] = find_slides([Path(folder)])
writer = CellsWriter(cells)
from smear.io import Slide
run_slide(Slide("warm-up", slide.fields[:8]), stages, keep_fields=False)  # one-off start-up, untimed
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
rep = run_slide(slide, stages, on_field=lambda fr: writer.write(slide.name, fr) if hasattr(fr, "detections") else None,
                keep_fields=False)
secs = time.perf_counter() - t
writer.close()
print(json.dumps({"n": rep.n_fields, "seconds": secs, "rss_after_load_mb": rss0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/bccd/test/images")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--classifier", default="cnn")
    args = ap.parse_args()
    src = sorted(p for p in Path(args.data).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    print(f"{len(src)} distinct fields from {args.data}, repeated; runtime {args.runtime}, classifier "
          f"{args.classifier}; {platform.processor() or platform.machine()}, {available_cores()} cores")
    print(f"{'fields':>7} {'ms/field':>9} {'peak RSS MB':>12} {'RSS after load MB':>18}")
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "slide"
            folder.mkdir()
            for i in range(n):
                s = src[i % len(src)]
                try:
                    os.link(s, folder / f"f{i:05d}{s.suffix}")
                except OSError:  # another file system: a symbolic link
                    os.symlink(s.resolve(), folder / f"f{i:05d}{s.suffix}")
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.runtime, args.classifier,
                                  str(Path(tmp) / "cells.csv")], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['n']:7d} {1000 * r['seconds'] / r['n']:9.1f} {r['peak_rss_mb']:12.0f} {r['rss_after_load_mb']:18.0f}")
    first, last = results[0], results[-1]
    t0, t1 = first["seconds"] / first["n"], last["seconds"] / last["n"]
    print(f"{last['n']} vs {first['n']} fields: time per field x{t1 / t0:.3f}, peak memory "
          f"x{last['peak_rss_mb'] / first['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
