"""Packed projections for decode steps: attention's q|k|v and each MLP's gate|up as one GEMV each.

    packing = DecodePacking(model)        # Decoder does this at construction on CUDA (pack=None)
    with packing.active():                # ... and this around every decode step
        logits = model(tokens_B1, ...)

Why: a batch-1 decode step is a chain of small GEMVs (three for q, k, v and two for gate, up per
layer), each too small to reach the GPU's bandwidth and each a launch. One GEMV over the rows of
all three (or both) reads the same bytes in one launch.

Storage (no extra memory, no change on disk). Packing allocates one [(H + 2*Hkv) * d, D] tensor per
attention (one [2F, D] per dense or shared-expert MLP), copies the weights in and re-points each
Linear's `weight.data` (and `bias.data`, with attention_bias) at its row slice, as the transformers
class's ExpertList does for the routed experts. Parameter objects, names, values and the state_dict
stay the same; only their storage is shared. A model already packed (by an earlier Decoder) is
recognised from its storage and not copied again. The packed tensors live on the DecodePacking
(a Decoder), never on the model: a moved or cast model holds no stale copy, and a Decoder lets go
of the old storage at its next step, when it re-packs.
`ensure()` (each decode step) compares the weights' data pointers and module identities with those
packed and re-packs when they changed (after `.to()`, `load_state_dict(assign=True)`, an adapter
wrapped around a projection, ...).

Forwards. Inside `active()` each packed attention's `project` (q, k, v and RoPE; Attention.forward
calls it, and so does the split-KV decode forward, inference/splitkv.py) and each packed MLP's
forward is the packed twin below (bound to the module for the block, restored after:
torch.compile sees the same function every step, so a compiled step is not retraced). Reference
twins: Attention.project and MLP.forward (the tests check they agree). With `mlp_on_kernels`
(decode_backend "fused_shared") the dense MLPs run on the decode kernels instead
(decode_moe.decode_shared: gate|up + SwiGLU in one launch, down in a second); the MoE layers'
shared experts are on them already (inference/fast_path.py).

A module keeps its own forward where packing cannot reproduce it: a projection that is not a bare
nn.Linear (LoRA, PEFT or any wrapper) or has hooks, FSDP's DTensors, the meta device, training
mode, mixed dtypes / devices or biases on some projections only. Decode is inference: the packed
forwards read the packed tensor, which autograd does not connect to the parameters.

Shape legend: B batch, L query length, H heads, Hkv key/value heads, d head dim, D hidden, F MLP
width, N packed rows, T = B*L tokens.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.model.layers import MLP, Attention, apply_rope

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# The attributes a packed forward / projection reads (set in the module's __dict__ for the block only).
_W, _B = "_decode_packed_w", "_decode_packed_b"


# ---------------------------------------------------------------------- the packed forwards
def packed_attention_project(self, x, cos, sin):
    """Attention.project with q, k, v from one GEMV over the packed weight."""
    B, L, _ = x.shape
    H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
    q, k, v = F.linear(x, getattr(self, _W), getattr(self, _B)).split((H * d, Hkv * d, Hkv * d), dim=-1)
    q = q.reshape(B, L, H, d).transpose(1, 2)
    k = k.reshape(B, L, Hkv, d).transpose(1, 2)
    v = v.reshape(B, L, Hkv, d).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def packed_mlp_forward(self, x):
    """MLP.forward with gate and up from one GEMV over the packed [2F, D] weight."""
    g, u = F.linear(x, getattr(self, _W)).chunk(2, dim=-1)
    return self.down_proj(F.silu(g) * u)


def kernel_mlp_forward(self, x):
    """MLP.forward on the decode kernels (decode_moe.decode_shared; at most MAX_TOKENS tokens)."""
    from deepseekmoe.kernels.decode_moe import decode_shared

    D = x.shape[-1]
    y_TD = decode_shared(x.reshape(-1, D), self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    return y_TD.to(x.dtype).view(x.shape)


# ---------------------------------------------------------------------- storage
def plain_linear(lin) -> bool:
    """A bare nn.Linear (not a subclass such as LoraLinear, no hooks) over plain, materialised tensors."""
    if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
        return False
    return all(p is None or (type(p.data) is torch.Tensor and p.device.type != "meta") for p in (lin.weight, lin.bias))


def unpackable_reason(module, names: tuple[str, ...]) -> str | None:
    """Why `module`'s projections `names` cannot be packed for decode, or None when they can."""
    if module.training:
        return "training mode"
    if "forward" in module.__dict__ or "project" in module.__dict__:
        return "its forward is replaced already"
    ref = Attention if names == QKV else MLP
    if type(module).forward is not ref.forward:
        return f"{type(module).__name__} has its own forward"
    lins = [getattr(module, n) for n in names]
    for n, lin in zip(names, lins):
        if not plain_linear(lin):
            return f"{n} is a {type(lin).__name__} (an adapter, wrapper, hook or sharded weight)"
    ws = [lin.weight for lin in lins]
    if len({(w.dtype, w.device) for w in ws}) != 1:
        return "the projections differ in dtype, device or input width"
    if len({lin.bias is None for lin in lins}) != 1:
        return "only some projections have a bias"
    return None


