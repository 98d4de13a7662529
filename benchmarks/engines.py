"""The same fields under `--engine local` and `--engine ray` with 1 and 2 workers, on this machine.

Usage: python benchmarks/engines.py [--data ../shared/data/bccd/test/images] [--n 200] [--slides 4]
                                    [--out benchmarks/results/engines.md]

The N fields (the --data images repeated as links, or synthetic 640x480 fields when --data is
absent) are split into --slides slides and run with the shipped pipeline (YOLO + CNN, runtime
onnx, device cpu, cache off), each run through `run_slides` as `smear run` calls it:
- local: this process, models loaded first (not timed);
- ray, 1 and 2 workers: a local Ray with the cores of this machine; the start (workers up, models
  loaded) is timed apart from the run.
Printed (and written to --out): fields/s per engine, the overhead ratio of ray with 1 worker to
local (run time, and with the start), the scaling from 1 to 2 workers, Ray's round trip per call
on an empty actor method, and the time to decode a field (what shared storage must deliver).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from smear.config import load_config
from smear.devices import available_cores
from smear.io import Slide, list_images, read_image, write_image_atomic
from smear.pipeline.build import build_stages
from smear.pipeline.run import run_slides

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd" / "test" / "images"


def make_slides(folder: Path, data: Path | None, n: int, n_slides: int) -> list[Slide]:
    """N fields in n_slides slide folders: links to the --data images in turn, or synthetic fields."""
    sources = list_images(data) if data is not None else []
    paths = []
    for k in range(n):
        slide = folder / f"slide{k % n_slides}"
        slide.mkdir(parents=True, exist_ok=True)
        if sources:
            src = sources[k % len(sources)]
            target = slide / f"f{k:04d}{src.suffix}"
            target.symlink_to(src.resolve())
        else:
            from smear.synth import make_field

            target = write_image_atomic(slide / f"f{k:04d}.png", make_field(seed=k).image_rgb)
        paths.append(target)
    return [Slide(f"slide{s}", tuple(p for p in paths if p.parent.name == f"slide{s}")) for s in range(n_slides)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def round_trip_ms(ray, calls: int = 200) -> float:
    """Ray's cost per actor call with nothing to do: submit, run, return, get (one call at a time)."""
    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    start = time.perf_counter()
    for i in range(calls):
        ray.get(echo.echo.remote(i))
    ms = (time.perf_counter() - start) / calls * 1000
    ray.kill(echo)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from smear.pipeline.ray_engine import BuildFromConfig, RayEngine

    cfg = load_config("pipeline", None, ["cache_dir=off", "device=cpu", "runtime=onnx"])
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        slides = make_slides(Path(tmp), args.data, args.n, args.slides)
        n = sum(len(s.fields) for s in slides)
        io_s, _ = timed(lambda: [read_image(p) for s in slides for p in s.fields])
        stages = build_stages(cfg)  # also makes the ONNX files the workers then load
        run_slides(slides[:1], stages)  # warm-up: first calls, page cache
        local_s, local = timed(lambda: run_slides(slides, stages, keep_fields=False))
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        trip = round_trip_ms(ray)
        rows = {}
        for workers in (1, 2):
            engine = RayEngine(BuildFromConfig(cfg), field_batch=stages.field_batch, workers=workers)
            start_s, _ = timed(engine.__enter__)
            try:
                run_s, remote = timed(lambda: run_slides(slides, stages, keep_fields=False, engine=engine))
            finally:
                engine.__exit__(None, None, None)
            assert [r.tally for r in remote] == [r.tally for r in local], "ray counted otherwise than local"
            rows[workers] = (start_s, run_s)
        ray.shutdown()

    (s1, r1), (s2, r2) = rows[1], rows[2]
    source = f"{args.data} repeated" if args.data is not None else "synthetic 640x480"
    lines = [
        f"{n} fields ({source}), {args.slides} slides, shipped YOLO + CNN, runtime onnx, cache off; "
        f"{platform.machine()}, {cores} cores, ray {ray.__version__}",
        "",
        "| engine | start s | run s | fields/s (run) | fields/s (start + run) |",
        "|---|---|---|---|---|",
        f"| local | - | {local_s:.1f} | {n / local_s:.1f} | {n / local_s:.1f} |",
        f"| ray, 1 worker | {s1:.1f} | {r1:.1f} | {n / r1:.1f} | {n / (s1 + r1):.1f} |",
        f"| ray, 2 workers | {s2:.1f} | {r2:.1f} | {n / r2:.1f} | {n / (s2 + r2):.1f} |",
        "",
        f"overhead ratio ray 1 worker / local: {r1 / local_s:.2f} (run), {(s1 + r1) / local_s:.2f} (start + run); "
        "target <= 1.10",
        f"scaling 1 -> 2 workers: {r1 / r2:.2f}x (run), {(s1 + r1) / (s2 + r2):.2f}x (start + run)",
        f"per field: local {local_s / n * 1000:.1f} ms, decode alone {io_s / n * 1000:.1f} ms; "
        f"Ray round trip per actor call {trip:.2f} ms (one call per {stages.field_batch} fields)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
