"""The top-k router of a decode step in one kernel: gate GEMV + softmax + top-k + gate values.

    idx_TK, w_TK = decode_router(x_TD, w_ED, k, normalize)

Same result as deepseekmoe.model.moe.router.TopKRouter.forward without the analysis knobs
(mask_top_fraction = 0): logits in fp32 from the (bf16) token states and router weights,
softmax over the E routed experts, the k largest (ties: the lower expert id), gate values the raw
probabilities, or renormalised to sum to 1 when `normalize` (norm_topk_prob / GShard). Its
reference twin is `decode_router_reference` (that math in torch). Inference only: no backward.

One program per token reads the whole [E, D] router matrix (256 KB at the 16B shape, from L2
after the first token) in [E, BLOCK_K] tiles, so the step needs a single launch for routing
instead of the GEMV, softmax, top-k, gather and normalisation kernels of the torch path.
Outputs: idx int64 (as torch.topk gives), w fp32.

Shape legend: T tokens, E routed experts, D hidden, K experts per token (K_TOP in the kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_router(x_ptr, w_ptr, idx_ptr, gate_ptr, D, E, E_P2: tl.constexpr, K_TOP: tl.constexpr,
                   K_P2: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_e = tl.arange(0, E_P2)
    emask = offs_e < E
    acc = tl.zeros([E_P2], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_d = k0 + tl.arange(0, BLOCK_K)
        dmask = offs_d < D
        x = tl.load(x_ptr + t.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * D + offs_d[None, :], mask=emask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    logits = tl.where(emask, acc, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    left = tl.where(emask, p, -1.0)  # probabilities are >= 0: padding lanes never win
    offs_k = tl.arange(0, K_P2)
    vals = tl.zeros([K_P2], dtype=tl.float32)
    ids = tl.zeros([K_P2], dtype=tl.int64)
    for k in tl.static_range(K_TOP):
        best = tl.max(left, 0)
        i = tl.min(tl.where(left == best, offs_e, E_P2), 0)
        vals = tl.where(offs_k == k, best, vals)
        ids = tl.where(offs_k == k, i.to(tl.int64), ids)
        left = tl.where(offs_e == i, -2.0, left)
    if NORMALIZE:
        vals = vals / (tl.sum(vals, 0) + 1e-20)
    kmask = offs_k < K_TOP
    tl.store(idx_ptr + t * K_TOP + offs_k, ids, mask=kmask)
    tl.store(gate_ptr + t * K_TOP + offs_k, vals, mask=kmask)


def _block_k(D: int) -> int:
    return 16 if INTERPRET else min(256, triton.next_power_of_2(D))


def decode_router_impl(x_TD, w_ED, k: int, normalize: bool):
    T, D = x_TD.shape
    E = w_ED.shape[0]
    if not 1 <= k <= E:
        raise ValueError(f"top_k={k} must be between 1 and the number of routed experts ({E})")
    idx_TK = torch.empty(T, k, dtype=torch.int64, device=x_TD.device)
    w_TK = torch.empty(T, k, dtype=torch.float32, device=x_TD.device)
    opts = {} if INTERPRET else dict(num_warps=8)
    _decode_router[(T,)](x_TD.contiguous(), w_ED.contiguous(), idx_TK, w_TK, D, E, E_P2=triton.next_power_of_2(E),
                         K_TOP=k, K_P2=triton.next_power_of_2(k), NORMALIZE=bool(normalize and k > 1),
                         BLOCK_K=_block_k(D), **opts)
    return idx_TK, w_TK


@torch.library.custom_op("deepseekmoe::decode_router", mutates_args=())
def decode_router_op(x_TD: torch.Tensor, w_ED: torch.Tensor, k: int,
                     normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_router_impl(x_TD, w_ED, k, normalize)


@decode_router_op.register_fake
def _(x_TD, w_ED, k, normalize):
    T = x_TD.shape[0]
    return (x_TD.new_empty((T, k), dtype=torch.int64), x_TD.new_empty((T, k), dtype=torch.float32))


def decode_router(x_TD, w_ED, k: int, normalize: bool):
    """(idx_TK int64, w_TK fp32) of the top-k router; see the module docstring."""
    return decode_router_op(x_TD, w_ED, k, normalize)


def decode_router_reference(x_TD, w_ED, k: int, normalize: bool):
    """The reference twin: TopKRouter's math (fp32 logits, softmax, top-k, optional renormalisation)."""
    scores_TE = (x_TD.float() @ w_ED.float().T).softmax(-1)
    w_TK, idx_TK = scores_TE.topk(k, dim=-1)
    if normalize and k > 1:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    return idx_TK, w_TK