def packed_handle(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks `tensors` are, when they already are (one storage,
    exactly their size, in order), as a new handle on that storage; else None."""
    t0 = tensors[0]
    try:
        storage = t0.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (traced, sharded): not packed
        return None
    rows, off = 0, 0
    for t in tensors:
        if (t.dtype != t0.dtype or not t.is_contiguous() or t.storage_offset() != off or t.shape[1:] != t0.shape[1:]
                or t.untyped_storage().data_ptr() != storage.data_ptr()):
            return None
        rows, off = rows + t.shape[0], off + t.numel()
    if storage.nbytes() != off * t0.element_size():
        return None
    return torch.empty(0, dtype=t0.dtype, device=t0.device).set_(storage, 0, (rows, *t0.shape[1:]))


@torch.no_grad()
def pack_rows(params: list[nn.Parameter]) -> torch.Tensor:
    """Copy `params` into one new tensor (stacked along dim 0) and make each one's .data its slice
    (at the peak, one extra copy of these weights; the old storage is freed when nothing else
    holds it)."""
    p0 = params[0]
    packed = torch.empty((sum(p.shape[0] for p in params), *p0.shape[1:]), dtype=p0.dtype, device=p0.device)
    row = 0
    for p in params:
        view = packed[row:row + p.shape[0]]
        view.copy_(p.data)
        p.data = view
        row += p.shape[0]
    return packed


def pack_module(module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) packed handles of `module`'s projections `names` (packing them if needed)."""
    lins = [getattr(module, n) for n in names]
    out = []
    for attr in ("weight", "bias"):
        params = [getattr(lin, attr) for lin in lins]
        if params[0] is None:
            out.append(None)
            continue
        handle = packed_handle([p.data for p in params])
        out.append(handle if handle is not None else pack_rows(params))
    return out[0], out[1]


# ---------------------------------------------------------------------- the model's packing
def _global_hooks() -> bool:
    """Whether forward hooks for every module are registered (a packed forward would skip them)."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks)


@dataclass
class _Entry:
    """One packed module: its patch for the block, and what `holds()` compares."""

    module: nn.Module
    names: tuple[str, ...]
    attrs: dict  # __dict__ entries for the block: forward (MLP) or project (attention), _W, _B
    linears: list = field(default_factory=list)
    params: list = field(default_factory=list)
    ptrs: list = field(default_factory=list)


def decode_modules(model) -> list[tuple[nn.Module, str]]:
    """The modules a decode step can pack, with their kind ("attention", "mlp" for a dense MLP,
    "shared" for an MoE layer's shared experts); never the routed experts (they have their own
    stacked storage)."""
    out = []
    for block in model.layers.values():
        out.append((block.self_attn, "attention"))
        shared = getattr(block.mlp, "shared_experts", None)
        if isinstance(block.mlp, MLP):
            out.append((block.mlp, "mlp"))
        elif isinstance(shared, MLP):
            out.append((shared, "shared"))
    return out


class DecodePacking:
    """The packed projections of `model`'s decode steps (see the module docstring). With
    `mlp_on_kernels` the dense MLPs take the decode kernels. `skipped` maps module names to why
    they keep their own forward."""

    def __init__(self, model, mlp_on_kernels: bool = False):
        self.model, self.mlp_on_kernels = model, mlp_on_kernels
        self.entries: list[_Entry] = []
        self.skipped: dict[str, str] = {}
        self.pack()

    def pack(self) -> None:
        """(Re-)read the model and pack every module that can be (a copy only where not packed yet)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        self.entries, self.skipped = [], {}
        hooked = _global_hooks()
        for module, kind in decode_modules(self.model):
            on_kernels = kind == "mlp" and self.mlp_on_kernels
            projs = QKV if kind == "attention" else GATE_UP + ("down_proj",) if on_kernels else GATE_UP
            reason = "global module hooks are registered" if hooked else unpackable_reason(module, projs)
            if reason is not None:
                self.skipped[names.get(id(module), type(module).__name__)] = reason
            elif on_kernels:  # decode_shared reads the three weights as they are: nothing to pack
                self.entries.append(self._entry(module, projs, kernel_mlp_forward, None, None))
            else:
                w, b = pack_module(module, projs)
                fn = packed_attention_project if kind == "attention" else packed_mlp_forward
                self.entries.append(self._entry(module, projs, fn, w, b))
        es = self.entries
        self._check = {"modules": [(e.module, e.module.__dict__) for e in es],
                       "links": [(e.module._modules, n, lin) for e in es for n, lin in zip(e.names, e.linears)],
                       "params": [p for e in es for p in e.params], "ptrs": [p for e in es for p in e.ptrs]}

    def _entry(self, module, projs, fn, w, b) -> _Entry:
        lins = [getattr(module, n) for n in projs]
        params = [p for lin in lins for p in (lin.weight, lin.bias) if p is not None]
        attrs = {"project" if isinstance(module, Attention) else "forward": types.MethodType(fn, module)}
        if w is not None:
            attrs.update({_W: w, _B: b})
        return _Entry(module, projs, attrs, lins, params, [p.data_ptr() for p in params])

    def holds(self) -> bool:
        """Whether every packed module still has the projections and weight storage it was packed
        with, in eval mode, without hooks (one data pointer per weight: ~0.2 us each)."""
        if _global_hooks():
            return not self.entries
        c = self._check
        return (not any(m.training or "forward" in d or "project" in d for m, d in c["modules"])
                and all(mods.get(n) is lin and not (lin._forward_hooks or lin._forward_pre_hooks)
                        for mods, n, lin in c["links"])
                and [p.data_ptr() for p in c["params"]] == c["ptrs"])

    def ensure(self) -> bool:
        """Re-pack when the packing no longer holds; True when it did (a captured graph is stale)."""
        if self.holds():
            return False
        self.pack()
        return True

    @contextlib.contextmanager
    def active(self):
        """Every packed module on its packed forward inside the block."""
        for e in self.entries:
            e.module.__dict__.update(e.attrs)
        try:
            yield
        finally:
            for e in self.entries:
                d = e.module.__dict__
                for k in e.attrs:
                    d.pop(k, None)

