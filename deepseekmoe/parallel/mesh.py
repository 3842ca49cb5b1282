"""The parallel layout: `ParallelConfig` (what the user asks for) and `Mesh` (the DeviceMesh built
from it, with the coordinates the trainer and data loader need), plus process-group start-up.

Mesh dimensions, outermost first: ``pp`` (pipeline stages), ``dp`` (replicas of one expert
placement), ``ep`` (expert-parallel ranks). ``ep`` is innermost so that the ranks of one all-to-all
are adjacent, i.e. on one node's NVLink when ep <= GPUs per node. ``dp`` and ``ep`` flattened give
``dp_ep``: every rank of one pipeline stage, all of which see different tokens, so it is the
data-parallel group of the non-expert weights and the group the balance-loss counts are summed over.

    rank = (pp_rank * dp + dp_rank) * ep + ep_rank          data-parallel rank = dp_rank * ep + ep_rank

Everything here is device-agnostic: NCCL with one GPU per process when CUDA is available, gloo
on CPU (the tests), the device type taken from the mesh.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.dtypes import TRAINING_NAMES, parse_dtype

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")
PP_SCHEDULE_ALIASES = {"interleaved": "interleaved1f1b", "interleaved_1f1b": "interleaved1f1b"}


@dataclass
class ParallelConfig:
    """How one job is laid out over its ranks, and what parallelize() applies (in this order):
    expert parallel, activation checkpointing, torch.compile, FSDP2. The checkpointing and compile
    knobs apply to one process too (the trainer parallelizes every model); recipes may also spell
    them `system.compile` / `system.activation_checkpointing`."""

    dp: int = -1  # replicas of one expert placement; -1 = world / (pp * ep)
    ep: int = 1  # expert-parallel ranks (routed experts split evenly over them)
    pp: int = 1  # pipeline stages (see deepseekmoe.parallel.pipeline)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b (alias: interleaved)
    # micro-batches per step on each pipeline; 0 = 2 x stages (the trainer: its gradient-
    # accumulation count, see docs/parallel.md)
    pp_microbatches: int = 0
    pp_stages_per_rank: int = 1  # virtual stages per rank (interleaved1f1b needs >= 2)
    fsdp: bool = True  # shard parameters, gradients and optimizer state (FSDP2)
    reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3 memory)
    param_dtype: str = "float32"  # FSDP2 compute dtype of gathered weights: float32 | bfloat16
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block (EP's all-to-all splits are graph breaks)
    timeout_s: float = 600.0  # collectives that wait longer fail the job instead of hanging

    def validate(self, world_size: int | None = None) -> None:
        for name in ("ep", "pp", "pp_stages_per_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"parallel.{name}={v!r}: must be a positive integer")
        if not isinstance(self.pp_microbatches, int) or isinstance(self.pp_microbatches, bool) \
                or self.pp_microbatches < 0:
            raise ConfigError(f"parallel.pp_microbatches={self.pp_microbatches!r}: must be a non-negative "
                              "integer (0 = automatic)")
        self.pp_schedule = PP_SCHEDULE_ALIASES.get(self.pp_schedule, self.pp_schedule)
        if not isinstance(self.dp, int) or (self.dp < 1 and self.dp != -1):
            raise ConfigError(f"parallel.dp={self.dp!r}: must be a positive integer or -1 (infer)")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r}: choose one of "
                              f"{', '.join(PP_SCHEDULES)}")
        if self.pp_schedule == "interleaved1f1b" and self.pp_stages_per_rank < 2:
            raise ConfigError("parallel.pp_schedule='interleaved1f1b' runs several stages per rank: set "
                              "--parallel.pp_stages_per_rank=2 (or more)")
        if self.pp_schedule != "interleaved1f1b" and self.pp_stages_per_rank > 1:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} runs one stage per rank, but "
                              f"pp_stages_per_rank={self.pp_stages_per_rank}; use "
                              "--parallel.pp_schedule=interleaved1f1b or pp_stages_per_rank=1")
        parse_dtype(self.param_dtype, "parallel.param_dtype", TRAINING_NAMES)
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s={self.timeout_s}: must be positive seconds")
        if world_size is not None:
            self.resolve(world_size)

    def resolve(self, world_size: int) -> tuple[int, int, int]:
        """(pp, dp, ep) for `world_size` ranks; ConfigError if they do not multiply to it."""
        if world_size % (self.pp * self.ep):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.pp x parallel.ep = "
                              f"{self.pp} x {self.ep}; choose sizes whose product divides the number "
                              "of processes")
        dp = world_size // (self.pp * self.ep) if self.dp == -1 else self.dp
        if self.pp * dp * self.ep != world_size:
            raise ConfigError(f"parallel.pp x dp x ep = {self.pp} x {dp} x {self.ep} = "
                              f"{self.pp * dp * self.ep} does not equal the world size {world_size}; "
                              "set parallel.dp=-1 to infer it")
        return self.pp, dp, self.ep


@dataclass
class Mesh:
    """The DeviceMesh of a job and this process's coordinates in it."""

    device_mesh: DeviceMesh | None  # None in a single process without a process group
    pp: int = 1
    dp: int = 1
    ep: int = 1
    device: torch.device = torch.device("cpu")
    dp_ep_mesh: DeviceMesh | None = None  # dp and ep flattened (kept: torch deprecates re-slicing it)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    def _coord(self, name: str) -> int:
        if self.device_mesh is None:
            return 0
        return self.device_mesh.get_local_rank(name)

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def ep_rank(self) -> int:
        return self._coord("ep")

    @property
    def data_parallel_size(self) -> int:
        """Ranks of one pipeline stage that read different data (dp x ep)."""
        return self.dp * self.ep

    @property
    def data_parallel_rank(self) -> int:
        """Index of this rank's slice of the global batch (the data loader's `rank`)."""
        return self.dp_rank * self.ep + self.ep_rank

    def __getitem__(self, name: str) -> DeviceMesh:
        """The 1-D sub-mesh `pp`, `dp`, `ep` or `dp_ep`."""
        if self.device_mesh is None:
            raise ValueError("a single-process Mesh has no sub-meshes")
        return self.dp_ep_mesh if name == "dp_ep" else self.device_mesh[name]

    def group(self, name: str):
        """The process group of the 1-D sub-mesh `name` (None in a single process)."""
        return None if self.device_mesh is None else self[name].get_group()


