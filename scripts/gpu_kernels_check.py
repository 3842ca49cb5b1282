"""GPU check of the Triton expert backend: floors, correctness, memory, graphs/compile, stage timings.

Run on the device machine (one call does everything and prints a short table last):

    PYTHONUNBUFFERED=1 python scripts/gpu_kernels_check.py --out $OUT

1. floors: bf16 GEMM rate (8192^3 through cuBLAS) and device copy bandwidth (read + write bytes)
2. correctness: triton and grouped (bf16) against an fp32 `loop` reference, outputs and the grads
   of x, w_TK, w13, w2 (relative Frobenius error); triton fp32 too; balanced, skewed (one expert
   takes every token), empty experts, top-k = E, one token; poisoned outputs of each kernel
3. memory: peak allocated above the inputs around forward+backward, grouped vs triton
4. CUDA graph capture/replay of forward+backward, torch.compile(fullgraph=True) of the backend
5. timings at the 16B layer shape: each kernel under each candidate config (a sweep, to pick the
   autotune lists), the non-GEMM stages, and end-to-end grouped / triton / dense cuBLAS SwiGLU

TFLOP/s are of activated routed-expert FLOPs: forward 6*T*K*D*F, forward+backward 3x that.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are jitted

from deepseekmoe.kernels import moe_kernels as mk  # noqa: E402
from deepseekmoe.kernels import moe_triton as mt  # noqa: E402
from deepseekmoe.kernels.options import KernelOptions  # noqa: E402
from deepseekmoe.model.moe.dispatch import dispatch  # noqa: E402
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop  # noqa: E402

# --dry-run (CPU, TRITON_INTERPRET=1, tiny shapes, one call per "timing") checks this script itself.
DRY = "--dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"
BIG = dict(T=64, K=4, E=8, D=64, F=32) if DRY else dict(T=16384, K=6, E=64, D=2048, F=1408)


def bench(fn, rep=200):
    if DRY:
        fn()
        return 1.0
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def floors():
    if DRY:
        return {"gemm_tflops": 0.0, "copy_tbps": 0.0}
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, rep=300)
    src = torch.randn(1 << 29, device=DEV, dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    ms_c = bench(lambda: dst.copy_(src), rep=300)
    return {"gemm_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_tbps": 2 * src.numel() * 2 / ms_c / 1e9}


def routing(T, K, E, mode, gen):
    """idx_TK, w_TK. balanced: uniform top-K; skewed: expert popularity ~ exp(1.5 z) (Zipf-like);
    one: every token picks experts 0..K-1 (expert 0 takes all T, the rest of the E stay empty)."""
    if mode == "one":
        idx = torch.arange(K, device=DEV).expand(T, K).contiguous()
    else:
        logits = torch.rand(T, E, device=DEV, generator=gen).log().neg().log().neg()  # gumbel
        if mode == "skewed":
            logits = logits + 1.5 * torch.randn(E, device=DEV, generator=gen)
        idx = logits.topk(K, dim=1).indices
    w = torch.rand(T, K, device=DEV, generator=gen) + 0.05
    return idx, w


def make(T, K, E, D, F, mode, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    idx, w = routing(T, K, E, mode, gen)
    x = torch.randn(T, D, device=DEV, generator=gen)
    w13 = torch.randn(E, 2 * F, D, device=DEV, generator=gen) / D ** 0.5
    w2 = torch.randn(E, D, F, device=DEV, generator=gen) / F ** 0.5
    g = torch.randn(T, D, device=DEV, generator=gen)
    return [t.to(dtype) for t in (x, w, w13, w2, g)], idx


def triton_with(**options):
    """experts_triton with explicit KernelOptions (e.g. save="ast"), same signature as the others."""
    return functools.partial(mt.experts_triton, options=KernelOptions(**options))


def sorted_slots(idx, E):
    """(perm_S int32, counts_E int32) as the kernels read them."""
    d = dispatch(idx, E, index_dtype=torch.int32)
    return d.perm_S, d.counts_E


def run_fb(fn, x, w, w13, w2, g, idx):
    ins = [t.detach().clone().requires_grad_() for t in (x, w, w13, w2)]
    y = fn(ins[0], idx, ins[1], ins[2], ins[3])
    grads = torch.autograd.grad(y, ins, g)
    return [y.detach(), *grads]


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


NAMES = ["y", "dx", "dw", "dw13", "dw2"]


def check_correct(results):
    cases = [  # T, K, E, D, F, mode
        (512, 6, 64, 2048, 1408, "balanced"),
        (512, 6, 64, 2048, 1408, "skewed"),
        (300, 4, 16, 256, 96, "one"),
        (1, 6, 64, 2048, 1408, "balanced"),
        (64, 8, 8, 128, 64, "balanced"),      # top-k = E
        (200, 2, 32, 72, 40, "balanced"),     # odd dims: masks, some experts empty
        (256, 7, 63, 1280, 854, "skewed"),    # the 2B preset's F = 854: the zero-padding path
    ]
    if DRY:
        cases = [(20, 2, 4, 32, 16, "skewed"), (9, 3, 3, 16, 16, "one")]
    worst = 0.0
    for T, K, E, D, F, mode in cases:
        (x, w, w13, w2, g), idx = make(T, K, E, D, F, mode, torch.float32, seed=T + E)
        ref = run_fb(experts_loop, x, w, w13, w2, g, idx)
        row = {"case": f"T{T} K{K} E{E} D{D} F{F} {mode}"}
        bf = [t.bfloat16() for t in (x, w, w13, w2, g)]
        for name, fn, ins in (("triton_bf16", mt.experts_triton, bf),
                              ("triton_ast_bf16", triton_with(save="ast"), bf),
                              ("grouped_bf16", experts_grouped, bf),
                              ("triton_fp32", mt.experts_triton, (x, w, w13, w2, g))):
            try:
                out = run_fb(fn, *ins, idx)
                row[name] = {n: rel(o, r) for n, o, r in zip(NAMES, out, ref)}
            except Exception as e:
                row[name] = {"error": repr(e)[:300]}
        tb, ta, gb, tf = row["triton_bf16"], row["triton_ast_bf16"], row["grouped_bf16"], row["triton_fp32"]
        ok = all(n in d and d[n] < 1.5e-2 for d in (tb, ta) for n in NAMES)
        ok = ok and all(n in tf and tf[n] < 1e-4 for n in NAMES)
        if "error" not in gb:
            ok = ok and all(d[n] <= 1.5 * gb[n] + 1e-3 for d in (tb, ta) for n in NAMES)
        row["ok"] = bool(ok)
        worst = max([worst] + [d.get(n, float("inf")) for d in (tb, ta) for n in NAMES])
        results["correct"].append(row)
        print(row, flush=True)
    return worst


def check_poison(results):
    """Every kernel writes every element it owns: outputs start as NaN and must come back finite."""
    T, K, E, D, F = (30, 2, 8, 32, 32) if DRY else (700, 6, 16, 256, 192)
    (x, w, w13, w2, dy), idx = make(T, K, E, D, F, "skewed", torch.bfloat16, seed=7)
    idx = idx % (E - 3)  # the last 3 experts get nothing (repeats within a token are allowed)
    perm, counts = sorted_slots(idx, E)
    S = T * K
    tpe = mt.tpe_bucket(S, E)
    nan = lambda *s: torch.full(s, float("nan"), device=DEV, dtype=torch.bfloat16)
    a, gu, y = nan(S, F), nan(S, 2 * F), nan(S, D)
    mk.gateup_fwd(x, w13, perm, counts, K, tpe, a, gu, save=1)
    mk.rowtile(a, w2, y, perm, counts, w.reshape(-1), K, tpe, n=D, kd=F, a_gather=False, b_kmajor=True)
    dgu, aw, dx = nan(S, 2 * F), nan(S, F), nan(S, D)
    dwp = torch.full((S, mk.dwp_cols(F)), float("nan"), device=DEV)
    mk.down_bwd(dy, w2, a, gu, perm, counts, w.reshape(-1), K, tpe, dgu, aw, dwp, 1)
    dw2, dw13 = nan(E, D, F), nan(E, 2 * F, D)
    mk.wgrad(dy, aw, dw2, perm, counts, K, tpe, a_gather=True)
    mk.wgrad(dgu, x[perm.long() // K], dw13, perm, counts, K, tpe, a_gather=False, b_gather=False)
    mk.rowtile(dgu, w13, dx, perm, counts, None, K, tpe, n=D, kd=2 * F, a_gather=False, b_kmajor=False)
    finite = {n: bool(torch.isfinite(t).all()) for n, t in
              dict(a=a, gu=gu, y=y, dgu=dgu, aw=aw, dwp=dwp, dx=dx, dw2=dw2, dw13=dw13).items()}
    empty = (counts == 0).nonzero().flatten()
    finite["empty_experts_zero_grad"] = bool(len(empty) == 0 or (dw13[empty].abs().sum() == 0 and
                                                                 dw2[empty].abs().sum() == 0))
    results["poison"] = finite
    print("poison", finite, flush=True)


def peak_mem(fn, x, w, w13, w2, g, idx):
    ins = [t.detach().clone().requires_grad_() for t in (x, w, w13, w2)]
    if DRY:
        return 0.0, 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = fn(ins[0], idx, ins[1], ins[2], ins[3])
    fwd_hold = torch.cuda.memory_allocated() - base
    torch.autograd.grad(y, ins, g)
    del y
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, fwd_hold / 2 ** 20


def check_graph_compile(results):
    T, K, E, D, F = (16, 2, 4, 32, 16) if DRY else (1024, 6, 64, 2048, 1408)
    (x, w, w13, w2, g), idx = make(T, K, E, D, F, "balanced", torch.bfloat16, seed=3)
    if DRY:
        results["cuda_graph_max_rel"] = 0.0
        fn = torch.compile(mt.experts_triton, fullgraph=True, backend="aot_eager")
        out = run_fb(fn, x, w, w13, w2, g, idx)
        results["compile_max_rel"] = max(rel(a, b) for a, b in zip(out, run_fb(mt.experts_triton, x, w, w13, w2,
                                                                                      g, idx)))
        return
    eager = run_fb(mt.experts_triton, x, w, w13, w2, g, idx)
    fn = torch.compile(mt.experts_triton, fullgraph=True)
    t0 = time.time()
    out = run_fb(fn, x, w, w13, w2, g, idx)
    results["compile_s"] = time.time() - t0
    results["compile_max_rel"] = max(rel(a, b) for a, b in zip(out, eager))
    ins = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            y = mt.experts_triton(ins[0], idx, ins[1], ins[2], ins[3])
            torch.autograd.grad(y, ins, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mt.experts_triton(ins[0], idx, ins[1], ins[2], ins[3])
        grads = torch.autograd.grad(y, ins, g)
    # New routing in the same static buffers: the replay must follow it (no baked-in host values).
    (x2, w2_, _, _, g2), idx2 = make(T, K, E, D, F, "skewed", torch.bfloat16, seed=4)
    idx.copy_(idx2)
    ins[0].data.copy_(x2)
    ins[1].data.copy_(w2_)
    g.copy_(g2)
    graph.replay()
    torch.cuda.synchronize()
    ref = run_fb(mt.experts_triton, x2, w2_, w13, w2, g2, idx2)
    results["cuda_graph_max_rel"] = max(rel(a, b) for a, b in zip([y, *grads], ref))
    with torch.no_grad():  # inference forward: nothing saved for backward
        results["inference_rel"] = rel(mt.experts_triton(x2, idx2, w2_, w13, w2), ref[0])
    print("graph/compile", results["cuda_graph_max_rel"], results["compile_max_rel"], flush=True)


def sweep(results, T=BIG["T"], K=BIG["K"], E=BIG["E"], D=BIG["D"], F=BIG["F"]):
    (x, w, w13, w2, dy), idx = make(T, K, E, D, F, "balanced", torch.bfloat16, seed=11)
    w_S = w.reshape(-1)
    S = T * K
    unit = 2 * S * D * F / 1e9  # GFLOP of one [S, D] x [D, F] product
    perm, counts = sorted_slots(idx, E)
    tpe = mt.tpe_bucket(S, E)
    a, gu, y = [torch.randn(s, device=DEV, dtype=torch.bfloat16) for s in ((S, F), (S, 2 * F), (S, D))]
    dgu, aw, dx = torch.empty_like(gu), torch.empty_like(a), torch.empty_like(y)
    dwp = torch.zeros(S, mk.dwp_cols(F), device=DEV)
    dw2, dw13 = torch.empty_like(w2), torch.empty_like(w13)
    C = mk.triton.Config
    extra = {
        "gateup_fwd": [((128, 128, 32), 8, 6), ((256, 64, 64), 8, 4)],
        "down_fwd": [((128, 256, 32), 8, 6)],
        "down_bwd": [((128, 128, 64), 8, 3), ((128, 256, 32), 8, 6)],
        "wgrad": [((128, 256, 64), 8, 4), ((256, 128, 64), 8, 5)],
        "wgrad_sorted": [((256, 128, 64), 8, 4), ((128, 128, 64), 8, 5)],
        "gateup_dx": [((128, 256, 32), 8, 6)],
    }
    stages = {
        "gateup_fwd": (2, lambda c: mk.gateup_fwd(x, w13, perm, counts, K, tpe, a, gu, save=1, config=c)),
        "gateup_fwd_ast": (2, lambda c: mk.gateup_fwd(x, w13, perm, counts, K, tpe, a, gu, save=2, config=c)),
        "down_fwd": (1, lambda c: mk.rowtile(a, w2, y, perm, counts, w_S, K, tpe, n=D, kd=F, a_gather=False,
                                             b_kmajor=True, config=c)),
        "down_bwd": (1, lambda c: mk.down_bwd(dy, w2, a, gu, perm, counts, w_S, K, tpe, dgu, aw, dwp, 1, config=c)),
        "down_bwd_ast": (1, lambda c: mk.down_bwd(dy, w2, a, gu, perm, counts, w_S, K, tpe, dgu, aw, dwp, 2,
                                                  config=c)),
        # the split down backward: dA' = dy_tok @ W2_e (GEMM), then swiglu_bwd_rows (in "other")
        "down_bwd_gemm": (1, lambda c: mk.rowtile(dy, w2, a, perm, counts, None, K, tpe, n=F, kd=D, a_gather=True,
                                                  b_kmajor=False, out_sorted=True, config=c)),
        "wgrad_w2": (1, lambda c: mk.wgrad(dy, aw, dw2, perm, counts, K, tpe, a_gather=True, config=c)),
        # the same two products from dy copied to sorted order (the default backward, dy_copy=True)
        "down_bwd_gemm_sorted": (1, lambda c: mk.rowtile(dy_SD, w2, a, perm, counts, None, K, tpe, n=F, kd=D,
                                                         a_gather=False, b_kmajor=False, out_sorted=True, config=c)),
        "wgrad_w2_sorted": (1, lambda c: mk.wgrad(dy_SD, aw, dw2, perm, counts, K, tpe, a_gather=False,
                                                  b_gather=False, config=c)),
        # dW13 as the backward runs it: from a sorted copy of x (both operands through TMA)
        "wgrad_w13": (2, lambda c: mk.wgrad(dgu, x_SD, dw13, perm, counts, K, tpe, a_gather=False, b_gather=False,
                                            config=c)),
        "gateup_dx": (2, lambda c: mk.rowtile(dgu, w13, dx, perm, counts, None, K, tpe, n=D, kd=2 * F,
                                              a_gather=False, b_kmajor=False, config=c)),
        # Diagnostics: x_tok @ W13^T as a plain gathered GEMM (no SwiGLU epilogue), and the same
        # from a pre-permuted copy of x (no gather): what the epilogue and the gather cost.
        "diag_xw13_gather": (2, lambda c: mk.rowtile(x, w13, gu, perm, counts, None, K, tpe, n=2 * F, kd=D,
                                                     a_gather=True, b_kmajor=True, config=c)),
        "diag_xw13_sorted": (2, lambda c: mk.rowtile(x_SD, w13, gu, perm, counts, None, K, tpe, n=2 * F, kd=D,
                                                     a_gather=False, b_kmajor=True, config=c)),
    }
    x_SD = x[perm.long() // K]
    dy_SD = dy[perm.long() // K]
    outs = {"diag_xw13_gather": lambda: [gu], "diag_xw13_sorted": lambda: [gu],
            "gateup_fwd": lambda: [a, gu], "gateup_fwd_ast": lambda: [a, gu], "down_fwd": lambda: [y],
            "down_bwd": lambda: [dgu, aw, dwp.sum(1)], "down_bwd_ast": lambda: [dgu, aw, dwp.sum(1)],
            "down_bwd_gemm": lambda: [a], "wgrad_w2": lambda: [dw2], "down_bwd_gemm_sorted": lambda: [a],
            "wgrad_w2_sorted": lambda: [dw2], "wgrad_w13": lambda: [dw13],
            "gateup_dx": lambda: [dx]}
    best = {}
    for name, (units, fn) in stages.items():
        first = None
        key = {"wgrad_w2": "wgrad", "wgrad_w13": "wgrad_sorted", "down_bwd_gemm": "down_fwd",
               "down_bwd_gemm_sorted": "down_fwd", "wgrad_w2_sorted": "wgrad_sorted"}.get(
            name, name.removesuffix("_ast"))
        if name.startswith("diag"):
            cfgs = [C(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=4)]
        else:
            ex = {"NSPLIT": 2} if key == "down_bwd" else {}
            cfgs = list(mk.CONFIGS[key]) + [
                C(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, **({"NSPLIT": 4} if ex and n == 256 else ex)),
                  num_warps=nw, num_stages=ns) for (m, n, k), nw, ns in extra[key]]
        for c in cfgs:
            tag = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
            try:
                t0 = time.time()
                kern = fn(c)
                if not DRY:
                    torch.cuda.synchronize()
                comp = time.time() - t0
                asm = getattr(kern, "asm", {}) or {}
                info = dict(wgmma="wgmma" in asm.get("ptx", ""), regs=getattr(kern, "n_regs", None),
                            spills=getattr(kern, "n_spills", None))
                # Every config must compute the same thing: compare with the first config's outputs.
                now = [t.float().clone() for t in outs[name]()]
                first = first or now
                dev = max(rel(p, q) for p, q in zip(now, first))
                ms = bench(lambda c=c, fn=fn: fn(c), rep=100)
                tf = units * unit / ms
                results["sweep"].append({"stage": name, "cfg": tag, "ms": ms, "tflops": tf, "compile_s": comp,
                                         "rel_vs_first": dev, **info})
                print(f"sweep {name:11s} {tag:22s} {ms:7.3f} ms {tf:6.1f} TF/s (compile {comp:.1f}s, "
                      f"rel vs first {dev:.1e}, {info})", flush=True)
                if name not in best or ms < best[name][1]:
                    best[name] = (tag, ms, tf)
            except Exception as e:
                results["sweep"].append({"stage": name, "cfg": tag, "error": repr(e)[:300]})
                print(f"sweep {name} {tag} ERROR {repr(e)[:300]}", flush=True)
    # Non-GEMM stages
    dap_b, dw_b = torch.randn_like(a), torch.empty(S, device=DEV)
    other = {
        "dispatch": lambda: dispatch(idx, E, index_dtype=torch.int32),
        "combine_sum_K": lambda: mk.sum_slots(y, T, K),
        "dwp_scatter": lambda: torch.empty(S, device=DEV).scatter_(0, perm.long(), dwp.sum(1)),
        **{f"swiglu_bwd_rows {b}": (lambda b=b: mk.swiglu_bwd_rows(dap_b, a, gu, perm, w_S, dgu, aw, dw_b, 1,
                                                                  blocks=b))
           for b in ((8, 256, 4), (4, 512, 4), (16, 128, 4), (4, 256, 2), (16, 256, 8))},
    }
    for name, fn in other.items():
        ms = bench(fn, rep=100)
        best[name] = ("-", ms, 0.0)
        print(f"other {name:18s} {ms:7.3f} ms", flush=True)
    results["best_stage"] = best
    return best


def graph_time(fb):
    """fwd+bwd replayed from a CUDA graph: the GPU time without Python launch overhead."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fb()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fb()
    return bench(graph.replay)


