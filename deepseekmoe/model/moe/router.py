"""Routers (DeepSeekMoE top-k, Switch top-1, GShard top-2, Hash Layer) and balance losses.

A router maps token states to `Routing`: for each token the ids of its routed experts, their gate
values, and (for learned routers) the softmax affinities over all routed experts that the balance
losses need. The paper's analysis knobs (section 4.5) are plain attributes, settable on a loaded
model without retraining:

  top_k               route to this many experts instead of the configured count (Fig 6)
  mask_top_fraction   per token, disable the top-r fraction of experts ranked by affinity and
                      pick the top-K' among the rest (Fig 4, redundancy)

Scores are computed in float32 even under bf16 autocast: routing decisions are discrete and a
bf16 near-tie flips experts between runs.

Balance losses have one source: `TopKRouter.balance_loss(routing, batch_size)` computes the
expert- and device-level terms that training optimises and that the metrics log. When the batch
is split over data-parallel ranks, expert parallel sets `count_reducer` (an all-reduce of the
expert counts over the ranks whose batches form the global batch) and `n_device_groups` (the
real expert placement); nothing else computes a balance term.

Shape legend: T tokens, E routed experts, K experts per token, B sequences, G device groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.model.config import ModelConfig


@dataclass
class Routing:
    idx_TK: torch.Tensor  # int64 expert ids
    w_TK: torch.Tensor  # float32 gate values
    scores_TE: torch.Tensor | None  # float32 softmax affinities (None for hash routing)


class BalanceLoss(NamedTuple):
    """One MoE layer's balance-loss terms (None when a term is off); `total` is what is trained."""

    expert: torch.Tensor | None
    device: torch.Tensor | None
    total: torch.Tensor


class CountReducer(NamedTuple):
    """Sums expert counts over the `world` ranks whose batches together form the global batch."""

    all_reduce: Callable[[torch.Tensor], None]  # in place
    world: int


def device_loss_groups(cfg: ModelConfig, ep: int = 1) -> int:
    """D of the device-level loss: the expert-parallel ranks when experts are split over ep > 1
    ranks (the real placement), else the configured `n_device_groups`; 0 when the term is off."""
    if cfg.device_balance_alpha <= 0 or cfg.router == "hash":
        return 0
    groups = ep if ep > 1 else cfg.n_device_groups
    return groups if groups > 1 else 0


class TopKRouter(nn.Module):
    """Softmax affinities over the routed experts, top-k selection.

    `topk` (DeepSeekMoE): gates are the raw softmax probabilities unless `norm_topk_prob`.
    `switch`: k = 1, raw probability as the gate (so the router still gets a gradient).
    `gshard`: k = 2, gates renormalised to sum to 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.router == "gshard" or (cfg.router == "topk" and cfg.norm_topk_prob)
        self.mask_top_fraction = 0.0
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.expert_alpha, self.seq_aux = cfg.aux_loss_alpha, cfg.seq_aux
        self.device_alpha = cfg.device_balance_alpha
        self.n_device_groups = device_loss_groups(cfg)  # expert parallel sets the real placement
        self.count_reducer: CountReducer | None = None  # expert / data parallel: global counts

    def forward(self, x_TD: torch.Tensor, input_ids_T: torch.Tensor | None = None) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1)
        k = self.top_k
        if not 1 <= k <= self.n_experts:
            raise ValueError(f"top_k={k} must be between 1 and the number of routed experts "
                             f"({self.n_experts})")
        select_TE = scores_TE
        if self.mask_top_fraction > 0:
            n_masked = int(math.floor(self.mask_top_fraction * self.n_experts + 1e-9))
            if n_masked + k > self.n_experts:
                raise ValueError(f"mask_top_fraction={self.mask_top_fraction} leaves "
                                 f"{self.n_experts - n_masked} experts, fewer than top_k={k}")
            if n_masked:
                top_TM = scores_TE.topk(n_masked, dim=-1).indices
                select_TE = scores_TE.scatter(-1, top_TM, float("-inf"))
        idx_TK = select_TE.topk(k, dim=-1).indices
        w_TK = scores_TE.gather(-1, idx_TK)
        if self.normalize and k > 1:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(idx_TK, w_TK, scores_TE)

    def balance_loss(self, r: Routing, batch_size: int) -> BalanceLoss | None:
        """The expert-level (alpha_1; per sequence with `seq_aux`) and device-level (alpha_2) terms
        of this routing, or None when both are off. Gradients flow through the affinities only.

        With `count_reducer`, the batch-level terms use the global batch's counts (summed over the
        ranks, no gradient) and this rank's affinities: the loss is linear in P, so the mean over
        ranks of their losses (and gradients) equals one process's on the whole batch. The
        per-sequence form needs nothing: every sequence lives on one rank."""
        E = r.scores_TE.shape[-1]
        use_expert, G = self.expert_alpha > 0, self.n_device_groups
        if not use_expert and not G:
            return None
        f_E = P_E = None
        if G or (use_expert and not self.seq_aux):
            f_E = _expert_fraction_E(r.idx_TK, E, self.count_reducer)
            P_E = r.scores_TE.mean(0)
        expert = device = None
        if use_expert:
            expert = (expert_balance_loss(r.scores_TE, r.idx_TK, self.expert_alpha, batch_size) if self.seq_aux
                      else self.expert_alpha * (f_E * P_E).sum())
        if G:
            device = self.device_alpha * (f_E.view(G, E // G).mean(1) * P_E.view(G, E // G).sum(1)).sum()
        total = expert if device is None else device if expert is None else expert + device
        return BalanceLoss(expert, device, total)


class HashRouter(nn.Module):
    """Hash Layer (Roller et al. 2021): a fixed random token-id -> expert table, gate 1.

    The table is a random permutation of the vocabulary taken modulo E, so every expert owns the
    same number of vocabulary entries. It is rebuilt from `hash_seed`, not stored in checkpoints.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.vocab_size = cfg.vocab_size
        self.seed = cfg.hash_seed
        self.top_k = 1
        self.mask_top_fraction = 0.0
        self.register_buffer("table", self.build_table(), persistent=False)

    def build_table(self) -> torch.Tensor:
        perm = np.random.default_rng(self.seed).permutation(self.vocab_size)
        return torch.from_numpy(perm % self.n_experts).to(torch.int64)

    def forward(self, x_TD: torch.Tensor, input_ids_T: torch.Tensor | None = None) -> Routing:
        if input_ids_T is None:
            raise ValueError("router='hash' routes by token id: pass input_ids to the MoE layer")
        idx_TK = self.table[input_ids_T.reshape(-1)].unsqueeze(-1)
        w_TK = torch.ones(idx_TK.shape, dtype=torch.float32, device=x_TD.device)
        return Routing(idx_TK, w_TK, None)