def single_process_mesh(device: torch.device | str = "cpu") -> Mesh:
    return Mesh(None, device=torch.device(device))


def build_mesh(cfg: ParallelConfig, device: torch.device | str | None = None) -> Mesh:
    """The ("pp", "dp", "ep") DeviceMesh over the default process group (plus "dp_ep")."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group (see init_distributed)")
    world = dist.get_world_size()
    pp, dp, ep = cfg.resolve(world)
    device = torch.device(device) if device is not None else default_device()
    mesh = init_device_mesh(device.type, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
    dp_ep = mesh["dp", "ep"]._flatten("dp_ep")  # no public flatten in torch yet (torchtitan does the same)
    return Mesh(mesh, pp=pp, dp=dp, ep=ep, device=device, dp_ep_mesh=dp_ep)


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(cfg: ParallelConfig, device: torch.device | str | None = None,
                     store: dist.Store | None = None, rank: int | None = None,
                     world_size: int | None = None) -> Mesh:
    """Start the default process group (env:// as set by torchrun, or an explicit store) with the
    config's timeout, pin this process to its GPU, and build the mesh.

    The timeout is what turns a dead peer into an error instead of a hang: a collective waiting
    on a rank that died raises after `timeout_s` at the latest (gloo and NCCL usually notice a
    closed connection much sooner)."""
    cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # NCCL for GPU tensors; gloo as well so CPU-side collectives (checkpoint planning) work.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return build_mesh(cfg, device)
