"""Triton kernels for the MoE fast path.

Each kernel has a pure-PyTorch twin with the same signature (deepseekmoe.model.moe.experts) and tests
that they agree. This module decides whether the Triton backend can run on a device and exports
its options (KernelOptions, kernel_options: options.py); the kernels themselves live in submodules
and import triton lazily, so CPU installs never need it.
"""

from __future__ import annotations

import os

import torch

from deepseekmoe.kernels.options import KernelOptions, current_options, kernel_options

__all__ = ["KernelOptions", "current_options", "decode_experts", "decode_router", "decode_shared", "experts_triton",
           "kernel_options", "triton_unavailable_reason"]


def triton_unavailable_reason(device: torch.device | str | None) -> str | None:
    """None when the Triton expert backend can run on `device`, else a short reason."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return f"it needs a CUDA GPU (tensors are on {device.type})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed (pip install 'deepseekmoe[gpu]')"
    try:
        from deepseekmoe.kernels import moe_triton  # noqa: F401
    except ImportError as e:
        return f"the Triton MoE kernels are not available ({e})"
    return None


def experts_triton(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, options: KernelOptions | None = None):
    """Fused Triton expert compute; same signature and result as experts_loop (options: KernelOptions)."""
    from deepseekmoe.kernels.moe_triton import experts_triton as fn

    return fn(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, options)


def decode_experts(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """Fused routed experts of a decode step (T <= 64 tokens, inference only); same signature and
    result as the `gather` backend (decode_moe.py)."""
    from deepseekmoe.kernels.decode_moe import decode_experts as fn

    return fn(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)


def decode_router(x_TD, w_ED, k: int, normalize: bool):
    """(idx_TK, w_TK) of the top-k router in one kernel (inference only; decode_routing.py)."""
    from deepseekmoe.kernels.decode_routing import decode_router as fn

    return fn(x_TD, w_ED, k, normalize)


def decode_shared(x_TD, gate_FD, up_FD, down_DF):
    """The shared experts' SwiGLU MLP on the decode kernels, [T, D] fp32 (inference only; decode_moe.py)."""
    from deepseekmoe.kernels.decode_moe import decode_shared as fn

    return fn(x_TD, gate_FD, up_FD, down_DF)
