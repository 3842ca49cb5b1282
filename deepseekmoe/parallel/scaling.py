"""A back-of-the-envelope scaling model: expert-parallel all-to-all bytes vs. compute per token.

Per token and MoE layer, the EP layer (expert_parallel.py) moves K slot rows of D bf16 values to
the experts' ranks (dispatch) and K rows back (combine); a fraction (ep-1)/ep of the slots leave
the GPU (uniform routing, what the balance losses aim at). Backward repeats both exchanges in
the other direction; activation checkpointing re-runs the forward pair:

    bytes/token = n_moe_layers x K x D x 2 B x (ep-1)/ep x (2 fwd + 2 bwd [+ 2 recompute])

Compute per token is the core accounting's training FLOPs (ModelConfig.flops_per_token) at an
achieved fraction (MFU) of the GPU's peak. Both grow linearly with tokens per GPU, so their
ratio does not depend on the batch: it is the number this module reports, for an all-to-all
inside one node (NVLink) and for one spanning nodes (InfiniBand), where only the slots that go to
another node cross the slow link. `python -m deepseekmoe.parallel.scaling` prints the table of
docs/parallel.md.

Dedup headroom: a token whose K experts share a rank is sent once per slot here; sending it once
per destination rank (and expanding there) would move E[#distinct ranks] rows instead of K.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from deepseekmoe.model.config import ModelConfig

H100_PEAK = 989e12  # dense bf16 FLOP/s, SXM
NVLINK_ACHIEVED = 350e9  # bytes/s per direction per GPU actually reached by all-to-all (of ~450)
IB_PER_GPU = 400e9 / 8  # 400 Gb/s per GPU = 50 GB/s per direction


@dataclass
class A2APoint:
    name: str
    ep: int
    gpus_per_node: int
    bytes_per_token: float  # all MoE layers, forward + backward (+ recompute), leaving the GPU
    inter_node_bytes_per_token: float  # the part that crosses nodes
    compute_s_per_token: float
    comm_s_per_token: float  # the slowest link's time
    distinct_ranks: float  # E[#ranks a token's K slots go to] (dedup headroom, vs K)

    @property
    def ratio(self) -> float:
        """Compute time / all-to-all time (> 1: the exchange can hide behind compute)."""
        return self.compute_s_per_token / self.comm_s_per_token


def n_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def a2a_bytes_per_token(cfg: ModelConfig, ep: int, recompute: bool = False, bytes_per_value: int = 2) -> float:
    """Bytes one token sends to other GPUs per training step (all MoE layers)."""
    passes = 6 if recompute else 4  # dispatch + combine, forward + backward (+ recomputed forward)
    return n_moe_layers(cfg) * cfg.num_experts_per_tok * cfg.hidden_size * bytes_per_value * (ep - 1) / ep * passes


def expected_distinct_ranks(cfg: ModelConfig, ep: int) -> float:
    """E[#ranks holding at least one of a token's K experts] for K distinct uniform experts."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    per = E // ep
    return ep * (1 - comb(E - per, K) / comb(E, K))


def a2a_point(name: str, cfg: ModelConfig, ep: int, gpus_per_node: int = 8, mfu: float = 0.45,
              seq_len: int = 4096, recompute: bool = False, nvlink: float = NVLINK_ACHIEVED,
              ib: float = IB_PER_GPU, peak: float = H100_PEAK) -> A2APoint:
    total = a2a_bytes_per_token(cfg, ep, recompute)
    # Of the ep-1 other ranks, those outside this node (ep ranks packed onto whole nodes).
    off_node = max(ep - gpus_per_node, 0) / (ep - 1) if ep > 1 else 0.0
    inter = total * off_node
    comm = max((total - inter) / nvlink, inter / ib if inter else 0.0)
    compute = cfg.flops_per_token(seq_len) / (mfu * peak)
    return A2APoint(name, ep, gpus_per_node, total, inter, compute, comm, expected_distinct_ranks(cfg, ep))


MEASURED_MFU = 0.246  # docs/benchmarks.md: 16B cut to 4 layers, compiled, one H100 (65,510 tokens/s)
TARGET_MFU = 0.45  # the project's single-GPU target


def report(mfus: tuple[float, ...] = (MEASURED_MFU, TARGET_MFU)) -> str:
    from deepseekmoe.model import presets

    rows = []
    for preset in ("deepseekmoe-16b", "deepseekmoe-145b"):
        cfg = presets.get(preset)
        for ep, label in ((8, "1 node, NVLink"), (16, "2 nodes, IB"), (32, "4 nodes, IB")):
            if cfg.n_routed_experts % ep:
                continue
            for rc in (False, True):
                pts = [a2a_point(preset, cfg, ep, mfu=m, recompute=rc) for m in mfus]
                p = pts[0]
                cols = " | ".join(f"{q.compute_s_per_token * 1e6:.1f} | {q.ratio:.2f}" for q in pts)
                rows.append(f"| {preset} | {ep} ({label}) | {'yes' if rc else 'no'} | "
                            f"{p.bytes_per_token / 1e6:.2f} | {p.inter_node_bytes_per_token / 1e6:.2f} | "
                            f"{p.comm_s_per_token * 1e6:.1f} | {cols} | "
                            f"{p.distinct_ranks:.2f} of {cfg.num_experts_per_tok} |")
    mcols = " | ".join(f"compute us/token (MFU {m:.1%}) | compute / a2a" for m in mfus)
    head = (f"| model | ep | act. ckpt | MB/token sent | of which inter-node | a2a us/token | {mcols} | "
            "ranks per token (dedup) |\n|" + "---|" * (7 + 2 * len(mfus)))
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    print(report())
