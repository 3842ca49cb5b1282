"""Split-KV ("flash-decoding") attention of a decode step: one new query token per row over a static
KV cache, reading only the slots the row can see.

    out_BHd = decode_attention(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale)

Row b's query heads attend the cache slots s with pad_B[b] <= s <= pos (pos = pos_1[0], the slot the
step's token was just written to); query head h reads kv head h // (H // K) (grouped-query
attention). Same result as `decode_attention_reference`, its twin: the boolean-mask SDPA over the
whole cache that Decoder._step runs by default (deepseekmoe/inference/generate.py). Inference only:
no backward.

Two launches, no host sync, fixed grids (CUDA-graph safe; pos and pad_B are read on the device):

  partials  grid (B*K, n_splits). Program (b, kv, j) handles the G = H // K query heads that share
            kv head `kv`, so each key/value row is read once for the group. The row's visible
            range [pad_b, pos] (its start rounded down to a BLOCK_S boundary) is cut into n_splits
            equal chunks of whole blocks on the device, at every step; program j loops over the
            blocks of chunk j only (slots outside [pad_b, pos] masked), with an fp32 online
            softmax (running max m, sum l, unnormalised output acc). A chunk that starts past
            pos (a short visible range) writes an empty partial: m = -inf, l = 0, acc = 0.
            So the work follows the position, not the cache size: slots past pos are never read.
  combine   grid (B*H,): out = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j with M = max_j m_j,
            in q's dtype. (With one split the first launch normalises and writes out itself.)

Scores are q.k * scale in fp32 from bf16 (or fp32) inputs, kept in base 2 (scale * log2 e, so the
kernel uses exp2). n_splits is chosen on the host from static shapes only (`n_splits_for`): enough
programs to fill the GPU at batch 1, none beyond one block per split of the full cache.

Shape legend: B batch, H query heads, K kv heads, G = H // K query heads per kv head, S cache
slots, d head dim, N n_splits.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 128
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _splitkv_partials(q_ptr, k_ptr, v_ptr, pos_ptr, pad_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, qk_scale, H, K, S, d,
                      G: tl.constexpr, G_P2: tl.constexpr, D_P2: tl.constexpr, BLOCK_S: tl.constexpr,
                      NSPLIT: tl.constexpr):
    """Split j of row b, kv head kv: the online-softmax partials (m, l, acc) of its G query heads."""
    bk, j = tl.program_id(0), tl.program_id(1)
    b, kv = bk // K, bk % K
    pos = tl.load(pos_ptr).to(tl.int32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    base = (pad // BLOCK_S) * BLOCK_S
    chunk = tl.cdiv(tl.cdiv(pos + 1 - base, NSPLIT), BLOCK_S) * BLOCK_S
    lo = base + j * chunk
    hi = tl.minimum(lo + chunk, pos + 1)

    offs_g = tl.arange(0, G_P2)
    offs_d = tl.arange(0, D_P2)
    gmask, dmask = offs_g < G, offs_d < d
    h_G = kv * G + offs_g
    q_GD = tl.load(q_ptr + (b * H + h_G[:, None]).to(tl.int64) * d + offs_d[None, :],
                   mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * qk_scale
    kv_row = (b * K + kv).to(tl.int64) * S * d
    m_G = tl.full([G_P2], float("-inf"), dtype=tl.float32)
    l_G = tl.zeros([G_P2], dtype=tl.float32)
    acc_GD = tl.zeros([G_P2, D_P2], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):  # every block here holds a visible slot: m turns finite in the first
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = (offs_s >= pad) & (offs_s < hi)
        ptrs = kv_row + offs_s[:, None].to(tl.int64) * d + offs_d[None, :]
        kvmask = smask[:, None] & dmask[None, :]
        k_SD = tl.load(k_ptr + ptrs, mask=kvmask, other=0.0).to(tl.float32)
        v_SD = tl.load(v_ptr + ptrs, mask=kvmask, other=0.0).to(tl.float32)
        s_GS = tl.sum(q_GD[:, None, :] * k_SD[None, :, :], axis=2)
        s_GS = tl.where(smask[None, :], s_GS, float("-inf"))
        m_new = tl.maximum(m_G, tl.max(s_GS, axis=1))
        alpha = tl.exp2(m_G - m_new)
        p_GS = tl.exp2(s_GS - m_new[:, None])
        l_G = l_G * alpha + tl.sum(p_GS, axis=1)
        acc_GD = acc_GD * alpha[:, None] + tl.sum(p_GS[:, :, None] * v_SD[None, :, :], axis=1)
        m_G = m_new
    if NSPLIT == 1:
        out = acc_GD / l_G[:, None]
        tl.store(out_ptr + (b * H + h_G[:, None]).to(tl.int64) * d + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        row_G = (b * H + h_G).to(tl.int64) * NSPLIT + j
        tl.store(m_ptr + row_G, m_G, mask=gmask)
        tl.store(l_ptr + row_G, l_G, mask=gmask)
        tl.store(acc_ptr + row_G[:, None] * d + offs_d[None, :], acc_GD, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _splitkv_combine(m_ptr, l_ptr, acc_ptr, out_ptr, d, D_P2: tl.constexpr, NSPLIT: tl.constexpr):
    """out[bh] = the softmax-weighted sum of head bh's split partials (empty splits weigh 0)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, NSPLIT)
    offs_d = tl.arange(0, D_P2)
    dmask = offs_d < d
    m_N = tl.load(m_ptr + bh * NSPLIT + offs_j)
    l_N = tl.load(l_ptr + bh * NSPLIT + offs_j)
    acc_ND = tl.load(acc_ptr + (bh * NSPLIT + offs_j[:, None]) * d + offs_d[None, :], mask=dmask[None, :], other=0.0)
    m_max = tl.max(m_N, axis=0)
    w_N = tl.where(m_N == float("-inf"), 0.0, tl.exp2(m_N - m_max))
    out = tl.sum(w_N[:, None] * acc_ND, axis=0) / tl.sum(w_N * l_N, axis=0)
    tl.store(out_ptr + bh * d + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def block_s(G: int, d: int) -> int:
    """Cache slots per loop step: a [G, BLOCK_S, d] fp32 product of ~8K elements per program on the
    GPU (64 slots at G = 1, d = 128); 4 under the interpreter, so tiny caches cross block edges."""
    if INTERPRET:
        return 4
    return max(16, min(64, 8192 // (triton.next_power_of_2(G) * triton.next_power_of_2(d))))


def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 4 for tensors on the CPU (the interpreter runs one
    program after another, so a small grid: the CPU tests pass their own split counts too)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def n_splits_for(B: int, K: int, S: int, G: int = 1, d: int = 128, sms: int = 132) -> int:
    """Splits per (row, kv head), a power of two, from static shapes only: about two programs per SM,
    at most one block of the full cache per split and MAX_SPLITS. The 16B shape (K = 16, d = 128) on
    132 SMs with a 320-slot cache: 8 splits at batch 1, 4 at batch 8, 2 at 16, 1 from batch 32."""
    want = max(1, math.ceil(2 * sms / max(1, B * K)))
    blocks = max(1, triton.cdiv(S, block_s(G, d)))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(blocks), MAX_SPLITS)


def decode_attention_impl(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale: float, n_splits: int):
    """The two launches; see the module docstring."""
    B, H, d = q_BHd.shape
    K, S = k_BKSd.shape[1], k_BKSd.shape[2]
    if H % K or d > MAX_HEAD_DIM or n_splits < 1 or n_splits & (n_splits - 1):
        raise ValueError(f"decode_attention: need H % K == 0 (H={H}, K={K}), head_dim <= {MAX_HEAD_DIM} (got {d}) "
                         f"and a power-of-two n_splits (got {n_splits})")
    G = H // K
    q_BHd, k_BKSd, v_BKSd = q_BHd.contiguous(), k_BKSd.contiguous(), v_BKSd.contiguous()
    out_BHd = torch.empty_like(q_BHd)
    if B == 0:
        return out_BHd
    f32 = dict(dtype=torch.float32, device=q_BHd.device)
    m_BHN = torch.empty(B, H, n_splits, **f32) if n_splits > 1 else out_BHd
    l_BHN = torch.empty(B, H, n_splits, **f32) if n_splits > 1 else out_BHd
    acc_BHNd = torch.empty(B, H, n_splits, d, **f32) if n_splits > 1 else out_BHd
    D_P2 = triton.next_power_of_2(d)
    opts = {} if INTERPRET else dict(num_warps=4)
    _splitkv_partials[(B * K, n_splits)](q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, m_BHN, l_BHN, acc_BHNd, out_BHd,
                                         scale * _LOG2E, H, K, S, d, G=G, G_P2=triton.next_power_of_2(G),
                                         D_P2=D_P2, BLOCK_S=block_s(G, d), NSPLIT=n_splits, **opts)
    if n_splits > 1:
        _splitkv_combine[(B * H,)](m_BHN, l_BHN, acc_BHNd, out_BHd, d, D_P2=D_P2, NSPLIT=n_splits,
                                   **({} if INTERPRET else dict(num_warps=2)))
    return out_BHd


@torch.library.custom_op("deepseekmoe::decode_attention", mutates_args=())
def decode_attention_op(q_BHd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, pos_1: torch.Tensor,
                        pad_B: torch.Tensor, scale: float, n_splits: int) -> torch.Tensor:
    return decode_attention_impl(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale, n_splits)


@decode_attention_op.register_fake
def _(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale, n_splits):
    return torch.empty_like(q_BHd)


def decode_attention(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale: float, n_splits: int | None = None):
    """[B, H, d] in q's dtype: each row's attention over its cache slots pad_B[b]..pos_1[0] (see the
    module docstring). n_splits: by default `n_splits_for` the shapes and the device (callers inside
    torch.compile pass it, computed once: inference/splitkv.py)."""
    if n_splits is None:
        B, H, d = q_BHd.shape
        K, S = k_BKSd.shape[1], k_BKSd.shape[2]
        n_splits = n_splits_for(B, K, S, H // K, d, sm_count(q_BHd.device))
    return decode_attention_op(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, float(scale), n_splits)


def decode_attention_reference(q_BHd, k_BKSd, v_BKSd, pos_1, pad_B, scale: float, n_splits: int | None = None):
    """The reference twin: SDPA over the whole cache with the boolean mask Decoder._step builds
    (slot <= pos and slot >= pad_B[b]), the kv heads repeated for grouped-query attention."""
    import torch.nn.functional as F

    H, K, S = q_BHd.shape[1], k_BKSd.shape[1], k_BKSd.shape[2]
    slot_S = torch.arange(S, device=q_BHd.device)
    mask_B11S = ((slot_S <= pos_1) & (slot_S[None, :] >= pad_B[:, None]))[:, None, None, :]
    if K != H:
        k_BKSd, v_BKSd = k_BKSd.repeat_interleave(H // K, dim=1), v_BKSd.repeat_interleave(H // K, dim=1)
    out = F.scaled_dot_product_attention(q_BHd[:, :, None], k_BKSd, v_BKSd, attn_mask=mask_B11S, scale=scale)
    return out[:, :, 0]
