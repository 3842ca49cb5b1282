"""PEFT LoRA on the routed experts' Linears, run by the stacked backends.

PEFT wraps each adapted `experts.E.{gate,up,down}_proj` in its `lora.Linear`: the original Linear
becomes `base_layer`, and the adapter adds scale * B(A(dropout(x))). When every expert of a
projection is wrapped alike (one active LoRA adapter, not merged, no DoRA or LoRA bias, one scale
and one dropout for the whole layer), the layer keeps its fast path: the base Linears stay packed
in the stacked tensors and the adapters are stacked per forward into the project's
`ExpertLoraFactors` ([E, r, in] / [E, out, r]: a few r-row copies, differentiable, so gradients
reach PEFT's own parameters), which the backends apply (model/moe/experts.py `experts_with_lora`).
Anything else (another adapter type, a mix of adapters, hooks) is "loop": each expert module runs
by itself, as PEFT's own forward.

Semantics match PEFT's forward exactly outside training and with dropout 0. With LoRA dropout in
training, the backends draw one mask per token slot shared by gate and up (PEFT draws one per
projection): the same expectation, different noise.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepseekmoe.model.moe.lora import EXPERT_PROJECTIONS, ExpertLoraFactors

PLAIN, PEFT, LOOP = "plain", "peft", "loop"


def bare(m: nn.Module) -> bool:
    """A bare nn.Linear: no subclass, hook or replaced forward (accelerate's hooks replace it)."""
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and "forward" not in m.__dict__)


def _is_peft_lora(m: nn.Module) -> bool:
    return (type(m).__module__.startswith("peft.") and all(hasattr(m, a) for a in ("base_layer", "lora_A", "lora_B"))
            and not m._forward_hooks and not m._forward_pre_hooks and bare(m.base_layer))


def classify(experts: list[nn.Module]) -> tuple[str, list[nn.Module], dict[str, list[nn.Module] | None]]:
    """(mode, the 3E base Linears in stacked order: every gate, every up, every down, the PEFT
    wrappers per projection or None where it is not adapted)."""
    bases: list[nn.Module] = []
    wrapped: dict[str, list[nn.Module] | None] = {}
    for proj in EXPERT_PROJECTIONS:
        mods = [m._modules[proj] for m in experts]
        if all(bare(m) for m in mods):
            wrapped[proj] = None
            bases += mods
        elif all(_is_peft_lora(m) for m in mods):
            wrapped[proj] = mods
            bases += [m.base_layer for m in mods]
        else:
            return LOOP, [], {}
    return (PLAIN if all(v is None for v in wrapped.values()) else PEFT), bases, wrapped


def _state(m) -> tuple | None:
    """(adapter, scale, dropout p) of a PEFT LoRA Linear in its current state; () when it adds
    nothing (adapters disabled or merged into the base); None when the stacked path cannot run it."""
    if m.disable_adapters or m.merged:
        return ()
    active = [a for a in m.active_adapters if a in m.lora_A]
    if not active:
        return ()
    if len(active) > 1:
        return None
    a = active[0]
    A, B = m.lora_A[a], m.lora_B[a]
    if (getattr(m, "use_dora", {}).get(a, False) or type(A) is not nn.Linear or type(B) is not nn.Linear
            or B.bias is not None or A.bias is not None):
        return None
    drop = m.lora_dropout[a]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return None
    return a, float(m.scaling[a]), p


def lora_factors(wrapped: dict[str, list[nn.Module] | None], dtype) -> ExpertLoraFactors | None | bool:
    """The stacked factors of this forward; None when no adapter adds anything; False when the
    adapters are not uniform enough for the stacked path (the caller runs each expert module)."""
    factors, scale, p = {}, None, None
    for proj, mods in wrapped.items():
        if mods is None:
            continue
        states = {_state(m) for m in mods}
        if len(states) != 1 or None in states:
            return False
        state = states.pop()
        if state == ():
            continue
        a, s, q = state
        if (scale is not None and s != scale) or (p is not None and q != p):
            return False
        scale, p = s, q
        factors[proj] = (_stack([m.lora_A[a].weight for m in mods], dtype),
                         _stack([m.lora_B[a].weight for m in mods], dtype))
    if not factors:
        return None
    get = lambda proj, i: factors[proj][i] if proj in factors else None  # noqa: E731
    return ExpertLoraFactors(get("gate_proj", 0), get("gate_proj", 1), get("up_proj", 0), get("up_proj", 1),
                             get("down_proj", 0), get("down_proj", 1), scale, p)


def _stack(ws, dtype):
    return torch.stack(ws).to(dtype)