def build_router(cfg: ModelConfig) -> nn.Module:
    return HashRouter(cfg) if cfg.router == "hash" else TopKRouter(cfg)


# ---------------------------------------------------------------------- balance losses
def _expert_fraction_E(idx_TK: torch.Tensor, n_experts: int, reducer: CountReducer | None = None) -> torch.Tensor:
    """f_i = E / (K T) * (number of token slots choosing expert i); no gradient (counts). With a
    reducer, counts and T are those of the global batch."""
    T, K = idx_TK.shape
    counts_E = torch.zeros(n_experts, dtype=torch.float32, device=idx_TK.device)
    counts_E.scatter_add_(0, idx_TK.reshape(-1), torch.ones(T * K, device=idx_TK.device))
    if reducer is not None and reducer.world > 1:
        reducer.all_reduce(counts_E)
        T = T * reducer.world
    return counts_E * (n_experts / (K * T))


def expert_balance_loss(scores_TE: torch.Tensor, idx_TK: torch.Tensor, alpha: float,
                        batch_size: int | None = None) -> torch.Tensor:
    """Expert-level balance loss alpha * sum_i f_i P_i (paper eq. 12-14).

    With `batch_size` (the released code's `seq_aux`), f and P are computed per sequence and the
    per-sequence losses are averaged. Gradient flows through P only.
    """
    E = scores_TE.shape[-1]
    if batch_size is None:
        f_E = _expert_fraction_E(idx_TK, E)
        P_E = scores_TE.mean(0)
        return alpha * (f_E * P_E).sum()
    T, K = idx_TK.shape
    S = T // batch_size
    idx_BSK = idx_TK.view(batch_size, S * K)
    counts_BE = torch.zeros(batch_size, E, dtype=torch.float32, device=idx_TK.device)
    counts_BE.scatter_add_(1, idx_BSK, torch.ones(idx_BSK.shape, device=idx_TK.device))
    f_BE = counts_BE * (E / (S * K))
    P_BE = scores_TE.view(batch_size, S, E).mean(1)
    return alpha * (f_BE * P_BE).sum(1).mean()


def device_balance_loss(scores_TE: torch.Tensor, idx_TK: torch.Tensor, alpha: float,
                        n_groups: int) -> torch.Tensor:
    """Device-level balance loss alpha * sum_d f'_d P'_d over D contiguous expert groups
    (paper eq. 15-17): f'_d = mean of the group's f_i, P'_d = sum of the group's P_i."""
    E = scores_TE.shape[-1]
    f_GE = _expert_fraction_E(idx_TK, E).view(n_groups, E // n_groups)
    P_GE = scores_TE.mean(0).view(n_groups, E // n_groups)
    return alpha * (f_GE.mean(1) * P_GE.sum(1)).sum()
