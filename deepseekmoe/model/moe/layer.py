"""The MoE layer: K_s shared experts (always on, weight 1) + gated routed experts + router.

    h = sum_{i<=K_s} FFN_i(u) + sum_{i routed} g_i FFN_i(u)        (paper eq. 9-11; the
                                                                  residual is added by the block)

Routed expert weights are stacked (see experts.py); the shared experts are one SwiGLU MLP of
width n_shared x moe_intermediate_size, exactly the released layout. The layer returns its output
and its router's balance-loss terms (`BalanceLoss`, None outside training), so the model can
report them apart from the LM loss.

LoRA: `RoutedExperts.lora` (None, or the stacked per-expert factors of model/moe/lora.py that
deepseekmoe.model.lora.apply_lora attaches) reaches the backend with every forward.

Analysis knobs (paper section 4.5), plain attributes set by `Transformer.set_routing`:
  shared_enabled   False switches the shared experts off (Fig 5 also routes one more expert)
  record           True stores the last call's routing in `last_routing` (ids, gates) for
                   routing statistics and specialisation plots

Shape legend: B batch, L sequence, T = B*L tokens, D hidden, E routed experts, F expert width,
K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.layers import MLP
from deepseekmoe.model.moe.experts import experts_with_lora, resolve_backend
from deepseekmoe.model.moe.lora import ExpertLora
from deepseekmoe.model.moe.router import Routing, build_router


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors (gate|up fused, and down)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.dim, self.width = E, D, F
        self.backend = cfg.expert_backend
        self.w13 = nn.Parameter(torch.empty(E, 2 * F, D))  # [E, 2F, D]: gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(E, D, F))  # [E, D, F]
        # Expert parallel sets a token dispatcher (parallel/expert_parallel.py) that sends each slot
        # to the rank holding its expert, runs the backend there and combines the results; None: local.
        self.dispatcher = None
        # LoRA factors of every expert (model/moe/lora.py), set by deepseekmoe.model.lora.apply_lora.
        self.lora: ExpertLora | None = None

    def forward(self, x_TD, idx_TK, w_TK):
        fn = resolve_backend(self.backend, x_TD.device)
        dev = x_TD.device.type
        # Autocast does not reach grouped_mm / custom kernels, and the fp32 residual stream
        # would make them run in fp32: compute the experts in the autocast dtype, as nn.Linear does.
        if torch.is_autocast_enabled(dev) and x_TD.dtype == torch.float32:
            x_TD = x_TD.to(torch.get_autocast_dtype(dev))
        if self.lora is not None:
            if self.dispatcher is not None:
                raise ConfigError("LoRA on the routed experts does not run under expert parallel yet; "
                                  "use parallel.ep=1 or LoRA without the routed experts (lora.experts=false)")
            return experts_with_lora(fn, x_TD, idx_TK, w_TK, self.w13, self.w2, self.lora.factors(x_TD.dtype))
        if self.dispatcher is not None:
            return self.dispatcher(self, x_TD, idx_TK, w_TK)
        return fn(x_TD, idx_TK, w_TK, self.w13, self.w2)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, width={self.width}, backend={self.backend}"


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = build_router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts > 0 else None)
        self.shared_enabled = True
        self.record = False
        self.last_routing: Routing | None = None

    def forward(self, x_BLD: torch.Tensor, input_ids_BL: torch.Tensor | None = None):
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        r = self.gate(x_TD, input_ids_BL)
        if self.record:
            self.last_routing = Routing(r.idx_TK.detach(), r.w_TK.detach(), None)
        y_TD = self.experts(x_TD, r.idx_TK, r.w_TK)
        if self.shared_experts is not None and self.shared_enabled:
            y_TD = y_TD + self.shared_experts(x_TD)
        balance = self.gate.balance_loss(r, B) if self.training and r.scores_TE is not None else None
        return y_TD.view(B, L, D), balance
