"""Device resolution and thread count."""

from __future__ import annotations

import pytest
import torch

from smear.devices import available_cores, default_threads, resolve_device, set_threads
from smear.errors import SmearError


def test_cpu_and_auto():
    set_threads()
    assert resolve_device("cpu").type == "cpu"
    assert torch.get_num_threads() == default_threads()
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_names():
    with pytest.raises(SmearError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SmearError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_set_threads_explicit():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        set_threads(before)


def test_resolve_device_sets_nothing_and_torch_threads_restores():
    import torch

    from smear.devices import torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        resolve_device("cpu")
        assert torch.get_num_threads() == 1  # resolving a device has no side effect
        with torch_threads(1) as n:
            assert n == 1
            torch.set_num_threads(1)  # as ultralytics does while it predicts
        assert torch.get_num_threads() == default_threads()
    finally:
        set_threads(before)


def test_available_cores_takes_the_share_ray_gives(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    all_cores = available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a Ray worker holding one CPU
    assert available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "999")
    assert available_cores() == all_cores
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert available_cores() == all_cores


def test_importing_ultralytics_leaves_the_thread_count_to_smear(monkeypatch):
    """ultralytics sets OMP_NUM_THREADS=1 on import when it is unset; available_cores reads that
    variable (a Ray worker's share), so smear must take it back out."""
    import os
    import sys

    from smear.detect.ultralytics_adapter import ultralytics
    from smear.devices import available_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cores()
    for name in [m for m in sys.modules if m == "ultralytics" or m.startswith("ultralytics.")]:
        monkeypatch.delitem(sys.modules, name)  # import it afresh, as a new process would
    ultralytics()
    assert "OMP_NUM_THREADS" not in os.environ
    assert available_cores() == cores


@pytest.mark.parametrize("env, load, want", [
    ({}, 0.2, "cores"),  # a quiet machine: every core
    ({}, 1.0, "cores-1"),  # one core busy elsewhere: one fewer
    ({}, 40.0, 1),  # a busy machine: one thread
    ({"SMEAR_THREADS": "3"}, 40.0, 3),  # the user's word
    ({"OMP_NUM_THREADS": "1"}, 0.0, 1),  # a Ray worker's share, whatever the load
])
def test_default_threads_leave_busy_cores_alone(monkeypatch, env, load, want):
    import os

    for key in ("SMEAR_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    default_threads.cache_clear()
    try:
        cores = available_cores()
        expect = {"cores": cores, "cores-1": max(1, cores - 1)}.get(want, want)
        assert default_threads() == expect
    finally:
        default_threads.cache_clear()


def test_a_bad_thread_count_is_one_error(monkeypatch):
    monkeypatch.setenv("SMEAR_THREADS", "two")
    default_threads.cache_clear()
    try:
        with pytest.raises(SmearError, match="SMEAR_THREADS='two': not a positive whole number"):
            default_threads()
    finally:
        monkeypatch.delenv("SMEAR_THREADS")
        default_threads.cache_clear()