def profile(fb):
    """Per-kernel device time of one fwd+bwd (mean of 5), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fb()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    # Idle time on the GPU between kernels (eager launch gaps or host syncs), and host calls
    # that synchronise or allocate.
    kern = sorted((e for e in p.events() if str(getattr(e, "device_type", "")).endswith("CUDA")),
                  key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name[:40], b.name[:40]) for a, b in zip(kern, kern[1:])]
    busy = sum(e.time_range.end - e.time_range.start for e in kern)
    span = kern[-1].time_range.end - kern[0].time_range.start if kern else 0
    print(f"profile span {span / 5e3:.3f} ms/iter, busy {busy / 5e3:.3f} ms/iter, idle {(span - busy) / 5e3:.3f}",
          flush=True)
    for gap, a, b in sorted(gaps, reverse=True)[:8]:
        print(f"profile gap {gap / 1e3:7.3f} ms after {a} before {b}", flush=True)
    host = {}
    for e in p.events():
        if any(k in e.name for k in ("Synchronize", "cudaMalloc", "cudaFree", "Memcpy", "cudaHostAlloc")):
            host[e.name] = host.get(e.name, 0) + 1
    print(f"profile host calls (5 iters): {host}", flush=True)
    rows = []
    for ev in p.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key[:60], t / 5 / 1e3, ev.count // 5))
    rows.sort(key=lambda r: -r[1])
    for k, ms, n in rows[:16]:
        print(f"profile {ms:7.3f} ms x{n:<3d} {k}", flush=True)
    print(f"profile total {sum(r[1] for r in rows):.3f} ms", flush=True)
    return rows


def end_to_end(results, T=BIG["T"], K=BIG["K"], E=BIG["E"], D=BIG["D"], F=BIG["F"], mode="balanced"):
    (x, w, w13, w2, g), idx = make(T, K, E, D, F, mode, torch.bfloat16, seed=5)
    fl = 6 * T * K * D * F / 1e9
    rows = {}
    ins = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    for name, fn in (("grouped", experts_grouped), ("triton", mt.experts_triton),
                     ("triton_ast", triton_with(save="ast")), ("triton_fused", triton_with(down_bwd="fused")),
                     ("triton_dy_gather", triton_with(dy_copy=False))):
        fwd = lambda fn=fn: fn(ins[0], idx, ins[1], ins[2], ins[3])
        fb = lambda fn=fn: torch.autograd.grad(fn(ins[0], idx, ins[1], ins[2], ins[3]), ins, g)
        fb()
        ms_f, ms_fb = bench(fwd), bench(fb)
        mem, hold = peak_mem(fn, x, w, w13, w2, g, idx)
        rows[name] = dict(fwd_ms=ms_f, fb_ms=ms_fb, fwd_tflops=fl / ms_f, fb_tflops=3 * fl / ms_fb,
                          peak_mib=mem, saved_mib=hold)
        if name == "triton" and mode == "balanced" and not DRY:
            rows[name]["graph_fb_ms"] = graph_time(fb)
            rows[name]["graph_fb_tflops"] = 3 * fl / rows[name]["graph_fb_ms"]
            results["profile"] = profile(fb)
    # Dense SwiGLU with the same activated FLOPs: width K*F on T tokens, cuBLAS through torch.
    W13 = (torch.randn(2 * K * F, D, device=DEV) / D ** 0.5).bfloat16().requires_grad_()
    W2 = (torch.randn(D, K * F, device=DEV) / (K * F) ** 0.5).bfloat16().requires_grad_()
    xd = x.clone().requires_grad_()

    def dense():
        h = Fn.linear(xd, W13)
        return Fn.linear(Fn.silu(h[:, :K * F]) * h[:, K * F:], W2)

    ms_f = bench(dense)
    ms_fb = bench(lambda: torch.autograd.grad(dense(), (xd, W13, W2), g))
    rows["dense_cublas"] = dict(fwd_ms=ms_f, fb_ms=ms_fb, fwd_tflops=fl / ms_f, fb_tflops=3 * fl / ms_fb)
    results["e2e"][f"16b_T{T}_{mode}"] = rows
    for n, r in rows.items():
        print(f"e2e {mode:8s} {n:13s} fwd {r['fwd_tflops']:6.1f} TF/s  fwd+bwd {r['fb_tflops']:6.1f} TF/s "
              f"({r['fb_ms']:.2f} ms) peak {r.get('peak_mib', 0):.0f} MiB", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--quick", action="store_true", help="correctness only: no sweep, no end-to-end timings")
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes: checks the script")
    args = p.parse_args()
    import triton

    results = {"device": "cpu-dry-run" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__,
               "sms": 0 if DRY else torch.cuda.get_device_properties(0).multi_processor_count,
               "correct": [], "sweep": [], "e2e": {}}
    t0 = time.time()
    results["floors"] = floors()
    print("floors", results["floors"], flush=True)
    # Correctness with one config per kernel (fewer compiles); the sweep then checks every config
    # against the first at the full shape, and end_to_end runs the autotuned path.
    mk.FORCE_CONFIG.update(gateup_fwd=mk.GATEUP_CFGS[0], rowtile=mk.ROWTILE_CFGS[1], down_bwd=mk.DOWN_BWD_CFGS[0],
                           wgrad=mk.WGRAD_CFGS[0], wgrad_sorted=mk.WGRAD_SORTED_CFGS[0])
    worst = check_correct(results)
    check_poison(results)
    check_graph_compile(results)
    mk.FORCE_CONFIG.clear()
    best = {} if args.skip_sweep or args.quick else sweep(results)
    if not args.quick:
        end_to_end(results)
        end_to_end(results, mode="skewed")
    if not DRY:
        results["autotune"] = {n: {str(k): str(v) for k, v in getattr(t, "cache", {}).items()}
                               for n, t in mk._TUNED.items()}
        for n, c in results["autotune"].items():
            for k, v in c.items():
                print(f"autotune {n} {k[:70]} -> {v}", flush=True)
    results["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_kernels_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    # Short table last.
    print(f"\n== {results['device']} torch {results['torch']} triton {results['triton']} "
          f"wall {results['wall_s']:.0f}s")
    fl = results["floors"]
    print(f"floors: bf16 GEMM {fl['gemm_tflops']:.0f} TF/s, copy {fl['copy_tbps']:.2f} TB/s")
    cfg_dev = max([r.get("rel_vs_first", 0.0) for r in results["sweep"]] + [0.0])
    print(f"correct: all ok={all(r['ok'] for r in results['correct'])} worst triton bf16 rel={worst:.2e} "
          f"configs agree to {cfg_dev:.1e} "
          f"poison ok={all(results['poison'].values())} graph rel={results['cuda_graph_max_rel']:.1e} "
          f"compile rel={results['compile_max_rel']:.1e} inference rel={results.get('inference_rel', 0):.1e}")
    for name, (tag, ms, tf) in best.items():
        print(f"  {name:18s} {tag:22s} {ms:7.3f} ms {tf:6.1f} TF/s")
    for key, rows in results["e2e"].items():
        for n, r in rows.items():
            print(f"  {key} {n:13s} fwd {r['fwd_tflops']:6.1f} fwd+bwd {r['fb_tflops']:6.1f} TF/s "
                  f"peak {r.get('peak_mib', 0):7.0f} MiB saved {r.get('saved_mib', 0):6.0f} MiB"
                  + (f" graph {r['graph_fb_tflops']:.1f} TF/s" if "graph_fb_tflops" in r else ""))


if __name__ == "__main__":
    main()
