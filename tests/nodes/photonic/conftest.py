"""Photonic tests run many tiny tensor ops; one intra-op thread avoids thread-pool overhead
on a shared 2-core machine (it makes them ~10x faster and does not change results)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
