"""Device resolution and thread count."""

from __future__ import annotations

import pytest
import torch

from smear.devices import available_cores, resolve_device, set_threads
from smear.types import SmearError


def test_cpu_and_auto():
    assert resolve_device("cpu").type == "cpu"
    assert torch.get_num_threads() == available_cores()
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
