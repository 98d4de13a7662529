"""Hardening of `--engine ray` (smear/pipeline/ray_engine.py): a Ray instance smear starts is reachable
from this machine only."""

from __future__ import annotations

import ipaddress
import os

import pytest

pytestmark = pytest.mark.slow


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``pids``."""
    import psutil

    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.append((conn.pid, conn.laddr.ip, conn.laddr.port))
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_a_local_ray_started_by_smear_listens_on_loopback_only(monkeypatch):
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from smear.config import load_config
    from smear.pipeline.ray_engine import BuildFromConfig, RayEngine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    cfg = load_config("pipeline", None, ["detector=classical", "classifier=off", "cache_dir=off"])
    with RayEngine(BuildFromConfig(cfg), workers=1) as engine:
        pids = {os.getpid(), *engine.pids, *(p.pid for p in psutil.Process().children(recursive=True))}
        sockets = _listening(pids)
        assert sockets, "no listening socket found: the check would hold vacuously"
        exposed = [s for s in sockets if not _loopback(s[1])]
        names = {pid: psutil.Process(pid).name() for pid, _, _ in exposed}
        assert not exposed, f"listening beyond loopback: {[(names[p], ip, port) for p, ip, port in exposed]}"
    assert not ray.is_initialized()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # the driver's environment is as it was
