"""Activation checkpointing, torch.compile and FSDP2 sharding of a (possibly expert-parallel)
model, and the gradient-norm clipping that goes with the resulting layout.

Where each parameter lives after `apply_fsdp` (see docs/parallel.md for the picture):

  routed experts (w13, w2)     dim 0 split over ``ep`` (expert parallel), each slice sharded again
                               over ``dp`` (the ranks that hold the same experts); gradients
                               averaged over ``dp`` (and scaled 1/ep inside the EP layer)
  everything else              sharded over ``dp_ep`` (all ranks of the stage, which all see
  (attention, router, shared   different tokens); gradients averaged over dp x ep
  experts, dense FFNs, norms,
  embeddings, head)

So every parameter element is stored on exactly one rank of a stage, which is what makes the
global gradient norm a plain sum of local squares over all ranks (`clip_grad_norm_`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from deepseekmoe.model.moe.lora import ExpertLora
from deepseekmoe.parallel.expert_parallel import is_expert_parallel
from deepseekmoe.parallel.mesh import Mesh


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(layer index, block) of a Transformer or pipeline stage (its `layers` are keyed by index)."""
    return list(model.layers.items())


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (non-reentrant). The wrapper's state-dict hooks strip its
    prefix, so checkpoints keep the plain parameter names.

    early_stop=False: the recomputation runs the whole block, so every rank re-runs the block's
    all-to-alls even when its own saved tensors would let it stop earlier (a rank whose experts
    got no tokens saves different tensors, and collectives must match across ranks).

    A block that draws random numbers in training (LoRA dropout) keeps its RNG state, so the
    recomputation draws the very masks the forward used; the others skip that save/restore."""
    for key, block in _blocks(model):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=_draws_random(block), early_stop=False)


def _draws_random(block: nn.Module) -> bool:
    """True when the block has a dropout with p > 0 (nn.Dropout, or the experts' LoRA dropout)."""
    return any((isinstance(m, nn.Dropout) and m.p > 0) or
               (isinstance(m, ExpertLora) and m.dropout > 0) for m in block.modules())


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged). The EP all-to-all needs its split
    sizes on the host, so dynamo breaks the graph there and compiles the pieces around it."""
    for _, block in _blocks(model):
        block.compile()


def apply_fsdp(model: nn.Module, mesh: Mesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None) -> None:
    """fully_shard bottom-up: routed experts over ``dp`` (when ep > 1), each block over ``dp_ep``,
    then the root (embeddings, final norm, head) over ``dp_ep``."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    dp_ep = mesh["dp_ep"]
    for _, block in _blocks(model):
        for m in block.modules():
            if is_expert_parallel(m):
                fully_shard(m, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward, mp_policy=mp)
        fully_shard(block, mesh=dp_ep, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # The root is needed again as soon as backward starts: keep it gathered after forward.
    fully_shard(model, mesh=dp_ep, reshard_after_forward=False, mp_policy=mp)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def grad_norm(parameters, group=None) -> torch.Tensor:
    """L2 norm of all gradients of a model laid out by parallelize(): local sums of squares,
    summed over `group` (default: all ranks; each element lives on exactly one rank per stage and
    stages hold disjoint layers). In a single process it is torch's usual total norm."""
    params = list(parameters)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    else:  # still join the all-reduce (on the parameters' device: NCCL needs GPU tensors)
        sq = torch.zeros((), dtype=torch.float32, device=_local(params[0]).device if params else None)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None) -> torch.Tensor:
    """Clip gradients in place to global norm `max_norm` (0 disables clipping); returns the norm
    before clipping. Same rule as torch.nn.utils.clip_grad_norm_ (coefficient max_norm /
    (norm + 1e-6), capped at 1), for gradients sharded over different meshes."""
    everything = list(parameters)
    total = grad_norm(everything, group)
    params = [p for p in everything if p.grad is not None]
    if max_norm and max_norm > 0:  # no host sync: a non-finite norm makes non-finite grads
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            _local(p.grad).mul_(coef.to(_local(p.grad).device))
    return total
