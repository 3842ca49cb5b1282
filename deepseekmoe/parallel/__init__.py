"""Scale-out on PyTorch's own distributed stack: DeviceMesh, expert parallel (all-to-all), FSDP2,
pipelining, DCP checkpoints.

The model code is single-device; `parallelize(model, mesh, cfg)` rewrites a built model in place,
always in this order (each step relies on the previous one):

  1. expert parallel   routed experts split over ``ep``, token slots moved by all-to-all;
                       routers count experts over the global batch (expert_parallel.py)
  2. activation ckpt   recompute each block in backward (fsdp.py)
  3. torch.compile     per block, in place (fsdp.py)
  4. FSDP2             experts over ``dp``, everything else over ``dp x ep`` (fsdp.py)

Pipeline parallelism splits the model into stages first and parallelizes each stage
(pipeline.py). Launch, layout and the scaling model: docs/parallel.md.

    mesh = init_distributed(ParallelConfig(ep=2))       # under torchrun
    with torch.device("meta"):
        model = Transformer(cfg)
    model = parallelize(model, mesh, pcfg)              # global-batch semantics
    model.to_empty(device=mesh.device)                  # this rank's shards only
    model.init_weights(seed=0)                          # one process's weights (docs/parallel.md)
"""

from __future__ import annotations

import importlib

# Names are imported on first use: the trainer reads ParallelConfig on every start, and FSDP,
# DCP and the pipelining stack cost about a second to import.
_EXPORTS = {
    "Mesh": "mesh", "ParallelConfig": "mesh", "build_mesh": "mesh", "default_device": "mesh",
    "init_distributed": "mesh", "launched_distributed": "mesh", "single_process_mesh": "mesh",
    "AllToAllDispatcher": "expert_parallel", "shard_experts": "expert_parallel",
    "apply_expert_parallel": "expert_parallel",
    "apply_activation_checkpointing": "fsdp", "apply_compile": "fsdp", "apply_fsdp": "fsdp",
    "clip_grad_norm_": "fsdp", "grad_norm": "fsdp",
}
__all__ = sorted([*_EXPORTS, "parallelize"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parallelize(model, mesh, cfg=None):
    """Apply EP -> activation checkpointing -> compile -> FSDP2 to `model` (in place; returned).

    `model` is a Transformer or a pipeline stage built from one, on its device, or on `meta`, to be
    materialised afterwards with to_empty() + init_weights(seed=...) (each rank then allocates and
    draws only its own shards, and gets the values one process would have: the trainer's way)
    or a checkpoint load. With a single-process mesh only activation checkpointing and compile
    apply."""
    import torch

    from deepseekmoe.errors import ConfigError
    from deepseekmoe.model.dtypes import TRAINING_NAMES, parse_dtype
    from deepseekmoe.parallel.expert_parallel import apply_expert_parallel
    from deepseekmoe.parallel.fsdp import apply_activation_checkpointing, apply_compile, apply_fsdp
    from deepseekmoe.parallel.mesh import ParallelConfig

    cfg = cfg or ParallelConfig()
    cfg.validate()
    distributed = mesh.device_mesh is not None
    if distributed:
        if getattr(model, "config", None) is not None and model.config.tie_word_embeddings and mesh.pp > 1:
            raise ConfigError("tied embeddings cannot be split over pipeline stages; use pp=1")
        apply_expert_parallel(model, mesh)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if distributed and cfg.fsdp:
        param_dtype = parse_dtype(cfg.param_dtype, "parallel.param_dtype", TRAINING_NAMES)
        param_dtype = None if param_dtype == torch.float32 else param_dtype  # fp32: no cast
        apply_fsdp(model, mesh, cfg.reshard_after_forward, param_dtype)
    elif distributed and mesh.data_parallel_size > 1:
        raise ConfigError("parallel.fsdp=false with more than one data-parallel rank is not supported: "
                          "gradients would not be reduced (use fsdp=true)")
    return model
