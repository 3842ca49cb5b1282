"""Fixtures shared by the test modules. Plain helper functions are in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for the requesting module (`pytestmark = pytest.mark.usefixtures
    ("one_thread")`): tiny models gain nothing from a thread pool, and on a shared 2-core machine a
    busy neighbour makes the pool spin (a tiny training step goes from ~10 ms to ~450 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
