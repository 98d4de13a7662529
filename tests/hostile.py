"""Shared helpers of the hardening tests: small slides, one-line errors, hostile model folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from typer.testing import CliRunner

runner = CliRunner()
CLASSICAL = ["--set", "detector=classical", "--set", "classifier=off"]


def slide(folder: Path, seeds=(1, 2)) -> list[Path]:
    """A slide folder of small synthetic PNG fields."""
    from smear.io import write_image_atomic
    from smear.synth import make_field

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        paths.append(write_image_atomic(folder / f"field_{s:02d}.png", make_field(seed=s, width=320, height=240).image_rgb))
    return paths


def one_line_error(res, *needles: str) -> str:
    """The one ``error:`` line of a failed CLI run, holding every needle; no traceback."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def no_models(monkeypatch):
    """Fail the test if any stage is built (the checks must come first)."""
    import smear.pipeline.build as build

    def boom(_cfg):
        raise AssertionError("stages were built before the outputs were checked")

    monkeypatch.setattr(build, "build_stages", boom)


def copy_model(name: str, dest: Path, **meta_changes) -> Path:
    """A copy of the shipped model folder ``name`` with ``meta_changes`` written into its meta.json."""
    from smear.artifacts import shipped_dir

    shutil.copytree(shipped_dir(name), dest)
    if meta_changes:
        meta = json.loads((dest / "meta.json").read_text())
        meta.update(meta_changes)
        (dest / "meta.json").write_text(json.dumps(meta))
    return dest


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


#: Source for the top of a child Python script: an audit hook that turns any connection or DNS lookup
#: off this machine into an error (loopback and Unix sockets allowed).
NO_NETWORK_PRELUDE = """
import socket, sys
def no_network(event, args):
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise RuntimeError(f"network connection to {address}")
    if event == "socket.getaddrinfo" and args[0] not in (None, "localhost", "127.0.0.1", "::1"):
        raise RuntimeError(f"DNS lookup of {args[0]}")
sys.addaudithook(no_network)
"""
