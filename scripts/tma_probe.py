"""Probe: do Hopper TMA loads and persistent tile loops speed up the MoE GEMMs? (docs/kernels.md v4-v6)

The experiment record behind the triton backend's v4-v6, rerunnable. `--part tma` times, at the
16B layer shape (16K tokens, balanced), the package's kernels ("current", autotuned) against
variants written here that load the weight operand (and the sorted operand where there is one)
through tensor descriptors, one tile per program or persistent (flattened or not), plus a dense
Triton TMA GEMM of the same size against cuBLAS as the ceiling; when it was first run "current"
was the pointer-load v3. `--part wgrad` compares the weight-gradient operand modes (gathered rows
vs a sorted copy; the old-vs-new kernel A/B, which needed an unshipped copy of older kernels, was
removed). `--part occupancy` times the fused
down_bwd and dW2 under configs that let two CTAs share an SM. Every variant is checked against
the package kernel's output.

    PYTHONUNBUFFERED=1 python3 scripts/tma_probe.py --part tma --out $OUT     # GPU
    TRITON_INTERPRET=1 python scripts/tma_probe.py --dry-run --part wgrad     # CPU: logic only, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from deepseekmoe.kernels import moe_kernels as mk  # noqa: E402
from deepseekmoe.kernels import moe_triton as mt  # noqa: E402
from deepseekmoe.model.moe.dispatch import dispatch  # noqa: E402

DRY = "--dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"


@triton.jit
def _rowtile_tma(a_desc, a_ptr, b_desc, out_ptr, perm_ptr, counts_ptr, w_ptr,
                 N, KD, lda, E, K_TOP, B_ROWS,
                 E_P2: tl.constexpr, A_TMA: tl.constexpr, A_GATHER: tl.constexpr, B_KMAJOR: tl.constexpr,
                 SCALE_W: tl.constexpr,
                 NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[slot(s)] = (w_s *) A_s @ B_e; B (and A when A_TMA) through TMA descriptors.

    A_TMA: A is the sorted [S, KD] tensor (rows past the expert's end are computed, never stored);
    else A rows are loaded by pointer: gathered by token through perm (A_GATHER) or sorted. B_KMAJOR: b_desc is the
    stacked weight [E*N, KD] (rows e*N + n), else [E*KD, N] (rows e*KD + k). Persistent over the
    real tiles (counted from counts_E) with NUM_PROGS programs.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    total = mk._n_row_tiles(counts_ptr, E, E_P2, BLOCK_M) * n_tiles  # the package's tile mapping
    k_tiles = tl.cdiv(KD, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, total, NUM_PROGS, flatten=FLATTEN):
        e, start, end = mk._expert_rows(tile // n_tiles, counts_ptr, E, E_P2, BLOCK_M)
        pid_n = tile % n_tiles
        rows = start + tl.arange(0, BLOCK_M)
        slot = tl.load(perm_ptr + tl.minimum(rows, end - 1)).to(tl.int64)
        n0 = pid_n * BLOCK_N
        if A_GATHER:
            a_ptrs = a_ptr + (slot // K_TOP)[:, None] * lda + offs_k[None, :]
        else:
            a_ptrs = a_ptr + tl.minimum(rows, end - 1).to(tl.int64)[:, None] * lda + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            if A_TMA:
                av = a_desc.load([start, k * BLOCK_K])
            else:
                av = tl.load(a_ptrs, mask=(offs_k < KD - k * BLOCK_K)[None, :], other=0.0)
                a_ptrs += BLOCK_K
            if B_KMAJOR:
                bv = b_desc.load([e * B_ROWS + n0, k * BLOCK_K]).T
            else:
                bv = b_desc.load([e * B_ROWS + k * BLOCK_K, n0])
            acc = tl.dot(av, bv, acc)
        if SCALE_W:
            acc = acc * tl.load(w_ptr + slot).to(tl.float32)[:, None]
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptr + slot[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gateup_tma(x_ptr, w_desc, perm_ptr, counts_ptr, st_ptr, a_ptr,
                D, F, K_TOP, E,
                E_P2: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gateup_fwd (save g|u) with W13 [E*2F, D] through a TMA descriptor, x rows gathered."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BLOCK_N)
    total = mk._n_row_tiles(counts_ptr, E, E_P2, BLOCK_M) * n_tiles  # the package's tile mapping
    k_tiles = tl.cdiv(D, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, total, NUM_PROGS, flatten=FLATTEN):
        e, start, end = mk._expert_rows(tile // n_tiles, counts_ptr, E, E_P2, BLOCK_M)
        pid_n = tile % n_tiles
        rows = start + tl.arange(0, BLOCK_M)
        tok = (tl.load(perm_ptr + tl.minimum(rows, end - 1)) // K_TOP).to(tl.int64)
        n0 = pid_n * BLOCK_N
        a_ptrs = x_ptr + tok[:, None] * D + offs_k[None, :]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            xa = tl.load(a_ptrs, mask=(offs_k < D - k * BLOCK_K)[None, :], other=0.0)
            bg = w_desc.load([e * 2 * F + n0, k * BLOCK_K]).T
            bu = w_desc.load([e * 2 * F + F + n0, k * BLOCK_K]).T
            acc_g = tl.dot(xa, bg, acc_g)
            acc_u = tl.dot(xa, bu, acc_u)
            a_ptrs += BLOCK_K
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        offs_n = n0 + tl.arange(0, BLOCK_N)
        r64 = rows.to(tl.int64)
        mask = (rows < end)[:, None] & (offs_n < F)[None, :]
        tl.store(a_ptr + r64[:, None] * F + offs_n[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)
        st = st_ptr + r64[:, None] * (2 * F) + offs_n[None, :]
        tl.store(st, acc_g.to(st_ptr.dtype.element_ty), mask=mask)
        tl.store(st + F, acc_u.to(st_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_tma(a_ptr, b_desc, out_ptr, perm_ptr, counts_ptr,
               N1, N2, lda, K_TOP, E,
               E_P2: tl.constexpr, NUM_PROGS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = A_tok^T @ B_e: A token-indexed (gathered, rows past the end masked to zero),
    B the sorted [S, N2] operand through TMA (rows past the end meet zeros of A). Persistent."""
    pid = tl.program_id(0)
    offs_e = tl.arange(0, E_P2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    t1 = tl.cdiv(N1, BLOCK_M)
    t2 = tl.cdiv(N2, BLOCK_N)
    offs_1 = tl.arange(0, BLOCK_M)
    for tile in tl.range(pid, E * t1 * t2, NUM_PROGS):
        e = tile // (t1 * t2)
        rem = tile % (t1 * t2)
        o1 = (rem // t2) * BLOCK_M + offs_1
        n0 = (rem % t2) * BLOCK_N
        start = tl.sum(tl.where(offs_e < e, cnt, 0), 0)
        end = start + tl.sum(tl.where(offs_e == e, cnt, 0), 0)
        m1 = (o1 < N1)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            rmask = rows < end
            arow = (tl.load(perm_ptr + tl.minimum(rows, end - 1)) // K_TOP).to(tl.int64)
            av = tl.load(a_ptr + arow[None, :] * lda + o1[:, None], mask=m1 & rmask[None, :], other=0.0)
            bv = b_desc.load([r0, n0])
            acc = tl.dot(av, bv, acc)
        offs_2 = n0 + tl.arange(0, BLOCK_N)
        mask = (o1 < N1)[:, None] & (offs_2 < N2)[None, :]
        out = out_ptr + e.to(tl.int64) * N1 * N2 + o1[:, None] * N2 + offs_2[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_tma(a_desc, b_desc, c_desc, M, N, K, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B^T (B given as [N, K]), persistent with grouped tile order: the Triton ceiling."""
    pid = tl.program_id(0)
    tm = tl.cdiv(M, BLOCK_M)
    tn = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(pid, tm * tn, NUM_PROGS, flatten=FLATTEN):
        group = tile // (GROUP_M * tn)
        first = group * GROUP_M
        gsz = tl.minimum(tm - first, GROUP_M)
        pm = first + (tile % (GROUP_M * tn)) % gsz
        pn = (tile % (GROUP_M * tn)) // gsz
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.cdiv(K, BLOCK_K)):
            acc = tl.dot(a_desc.load([pm * BLOCK_M, k * BLOCK_K]), b_desc.load([pn * BLOCK_N, k * BLOCK_K]).T, acc)
        c_desc.store([pm * BLOCK_M, pn * BLOCK_N], acc.to(tl.bfloat16))


def bench(fn, rep=100):
    if DRY:
        fn()
        return 1.0
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def wgrad_part(ctx, record):
    """dW2 / dW13 variants: current kernel, mask-free main loop (gathered or from a sorted copy),
    the cost of that copy."""
    K, dt, perm, counts, tpe, x, dy, a, dgu, w2, w13 = (ctx[k] for k in (
        "K", "dt", "perm", "counts", "tpe", "x", "dy", "a", "dgu", "w2", "w13"))
    bm, bn, bk = (16, 16, 16) if DRY else (128, 256, 64)
    tok_S = perm.long() // K
    x_perm, dy_perm = x[tok_S], dy[tok_S]
    record("permute_copy", "x[tok_sorted] (one [S, D] gather)", 0, lambda: torch.index_select(x, 0, tok_S), None, None)
    for name, units, A, Bm, ag, out_shape in (
            ("wgrad_w2", 1, dy, a, True, w2.shape), ("wgrad_w13", 2, dgu, x, False, w13.shape)):
        ref = torch.empty(out_shape, device=DEV, dtype=dt)
        record(name, "current(autotuned)", units, lambda A=A, Bm=Bm, ref=ref, ag=ag: mk.wgrad(
            A, Bm, ref, perm, counts, K, tpe, a_gather=ag), ref, None)
        o = torch.empty_like(ref)
        sorted_A = dy_perm if ag else A
        sorted_B = Bm if ag else x_perm
        for label, aa, bb, ga, gb in (("split, gathered", A, Bm, ag, not ag),
                                      ("split, sorted copy", sorted_A, sorted_B, False, False)):
            # the mask-free main loop + masked tail, as it landed in deepseekmoe.kernels (v4)
            for stages in ((3,) if DRY else (4, 5)):
                cfg = None if DRY else triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=8,
                                                     num_stages=stages)
                record(name, f"{label} s{stages}", units, lambda aa=aa, bb=bb, ga=ga, gb=gb, o=o, cfg=cfg: mk.wgrad(
                    aa, bb, o, perm, counts, K, tpe, a_gather=ga, b_gather=gb, config=cfg), o, ref)


def occupancy_part(ctx, record):
    """down_bwd (g|u saved) and dW2 under configs that let two CTAs share an SM (fewer stages,
    register caps), so one CTA's epilogue can overlap the other's main loop."""
    K, E, D, F, dt, perm, counts, tpe, dy, a, dgu, w2, w_S, S = (ctx[k] for k in (
        "K", "E", "D", "F", "dt", "perm", "counts", "tpe", "dy", "a", "dgu", "w2", "w_S", "S"))
    C = triton.Config
    gu = torch.randn_like(dgu)
    dgu_o, aw_o = torch.empty_like(dgu), torch.empty_like(a)
    dwp = torch.zeros(S, mk.dwp_cols(F), device=DEV)
    specs = [(128, 128, 64, 8, 4, 2, None), (128, 128, 64, 8, 2, 2, 128), (128, 128, 64, 8, 3, 2, 128),
             (128, 128, 32, 8, 4, 2, 128), (128, 128, 32, 8, 3, 2, None), (64, 128, 64, 4, 3, 2, None),
             (64, 128, 64, 4, 4, 2, None), (64, 256, 64, 8, 3, 4, None), (128, 256, 64, 8, 3, 4, None),
             (128, 128, 64, 4, 3, 2, None)]
    if DRY:
        specs = [(16, 32, 16, 4, 1, 2, None)]
    for bm, bn, bk, w, st, ns, mr in specs:
        cfg = C(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NSPLIT=ns), num_warps=w, num_stages=st,
                **({} if mr is None else dict(maxnreg=mr)))
        record("down_bwd_s1", f"{bm}x{bn}x{bk} w{w} s{st} nsplit{ns} maxnreg{mr}", 1,
               lambda cfg=cfg: mk.down_bwd(dy, w2, a, gu, perm, counts, w_S, K, tpe, dgu_o, aw_o, dwp, 1,
                                           config=None if DRY else cfg), None, None)
    dw2 = torch.empty_like(w2)
    wspecs = [(128, 256, 64, 8, 5, None), (128, 128, 64, 8, 4, 128), (128, 128, 64, 8, 3, 128),
              (128, 128, 64, 4, 4, None), (256, 128, 64, 8, 4, None), (128, 256, 64, 8, 4, None)]
    if DRY:
        wspecs = [(16, 16, 16, 4, 1, None)]
    for bm, bn, bk, w, st, mr in wspecs:
        cfg = C(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st,
                **({} if mr is None else dict(maxnreg=mr)))
        record("wgrad_w2", f"{bm}x{bn}x{bk} w{w} s{st} maxnreg{mr}", 1,
               lambda cfg=cfg: mk.wgrad(dy, a, dw2, perm, counts, K, tpe, a_gather=True, config=None if DRY else cfg),
               None, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--part", default="tma", choices=["tma", "wgrad", "occupancy"],
                    help="tma: the v4 probe; wgrad: wgrad operand variants; occupancy: down_bwd/dW2 configs")
    args = ap.parse_args()
    if not DRY:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    T, K, E, D, F = (64, 4, 8, 64, 32) if DRY else (16384, 6, 64, 2048, 1408)
    dt = torch.float32 if DRY else torch.bfloat16
    gen = torch.Generator(device=DEV).manual_seed(0)
    idx = torch.rand(T, E, device=DEV, generator=gen).topk(K, dim=1).indices
    w_S = (torch.rand(T * K, device=DEV, generator=gen) + 0.05).to(dt)
    x = torch.randn(T, D, device=DEV, generator=gen).to(dt)
    dy = torch.randn(T, D, device=DEV, generator=gen).to(dt)
    w13 = (torch.randn(E, 2 * F, D, device=DEV, generator=gen) / D ** 0.5).to(dt)
    w2 = (torch.randn(E, D, F, device=DEV, generator=gen) / F ** 0.5).to(dt)
    S = T * K
    d = dispatch(idx, E, index_dtype=torch.int32)
    perm, counts = d.perm_S, d.counts_E
    tpe = mt.tpe_bucket(S, E)
    a = torch.randn(S, F, device=DEV, generator=gen).to(dt)
    dgu = torch.randn(S, 2 * F, device=DEV, generator=gen).to(dt)
    unit = 2 * S * D * F / 1e9
    nsm = 8 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def record(stage, variant, units, fn, out, ref):
        try:
            t0 = time.time()
            fn()
            if not DRY:
                torch.cuda.synchronize()
            comp = time.time() - t0
            err = rel(out, ref) if ref is not None else 0.0
            ms = bench(fn)
            r = dict(stage=stage, variant=variant, ms=ms, tflops=units * unit / ms if units else 0.0,
                     rel_vs_current=err,
                     first_call_s=comp)
        except Exception as e:  # keep going: a variant that does not compile is a result too
            r = dict(stage=stage, variant=variant, error=repr(e)[:400])
        rows.append(r)
        print(json.dumps(r), flush=True)

    if args.part in ("wgrad", "occupancy"):
        part = wgrad_part if args.part == "wgrad" else occupancy_part
        part(dict(T=T, K=K, E=E, D=D, F=F, dt=dt, perm=perm, counts=counts, tpe=tpe, x=x, dy=dy, a=a, dgu=dgu,
                        w2=w2, w13=w13, w_S=w_S, S=S), record)
        return finish(rows, args)
    E_P2 = triton.next_power_of_2(E)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if DRY else dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    kw = {} if DRY else dict(num_warps=8)

    # --- down_fwd: y[slot] = w * a @ W2^T  (A sorted, B K-major) ---
    y_ref = torch.empty(S, D, device=DEV, dtype=dt)
    record("down_fwd", "current(autotuned)", 1, lambda: mk.rowtile(a, w2, y_ref, perm, counts, w_S, K, tpe, n=D, kd=F,
                                                                  a_gather=False, b_kmajor=True), y_ref, None)
    y = torch.empty_like(y_ref)
    for a_tma in (False, True):
        for stages in ((3,) if DRY else (3, 4)):
            for pers, flat in ((False, False), (True, False), (True, True)):
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
                b_desc = TensorDescriptor.from_tensor(w2.view(E * D, F), [bn, bk])
                grid = nsm if pers else (triton.cdiv(S, bm) + E) * triton.cdiv(D, bn)

                def run(a_desc=a_desc, b_desc=b_desc, grid=grid, flat=flat, a_tma=a_tma, stages=stages):
                    y.fill_(float("nan")) if DRY else None
                    _rowtile_tma[(grid,)](a_desc, a, b_desc, y, perm, counts, w_S, D, F, a.stride(0), E, K, D,
                                          E_P2=E_P2, A_TMA=a_tma, A_GATHER=False, B_KMAJOR=True, SCALE_W=True,
                                          NUM_PROGS=grid,
                                          FLATTEN=flat, **cfg, **kw, **({} if DRY else dict(num_stages=stages)))
                record("down_fwd", f"tma_b{'+a' if a_tma else ''} s{stages} {'persistent' if pers else 'grid'}"
                       f"{' flat' if flat else ''}", 1, run, y, y_ref)

    # --- gateup_dx: dx[slot] = dgu @ W13  (A sorted [S, 2F], B = W13 rows e*2F + k) ---
    dx_ref = torch.empty(S, D, device=DEV, dtype=dt)
    record("gateup_dx", "current(autotuned)", 2, lambda: mk.rowtile(dgu, w13, dx_ref, perm, counts, None, K, tpe, n=D,
                                                                   kd=2 * F, a_gather=False, b_kmajor=False),
           dx_ref, None)
    dx = torch.empty_like(dx_ref)
    for stages in ((3,) if DRY else (3, 4)):
        for pers, flat in ((False, False), (True, True)):
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            a_desc = TensorDescriptor.from_tensor(dgu, [bm, bk])
            b_desc = TensorDescriptor.from_tensor(w13.view(E * 2 * F, D), [bk, bn])
            grid = nsm if pers else (triton.cdiv(S, bm) + E) * triton.cdiv(D, bn)

            def run(a_desc=a_desc, b_desc=b_desc, grid=grid, flat=flat, stages=stages):
                _rowtile_tma[(grid,)](a_desc, dgu, b_desc, dx, perm, counts, w_S, D, 2 * F, dgu.stride(0), E, K,
                                      2 * F, E_P2=E_P2, A_TMA=True, A_GATHER=False, B_KMAJOR=False, SCALE_W=False,
                                      NUM_PROGS=grid,
                                      FLATTEN=flat, **cfg, **kw, **({} if DRY else dict(num_stages=stages)))
            record("gateup_dx", f"tma_a+b s{stages} {'persistent flat' if pers else 'grid'}", 2, run, dx, dx_ref)

    # --- gateup_fwd (save g|u): x gathered, W13 through TMA ---
    a_ref, gu_ref = torch.empty(S, F, device=DEV, dtype=dt), torch.empty(S, 2 * F, device=DEV, dtype=dt)
    record("gateup_fwd", "current(autotuned)", 2, lambda: mk.gateup_fwd(x, w13, perm, counts, K, tpe, a_ref, gu_ref,
                                                                       save=1), gu_ref, None)
    a_o, gu_o = torch.empty_like(a_ref), torch.empty_like(gu_ref)
    gcfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if DRY else dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    for stages in ((3,) if DRY else (3, 4)):
        for pers, flat in ((False, False), (True, False), (True, True)):
            w_desc = TensorDescriptor.from_tensor(w13.view(E * 2 * F, D), [gcfg["BLOCK_N"], gcfg["BLOCK_K"]])
            grid = nsm if pers else (triton.cdiv(S, gcfg["BLOCK_M"]) + E) * triton.cdiv(F, gcfg["BLOCK_N"])

            def run(w_desc=w_desc, grid=grid, flat=flat, stages=stages):
                _gateup_tma[(grid,)](x, w_desc, perm, counts, gu_o, a_o, D, F, K, E, E_P2=E_P2, NUM_PROGS=grid,
                                     FLATTEN=flat, **gcfg, **kw, **({} if DRY else dict(num_stages=stages)))
            record("gateup_fwd", f"tma_b s{stages} {'persistent' if pers else 'grid'}{' flat' if flat else ''}", 2,
                   run, gu_o, gu_ref)

    # --- wgrad dW2 = dy_tok^T aw (aw sorted through TMA) and dW13 = dgu^T x_tok (x gathered) ---
    dw2_ref = torch.empty_like(w2)
    record("wgrad_w2", "current(autotuned)", 1, lambda: mk.wgrad(dy, a, dw2_ref, perm, counts, K, tpe, a_gather=True),
           dw2_ref, None)
    dw2 = torch.empty_like(w2)
    for stages in ((3,) if DRY else (4, 5)):
        for pers in (False, True):
            b_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_K"], cfg["BLOCK_N"]])
            grid = nsm if pers else E * triton.cdiv(D, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"])

            def run(b_desc=b_desc, grid=grid, stages=stages):
                _wgrad_tma[(grid,)](dy, b_desc, dw2, perm, counts, D, F, dy.stride(0), K, E, E_P2=E_P2,
                                    NUM_PROGS=grid, **cfg, **kw, **({} if DRY else dict(num_stages=stages)))
            record("wgrad_w2", f"tma_b s{stages} {'persistent' if pers else 'grid'}", 1, run, dw2, dw2_ref)

    # --- ceiling: one dense GEMM of the down_fwd size, cuBLAS vs Triton TMA persistent ---
    if not DRY:
        A = a.new_empty(S, F).normal_()
        B = w2[0].contiguous()  # [D, F]
        C = torch.empty(S, D, device=DEV, dtype=dt)
        record("dense_SxDxF", "cublas", 1, lambda: torch.mm(A, B.t(), out=C), C, None)
        Cref = C.clone()
        for stages in (3, 4):
            for flat in (False, True):
                ad = TensorDescriptor.from_tensor(A, [128, 64])
                bd = TensorDescriptor.from_tensor(B, [256, 64])
                cd = TensorDescriptor.from_tensor(C, [128, 256])

                def run(ad=ad, bd=bd, cd=cd, flat=flat, stages=stages):
                    _dense_tma[(nsm,)](ad, bd, cd, S, D, F, NUM_PROGS=nsm, FLATTEN=flat, BLOCK_M=128, BLOCK_N=256,
                                       BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)
                record("dense_SxDxF", f"triton tma persistent s{stages}{' flat' if flat else ''}", 1, run, C, Cref)

    finish(rows, args)


def finish(rows, args):
    print("\nstage        variant                               ms     TF/s   rel vs current")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:12s} {r['variant']:36s} ERROR {r['error'][:90]}")
        else:
            print(f"{r['stage']:12s} {r['variant']:36s} {r['ms']:7.3f} {r['tflops']:7.1f}  {r['rel_vs_current']:.1e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tma_probe.json"), "w") as f:
            json.dump(dict(device=None if DRY else torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
