"""Wall time of `smear adapt` with 1 and with 2 torch threads, alone and with copies of itself running
beside it (a busy lab PC): is the default thread count safe under load?

    python benchmarks/threads.py --data /work/raabin/test --per-class 12 --epochs 4 --parallel 1 2

Each setting runs `smear adapt` as a subprocess with SMEAR_THREADS (smear's own knob) and prints the
wall time of each copy. The cells are copied into a temporary folder (class folders) and removed after.

    python benchmarks/threads.py --steps 20 --threads 1 2 1 2 --parallel 1 2

``--steps N`` times N training steps of the shipped classifier's network (batch 32 at its input size,
random crops) instead: the same arithmetic as adapt and train without the data loading, quick enough
to repeat each setting in turn on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _dataset(src: Path, per_class: int, dst: Path) -> int:
    n = 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())[:per_class]
        (dst / cls.name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / cls.name / f.name)
            n += 1
    return n


def _run(data: Path, epochs: int, threads: str, copies: int, tmp: Path) -> list[float]:
    """Start ``copies`` adapt runs at once with ``threads``; their wall times in seconds."""
    env = {**os.environ, "SMEAR_THREADS": threads, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    procs = []
    for k in range(copies):
        out = tmp / f"out-{threads}-{copies}-{k}"
        cmd = [sys.executable, "-m", "smear.cli", "adapt", "--data", str(data), "--out", str(out),
               "--epochs", str(epochs)]
        procs.append((time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                             stderr=subprocess.PIPE, text=True)))
    times = []
    for t0, p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"adapt failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
        times.append(time.perf_counter() - t0)
    return times


STEPS = """
import sys, time, torch
from smear.classify.model import build_model
from smear.devices import set_threads
set_threads()
torch.manual_seed(0)
net = build_model("mobilenetv3_small_100")
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
x, y = torch.rand(32, 3, 128, 128), torch.randint(0, 11, (32,))
net.train()
t0 = time.perf_counter()
for _ in range(int(sys.argv[1])):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
print(time.perf_counter() - t0)
"""


def _steps(steps: int, threads: str, copies: int) -> list[float]:
    """``copies`` processes at once, each ``steps`` training steps with ``threads``; their step times."""
    env = {**os.environ, "SMEAR_THREADS": threads}
    env.pop("OMP_NUM_THREADS", None)
    procs = [subprocess.Popen([sys.executable, "-c", STEPS, str(steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="class folders of single-cell images")
    ap.add_argument("--steps", type=int, help="time this many training steps instead of smear adapt")
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", nargs="+", default=["1", "2"])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2], help="copies running at once")
    args = ap.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}")
    if args.steps:
        for copies in args.parallel:
            for threads in args.threads:
                load = os.getloadavg()[0]
                times = _steps(args.steps, threads, copies)
                print(f"threads {threads:>4}, {copies} cop{'y' if copies == 1 else 'ies'} at once (load before "
                      f"{load:.2f}): " + ", ".join(f"{1000 * t / args.steps:.0f} ms/step" for t in times), flush=True)
        return
    if args.data is None:
        ap.error("--data is needed (or --steps)")
    with tempfile.TemporaryDirectory(prefix="smear-threads-") as tmp:
        tmp = Path(tmp)
        n = _dataset(args.data, args.per_class, tmp / "cells")
        print(f"{n} cells from {args.data}, {args.epochs} passes")
        for copies in args.parallel:
            for threads in args.threads:
                load = os.getloadavg()[0]
                times = _run(tmp / "cells", args.epochs, threads, copies, tmp)
                print(f"threads {threads:>4}, {copies} cop{'y' if copies == 1 else 'ies'} at once "
                      f"(load before {load:.2f}): " + ", ".join(f"{t:.1f} s" for t in times), flush=True)


if __name__ == "__main__":
    main()
