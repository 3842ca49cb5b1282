"""Triton kernels of the fused MoE expert path (forward and backward) and their launchers.

Five grouped GEMMs over token slots sorted by expert, none of which materialises a permuted copy
of its token-indexed operand (rows are gathered by pointer inside the main loop):

  gateup_fwd   gu = x[tok(s)] @ W13_e^T, epilogue a = silu(g) * u        (gather of x fused)
  down_fwd     y[slot(s)] = w_s * (a_s @ W2_e^T)                          (weight + scatter fused)
  down_bwd     dA'_s = dy[tok(s)] @ W2_e, epilogue: recompute a from the saved g|u, partial
               dw_s = <dA'_s, a_s>, dg/du (dSwiGLU), aw_s = w_s * a_s for dW2
  wgrad        dW_e = A_e^T @ B_e over the expert's slots (dW2 and dW13; gathered operand)
  gateup_dx    dx[slot(s)] = dgu_s @ W13_e                                (scatter to token slots)

Operands that are contiguous per expert (the stacked weights, and the sorted [S, *] activations)
are read through Hopper TMA tensor descriptors (`TensorDescriptor`, block shapes set per config by
a pre-hook); token-indexed operands are gathered with pointer loads. Rows or columns a TMA box
reads past an expert's range either meet zeros of the other operand or land in outputs that are
masked on store. docs/kernels.md (v4) has the measurements.

Routing metadata is only `perm_S` (slot ids sorted by expert) and `counts_E`; every M-tiled
kernel finds its expert and row range from counts_E itself (a prefix sum over E lanes), so the
launch grid is a bound known on the host without reading device values: cdiv(S, BLOCK_M) + E
row tiles (programs past the last real tile exit at once). No host sync, CUDA-graph safe.

Shape legend: T tokens, K routed experts per token (K_TOP in kernels), S = T*K slots (sorted
order unless a name says slot order), E experts, D hidden, F expert width, NT column tiles.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Small fixed tiles for the CPU interpreter (tl.dot needs every dim >= 16).
_INTERP_CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
# The interpreter (triton 3.9) multiplies bf16 tiles as raw integers: upcast there, only there.
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _expert_rows(pid_m, counts_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile `pid_m` -> (expert, first sorted row, end row of that expert)."""
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    ntiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(ntiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    tile0 = tl.sum(tl.where(offs_e < e, ntiles, 0), 0)
    row0 = tl.sum(tl.where(offs_e < e, cnt, 0), 0)
    end = tl.sum(tl.where(offs_e <= e, cnt, 0), 0)
    # Past the last tile e == E and start >= end == S: the caller returns.
    return e, row0 + (pid_m - tile0) * BLOCK_M, end


@triton.jit
def _n_row_tiles(counts_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Number of real row tiles (sum over experts of cdiv(count, BLOCK_M))."""
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    return tl.sum((cnt + BLOCK_M - 1) // BLOCK_M, 0)


@triton.jit
def _gateup_fwd(x_ptr, w_desc, perm_ptr, counts_ptr, st_ptr, a_ptr,
                D, F, K_TOP, E, TPE,
                E_P2: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, PERSIST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a = silu(g) * u, [g|u] = x[tok(s)] @ W13_e^T; saves for backward (SAVE): 0 nothing,
    1 g|u (SAVE_GU), 2 s|t = silu(g) | u silu'(g) (SAVE_AST, with a kept by the caller).

    w_desc: TMA descriptor of W13 as [E*2F, D] (gate rows e*2F + n, up rows e*2F + F + n; a gate
    box past F reads up rows, whose columns are masked on store). Programs stride over the real
    tiles (one tile each unless the grid is persistent).
    """
    n_tiles = tl.cdiv(F, BLOCK_N)
    total = _n_row_tiles(counts_ptr, E, E_P2, BLOCK_M) * n_tiles
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0)):
        e, start, end = _expert_rows(tile // n_tiles, counts_ptr, E, E_P2, BLOCK_M)
        n0 = (tile % n_tiles) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_M)
        # Clamped rows keep the main loop free of row masks; their results are never stored.
        tok = (tl.load(perm_ptr + tl.minimum(rows, end - 1)) // K_TOP).to(tl.int64)
        a_ptrs = x_ptr + tok[:, None] * D + offs_k[None, :]
        wrow = e * 2 * F + n0
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            xa = tl.load(a_ptrs, mask=(offs_k < D - k * BLOCK_K)[None, :], other=0.0)
            acc_g = _dot(xa, w_desc.load([wrow, k * BLOCK_K]).T, acc_g, PREC)
            acc_u = _dot(xa, w_desc.load([wrow + F, k * BLOCK_K]).T, acc_u, PREC)
            a_ptrs += BLOCK_K
        sig = tl.sigmoid(acc_g)
        silu = acc_g * sig
        act = silu * acc_u
        offs_n = n0 + tl.arange(0, BLOCK_N)
        r64 = rows.to(tl.int64)
        mask = (rows < end)[:, None] & (offs_n < F)[None, :]
        tl.store(a_ptr + r64[:, None] * F + offs_n[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)
        st_out = st_ptr + r64[:, None] * (2 * F) + offs_n[None, :]
        if SAVE == 1:
            tl.store(st_out, acc_g.to(st_ptr.dtype.element_ty), mask=mask)
            tl.store(st_out + F, acc_u.to(st_ptr.dtype.element_ty), mask=mask)
        if SAVE == 2:
            # The backward's SwiGLU factors while g and u are in registers: s = silu(g) and
            # t = u silu'(g) = u sig (1 + g (1 - sig)) = sig (u - a) + a.
            tl.store(st_out, silu.to(st_ptr.dtype.element_ty), mask=mask)
            tl.store(st_out + F, (sig * (acc_u - act) + act).to(st_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rowtile_gemm(a_desc, a_ptr, b_desc, out_ptr, perm_ptr, counts_ptr, w_ptr,
                  N, KD, lda, E, TPE, K_TOP,
                  E_P2: tl.constexpr, A_GATHER: tl.constexpr, B_KMAJOR: tl.constexpr,
                  SCALE_W: tl.constexpr, OUT_SORTED: tl.constexpr, PREC: tl.constexpr, PERSIST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[slot(s)] = (w_s *) A_s @ B_e for the sorted rows s of each expert, stored in slot order
    (or in sorted order, OUT_SORTED).

    A_s is row s of a sorted [S, KD] tensor read through a_desc (a box running past the expert's
    end computes rows that are never stored), or (A_GATHER) row tok(s) of a token-indexed tensor
    at a_ptr. B through b_desc: the stacked weight as [E*N, KD] (B_KMAJOR, i.e. W^T; rows e*N + n)
    or [E*KD, N] (rows e*KD + k; a K box past KD meets A's zero padding). Used for down_fwd
    (a @ W2^T, scaled by w) and gateup_dx (dgu @ W13). Programs stride over the real tiles.
    """
    n_tiles = tl.cdiv(N, BLOCK_N)
    total = _n_row_tiles(counts_ptr, E, E_P2, BLOCK_M) * n_tiles
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0)):
        e, start, end = _expert_rows(tile // n_tiles, counts_ptr, E, E_P2, BLOCK_M)
        n0 = (tile % n_tiles) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_M)
        slot = tl.load(perm_ptr + tl.minimum(rows, end - 1)).to(tl.int64)
        a_ptrs = a_ptr + (slot // K_TOP)[:, None] * lda + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(KD, BLOCK_K)):
            if A_GATHER:
                av = tl.load(a_ptrs, mask=(offs_k < KD - k * BLOCK_K)[None, :], other=0.0)
                a_ptrs += BLOCK_K
            else:
                av = a_desc.load([start, k * BLOCK_K])
            if B_KMAJOR:
                bv = b_desc.load([e * N + n0, k * BLOCK_K]).T
            else:
                bv = b_desc.load([e * KD + k * BLOCK_K, n0])
            acc = _dot(av, bv, acc, PREC)
        if SCALE_W:
            acc = acc * tl.load(w_ptr + slot).to(tl.float32)[:, None]
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & (offs_n < N)[None, :]
        orow = rows.to(tl.int64) if OUT_SORTED else slot
        tl.store(out_ptr + orow[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_tile(acc, rows, end, start, n0, wv, a_ptr, st_ptr, dgu_ptr, aw_ptr, dwp_ptr, F, DWP_COLS,
                     BLOCK_M: tl.constexpr, SUB_N: tl.constexpr, DWP_GRAN: tl.constexpr, SAVE: tl.constexpr):
    """SwiGLU backward of one [BLOCK_M, SUB_N] column block of dA' (see _down_bwd).

    SAVE 1: recompute s = silu(g), t = u silu'(g), a = s u from the saved g|u. SAVE 2: products
    with the saved a and s|t only (no transcendental, fewer live temporaries, 1.5x the memory).
    """
    offs_n = n0 + tl.arange(0, SUB_N)
    mask = (rows < end)[:, None] & (offs_n < F)[None, :]
    # Offsets inside the tile stay int32; the tile's first row moves the base pointer (int64).
    loc2 = tl.arange(0, BLOCK_M)[:, None] * (2 * F) + offs_n[None, :]
    loc1 = tl.arange(0, BLOCK_M)[:, None] * F + offs_n[None, :]
    row0 = start.to(tl.int64)
    if SAVE == 1:
        g = tl.load(st_ptr + row0 * (2 * F) + loc2, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(st_ptr + row0 * (2 * F) + F + loc2, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        s_f = g * sig
        act = s_f * u
        t_f = sig * (u - act) + act
    else:
        act = tl.load(a_ptr + row0 * F + loc1, mask=mask, other=0.0).to(tl.float32)
    dwp = tl.sum(acc * act, 1)  # masked columns have a = 0
    # dwp has one column per DWP_GRAN columns of F whatever the tile shape: this block writes all
    # of its own (the sum into the first, zeros after), so no zero-init and no stale values.
    NSUB: tl.constexpr = SUB_N // DWP_GRAN
    sub = n0 // DWP_GRAN + tl.arange(0, NSUB)
    dwp_tile = tl.where(tl.arange(0, NSUB)[None, :] == 0, dwp[:, None], 0.0)
    tl.store(dwp_ptr + rows.to(tl.int64)[:, None] * DWP_COLS + sub[None, :], dwp_tile,
             mask=(rows < end)[:, None] & (sub < DWP_COLS)[None, :])
    tl.store(aw_ptr + row0 * F + loc1, (act * wv[:, None]).to(aw_ptr.dtype.element_ty), mask=mask)
    da = acc * wv[:, None]
    if SAVE == 2:
        s_f = tl.load(st_ptr + row0 * (2 * F) + loc2, mask=mask, other=0.0).to(tl.float32)
    tl.store(dgu_ptr + row0 * (2 * F) + F + loc2, (da * s_f).to(dgu_ptr.dtype.element_ty), mask=mask)
    if SAVE == 2:
        t_f = tl.load(st_ptr + row0 * (2 * F) + F + loc2, mask=mask, other=0.0).to(tl.float32)
    tl.store(dgu_ptr + row0 * (2 * F) + loc2, (da * t_f).to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_bwd(dy_ptr, w2_desc, a_ptr, st_ptr, perm_ptr, counts_ptr, w_ptr, dgu_ptr, aw_ptr, dwp_ptr,
              D, F, K_TOP, E, TPE, DWP_COLS,
              E_P2: tl.constexpr, PREC: tl.constexpr, DWP_GRAN: tl.constexpr,
              SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              NSPLIT: tl.constexpr):
    """dA'_s = dy[tok(s)] @ W2_e (unweighted grad of a), then the whole SwiGLU backward in registers.

    dw_s = <dA'_s, a_s> (partial over this column block), da = w_s dA', dg = da u silu'(g),
    du = da silu(g), aw = w_s a (the left operand of dW2), from what the forward saved (SAVE).
    The BLOCK_N columns are NSPLIT (2 or 4) accumulators of BLOCK_N / NSPLIT columns, so the
    register-hungry epilogue runs on part of the tile at a time (a whole-tile one spilled heavily).
    w2_desc: TMA descriptor of W2 as [E*D, F], box [BLOCK_K, BLOCK_N / NSPLIT] (a K box past D
    meets dy's masked zeros; columns past F load as zeros).
    """
    SUB_N: tl.constexpr = BLOCK_N // NSPLIT
    tl.static_assert(SUB_N % DWP_GRAN == 0)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e, start, end = _expert_rows(pid_m, counts_ptr, E, E_P2, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, end - 1)
    slot = tl.load(perm_ptr + rows_c).to(tl.int64)
    tok = slot // K_TOP
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * D + offs_k[None, :]
    wrow = e * D
    acc0 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    if NSPLIT == 4:
        acc2 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        av = tl.load(a_ptrs, mask=(offs_k < D - k * BLOCK_K)[None, :], other=0.0)
        kr = wrow + k * BLOCK_K
        acc0 = _dot(av, w2_desc.load([kr, n0]), acc0, PREC)
        acc1 = _dot(av, w2_desc.load([kr, n0 + SUB_N]), acc1, PREC)
        if NSPLIT == 4:
            acc2 = _dot(av, w2_desc.load([kr, n0 + 2 * SUB_N]), acc2, PREC)
            acc3 = _dot(av, w2_desc.load([kr, n0 + 3 * SUB_N]), acc3, PREC)
        a_ptrs += BLOCK_K
    wv = tl.load(w_ptr + slot).to(tl.float32)
    _swiglu_bwd_tile(acc0, rows, end, start, n0, wv, a_ptr, st_ptr, dgu_ptr, aw_ptr, dwp_ptr, F, DWP_COLS,
                     BLOCK_M, SUB_N, DWP_GRAN, SAVE)
    _swiglu_bwd_tile(acc1, rows, end, start, n0 + SUB_N, wv, a_ptr, st_ptr, dgu_ptr, aw_ptr, dwp_ptr, F, DWP_COLS,
                     BLOCK_M, SUB_N, DWP_GRAN, SAVE)
    if NSPLIT == 4:
        _swiglu_bwd_tile(acc2, rows, end, start, n0 + 2 * SUB_N, wv, a_ptr, st_ptr, dgu_ptr, aw_ptr, dwp_ptr, F,
                         DWP_COLS, BLOCK_M, SUB_N, DWP_GRAN, SAVE)
        _swiglu_bwd_tile(acc3, rows, end, start, n0 + 3 * SUB_N, wv, a_ptr, st_ptr, dgu_ptr, aw_ptr, dwp_ptr, F,
                         DWP_COLS, BLOCK_M, SUB_N, DWP_GRAN, SAVE)


@triton.jit
def _wgrad(a_ptr, a_desc, b_ptr, b_desc, out_ptr, perm_ptr, counts_ptr,
           N1, N2, lda, ldb, ldo_e, ldo_1, K_TOP, E, TPE,
           E_P2: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, PREC: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = A_e^T @ B_e, [N1, N2], summed over the sorted slots of expert e.

    A sorted [S, *] operand is read through its TMA descriptor (box [BLOCK_K, BLOCK_M or
    BLOCK_N]); a token-indexed one (A_GATHER / B_GATHER) is gathered through perm by pointer. The
    main loop runs over the expert's full BLOCK_K row blocks with no masks; one masked block takes
    the tail. An empty expert stores zeros.
    """
    pid = tl.program_id(0)
    t1 = tl.cdiv(N1, BLOCK_M)
    t2 = tl.cdiv(N2, BLOCK_N)
    e = pid // (t1 * t2)
    rem = pid % (t1 * t2)
    n1 = (rem // t2) * BLOCK_M
    n2 = (rem % t2) * BLOCK_N
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    start = tl.sum(tl.where(offs_e < e, cnt, 0), 0)
    end = start + tl.sum(tl.where(offs_e == e, cnt, 0), 0)
    offs_1 = n1 + tl.arange(0, BLOCK_M)
    offs_2 = n2 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, (end - start) // BLOCK_K):
        r0 = start + i * BLOCK_K
        if A_GATHER:
            arow = (tl.load(perm_ptr + r0 + offs_r) // K_TOP).to(tl.int64)
            av = tl.load(a_ptr + arow[None, :] * lda + offs_1[:, None])  # [BM, BK] = A^T
        else:
            av = a_desc.load([r0, n1]).T
        if B_GATHER:
            brow = (tl.load(perm_ptr + r0 + offs_r) // K_TOP).to(tl.int64)
            bv = tl.load(b_ptr + brow[:, None] * ldb + offs_2[None, :])
        else:
            bv = b_desc.load([r0, n2])
        acc = _dot(av, bv, acc, PREC)
    r0 = end - (end - start) % BLOCK_K
    if r0 < end:
        rows = r0 + offs_r
        rmask = rows < end
        grow = (tl.load(perm_ptr + rows, mask=rmask, other=0) // K_TOP).to(tl.int64)
        arow = grow if A_GATHER else rows.to(tl.int64)
        brow = grow if B_GATHER else rows.to(tl.int64)
        av = tl.load(a_ptr + arow[None, :] * lda + offs_1[:, None], mask=rmask[None, :] & (offs_1 < N1)[:, None],
                     other=0.0)
        bv = tl.load(b_ptr + brow[:, None] * ldb + offs_2[None, :], mask=rmask[:, None] & (offs_2 < N2)[None, :],
                     other=0.0)
        acc = _dot(av, bv, acc, PREC)
    mask = (offs_1 < N1)[:, None] & (offs_2 < N2)[None, :]
    out = out_ptr + e.to(tl.int64) * ldo_e + offs_1[:, None] * ldo_1 + offs_2[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_slots(src_ptr, out_ptr, T, D, K_TOP, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_k src[t*K + k] (fp32 accumulate): the combine of forward outputs / dx slots."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    src = src_ptr + (rows.to(tl.int64) * K_TOP)[:, None] * D + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in range(0, K_TOP):
        acc += tl.load(src, mask=mask, other=0.0).to(tl.float32)
        src += D
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_slots(src_SD, T, K):
    """[T*K, D] in slot order -> [T, D], summing each token's K slots."""
    D = src_SD.shape[1]
    out = src_SD.new_empty(T, D)
    bt, bd = (4, 16) if INTERPRET else (4, 512)
    _sum_slots[(triton.cdiv(T, bt), triton.cdiv(D, bd))](src_SD, out, T, D, K, BLOCK_T=bt, BLOCK_D=bd,
                                                          **({} if INTERPRET else dict(num_warps=4)))
    return out


@triton.jit
def _swiglu_bwd_rows(dap_ptr, a_ptr, st_ptr, perm_ptr, w_ptr, dgu_ptr, aw_ptr, dw_ptr, S, F,
                     SAVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """SwiGLU backward of sorted rows from dA' = dy_tok @ W2_e (a separate GEMM, rowtile):
    dw[slot] = <dA', a> (whole rows: exact, no partials), da = w dA', dg = da t, du = da s,
    aw = w a, with s = silu(g), t = u silu'(g) recomputed from g|u (SAVE 1) or loaded (SAVE 2)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < S
    r64 = rows.to(tl.int64)
    slot = tl.load(perm_ptr + rows, mask=rm, other=0).to(tl.int64)
    wv = tl.load(w_ptr + slot, mask=rm, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        m = rm[:, None] & (cols < F)[None, :]
        o1 = r64[:, None] * F + cols[None, :]
        o2 = r64[:, None] * (2 * F) + cols[None, :]
        dap = tl.load(dap_ptr + o1, mask=m, other=0.0).to(tl.float32)
        if SAVE == 1:
            g = tl.load(st_ptr + o2, mask=m, other=0.0).to(tl.float32)
            u = tl.load(st_ptr + o2 + F, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            s_f = g * sig
            act = s_f * u
            t_f = sig * (u - act) + act
        else:
            act = tl.load(a_ptr + o1, mask=m, other=0.0).to(tl.float32)
            s_f = tl.load(st_ptr + o2, mask=m, other=0.0).to(tl.float32)
            t_f = tl.load(st_ptr + o2 + F, mask=m, other=0.0).to(tl.float32)
        dw += tl.sum(dap * act, 1)
        da = dap * wv[:, None]
        tl.store(dgu_ptr + o2, (da * t_f).to(dgu_ptr.dtype.element_ty), mask=m)
        tl.store(dgu_ptr + o2 + F, (da * s_f).to(dgu_ptr.dtype.element_ty), mask=m)
        tl.store(aw_ptr + o1, (act * wv[:, None]).to(aw_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + slot, dw, mask=rm)


# (rows, columns, warps) per program of the elementwise SwiGLU backward; GPU check sweeps others.
SWIGLU_BWD_BLOCKS = (8, 256, 4)


def swiglu_bwd_rows(dap_SF, a_SF, st_S2F, perm_S, w_S, dgu_S2F, aw_SF, dw_S, save, blocks=None):
    """Elementwise SwiGLU backward of the split down-projection backward (see _swiglu_bwd_rows)."""
    S, F_ = dap_SF.shape
    if S == 0:
        return None
    br, bf, nw = (4, 16, 1) if INTERPRET else (blocks or SWIGLU_BWD_BLOCKS)
    return _swiglu_bwd_rows[(triton.cdiv(S, br),)](dap_SF, a_SF if save == 2 else st_S2F, st_S2F, perm_S, w_S,
                                                    dgu_S2F, aw_SF, dw_S, S, F_, SAVE=save, BLOCK_R=br, BLOCK_F=bf,
                                                    **({} if INTERPRET else dict(num_warps=nw)))


# ---------------------------------------------------------------------------------------------
# Hopper configs (bf16 operands, fp32 accumulate; num_warps a multiple of 4 and BLOCK_M >= 64 so
# Triton emits wgmma). Autotuned per (shape, tokens-per-expert bucket); the lists stay short
# because every config costs a compile on a fresh machine. A pre-hook gives the TMA descriptors
# the box shapes of the config being run.

def _set_boxes(name):
    def hook(nargs, **_):
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        if name == "gateup_fwd":
            nargs["w_desc"].block_shape = [bn, bk]
        elif name == "rowtile":
            nargs["a_desc"].block_shape = [bm, bk]
            nargs["b_desc"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]
        elif name == "down_bwd":
            nargs["w2_desc"].block_shape = [bk, bn // nargs["NSPLIT"]]
        else:  # wgrad
            nargs["a_desc"].block_shape = [bk, bm]
            nargs["b_desc"].block_shape = [bk, bn]
    return hook


def _cfgs(name, *specs, **extra):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, **extra, **({"PERSIST": p} if p >= 0 else {})),
                          num_warps=w, num_stages=s, pre_hook=_set_boxes(name))
            for m, n, k, w, s, p in specs]


# From the H100 sweeps at the 16B shape (docs/kernels.md): the largest tiles that fit the register
# file (128x256 outputs, or 128x2x128) win; PERSIST=1 runs one program per SM over the tiles.
GATEUP_CFGS = _cfgs("gateup_fwd", (128, 128, 64, 8, 4, 0), (128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 1))
ROWTILE_CFGS = _cfgs("rowtile", (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 1), (128, 256, 64, 8, 4, 0))
# down_bwd: BLOCK_N / NSPLIT must be a multiple of DWP_GRAN (NSPLIT accumulators of that width).
# (128x256 with NSPLIT=2 is the best for save mode 2; with g|u saved it spills and loses.)
DOWN_BWD_CFGS = (_cfgs("down_bwd", (128, 128, 64, 8, 4, -1), (128, 256, 64, 8, 4, -1), NSPLIT=2)
                 + _cfgs("down_bwd", (128, 256, 32, 8, 6, -1), (128, 256, 64, 8, 3, -1), NSPLIT=4))
# wgrad with a gathered operand: num_stages 5 (its row-index load takes pipeline stages from the
# data loads); with both operands sorted (through TMA) 5 stages do not fit shared memory, 4 win.
WGRAD_CFGS = _cfgs("wgrad", (128, 256, 64, 8, 5, -1), (128, 256, 32, 8, 8, -1))
WGRAD_SORTED_CFGS = _cfgs("wgrad", (128, 256, 64, 8, 4, -1), (128, 256, 64, 8, 3, -1), (128, 256, 32, 8, 6, -1))
CONFIGS = {"gateup_fwd": GATEUP_CFGS, "down_fwd": ROWTILE_CFGS, "gateup_dx": ROWTILE_CFGS,
           "down_bwd": DOWN_BWD_CFGS, "wgrad": WGRAD_CFGS, "wgrad_sorted": WGRAD_SORTED_CFGS}


def _tuned(fn, cfgs, key):
    return fn if INTERPRET else triton.autotune(cfgs, key=key)(fn)


_TUNED = {
    "gateup_fwd": _tuned(_gateup_fwd, GATEUP_CFGS, ["D", "F", "TPE", "SAVE"]),
    "rowtile": _tuned(_rowtile_gemm, ROWTILE_CFGS, ["N", "KD", "TPE", "A_GATHER", "SCALE_W", "OUT_SORTED"]),
    "down_bwd": _tuned(_down_bwd, DOWN_BWD_CFGS, ["D", "F", "TPE", "SAVE"]),
    "wgrad": _tuned(_wgrad, WGRAD_CFGS, ["N1", "N2", "TPE", "A_GATHER", "B_GATHER"]),
    "wgrad_sorted": _tuned(_wgrad, WGRAD_SORTED_CFGS, ["N1", "N2", "TPE"]),
}
_RAW = {"gateup_fwd": _gateup_fwd, "rowtile": _rowtile_gemm, "down_bwd": _down_bwd, "wgrad": _wgrad,
        "wgrad_sorted": _wgrad}
# Meta-parameters a config may leave out (older sweep configs, the fp32 and interpreter paths).
_META_DEFAULTS = {"gateup_fwd": {"PERSIST": 0}, "rowtile": {"PERSIST": 0}, "down_bwd": {}, "wgrad": {},
                  "wgrad_sorted": {}}


# fp32 is the exactness path (tests, references), not a speed path: one config that fits in
# shared memory at 4 bytes an element, no tuning.
FP32_CFG = triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_warps=4, num_stages=2)
FP32_DOWN_BWD_CFG = triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, NSPLIT=2), num_warps=4, num_stages=2)
# {kernel name: Config} to bypass autotuning (the GPU check uses it to test every config).
FORCE_CONFIG: dict = {}
# Column granularity of the partial routing-weight grads of down_bwd (the smallest BLOCK_N used).
DWP_GRAN = 16 if INTERPRET else 64
# Programs of a persistent launch: one per SM (the interpreter uses 3, so programs loop).
_N_PROGS: dict = {}


def _n_progs(device) -> int:
    if INTERPRET:
        return 3
    if device not in _N_PROGS:
        import torch

        _N_PROGS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _N_PROGS[device]


def dwp_cols(F_: int) -> int:
    return triton.cdiv(F_, DWP_GRAN)


def _desc(t):
    """TMA descriptor of a 2-D view (its box shape is set per config by the pre-hook)."""
    return TensorDescriptor.from_tensor(t, [16, 16])


def _launch(name, grid_fn, args, kwargs, config=None):
    """Run kernel `name`: with `config` (a triton.Config, for sweeps), autotuned, or interpreted."""
    if config is None and not INTERPRET and kwargs["PREC"] == "ieee":  # fp32 operands
        config = FP32_DOWN_BWD_CFG if name == "down_bwd" else FP32_CFG
    config = config or FORCE_CONFIG.get(name)
    if name == "down_bwd":
        kwargs = dict(kwargs, DWP_GRAN=DWP_GRAN)
    if config is not None or INTERPRET:
        if config is not None:
            meta, opts = dict(config.kwargs), dict(num_warps=config.num_warps, num_stages=config.num_stages)
        else:  # the interpreter: small fixed tiles, persistent where the kernel can be
            meta, opts = dict(_INTERP_CFG, PERSIST=1), {}
            if name == "down_bwd":
                meta = dict(_INTERP_CFG, BLOCK_N=2 * DWP_GRAN, NSPLIT=2)
        meta = {**_META_DEFAULTS[name], **meta}
        if name in ("down_bwd", "wgrad", "wgrad_sorted"):
            meta.pop("PERSIST", None)
        _set_boxes(name)({**kwargs, **meta})
        return _RAW[name][grid_fn(meta)](*args, **kwargs, **meta, **opts)
    return _TUNED[name][grid_fn](*args, **kwargs)


def _row_grid(S, E, n_cols, device):
    def grid(m):
        n = (triton.cdiv(S, m["BLOCK_M"]) + E) * triton.cdiv(n_cols, m["BLOCK_N"])
        return (min(n, _n_progs(device)) if m.get("PERSIST") else n,)
    return grid


def _common(E, tpe, dtype_is_fp32):
    return dict(E_P2=triton.next_power_of_2(E), PREC="ieee" if dtype_is_fp32 else "tf32")


def gateup_fwd(x_TD, w13_E2FD, perm_S, counts_E, K, tpe, a_SF, st_S2F, save=0, config=None):
    """a_SF[s] = silu(g) * u with [g|u] = x[tok(s)] @ W13_e^T; st_S2F gets g|u (save=1) or s|t (2)."""
    E, twoF, D = w13_E2FD.shape
    F_ = twoF // 2
    S = perm_S.shape[0]
    if S == 0:
        return None
    kw = dict(w_desc=_desc(w13_E2FD.view(E * twoF, D)), SAVE=save, **_common(E, tpe, x_TD.dtype.itemsize == 4))
    args = (x_TD,)
    rest = (perm_S, counts_E, st_S2F if save else a_SF, a_SF, D, F_, K, E, tpe)
    return _launch("gateup_fwd", _row_grid(S, E, F_, x_TD.device), args, dict(kw, **_named(_gateup_fwd, 2, rest)),
                   config)


def rowtile(a, b_EXX, out_SN, perm_S, counts_E, w_S, K, tpe, *, n, kd, a_gather, b_kmajor, out_sorted=False,
            config=None):
    """out_SN[slot(s)] (or out_SN[s] when out_sorted) = (w_s *) A_s @ B_e  (see _rowtile_gemm)."""
    E = b_EXX.shape[0]
    S = perm_S.shape[0]
    if S == 0:
        return None
    b2 = b_EXX.view(E * b_EXX.shape[1], b_EXX.shape[2])
    kw = dict(a_desc=_desc(a), a_ptr=a, b_desc=_desc(b2), A_GATHER=a_gather, B_KMAJOR=b_kmajor,
              SCALE_W=w_S is not None, OUT_SORTED=out_sorted, **_common(E, tpe, a.dtype.itemsize == 4))
    rest = (out_SN, perm_S, counts_E, w_S if w_S is not None else a, n, kd, a.stride(0), E, tpe, K)
    return _launch("rowtile", _row_grid(S, E, n, a.device), (), dict(kw, **_named(_rowtile_gemm, 3, rest)), config)


def down_bwd(dy_TD, w2_EDF, a_SF, st_S2F, perm_S, counts_E, w_S, K, tpe, dgu_S2F, aw_SF, dwp_SC, save,
             config=None):
    """dSwiGLU, aw = w * a and per-column-block partial routing-weight grads (see _down_bwd);
    st_S2F holds g|u (save=1, a_SF unused) or s|t (save=2)."""
    E, D, F_ = w2_EDF.shape
    S = perm_S.shape[0]
    if S == 0:
        return None
    kw = dict(w2_desc=_desc(w2_EDF.view(E * D, F_)), SAVE=save, **_common(E, tpe, dy_TD.dtype.itemsize == 4))
    rest = (a_SF if save == 2 else st_S2F, st_S2F, perm_S, counts_E, w_S, dgu_S2F, aw_SF, dwp_SC,
            D, F_, K, E, tpe, dwp_SC.shape[1])
    return _launch("down_bwd", _row_grid(S, E, F_, dy_TD.device), (dy_TD,), dict(kw, **_named(_down_bwd, 2, rest)),
                   config)


def wgrad(a, b, out_EN1N2, perm_S, counts_E, K, tpe, *, a_gather, b_gather=None, config=None):
    """out[e] = A_e^T @ B_e over expert e's slots; a_gather / b_gather: that operand is token-indexed
    (gathered through perm), else sorted [S, *]. b_gather defaults to `not a_gather`."""
    b_gather = (not a_gather) if b_gather is None else b_gather
    E, N1, N2 = out_EN1N2.shape
    if perm_S.shape[0] == 0:  # no slots: every expert is empty (a TMA box needs a non-empty tensor)
        return out_EN1N2.zero_()
    kw = dict(a_ptr=a, a_desc=_desc(a), b_ptr=b, b_desc=_desc(b), A_GATHER=a_gather, B_GATHER=b_gather,
              **_common(E, tpe, a.dtype.itemsize == 4))
    assert out_EN1N2.stride(2) == 1, "wgrad writes rows of the output: its last dim must be contiguous"
    rest = (out_EN1N2, perm_S, counts_E, N1, N2, a.stride(0), b.stride(0), out_EN1N2.stride(0), out_EN1N2.stride(1),
            K, E, tpe)
    grid = lambda m: (E * triton.cdiv(N1, m["BLOCK_M"]) * triton.cdiv(N2, m["BLOCK_N"]),)
    name = "wgrad" if a_gather or b_gather else "wgrad_sorted"
    return _launch(name, grid, (), dict(kw, **_named(_wgrad, 4, rest)), config)


def _named(kernel, first, values):
    """{parameter name: value} for the kernel's parameters from position `first` on."""
    return dict(zip(kernel.arg_names[first:first + len(values)], values))
