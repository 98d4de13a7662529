"""Tiles run past the stop with `--engine ray` on a whole slide: the tests' synthetic gradient slide
(tests/wsi_synth.py) counted to each target on a local Ray of 2 workers (the tests' SynthStages), as
tests/test_ray_engine.py's whole-slide test does, against the tiles the local engine runs.

Usage: python benchmarks/wsi_ray_stop.py [--root CHECKOUT] [--targets 7 15] [--repeats 2]

--root measures another checkout's smear (e.g. an export of an older commit: `git archive COMMIT |
tar -x -C /tmp/old`), so a change to the dispatch can be measured before and after. Each worker logs
each tile it runs the models on (SynthStages' log), counted when the count has stopped and again
once the engine has closed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout measured")
    ap.add_argument("--targets", type=int, nargs="+", default=[7, 15])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = args.root.resolve()
    sys.path[:0] = [str(root / "tests"), str(root)]
    import ray
    from fakes import SynthStages
    from wsi_synth import BLOCK, gradient_slide

    from smear.pipeline.ray_engine import RayEngine, _loopback_only
    from smear.pipeline.wsi_run import WsiSettings, run_whole_slide

    tmp = Path(tempfile.mkdtemp(prefix="wsi-ray-stop-"))
    slide = gradient_slide(tmp / "gradient.tif")
    settings = WsiSettings(tile_px=BLOCK, margin_px=64)
    path = os.pathsep.join([str(root / "tests"), str(root), os.environ.get("PYTHONPATH", "")])
    with _loopback_only(ray):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    for target in args.targets:
        info = run_whole_slide(slide, SynthStages()(), settings, target_wbc=target).whole_slide
        run_here = info.tiles_read - info.skipped["blurred_on_read"]
        for k in range(args.repeats):
            log = tmp / f"log-{target}-{k}"
            log.mkdir()
            with RayEngine(SynthStages(log=str(log)), workers=2) as engine:
                run_whole_slide(slide, None, settings, target_wbc=target, engine=engine)
                ran = len(list(log.iterdir()))
            print(f"{root.name}: --target-wbc {target}: {info.tiles_counted} tiles counted, {run_here} run by the "
                  f"local engine, {ran} by the Ray workers at the stop ({len(list(log.iterdir()))} by the engine's "
                  f"exit): {ran - run_here} past the stop", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
