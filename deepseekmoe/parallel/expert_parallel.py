"""Expert parallelism: routed experts split over the ``ep`` ranks, token slots moved by all-to-all;
and the routers given the global batch's expert counts when the batch is split over ranks.

Each ep rank keeps experts [r*El, (r+1)*El) of every MoE layer (El = E / ep), stored as DTensors
of the full [E, ...] shape sharded on dim 0 over the ``ep`` mesh, so checkpoints (DCP) see the
global tensor and can reshard to any other layout. The router and the shared experts stay
replicated (they are ordinary data-parallel weights), so routing, gates and balance losses are
those of a single device. The RoutedExperts module itself is not replaced (torchtitan's
ExpertParallel style): `shard_experts` turns its w13 / w2 into those DTensors and gives it an
`AllToAllDispatcher`, so one MoE forward on rank r is

    dispatch(): sort own slots by expert  ->  exchange per-expert counts (tiny all-to-all)  ->
    ONE host sync for the split sizes  ->  send slot rows (variable all-to-all)  ->  the module's
    expert backend (loop / grouped / triton / gather) on the received rows with gate 1  ->  the
    reverse all-to-all  ->  combine(): unsort and take the gate-weighted sum over K, the same
    primitive experts_grouped uses (model/moe/dispatch.py).

Both all-to-alls are autograd functions whose backward is the reverse exchange.

Gradient scaling: each rank's loss is the mean over its own tokens and FSDP averages gradients
over the ranks that hold a weight. The routed-expert weights on rank (dp i, ep j) already receive
the gradients of the losses of all ep ranks of replica i (through the combine's backward), so an
average over dp alone would leave them ep times too large; `_ScaleGrad` (applied by the dispatcher
to the local weights) divides by ep in backward.

Shape legend: T local tokens, K experts per token, S = T*K slots, E routed experts (global),
El local experts, P ep ranks, R slots received by this rank, D hidden, F expert width.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.moe.dispatch import combine, dispatch
from deepseekmoe.model.moe.experts import resolve_backend
from deepseekmoe.model.moe.layer import MoE, RoutedExperts
from deepseekmoe.model.moe.router import CountReducer, device_loss_groups
from deepseekmoe.parallel.mesh import Mesh

log = logging.getLogger(__name__)


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows; backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send rows in_splits[p] of `x` to rank p of `group`, receive out_splits[p] rows from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class AllToAllDispatcher:
    """The token dispatcher of one MoE layer's routed experts under expert parallel.

    Set as `RoutedExperts.dispatcher` by `shard_experts`; the module, its parameters and its
    backend stay what they are on one device: dispatch -> all-to-all -> the module's backend on
    this rank's E/ep experts -> reverse all-to-all -> combine (model/moe/dispatch.py). Expert
    inputs arrive in the autocast dtype (RoutedExperts casts them first), which also halves the
    bytes moved."""

    def __init__(self, ep_mesh, n_experts: int):
        self.ep_size, self.n_local, self.group = ep_mesh.size(), n_experts // ep_mesh.size(), ep_mesh.get_group()
        self.last_received = -1  # slots this rank's experts got in the last forward (load logging)

    def __call__(self, experts: RoutedExperts, x_TD, idx_TK, w_TK):
        P, El, group = self.ep_size, self.n_local, self.group
        d = dispatch(idx_TK, experts.n_experts)  # slots grouped by expert = by destination rank
        recv_counts_PEl = torch.empty_like(d.counts_E)
        dist.all_to_all_single(recv_counts_PEl, d.counts_E, group=group)  # [src p][my expert]
        # The only host sync: the split sizes of the two variable all-to-alls.
        splits = torch.cat([d.counts_E.view(P, El).sum(1), recv_counts_PEl.view(P, El).sum(1)]).tolist()
        send, recv = splits[:P], splits[P:]
        R = sum(recv)
        self.last_received = R

        x_RD = all_to_all(x_TD[d.tok_S], recv, send, group)
        w13 = _ScaleGrad.apply(experts.w13.to_local(), 1.0 / P)
        w2 = _ScaleGrad.apply(experts.w2.to_local(), 1.0 / P)
        if R == 0:
            # No slot came here. Keep the received rows and the weights in the graph anyway:
            # every rank must run the dispatch's backward all-to-all, and produce (zero) weight
            # gradients for FSDP's reduce-scatter, or the other ranks would wait forever.
            y_RD = x_RD * 0.0 + 0.0 * (w13.sum() + w2.sum()).to(x_RD.dtype)
        else:
            # Received rows come by source rank, then local expert: one slot (gate 1) each.
            local_R = torch.arange(El, device=x_RD.device).repeat(P)
            idx_R1 = torch.repeat_interleave(local_R, recv_counts_PEl, output_size=R).unsqueeze(1)
            ones_R1 = torch.ones(R, 1, dtype=torch.float32, device=x_RD.device)
            y_RD = resolve_backend(experts.backend, x_RD.device)(x_RD, idx_R1, ones_R1, w13, w2)
        y_SD = all_to_all(y_RD, send, recv, group)
        return combine(y_SD, w_TK, d)

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep={self.ep_size}, local_experts={self.n_local})"


def shard_experts(experts: RoutedExperts, ep_mesh) -> None:
    """Keep this rank's E/ep experts of `experts` (w13, w2 become DTensors of the global [E, ...]
    shape sharded on dim 0 over `ep_mesh`; names unchanged) and route its slots through an
    AllToAllDispatcher. Works on `meta` parameters (materialised later by to_empty + init)."""
    P, r = ep_mesh.size(), ep_mesh.get_local_rank()
    E = experts.n_experts
    if E % P:
        raise ConfigError(f"n_routed_experts={E} cannot be split evenly over parallel.ep={P} ranks; choose an "
                          f"ep that divides {E}")
    lo, hi = r * (E // P), (r + 1) * (E // P)
    for name in ("w13", "w2"):
        p = getattr(experts, name)
        local = DTensor.from_local(p.detach()[lo:hi].clone(), ep_mesh, [Shard(0)], run_check=False)
        experts.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))
    experts.dispatcher = AllToAllDispatcher(ep_mesh, E)


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether `module` is a RoutedExperts split over ep ranks by shard_experts."""
    return isinstance(module, RoutedExperts) and isinstance(module.dispatcher, AllToAllDispatcher)


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, mesh: Mesh) -> list[MoE]:
    """Split every MoE layer's routed experts over `ep` and give its router the global batch's
    expert counts (the balance losses stay the router's own, deepseekmoe.model.moe.router).

    Works on a Transformer or on a pipeline stage (any module holding MoE layers). Returns the MoE
    layers it changed."""
    moes = moe_modules(model)
    if mesh.device_mesh is None:
        return moes
    reducer = CountReducer(functools.partial(dist.all_reduce, group=mesh.group("dp_ep")), mesh.data_parallel_size)
    for moe in moes:
        cfg = moe.cfg
        if cfg.router == "hash":
            if mesh.ep > 1:
                raise ConfigError("router='hash' has no learned router; expert parallel is not supported "
                                  "for the Hash Layer baseline (use parallel.ep=1)")
            continue
        moe.gate.count_reducer = reducer
        moe.gate.n_device_groups = device_loss_groups(cfg, mesh.ep)
        if mesh.ep > 1 and cfg.device_balance_alpha > 0 and cfg.n_device_groups != mesh.ep:
            log.warning("device-level balance loss: n_device_groups=%d in the config, but experts are "
                        "placed on ep=%d ranks; using D=%d (the real placement)",
                        cfg.n_device_groups, mesh.ep, mesh.ep)
        if mesh.ep > 1:
            shard_experts(moe.experts, mesh["ep"])
    return moes
