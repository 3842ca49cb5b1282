"""The decode fast path of the MoE layers: router and routed experts as two Triton kernels each step.

    with fused_moe_path(model):      # what Decoder does around each decode step (decode_backend="fused")
        logits = model(tokens_B1, ...)

Inside the block every eligible MoE layer computes

    idx_TK, w_TK = decode_router(x_TD, gate.weight, top_k, normalize)     (one kernel)
    y_TD = decode_experts(x_TD, idx_TK, w_TK, w13, w2) + shared_experts(x_TD)

with the kernels of deepseekmoe.kernels.decode_routing and decode_moe (reference twins: TopKRouter and
the `gather` backend; tests/test_decode_kernels.py). Each layer's weights are read from its
modules as they are (nothing is copied or re-laid out). A layer stays on its own forward when
the fast path cannot reproduce it: hash routing, the mask_top_fraction knob, LoRA on the
experts, expert parallel, training mode. The `top_k`, `shared_enabled` and `record` knobs are
honoured (recording keeps ids and gates; scores are not computed).

How it hooks in: the layer's `forward` is replaced by a bound method for the block's duration
(torch.compile guards a patched forward on its function, which is the same every step, so a
compiled step is not retraced) and restored afterwards. The kernels are imported only when the
block is entered, so CPU installs and the CPU tests' interpreter rule never see triton imported
early. Decode is inference: there is no backward.

Shape legend: B batch, L sequence (1 in decode), T = B*L tokens, D hidden, K experts per token.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch

from deepseekmoe.model.moe.router import Routing, TopKRouter

_KERNELS: dict = {}


def _kernels() -> dict:
    """The two kernel entry points (imported on first use)."""
    if not _KERNELS:
        from deepseekmoe.kernels.decode_moe import MAX_TOKENS, decode_experts
        from deepseekmoe.kernels.decode_routing import decode_router

        _KERNELS.update(router=decode_router, experts=decode_experts, max_tokens=MAX_TOKENS)
    return _KERNELS


def fused_unavailable_reason(model, batch_size: int) -> str | None:
    """None when decode steps of `batch_size` rows can take the fused path, else a short reason."""
    cfg = model.config
    dev = model.embed_tokens.weight.device
    if not cfg.n_routed_experts or cfg.router == "hash":
        return "the model has no learned top-k router"
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the fused decode kernels need a CUDA GPU (the model is on {dev.type})"
    try:
        max_tokens = _kernels()["max_tokens"]
    except ImportError as e:
        return f"the decode kernels are not available ({e})"
    if batch_size > max_tokens:
        return f"batch {batch_size} is above the decode kernels' {max_tokens} tokens"
    return None


def layer_takes_fused(moe) -> bool:
    """Whether this MoE layer's forward can be the fused one (see the module docstring)."""
    gate, experts = moe.gate, moe.experts
    plain = all(type(p.data) is torch.Tensor for p in (gate.weight, experts.w13, experts.w2))  # not FSDP's DTensors
    return (type(gate) is TopKRouter and gate.mask_top_fraction == 0 and experts.lora is None
            and experts.dispatcher is None and not moe.training and plain)


def fused_moe_forward(self, x_BLD: torch.Tensor, input_ids_BL: torch.Tensor | None = None):
    """MoE.forward of a decode step on the fused kernels (bound to the layer as `self`)."""
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(B * L, D)
    gate = self.gate
    idx_TK, w_TK = _KERNELS["router"](x_TD, gate.weight, gate.top_k, gate.normalize)
    if self.record:
        self.last_routing = Routing(idx_TK, w_TK, None)
    y_TD = _KERNELS["experts"](x_TD, idx_TK, w_TK, self.experts.w13, self.experts.w2)
    if self.shared_experts is not None and self.shared_enabled:
        y_TD = y_TD + self.shared_experts(x_TD)
    return y_TD.view(B, L, D), None


@contextlib.contextmanager
def fused_moe_path(model):
    """Run every eligible MoE layer of `model` with fused_moe_forward inside the block."""
    _kernels()
    patched = []
    for moe in model.moe_layers():
        if layer_takes_fused(moe):
            patched.append((moe, moe.__dict__.get("forward")))
            moe.forward = types.MethodType(fused_moe_forward, moe)
    try:
        yield
    finally:
        for moe, old in patched:
            if old is None:
                del moe.forward
            else:
                moe.forward = old
