"""Expert parallelism: routed experts split over the ``ep`` ranks, token slots moved by all-to-all;
and the routers given the global batch's expert counts when the batch is split over ranks.

Each ep rank keeps experts [r*El, (r+1)*El) of every MoE layer (El = E / ep), stored as DTensors
of the full [E, ...] shape sharded on dim 0 over the ``ep`` mesh, so checkpoints (DCP) see the
global tensor and can reshard to any other layout. The router and the shared experts stay
replicated (they are ordinary data-parallel weights), so routing, gates and balance losses are
those of a single device. One MoE forward on rank r:

    sort own slots by expert  ->  exchange per-expert counts (tiny all-to-all)  ->  ONE host sync
    for the split sizes  ->  dispatch slot rows (variable all-to-all)  ->  the configured expert
    backend (loop / grouped / triton) on the received rows with gate 1  ->  combine (the reverse
    all-to-all)  ->  unsort and take the gate-weighted sum over K, exactly as experts_grouped does.

Both all-to-alls are autograd functions whose backward is the reverse exchange.

Gradient scaling: each rank's loss is the mean over its own tokens and FSDP averages gradients
over the ranks that hold a weight. The routed-expert weights on rank (dp i, ep j) already receive
the gradients of the losses of all ep ranks of replica i (through the combine's backward), so an
average over dp alone would leave them ep times too large; `_scale_grad` divides by ep in backward.

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


class ExpertParallelExperts(RoutedExperts):
    """Drop-in for RoutedExperts holding this rank's E/ep experts; same forward signature."""

    def __init__(self, routed: RoutedExperts, ep_mesh):
        nn.Module.__init__(self)
        P, r = ep_mesh.size(), ep_mesh.get_local_rank()
        E = routed.n_experts
        if E % P:
            raise ConfigError(f"n_routed_experts={E} cannot be split evenly over parallel.ep={P} ranks; choose an "
                              f"ep that divides {E}")
        self.n_experts, self.dim, self.width, self.backend = E, routed.dim, routed.width, routed.backend
        self.ep_size, self.n_local, self.ep_group = P, E // P, ep_mesh.get_group()
        self.last_received = -1
        lo, hi = r * self.n_local, (r + 1) * self.n_local
        # Each rank keeps only its slice; the DTensor records the global [E, ...] layout.
        self.w13 = nn.Parameter(DTensor.from_local(routed.w13.detach()[lo:hi].clone(), ep_mesh, [Shard(0)],
                                                   run_check=False))
        self.w2 = nn.Parameter(DTensor.from_local(routed.w2.detach()[lo:hi].clone(), ep_mesh, [Shard(0)],
                                                  run_check=False))

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, local={self.n_local}, ep={self.ep_size}, dim={self.dim}, "
                f"width={self.width}, backend={self.backend}")

    def forward(self, x_TD, idx_TK, w_TK):
        T, K = idx_TK.shape
        D, P, El, group = x_TD.shape[1], self.ep_size, self.n_local, self.ep_group
        dev = x_TD.device
        if torch.is_autocast_enabled(dev.type):
            # Move (and compute) expert inputs in the autocast dtype: half the all-to-all bytes.
            x_TD = x_TD.to(torch.get_autocast_dtype(dev.type))
        flat_S = idx_TK.reshape(-1)
        perm_S = torch.argsort(flat_S, stable=True)  # slots grouped by expert = by destination rank
        counts_E = torch.bincount(flat_S, minlength=self.n_experts)
        recv_counts_PEl = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_PEl, counts_E, group=group)  # [src p][my expert]
        # The only host sync: the split sizes of the two variable all-to-alls.
        splits = torch.cat([counts_E.view(P, El).sum(1), recv_counts_PEl.view(P, El).sum(1)]).tolist()
        send, recv = splits[:P], splits[P:]
        R = sum(recv)
        self.last_received = R  # slots this rank's experts got in the last forward (load logging)

        x_RD = all_to_all(x_TD[perm_S // K], recv, send, group)
        w13 = _ScaleGrad.apply(self.w13.to_local(), 1.0 / P)
        w2 = _ScaleGrad.apply(self.w2.to_local(), 1.0 / P)
        if R == 0:
            # No slot came here. Keep the received rows and the weights in the graph anyway:
            # every rank must run the dispatch's backward all-to-all, and produce (zero) weight
            # gradients for FSDP's reduce-scatter, or the other ranks would wait forever.
            y_RD = x_RD * 0.0 + 0.0 * (w13.sum() + w2.sum()).to(x_RD.dtype)
        else:
            local_R = torch.arange(El, device=dev).repeat(P)
            idx_R1 = torch.repeat_interleave(local_R, recv_counts_PEl, output_size=R).unsqueeze(1)
            ones_R1 = torch.ones(R, 1, dtype=torch.float32, device=dev)
            y_RD = resolve_backend(self.backend, dev)(x_RD, idx_R1, ones_R1, w13, w2)
        y_SD = all_to_all(y_RD, send, recv, group)
        inv_S = torch.empty_like(perm_S)
        inv_S[perm_S] = torch.arange(perm_S.numel(), device=dev)
        y_TKD = y_SD[inv_S].view(T, K, D)
        # Gate-weighted sum over K (a fresh tensor: FSDP warns about modules returning views).
        return (w_TK.to(y_TKD.dtype).unsqueeze(-1) * y_TKD).sum(1)


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
            moe.experts = ExpertParallelExperts(moe.experts, mesh["ep"])
    return moes
