"""Weight initialisation, layout-independent.

`init_weights(model, seed=...)` draws each parameter on the CPU in float32 from its own generator
seeded from (seed, parameter name) (each routed expert of a stacked tensor from (seed, name,
expert index)) and copies only this process's part to the parameter's device. So a whole model, a
pipeline stage and an expert-parallel / FSDP shard (DTensor) of the same parameter agree element
for element, whatever the device or the layout.
"""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.nn as nn

from deepseekmoe.model.layers import RMSNorm
from deepseekmoe.model.moe.layer import RoutedExperts
from deepseekmoe.model.moe.router import HashRouter

# Wrappers that parallelize() may insert into parameter names (activation checkpointing,
# torch.compile's OptimizedModule); the seed uses the plain Transformer name.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")



@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator | None = None, *, seed: int | None = None) -> None:
    """Initialise `model` in place; what each parameter gets is chosen by the type of the module
    that owns it:

      RMSNorm gains             ones
      biases                    zeros
      RoutedExperts (stacked)   Normal(0, initializer_range), one stream per expert (seeded path)
      everything else           Normal(0, initializer_range)

    `seed` (the trainer and the parallel code): layout-independent init, each parameter (each
    routed expert) drawn on the CPU in float32 from its own (seed, name) generator and only this
    process's part copied to the parameter's device (a DTensor receives its local block).
    Without `seed`: the global RNG (or `generator`) fills the parameters in place, in module
    order, as `Transformer(cfg)` does after `torch.manual_seed`.

    Meta parameters are skipped, so this is safe after `to_empty()` on a meta-built model; the
    non-persistent buffers are rebuilt too (`init_buffers`)."""
    if seed is not None and generator is not None:
        raise ValueError("init_weights: pass either a generator or a seed, not both")
    std = model.config.initializer_range
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.device.type == "meta":  # tied weights are initialised once
                continue
            seen.add(id(p))
            name = _canonical_name(f"{mod_name}.{pname}" if mod_name else pname)
            local, offset = _local_part(p) if seed is not None else (p, None)
            if isinstance(module, RMSNorm):
                local.fill_(1.0)
            elif pname == "bias":
                local.zero_()
            elif seed is None:
                p.normal_(0.0, std, generator=generator)
            else:
                per_expert = isinstance(module, RoutedExperts)
                local.copy_(_seeded_normal(seed, name, tuple(p.shape), offset, tuple(local.shape), std, per_expert))
    init_buffers(model)


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Rebuild the non-persistent buffers (not in checkpoints): the Hash Layer's token -> expert
    table. The one place that knows which modules hold such buffers."""
    for m in model.modules():
        if isinstance(m, HashRouter) and m.table.device.type != "meta":
            m.table = m.build_table().to(m.table.device)

def _canonical_name(name: str) -> str:
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit generator seed from (seed, parameter name[, expert index]); a stable hash
    (blake2b), not Python's per-process salted hash()."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _local_part(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this process's storage of parameter p, its offset in the global tensor per dimension).

    A DTensor (expert parallel, FSDP2) holds one contiguous block of the global tensor per rank
    (FSDP's shards of an expert slice are sub-blocks of it); its offset comes from the placements,
    without communication. A plain tensor is its own whole."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")  # a DTensor implies this import
    if dtensor_mod is not None and isinstance(p, dtensor_mod.DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()  # under no_grad: the local storage itself (FSDP's shard included)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"init_weights: local shard {tuple(local.shape)} of a {tuple(p.shape)} parameter "
                               f"does not match its placements {p.placements} (expected {tuple(shape)})")
        return local, tuple(offset)
    return p, (0,) * p.dim()


def _seeded_normal(seed: int, name: str, shape: tuple[int, ...], offset: tuple[int, ...],
                   size: tuple[int, ...], std: float, per_expert: bool) -> torch.Tensor:
    """Block [offset, offset + size) of parameter `name` (global `shape`) drawn as
    Normal(0, std) on the CPU in float32 from the (seed, name) streams; `per_expert`: dim 0
    indexes stacked experts, each from its own stream, so a rank holding E/ep experts draws only
    those."""
    if per_expert:
        # Only the experts this block covers: one stream per expert.
        lo, n = offset[0], size[0]
        block = torch.empty((n, *shape[1:]), device="cpu", dtype=torch.float32)
        for i in range(n):
            block[i].normal_(0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name, lo + i)))
        offset = (0, *offset[1:])
    else:
        block = torch.empty(shape, device="cpu", dtype=torch.float32).normal_(
            0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name)))
    return block[tuple(slice(o, o + n) for o, n in zip(offset, size))]
