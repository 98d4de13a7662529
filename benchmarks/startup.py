"""Where a small run's fixed seconds go: imports, building the stages, the first and a second run.

Usage: python benchmarks/startup.py [--slide examples/slide_demo] [--set runtime=torch ...]

Run it as its own process (the imports are what it times). Prints one line: seconds for the
imports smear needs, for build_stages (model loads, ONNX sessions, first-use exports), for a first
and a second run of the slide, the heavy modules the process ended up importing, and the load
average. For the whole command, time `smear run examples/slide_demo --set cache_dir=off`; for the
detail, `python -X importtime -m smear.cli run ...` and `python -m cProfile -m smear.cli run ...`.
"""

from __future__ import annotations

import time

t0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.config import load_config  # noqa: E402
from smear.io import find_slides  # noqa: E402
from smear.pipeline.build import build_stages  # noqa: E402
from smear.pipeline.run import run_slide  # noqa: E402
from smear.report.summary import differential  # noqa: E402,F401 - the report's import, as `smear run` has it

HEAVY = ("torch", "torchvision", "ultralytics", "timm", "scipy.stats", "pandas", "matplotlib", "openvino")


def main() -> None:
    t_imports = time.perf_counter() - t0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(ROOT / "examples" / "slide_demo"))
    ap.add_argument("--set", action="append", default=[], help="pipeline config override")
    args = ap.parse_args()
    t = time.perf_counter()
    stages = build_stages(load_config("pipeline", None, ["cache_dir=off", *args.set]))
    t_build = time.perf_counter() - t
    [slide] = find_slides([Path(args.slide)])
    t = time.perf_counter()
    run_slide(slide, stages)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    run_slide(slide, stages)
    t_second = time.perf_counter() - t
    loaded = [m for m in HEAVY if m in sys.modules]
    print(f"{' '.join(args.set) or 'defaults'}: imports {t_imports:.2f} s, build {t_build:.2f} s, first run "
          f"{t_first:.2f} s, second run {t_second:.2f} s ({len(slide.fields)} fields); imported: "
          f"{', '.join(loaded) or 'none of ' + ', '.join(HEAVY)}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
