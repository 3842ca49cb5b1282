"""What the trainer needs to run unchanged on one process or on a torchrun job: `Runtime`.

The trainer calls each hook at one place; in a single process every hook is the plain
single-device behaviour, so the one-process trainer (and its bit-exact resume) is untouched.

  Runtime.from_env(pcfg)      torchrun env -> process group, DeviceMesh, device (cuda:LOCAL_RANK)
  .parallelize(model, device) EP -> activation checkpointing -> compile -> FSDP2 (one process:
                              checkpointing and compile only); the ParallelConfig is never changed
  .build_pipeline(model, ...) parallel.pp > 1: this rank's stages, each parallelized as above,
                              and the torch.distributed.pipelining schedule (pipeline.py)
  .pp_sum(t) / .pp_gather(x)  sum / gather over the pipeline stages (per-stage metrics)
  .loader_rank / .loader_world   the data loader's rank and world size (data-parallel ranks)
  .clip_grad_norm_(params, c) global norm over sharded gradients (all stages: the squares are
                              summed over every rank, pp included)
  .mean(t)                    average over data-parallel ranks (losses for logging, finiteness)
  .mean_and_any(t, flag)      the same, plus whether any rank raised a flag (a stop signal)
  .eval_share(batches) / .sum(t)   split validation batches over ranks, sum the results
  .save(...) / load via deepseekmoe.checkpoint.dcp (DCP, any world size)
  .guard(...)                 fail fast with one message when a peer dies (launch.fail_fast)
  .is_rank0                   only rank 0 writes metrics, plots, config and prints
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from deepseekmoe.errors import ConfigError
from deepseekmoe.parallel.launch import fail_fast
from deepseekmoe.parallel.mesh import (
    Mesh,
    ParallelConfig,
    init_distributed,
    launched_distributed,
    single_process_mesh,
)


class Runtime:
    def __init__(self, mesh: Mesh | None, cfg: ParallelConfig):
        self.mesh, self.cfg = mesh, cfg

    @classmethod
    def from_env(cls, cfg: ParallelConfig | None = None, device: torch.device | str | None = None) -> Runtime:
        """Distributed when launched by torchrun with WORLD_SIZE > 1, else a single process."""
        cfg = cfg or ParallelConfig()
        if not launched_distributed():
            if cfg.ep > 1 or cfg.pp > 1 or cfg.dp > 1:
                raise ConfigError(f"parallel.ep={cfg.ep}, pp={cfg.pp}, dp={cfg.dp} need several processes; launch "
                                  "with torchrun --nproc-per-node N -m deepseekmoe train ... (docs/parallel.md)")
            return cls(None, cfg)
        cfg.validate()
        return cls(init_distributed(cfg, device), cfg)

    # ------------------------------------------------------------------ coordinates
    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def device(self) -> torch.device | None:
        return self.mesh.device if self.mesh is not None else None

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's value of a picklable object on every rank (e.g. a timestamped run dir)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def loader_rank(self) -> int:
        return self.mesh.data_parallel_rank if self.distributed else 0

    @property
    def loader_world(self) -> int:
        return self.mesh.data_parallel_size if self.distributed else 1

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        m = self.mesh
        return f"{m.world_size} ranks (dp {m.dp} x ep {m.ep}{f' x pp {m.pp}' if m.pp > 1 else ''}, {m.device.type})"

    # ------------------------------------------------------------------ model
    def parallelize(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> torch.nn.Module:
        """EP -> activation checkpointing -> compile -> FSDP2 as `self.cfg` says; in a single process
        (on `device`) checkpointing and compile only."""
        from deepseekmoe.parallel import parallelize

        return parallelize(model, self.mesh if self.distributed else single_process_mesh(device), self.cfg)

    @property
    def pp(self) -> int:
        return self.mesh.pp if self.distributed else 1

    def build_pipeline(self, model: torch.nn.Module, n_microbatches: int, seq_len: int):
        """This rank's pipeline stages of `model` (a whole Transformer on any device: only the
        stages kept here move to this rank's device; on `meta`: they are allocated there,
        uninitialised, for init_weights(seed=...)) with `n_microbatches` micro-batches a step."""
        from deepseekmoe.parallel.pipeline import build_pipeline

        cfg = dataclasses.replace(self.cfg, pp_microbatches=n_microbatches)  # the job's config stays as given
        return build_pipeline(model, self.mesh, cfg, seq_len=seq_len)

    def pp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the pipeline stages (each holds its own layers' share of a metric)."""
        if self.pp == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, group=self.mesh.group("pp"))
        return t

    def pp_gather(self, obj) -> list:
        """Every pipeline stage's picklable `obj`, in pp-rank order (collective over pp)."""
        if self.pp == 1:
            return [obj]
        out = [None] * self.pp
        dist.all_gather_object(out, obj, group=self.mesh.group("pp"))
        return out

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        from deepseekmoe.parallel.fsdp import clip_grad_norm_

        return clip_grad_norm_(params, 0.0 if max_norm == float("inf") else max_norm)

    # ------------------------------------------------------------------ reductions
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over the data-parallel ranks (each holds the mean of an equal share)."""
        if not self.distributed or self.loader_world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, group=self.mesh.group("dp_ep"))
        return t / self.loader_world

    def mean_and_any(self, t: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`mean(t)`, and whether any rank of the job passed `flag` (a 0-dim bool tensor): one
        all-reduce when the data-parallel ranks are the whole job, a second (of the flag) otherwise."""
        f = torch.tensor([float(flag)], device=t.device)
        if self.loader_world == self.world_size:
            both = self.mean(torch.cat([t, f]))
            return both[:-1], both[-1] > 0
        return self.mean(t), self.sum(f)[0] > 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def eval_share(self, batches):
        """This rank's rows of each validation batch (batches of micro x data-parallel ranks rows,
        so the ranks together evaluate the windows one process evaluates). Every rank must run the
        same number of forwards (they are collective), so each gets floor(rows / W) rows: a short
        last batch of a whole-split pass loses at most W-1 windows."""
        W = self.loader_world
        if W == 1:
            yield from batches
            return
        r = self.loader_rank
        for x in batches:
            k = x.shape[0] // W
            if k == 0:
                return
            yield x[r * k:(r + 1) * k]

    # ------------------------------------------------------------------ checkpoints and failures
    def save(self, path: Path, model, optimizer, state: dict, keep: int, list_checkpoints,
             files: dict | None = None) -> Path:
        """DCP checkpoint at `path` (atomic), then rank 0 prunes all but the newest `keep` (the same
        files.prune as single-process runs; a killed save's temporary goes at the next start)."""
        from deepseekmoe.checkpoint import dcp as dcp_ckpt
        from deepseekmoe.checkpoint.files import prune

        dcp_ckpt.save(path, model, optimizer, state, files)
        if self.is_rank0:
            prune(list_checkpoints()[:-keep])
        if self.distributed:
            dist.barrier()
        return Path(path)

    def guard(self, last_checkpoint=None, passthrough: tuple = ()):
        return fail_fast("training", last_checkpoint, timeout_s=self.cfg.timeout_s, passthrough=passthrough) \
            if self.distributed else contextlib.nullcontext()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
