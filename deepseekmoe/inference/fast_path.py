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
honoured (recording keeps ids and gates; scores are not computed). The shared experts stay the
layer's MLP (torch / inductor), or with `shared_on_kernels` (decode_backend="fused_shared") run on
the same decode kernels as one expert every token takes (decode_moe.decode_shared).

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
        from deepseekmoe.kernels.decode_moe import MAX_TOKENS, decode_experts, decode_shared
        from deepseekmoe.kernels.decode_routing import decode_router

        _KERNELS.update(router=decode_router, experts=decode_experts, shared=decode_shared, max_tokens=MAX_TOKENS)
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


def _fused(self, x_BLD: torch.Tensor, shared_on_kernels: bool):
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(B * L, D)
    gate = self.gate
    idx_TK, w_TK = _KERNELS["router"](x_TD, gate.weight, gate.top_k, gate.normalize)
    if self.record:
        self.last_routing = Routing(idx_TK, w_TK, None)
    y_TD = _KERNELS["experts"](x_TD, idx_TK, w_TK, self.experts.w13, self.experts.w2)
    mlp = self.shared_experts
    if mlp is not None and self.shared_enabled:
        if shared_on_kernels:
            s_TD = _KERNELS["shared"](x_TD, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            y_TD = (y_TD.float() + s_TD).to(x_TD.dtype)
        else:
            y_TD = y_TD + mlp(x_TD)
    return y_TD.view(B, L, D), None


def fused_moe_forward(self, x_BLD: torch.Tensor, input_ids_BL: torch.Tensor | None = None):
    """MoE.forward of a decode step on the fused kernels (bound to the layer as `self`); the
    shared experts stay the layer's own MLP."""
    return _fused(self, x_BLD, False)


def fused_moe_shared_forward(self, x_BLD: torch.Tensor, input_ids_BL: torch.Tensor | None = None):
    """As fused_moe_forward, with the shared experts on the decode kernels too (decode_shared:
    gate|up + SwiGLU in one launch, down in a second)."""
    return _fused(self, x_BLD, True)


@contextlib.contextmanager
def fused_moe_path(model, shared_on_kernels: bool = False):
    """Run every eligible MoE layer of `model` with fused_moe_forward (or, with
    `shared_on_kernels`, fused_moe_shared_forward) inside the block."""
    _kernels()
    fn = fused_moe_shared_forward if shared_on_kernels else fused_moe_forward
    patched = []
    for moe in model.moe_layers():
        if layer_takes_fused(moe):
            patched.append((moe, moe.__dict__.get("forward")))
            moe.forward = types.MethodType(fn, moe)
    try:
        yield
    finally:
        for moe, old in patched:
            if old is None:
                del moe.forward
            else:
                moe.forward = old
