"""Routed experts under the released names (`experts.E.{gate,up,down}_proj`), computed by this
project's stacked backends (`deepseekmoe.model.moe.experts`: grouped / triton / gather / loop).

Storage. Each expert is the project's SwiGLU `MLP` (three `nn.Linear`), so checkpoints, PEFT target
names (`experts.0.up_proj`) and `device_map` see the released layout. The backends want two stacked
tensors, w13_E2FD (gate rows, then up rows) and w2_EDF, so the experts' weights are *packed*: the
first forward after loading, moving or casting allocates the stacked tensors, copies the weights in
and re-points every Linear's `weight.data` at its slice. Parameter objects stay the same (optimizers
keep their references), and the backends read the stacked tensors without a copy. Whether the
packing still holds is checked per forward, one data pointer per weight (~20 us for 64 experts on a
CPU core); the module tree (is every projection a bare Linear?) is re-read only after some module
or parameter was registered anywhere (torch's global registration hooks). Under torch.compile the
packing of the last eager forward is assumed.

Gradients. `_Stacked` hands the stacked tensors to the backend as a differentiable function of the
per-expert weights: its backward slices the stacked gradient back into one gradient per Linear.

Adapters. PEFT LoRA on the expert Linears keeps the stacked path (peft_lora.py: PEFT's base
layers stay packed, its factors are stacked per forward and applied by the backends). Any other
wrapper (DoRA, several active adapters, a quantised layer, hooks) makes the layer run each expert
module on its own tokens (`module_loop`), so whatever wraps the Linear runs too: correct for any
wrapper, slower (one host sync per expert).

Shape legend: T tokens, K experts per token, E experts, D hidden, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepseekmoe.integrations.transformers.peft_lora import LOOP, PEFT, PLAIN, classify, lora_factors
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.layers import MLP
from deepseekmoe.model.moe.experts import experts_gather, experts_with_lora, resolve_backend

# Bumped whenever any module registers a submodule or parameter (PEFT replacing a Linear, a new
# weight Parameter): ExpertList re-reads its module tree only then, not on every forward.
_EPOCH = [0]


def _bump(*_args):
    _EPOCH[0] += 1


nn.modules.module.register_module_module_registration_hook(_bump)
nn.modules.module.register_module_parameter_registration_hook(_bump)


class _Stacked(torch.autograd.Function):
    """(w13_E2FD, w2_EDF) stacked storage -> the same tensors, differentiable in the E*3 per-expert
    weights that are views of it (order: every gate, every up, every down)."""

    @staticmethod
    def forward(ctx, w13_E2FD, w2_EDF, *weights):
        ctx.n_experts = w13_E2FD.shape[0]
        return w13_E2FD.view_as(w13_E2FD), w2_EDF.view_as(w2_EDF)

    @staticmethod
    def backward(ctx, g13_E2FD, g2_EDF):
        E = ctx.n_experts
        F_ = None if g13_E2FD is None else g13_E2FD.shape[1] // 2
        gates = [None] * E if g13_E2FD is None else [g13_E2FD[e, :F_] for e in range(E)]
        ups = [None] * E if g13_E2FD is None else [g13_E2FD[e, F_:] for e in range(E)]
        downs = [None] * E if g2_EDF is None else [g2_EDF[e] for e in range(E)]
        return (None, None, *gates, *ups, *downs)


class ExpertList(nn.Module):
    """E expert MLPs named "0".."E-1" (so `experts.3.down_proj.weight`), forward like the project's
    `RoutedExperts`: (x_TD, idx_TK, w_TK) -> y_TD."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.dim, self.width = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.backend = cfg.expert_backend
        self.dispatcher = None  # the RoutedExperts attribute expert parallel sets; unused here
        for e in range(self.n_experts):
            self.add_module(str(e), MLP(self.dim, self.width))
        self._w13_E2FD: torch.Tensor | None = None
        self._w2_EDF: torch.Tensor | None = None
        self._ptrs: list[int] = []
        self._epoch, self._mode, self._bases, self._wrapped, self._param_dicts = -1, LOOP, [], {}, []

    def __getitem__(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return self.n_experts

    # ------------------------------------------------------------------ packing
    def _refresh(self) -> None:
        """Re-read the module tree (after any module or parameter was registered anywhere)."""
        self._mode, self._bases, self._wrapped = classify(list(self._modules.values()))
        self._param_dicts = [lin._parameters for lin in self._bases]
        self._epoch = _EPOCH[0]

    @property
    def mode(self) -> str:
        """"plain" (bare Linears), "peft" (PEFT LoRA the stacked path runs) or "loop" (each expert
        module runs by itself)."""
        if self._epoch != _EPOCH[0]:
            self._refresh()
        return self._mode

    def plain(self) -> bool:
        """True when every expert projection is a bare nn.Linear (no adapter, wrapper or hook)."""
        return self.mode == PLAIN

    # What the decode fast path (inference/fast_path.py) reads of the project's RoutedExperts: the
    # stacked weights, and `lora` None only where they are the whole computation.
    @property
    def lora(self) -> str | None:
        return None if self.plain() else self.mode

    @property
    def w13(self) -> torch.Tensor:
        return self.stacked()[0]

    @property
    def w2(self) -> torch.Tensor:
        return self.stacked()[1]

    def _linears(self) -> list[nn.Module]:
        """The 3E Linears holding the expert weights (PEFT's base layers when wrapped), stacked order."""
        return self._bases if self.mode != LOOP else []

    def packed(self) -> bool:
        """True when every expert weight is still its slice of the stacked tensors (the check a
        forward pays: one data pointer per weight)."""
        if self.mode == LOOP or self._w13_E2FD is None:  # mode first: it refreshes _param_dicts
            return False
        return [d["weight"].data_ptr() for d in self._param_dicts] == self._ptrs

    @torch.no_grad()
    def pack(self) -> None:
        """Move the expert weights into stacked storage (one extra copy of one layer's experts at
        the peak) and make each Linear's weight a view of it."""
        lins = self._linears()
        E, F_ = self.n_experts, self.width
        w = lins[0].weight
        if w.device.type == "meta":
            return
        w13_E2FD = torch.empty(E, 2 * F_, self.dim, dtype=w.dtype, device=w.device)
        w2_EDF = torch.empty(E, self.dim, F_, dtype=w.dtype, device=w.device)
        views = [w13_E2FD[e, :F_] for e in range(E)] + [w13_E2FD[e, F_:] for e in range(E)] + list(w2_EDF)
        for lin, view in zip(lins, views):
            view.copy_(lin.weight)
            lin.weight.data = view
        self._w13_E2FD, self._w2_EDF = w13_E2FD, w2_EDF
        self._ptrs = [lin.weight.data_ptr() for lin in lins]

    def _apply(self, fn, *args, **kwargs):
        # Moving / casting gives every weight new storage: drop the stale stacked copy first.
        self._w13_E2FD = self._w2_EDF = None
        self._ptrs = []
        return super()._apply(fn, *args, **kwargs)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_E2FD, w2_EDF) for the backends, connected to the per-expert weights for autograd."""
        if not torch.compiler.is_compiling() and not self.packed():
            self.pack()
        if self._w13_E2FD is None:  # compiled before any eager forward: stack in the graph (a copy)
            return self._stack_in_graph()
        if torch.is_grad_enabled():
            weights = [d["weight"] for d in self._param_dicts]
            if any(w.requires_grad for w in weights):
                return _Stacked.apply(self._w13_E2FD, self._w2_EDF, *weights)
        return self._w13_E2FD, self._w2_EDF

    def _stack_in_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        lins = self._linears()
        E = self.n_experts
        w13_E2FD = torch.cat([torch.stack([lin.weight for lin in lins[:E]]),
                              torch.stack([lin.weight for lin in lins[E:2 * E]])], dim=1)
        return w13_E2FD, torch.stack([lin.weight for lin in lins[2 * E:]])

    # ------------------------------------------------------------------ forward
    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == LOOP:
            return self.module_loop(x_TD, idx_TK, w_TK)
        dev = x_TD.device.type
        # As RoutedExperts: autocast does not reach the grouped kernels, so run them in its dtype.
        if torch.is_autocast_enabled(dev) and x_TD.dtype == torch.float32:
            x_TD = x_TD.to(torch.get_autocast_dtype(dev))
        lora = lora_factors(self._wrapped, x_TD.dtype) if mode == PEFT else None
        if lora is False:  # adapters the stacked path cannot express right now (e.g. two active)
            return self.module_loop(x_TD, idx_TK, w_TK)
        w13_E2FD, w2_EDF = self.stacked()
        fn = resolve_backend(self.backend, x_TD.device)
        T, K = idx_TK.shape
        # Compiled decode steps with few token slots read only the chosen experts (the rule of
        # inference.generate.default_decode_backend).
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and T * K <= self.n_experts:
            fn = experts_gather
        if lora is not None:
            return experts_with_lora(fn, x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora)
        return fn(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)

    def module_loop(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Each expert module (with whatever wraps its Linears) on the tokens that chose it."""
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for e, expert in enumerate(self):
            tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(x_TD[tok])
            out_TD = out_TD.index_add(0, tok, (y * w_TK[tok, slot, None].to(y.dtype)).float())
        return out_TD.to(x_TD.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, width={self.width}, backend={self.backend}"
