"""The top-k router of a decode step: gate GEMV + softmax + top-k + gate values in one kernel (two launches
by default: split-D partial logits first, see SPLITS).

    idx_TK, w_TK = decode_router(x_TD, w_ED, k, normalize)

Same result as deepseekmoe.model.moe.router.TopKRouter.forward without the analysis knobs
(mask_top_fraction = 0): logits in fp32 from the (bf16) token states and router weights,
softmax over the E routed experts, the k largest (ties: the lower expert id), gate values the raw
probabilities, or renormalised to sum to 1 when `normalize` (norm_topk_prob / GShard). Its
reference twin is `decode_router_reference` (that math in torch). Inference only: no backward.

One program per token reads the whole [E, D] router matrix (256 KB at the 16B shape, from L2
after the first token) in [E, BLOCK_K] tiles, so the step needs a single launch for routing
instead of the GEMV, softmax, top-k, gather and normalisation kernels of the torch path. With
`splits` > 1 (module default SPLITS) a first launch spreads that read over `splits` programs per
token (split-D partial logits, summed in a fixed order by the second: deterministic), for when
one SM's read of the matrix is slower than a second launch; benchmarks/inference.py times both.
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
def _logits_part(x_ptr, w_ptr, t, d0, d1, D, E, E_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token t's fp32 router logits over columns [d0, d1) of D, [E_P2] (padding lanes 0)."""
    offs_e = tl.arange(0, E_P2)
    emask = offs_e < E
    acc = tl.zeros([E_P2], dtype=tl.float32)
    for k0 in range(d0, d1, BLOCK_K):
        offs_d = k0 + tl.arange(0, BLOCK_K)
        dmask = offs_d < d1
        x = tl.load(x_ptr + t.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * D + offs_d[None, :], mask=emask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def _router_partials(x_ptr, w_ptr, part_ptr, D, E, CHUNK, NSPLIT: tl.constexpr, E_P2: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Split-D logits: program (t, j) writes token t's logits over columns [j*CHUNK, (j+1)*CHUNK)."""
    t, j = tl.program_id(0), tl.program_id(1)
    d0 = j * CHUNK
    acc = _logits_part(x_ptr, w_ptr, t, d0, tl.minimum(d0 + CHUNK, D), D, E, E_P2, BLOCK_K)
    tl.store(part_ptr + (t * NSPLIT + j) * E_P2 + tl.arange(0, E_P2), acc)


@triton.jit
def _decode_router(x_ptr, w_ptr, part_ptr, idx_ptr, gate_ptr, D, E, NSPLIT: tl.constexpr, E_P2: tl.constexpr,
                   K_TOP: tl.constexpr, K_P2: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_e = tl.arange(0, E_P2)
    emask = offs_e < E
    if NSPLIT == 1:
        acc = _logits_part(x_ptr, w_ptr, t, 0, D, D, E, E_P2, BLOCK_K)
    else:  # sum the split-D partial logits of _router_partials (fixed order: deterministic)
        offs_j = tl.arange(0, NSPLIT)
        acc = tl.sum(tl.load(part_ptr + (t * NSPLIT + offs_j[:, None]) * E_P2 + offs_e[None, :]), axis=0)
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


# Split-D programs per token (1: one program per token does everything in one launch; > 1: a
# first launch spreads the [E, D] read over that many programs per token). A power of two. 8:
# measured on an H200 at the 16B shape, batch 1, in a CUDA graph (benchmarks/inference.py, kernel
# phase): 5.1 us per call split 8 ways, 20.3 us in one launch, 17.7 us for the torch path.
SPLITS = 8


def decode_router_impl(x_TD, w_ED, k: int, normalize: bool, splits: int | None = None):
    T, D = x_TD.shape
    E = w_ED.shape[0]
    if not 1 <= k <= E:
        raise ValueError(f"top_k={k} must be between 1 and the number of routed experts ({E})")
    splits = SPLITS if splits is None else splits
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"router splits={splits}: must be a power of two")
    x_TD, w_ED = x_TD.contiguous(), w_ED.contiguous()
    idx_TK = torch.empty(T, k, dtype=torch.int64, device=x_TD.device)
    w_TK = torch.empty(T, k, dtype=torch.float32, device=x_TD.device)
    opts = {} if INTERPRET else dict(num_warps=8)
    E_P2, bk = triton.next_power_of_2(E), _block_k(D)
    part = w_TK  # unused when splits == 1
    if splits > 1 and T:
        chunk = triton.cdiv(triton.cdiv(D, splits), bk) * bk
        part = torch.empty(T, splits, E_P2, dtype=torch.float32, device=x_TD.device)
        _router_partials[(T, splits)](x_TD, w_ED, part, D, E, chunk, NSPLIT=splits, E_P2=E_P2, BLOCK_K=bk,
                                      **({} if INTERPRET else dict(num_warps=4)))
    if T:
        _decode_router[(T,)](x_TD, w_ED, part, idx_TK, w_TK, D, E, NSPLIT=splits, E_P2=E_P2, K_TOP=k,
                             K_P2=triton.next_power_of_2(k), NORMALIZE=bool(normalize and k > 1), BLOCK_K=bk, **opts)
    return idx_TK, w_TK


@torch.library.custom_op("deepseekmoe::decode_router", mutates_args=())
def decode_router_op(x_TD: torch.Tensor, w_ED: torch.Tensor, k: int, normalize: bool,
                     splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_router_impl(x_TD, w_ED, k, normalize, splits)


@decode_router_op.register_fake
def _(x_TD, w_ED, k, normalize, splits):
    T = x_TD.shape[0]
    return (x_TD.new_empty((T, k), dtype=torch.int64), x_TD.new_empty((T, k), dtype=torch.float32))


def decode_router(x_TD, w_ED, k: int, normalize: bool, splits: int | None = None):
    """(idx_TK int64, w_TK fp32) of the top-k router; see the module docstring (splits: SPLITS)."""
    return decode_router_op(x_TD, w_ED, k, normalize, SPLITS if splits is None else splits)


def decode_router_reference(x_TD, w_ED, k: int, normalize: bool, splits: int | None = None):
    """The reference twin: TopKRouter's math (fp32 logits, softmax, top-k, optional renormalisation)."""
    scores_TE = (x_TD.float() @ w_ED.float().T).softmax(-1)
    w_TK, idx_TK = scores_TE.topk(k, dim=-1)
    if normalize and k > 1:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    return idx_TK, w_TK
