"""Resolve "auto" | "cpu" | "cuda[:N]" to a torch.device, and torch's CPU thread count, in one place."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from smear.errors import SmearError


def available_cores() -> int:
    """CPU cores this process may use: $OMP_NUM_THREADS when it is set (a Ray worker's share of its
    node, as Ray sets it), else the cores the process is allowed to run on."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = max(1, os.cpu_count() or 1)
    share = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(cores, int(share))) if share.isdigit() else cores


@functools.cache
def default_threads() -> int:
    """torch's CPU threads when nothing else is asked, decided once per process: $SMEAR_THREADS when
    it is set; $OMP_NUM_THREADS when set (a Ray worker's share); else the cores other programs leave
    free (the available cores less the 1-minute load average, rounded), at least 1. On a busy 2-core
    PC two threads ran adapt many times slower than one (benchmarks/threads.py): a thread that waits
    for a core its partner's barrier needs stalls both."""
    value = os.environ.get("SMEAR_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise SmearError(f"SMEAR_THREADS={value!r}: not a positive whole number of threads",
                             hint="unset it, or give a number such as SMEAR_THREADS=1")
        return int(value)
    cores = available_cores()
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return cores
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):  # not available on this system
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: ``default_threads()``); returns the count."""
    import torch

    n = n or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Inside the block torch uses ``n`` threads (default: ``default_threads()``); on leaving it, the
    default again, whatever the code inside set (ultralytics lowers them)."""
    try:
        yield set_threads(n)
    finally:
        set_threads()


def resolve_device(name: str = "auto"):
    """A torch.device for "auto", "cpu", "cuda" or "cuda:N"; auto picks CUDA when present. It sets
    nothing: the code that runs a network on the CPU sets the threads (``set_threads``)."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    elif name == "cpu":
        device = torch.device("cpu")
    elif name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SmearError(f"device {name!r} asked for, but no CUDA device is available",
                             hint="use --device cpu or --device auto")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SmearError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        device = torch.device(f"cuda:{index}")
    else:
        raise SmearError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N")
    return device
