"""Fixtures shared by the test modules. Plain helper functions are in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch


def _kernels_for_the_interpreter() -> None:
    """On a machine without CUDA the Triton kernels are tested under Triton's interpreter, which
    must be chosen before triton is first imported, and transformers, lm-eval and torch.compile
    import it too: so the kernels are imported here, once, with TRITON_INTERPRET=1, and the variable
    is restored (other tests check the no-interpreter path). tests/test_kernels.py and
    tests/test_lora_triton.py then run in this process whatever ran before them."""
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    from tests.helpers import triton_interpreter

    with triton_interpreter():
        import deepseekmoe.kernels.moe_kernels  # noqa: F401


_kernels_for_the_interpreter()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for the requesting module (`pytestmark = pytest.mark.usefixtures
    ("one_thread")`): tiny models gain nothing from a thread pool, and on a shared 2-core machine a
    busy neighbour makes the pool spin (a tiny training step goes from ~10 ms to ~450 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
