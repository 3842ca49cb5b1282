"""Pipeline parallelism with torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B).

The Transformer is cut into contiguous stages, each a Transformer itself (`Transformer.stage`,
torchtitan's way): the first holds the embedding, the last the final norm and output head, and
each keeps its blocks under their original indices, so parameter names (and DCP checkpoints) are
those of the whole model, and a stage runs the model's own forward (`Transformer.forward_stage`).
Each stage is then parallelized like a whole model (EP -> activation checkpointing -> compile ->
FSDP2 over the stage's dp x ep ranks) and handed to a torch pipelining schedule, whose loss is the
model's `lm_loss`.

Balance losses. Only the last stage computes the loss the schedule backpropagates, yet every
MoE layer adds a balance loss where it sits. Each stage therefore attaches the sum of its layers'
balance losses to its output with `AddAuxiliaryLoss` (the released DeepSeek code's device, in
model/transformer.py): the forward value is the output unchanged; the backward passes the
incoming gradient through and gives the balance loss a gradient of 1, i.e. exactly
d(loss + balance)/d(balance) = 1. The
schedule averages over micro-batches (scale_grads), as it does for the LM loss, so the objective
is the mean over micro-batches of (LM loss + balance losses). For the per-sequence balance loss
(seq_aux, 16B) that equals the whole-batch loss; batch-level balance losses (seq_aux off, and the
device-level loss; 145B) are computed per global micro-batch (their counts still summed over
the stage's dp x ep ranks), as under gradient accumulation.

Layer split: `split_layers` balances training FLOPs per stage, `ModelConfig.layer_flops` (the
accounting's per-layer terms, attention scores included; the output head counts on the last stage,
the embedding lookup nowhere), contiguous, every stage at least one block.

Validation (`Pipeline.eval_loss`) runs forward-only schedules (GPipe, or looped BFS for several
stages per rank) over their own PipelineStage objects around the same modules: torch's stages
fix their receive buffers' shapes on the first step, so each distinct (micro-batch count, batch
shape) gets its own schedule, built once and cached (a short last validation batch adds one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.moe.layer import MoE
from deepseekmoe.model.transformer import Transformer, lm_loss
from deepseekmoe.parallel.mesh import Mesh, ParallelConfig


def split_layers(cfg: ModelConfig, n_stages: int, seq_len: int = 4096) -> list[list[int]]:
    """Contiguous blocks per stage minimising the most expensive stage (the head counts on the
    last stage). Exact: binary search over the bottleneck with a greedy feasibility check."""
    L = cfg.num_hidden_layers
    if n_stages > L:
        raise ConfigError(f"{n_stages} pipeline stages for {L} layers: each stage needs at least one layer")
    costs = [cfg.layer_flops(i, seq_len) for i in range(L)]
    costs[-1] += 6.0 * cfg.hidden_size * cfg.vocab_size  # output head on the last stage

    def greedy(cap: float) -> list[list[int]] | None:
        stages, cur, load = [], [], 0.0
        for i, c in enumerate(costs):
            left_layers, left_stages = L - i, n_stages - len(stages)
            if cur and (load + c > cap or left_layers < left_stages):
                stages.append(cur)
                cur, load = [], 0.0
            if c > cap:
                return None
            cur.append(i)
            load += c
        stages.append(cur)
        return stages if len(stages) == n_stages else None

    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    return greedy(hi)


@dataclass
class Pipeline:
    """This rank's share of a pipeline-parallel model and the schedule that runs it."""

    schedule: object
    modules: list[Transformer]  # this rank's stages (1, or pp_stages_per_rank when interleaved)
    stages: list[PipelineStage] = field(default_factory=list)
    mesh: Mesh | None = None
    stage_ids: list[int] = field(default_factory=list)  # global index of each of `modules`
    n_stages: int = 1
    split: list[list[int]] = field(default_factory=list)  # block indices of every stage
    # fn(stage) after each training forward of a stage: per-micro-batch metrics (expert load) read
    # the MoE layers' last routing here, before activation checkpointing's recomputation in a
    # later backward overwrites it.
    after_forward: list = field(default_factory=list)
    _eval_schedules: dict = field(default_factory=dict)
    # per stage module, per micro-batch of this step: [total, expert-level, device-level] balance
    _balance: list[list[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        self._balance = [[] for _ in self.modules]
        for i, m in enumerate(self.modules):
            m.register_forward_hook(functools.partial(self._after_stage_forward, i))

    def _after_stage_forward(self, i: int, module: Transformer, args, output) -> None:
        if module.last_balance is not None:
            self._balance[i].append(module.last_balance)
        if module.training:
            for fn in self.after_forward:
                fn(module)

    @property
    def has_first(self) -> bool:
        return any(m.embed_tokens is not None for m in self.modules)

    @property
    def has_last(self) -> bool:
        return any(m.lm_head is not None for m in self.modules)

    @property
    def n_microbatches(self) -> int:
        return self.schedule._n_microbatches

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def named_parameters(self):
        for m in self.modules:
            yield from m.named_parameters()

    def train(self, mode: bool = True):
        for m in self.modules:
            m.train(mode)

    def eval(self):
        self.train(False)

    def moe_layers_by_index(self) -> list[tuple[int, MoE]]:
        """(global block index, MoE layer) of this rank's stages, in model order."""
        out = []
        for m in self.modules:
            for key, block in m.layers.items():
                out += [(int(key), mod) for mod in block.modules() if isinstance(mod, MoE)]
        return sorted(out, key=lambda t: t[0])

    def moe_layers(self) -> list[MoE]:
        return [m for _, m in self.moe_layers_by_index()]

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward + backward of this rank's data-parallel batch [B, L] over all micro-batches.
        Every rank passes the batch (only the first stage reads ids, only the last labels).
        Returns {"loss", "lm_loss", "balance_loss", "expert_balance_loss", "device_balance_loss"}
        (means over micro-batches, the same on every rank of the pipeline)."""
        self._balance = [[] for _ in self.modules]
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        target = labels if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None)
        dev = input_ids.device
        lm = torch.stack(losses).mean() if losses else torch.zeros((), device=dev)
        # The last n_microbatches records: on its first step the schedule runs one extra forward
        # (shape inference, on placeholder inputs after the first stage) before the real ones.
        n_mb = self.n_microbatches
        bal = sum((torch.stack(b[-n_mb:]).mean(0) for b in self._balance if b),
                  torch.zeros(3, device=dev))
        stats = torch.cat([lm.detach().float().to(dev).view(1), bal.float().to(dev)])
        if self.mesh is not None and self.mesh.pp > 1:
            dist.all_reduce(stats, group=self.mesh.group("pp"))  # lm from the last stage, balance summed
        return {"loss": stats[0] + stats[1], "lm_loss": stats[0], "balance_loss": stats[1],
                "expert_balance_loss": stats[2], "device_balance_loss": stats[3]}

    def _eval_schedule(self, n_microbatches: int, shape: tuple[int, ...]):
        key = (n_microbatches, shape)
        if key not in self._eval_schedules:
            group = self.mesh.group("pp") if self.mesh is not None else None
            device = self.mesh.device if self.mesh is not None else torch.device("cpu")
            stages = [PipelineStage(m, s, self.n_stages, device, group=group)
                      for m, s in zip(self.modules, self.stage_ids)]
            if len(stages) == 1:
                schedule = ScheduleGPipe(stages[0], n_microbatches, loss_fn=lm_loss)
            else:
                schedule = ScheduleLoopedBFS(stages, n_microbatches, loss_fn=lm_loss)
            self._eval_schedules[key] = schedule
        return self._eval_schedules[key]

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, n_microbatches: int) -> torch.Tensor | None:
        """Forward only: the mean LM loss over `n_microbatches` equal chunks of the batch [B, L]
        (B divisible by it) on the rank holding the last stage, None on the others. Every rank of
        the pipeline calls it with the same shapes (modules in eval mode: no balance losses)."""
        if input_ids.shape[0] % n_microbatches:
            raise ValueError(f"{input_ids.shape[0]} rows do not split into {n_microbatches} equal micro-batches")
        schedule = self._eval_schedule(n_microbatches, tuple(input_ids.shape))
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        schedule.eval(*args, target=labels if self.has_last else None, losses=losses if self.has_last else None)
        return torch.stack(losses).float().mean() if self.has_last else None


def check_layout(cfg: ModelConfig, pcfg: ParallelConfig, n_microbatches: int | None = None) -> None:
    """ConfigError (naming the value and the fix) for a pipeline layout that cannot run: more
    stages than blocks, options that need the whole model on one rank, or (when given) a
    micro-batch count the schedule refuses (torch: 1F1B needs at least one micro-batch per
    stage; interleaved 1F1B a multiple of its rounds)."""
    pcfg.validate()
    n_stages = pcfg.pp * pcfg.pp_stages_per_rank
    L = cfg.num_hidden_layers
    if n_stages > L:
        raise ConfigError(f"parallel.pp={pcfg.pp} x pp_stages_per_rank={pcfg.pp_stages_per_rank} = {n_stages} "
                          f"pipeline stages for a model of {L} blocks: each stage needs at least one block; "
                          f"use at most {L} stages")
    if cfg.tie_word_embeddings:
        raise ConfigError("parallel.pp > 1 with tie_word_embeddings=true: the embedding (first stage) and the "
                          "output head (last stage) cannot share one weight; use parallel.pp=1")
    if cfg.router == "hash":
        raise ConfigError("parallel.pp > 1 with router='hash': the Hash Layer routes by token id, which only "
                          "the first stage sees; use parallel.pp=1 for the Hash Layer baseline")
    n = n_microbatches
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"{n} pipeline micro-batches: need at least 1")
    if pcfg.pp_schedule == "1f1b" and n < pcfg.pp:
        raise ConfigError(f"parallel.pp_schedule='1f1b' needs at least one micro-batch per stage, got {n} "
                          f"micro-batches for pp={pcfg.pp}: use a smaller train.micro_batch_size (more "
                          "accumulation steps) or --parallel.pp_schedule=gpipe")
    if pcfg.pp_schedule == "interleaved1f1b" and n % max(1, n // pcfg.pp):
        rounds = max(1, n // pcfg.pp)
        raise ConfigError(f"parallel.pp_schedule='interleaved1f1b' runs micro-batches in rounds of pp={pcfg.pp}; "
                          f"{n} micro-batches are not a multiple of its {rounds} rounds: use a multiple of "
                          f"{pcfg.pp} micro-batches")


def build_pipeline(model: Transformer, mesh: Mesh, cfg: ParallelConfig, split: list[list[int]] | None = None,
                   seq_len: int = 4096) -> Pipeline:
    """Cut `model` into cfg.pp x cfg.pp_stages_per_rank stages, keep this rank's, parallelize each
    (EP, activation checkpointing, compile, FSDP2 over its dp x ep ranks), build the schedule.

    `model` may live on the meta device (the trainer's way: nothing of the other stages is ever
    allocated); this rank's stages are then parallelized on meta and materialised on its device
    with to_empty(), uninitialised: call `init_weights(seed=...)` on each of `Pipeline.modules`
    (their parameter names are the whole model's, so the weights are those of the whole model
    initialised with the same seed) or load a checkpoint.

    Stage s lives on pp rank s % pp (looped placement, what the interleaved schedule expects).
    Micro-batches per step: cfg.pp_microbatches (0: 2 x stages). ConfigError for a layout that
    cannot run (`check_layout`)."""
    from deepseekmoe.parallel import parallelize

    n_stages = mesh.pp * cfg.pp_stages_per_rank
    n_mb = cfg.pp_microbatches or 2 * n_stages
    check_layout(model.config, cfg, n_mb)
    split = split or split_layers(model.config, n_stages, seq_len)
    if len(split) != n_stages:
        raise ValueError(f"layer split has {len(split)} stages, expected {n_stages}")
    group = mesh.group("pp")
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    modules, stages = [], []
    for s in range(mesh.pp_rank, n_stages, mesh.pp):
        module = model.stage(split[s], first=s == 0, last=s == n_stages - 1)
        if on_meta:
            # Parallelize on meta, then allocate only this rank's shards of the stage on its
            # device, uninitialised: the caller runs init_weights(seed=...) or loads a checkpoint.
            parallelize(module, mesh, cfg)
            module.to_empty(device=mesh.device)
        else:
            # Only this rank's stages go to its device; the caller may keep the rest of `model`
            # on the CPU (or drop it).
            module.to(mesh.device)
            parallelize(module, mesh, cfg)
        modules.append(module)
        stages.append(PipelineStage(module, s, n_stages, mesh.device, group=group))
    if cfg.pp_schedule == "interleaved1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_mb, loss_fn=lm_loss)
    else:  # one stage per rank (check_layout)
        cls = Schedule1F1B if cfg.pp_schedule == "1f1b" else ScheduleGPipe
        schedule = cls(stages[0], n_mb, loss_fn=lm_loss)
    return Pipeline(schedule, modules, stages, mesh, list(range(mesh.pp_rank, n_stages, mesh.pp)), n_stages, split)
