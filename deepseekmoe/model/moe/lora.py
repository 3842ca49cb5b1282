"""LoRA for the routed experts: per-expert low-rank factors stacked over E like the expert weights.

For expert e and a projection P in {gate_proj, up_proj, down_proj} with weight W_P[e] (out, in),
LoRA adds a rank-r update, exactly PEFT's per-module formula on each released expert module:

    P_e(x) = x W_P[e]^T + scale * (drop(x) A_P[e]^T) B_P[e]^T,   scale = alpha / r

Layout (one parameter per projection, so any subset of the three can be adapted and each maps to
PEFT's `mlp.experts.{e}.{P}.lora_A/B.weight` by an index on dim 0):

    gate_proj_lora_A  [E, r, D]    gate_proj_lora_B  [E, F, r]
    up_proj_lora_A    [E, r, D]    up_proj_lora_B    [E, F, r]
    down_proj_lora_A  [E, r, F]    down_proj_lora_B  [E, D, r]

They live in `ExpertLora`, the child `lora` of RoutedExperts (full names such as
`layers.3.mlp.experts.lora.gate_proj_lora_A`: every adapter name holds "lora_"). The backends
receive `ExpertLoraFactors`, which also builds the fused operators the sorting backends need:
the gate|up factors as one pair matching w13's row layout,

    a13_ERD = [A_gate; A_up]            [E, R, D]   (R = r per adapted projection of the two)
    b13_E2FR = [[B_gate, 0], [0, B_up]] [E, 2F, R]  (block diagonal: rows 0..F-1 gate, F..2F-1 up)

so the gate/up low-rank term of all slots is two grouped GEMMs, (x_SD a13^T) b13^T, and the down
term two more. One dropout mask per slot row is shared by gate and up (PEFT draws one per
projection: same expectation, different noise); outside training there is none.

Shape legend: E experts, D hidden size, F expert width, r rank, R stacked rank, S token slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLoraFactors:
    """The factors one forward uses (already in the compute dtype; None = projection not adapted)."""

    gate_A: torch.Tensor | None  # [E, r, D]
    gate_B: torch.Tensor | None  # [E, F, r]
    up_A: torch.Tensor | None  # [E, r, D]
    up_B: torch.Tensor | None  # [E, F, r]
    down_A: torch.Tensor | None  # [E, r, F]
    down_B: torch.Tensor | None  # [E, D, r]
    scale: float
    dropout: float  # the probability in force now: 0 outside training

    @property
    def dropout_active(self) -> bool:
        return self.dropout > 0

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the LoRA input path only (the base projection sees x unchanged)."""
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 else x

    def stacked13(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a13_ERD, b13_E2FR), the gate|up factors fused as in the module docstring; None when
        neither gate nor up is adapted."""
        pairs = ((self.gate_A, self.gate_B), (self.up_A, self.up_B))
        if all(a is None for a, _ in pairs):
            return None
        ref_B = self.gate_B if self.gate_B is not None else self.up_B
        E, F_, _ = ref_B.shape
        a_parts, cols = [], []
        for half, (a, b) in enumerate(pairs):
            if a is None:
                continue
            a_parts.append(a)
            zero = b.new_zeros(E, F_, b.shape[-1])
            cols.append(torch.cat([b, zero] if half == 0 else [zero, b], dim=1))  # [E, 2F, r]
        return torch.cat(a_parts, dim=1), torch.cat(cols, dim=2)

    def delta13(self) -> torch.Tensor | None:
        """scale * B @ A for the gate|up rows, [E, 2F, D] in w13's layout (merging, merged weights)."""
        ab = self.stacked13()
        return None if ab is None else torch.bmm(ab[1], ab[0]) * self.scale

    def delta2(self) -> torch.Tensor | None:
        """scale * B @ A for the down projection, [E, D, F]."""
        return None if self.down_A is None else torch.bmm(self.down_B, self.down_A) * self.scale


class ExpertLora(nn.Module):
    """Stacked LoRA factors of one RoutedExperts (see the module docstring for the layout)."""

    def __init__(self, n_experts: int, dim: int, width: int, r: int, alpha: float, dropout: float,
                 targets: tuple[str, ...], dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        unknown = [t for t in targets if t not in EXPERT_PROJECTIONS]
        if unknown or not targets:
            raise ValueError(f"ExpertLora targets {targets!r}: choose among {EXPERT_PROJECTIONS}")
        self.n_experts, self.dim, self.width, self.r = n_experts, dim, width, r
        self.targets = tuple(t for t in EXPERT_PROJECTIONS if t in targets)
        self.scale = alpha / r
        self.dropout = dropout
        for proj in self.targets:
            n_in, n_out = (width, dim) if proj == "down_proj" else (dim, width)
            self.register_parameter(f"{proj}_lora_A", nn.Parameter(
                torch.empty(n_experts, r, n_in, dtype=dtype, device=device)))
            self.register_parameter(f"{proj}_lora_B", nn.Parameter(
                torch.zeros(n_experts, n_out, r, dtype=dtype, device=device)))

    @torch.no_grad()
    def reset_parameters(self, seed_of=None) -> None:
        """A as PEFT draws it (kaiming-uniform, a = sqrt(5), fan-in of one expert's [r, in] matrix),
        B = 0, so the adapted experts start equal to the base. `seed_of(name, e)` gives a generator
        seed per expert matrix (layout-independent init); None: the global RNG."""
        for proj in self.targets:
            A = getattr(self, f"{proj}_lora_A")
            for e in range(self.n_experts):
                g = None if seed_of is None else torch.Generator().manual_seed(seed_of(f"{proj}_lora_A", e))
                block = torch.empty(A.shape[1:], dtype=torch.float32)
                nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=g)
                A[e].copy_(block)
            getattr(self, f"{proj}_lora_B").zero_()

    def factor(self, proj: str, which: str) -> torch.Tensor | None:
        return getattr(self, f"{proj}_lora_{which}", None)

    def factors(self, dtype: torch.dtype) -> ExpertLoraFactors:
        """The factors cast to the compute dtype (as the backends cast w13 / w2)."""
        def get(proj, which):
            t = self.factor(proj, which)
            return None if t is None else t.to(dtype)

        return ExpertLoraFactors(get("gate_proj", "A"), get("gate_proj", "B"), get("up_proj", "A"),
                                 get("up_proj", "B"), get("down_proj", "A"), get("down_proj", "B"),
                                 self.scale, self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, r={self.r}, scale={self.scale:g}, dropout={self.dropout}, " \
               f"targets={','.join(self.targets)}"
