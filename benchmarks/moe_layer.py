"""Routed-expert compute of one MoE layer: loop / grouped / triton backends and a dense ceiling.

    PYTHONUNBUFFERED=1 python benchmarks/moe_layer.py --out DIR      # on a CUDA GPU

For the routed experts of the DeepSeekMoE 2B, 16B and 145B layers (shapes from deepseekmoe.model.presets)
at 4K, 16K and 64K tokens, with balanced and skewed routing, it times the expert function
fn(x_TD, idx_TK, w_TK, w13, w2) of each backend, forward (grad-enabled, i.e. training forward) and
forward+backward (grads of x, routing weights, w13, w2), and the peak memory allocated above the
inputs during forward+backward. The shared experts are a dense MLP outside the backends and are
not included (docs/kernels.md says why they are not fused).

Figure: TFLOP/s of activated routed-expert FLOPs, forward 6*T*K*D*F (three GEMMs of 2*T*K*D*F),
forward+backward 3x forward (backward = 2x forward), divided by the median time (CUDA events,
triton.testing.do_bench, L2 flushed before each run). "dense" is one dense SwiGLU MLP of width
K*F on the T tokens through cuBLAS (torch.nn.functional.linear): the same FLOPs with no routing,
the ceiling an MoE kernel is compared with. Balanced routing: uniform random top-K per token.
Skewed: expert popularity logits 1.5*N(0,1) (the table gives the max/mean expert load), run at
the --skewed-tokens counts. "graph" is the triton fwd+bwd replayed from one CUDA graph (no eager
launch gaps). The loop backend only runs up to --loop-max-tokens tokens (seconds per step beyond).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deepseekmoe import presets  # noqa: E402
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop  # noqa: E402

SHAPES = {"2b": "deepseekmoe-2b", "16b": "deepseekmoe-16b", "145b": "deepseekmoe-145b"}


def bench(fn, rep_ms):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def routing(T, K, E, mode, gen):
    logits = torch.rand(T, E, device="cuda", generator=gen).log().neg().log().neg()  # Gumbel noise
    if mode == "skewed":
        logits = logits + 1.5 * torch.randn(E, device="cuda", generator=gen)
    idx = logits.topk(K, dim=1).indices
    w = torch.softmax(torch.randn(T, K, device="cuda", generator=gen), dim=1)
    load = torch.bincount(idx.flatten(), minlength=E).float()
    return idx, w, (load.max() / load.mean()).item()


def graph_ms(fb, rep_ms):
    """fwd+bwd replayed from one CUDA graph: the kernels' time without eager launch gaps."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fb()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fb()
    ms = bench(graph.replay, rep_ms)
    del graph
    return ms


def peak_mib(fn, ins, idx, g):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = fn(ins[0], idx, ins[1], ins[2], ins[3])
    torch.autograd.grad(y, ins, g)
    del y
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_case(shape, T, mode, backends, args, seed=0):
    cfg = presets.get(SHAPES[shape])
    D, F_, E, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    gen = torch.Generator(device="cuda").manual_seed(seed)
    idx, w, imb = routing(T, K, E, mode, gen)
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(E, 2 * F_, D, device="cuda", generator=gen) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, F_, device="cuda", generator=gen) / F_ ** 0.5).bfloat16()
    g = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    ins = [t.requires_grad_() for t in (x, w, w13, w2)]
    gflop = 6 * T * K * D * F_ / 1e9
    out = []
    for name in backends:
        if name == "loop" and T > args.loop_max_tokens:
            continue
        if name == "dense":
            W13 = (torch.randn(2 * K * F_, D, device="cuda", generator=gen) / D ** 0.5).bfloat16().requires_grad_()
            W2 = (torch.randn(D, K * F_, device="cuda", generator=gen) / (K * F_) ** 0.5).bfloat16().requires_grad_()

            def fn(x_, _i, _w, _a, _b, W13=W13, W2=W2):
                h = Fn.linear(x_, W13)
                return Fn.linear(Fn.silu(h[:, :K * F_]) * h[:, K * F_:], W2)
            dins = [ins[0], W13, W2]
            fb = lambda fn=fn, dins=dins: torch.autograd.grad(fn(ins[0], None, None, None, None), dins, g)
        else:
            fn = {"loop": experts_loop, "grouped": experts_grouped}.get(name)
            if name == "triton":
                from deepseekmoe.kernels.moe_triton import experts_triton as fn
            fb = lambda fn=fn: torch.autograd.grad(fn(ins[0], idx, ins[1], ins[2], ins[3]), ins, g)
        fwd = lambda fn=fn: fn(ins[0], idx, ins[1], ins[2], ins[3])
        t0 = time.time()
        fb()  # compile / autotune outside the timing
        warm_s = time.time() - t0
        ms_f = bench(fwd, args.rep_ms)
        ms_fb = bench(fb, args.rep_ms)
        mem = 0.0 if name == "dense" else peak_mib(fn, ins, idx, g)
        ms_g = float("nan")
        if name in args.graph.split(","):
            try:
                ms_g = graph_ms(fb, args.rep_ms)
            except Exception as e:  # report, keep the eager numbers
                print(f"graph capture failed for {name}: {e!r}"[:300], flush=True)
        row = dict(shape=shape, D=D, F=F_, E=E, K=K, tokens=T, routing=mode, max_over_mean_load=imb, backend=name,
                   fwd_ms=ms_f, fb_ms=ms_fb, fwd_tflops=gflop / ms_f, fb_tflops=3 * gflop / ms_fb,
                   graph_fb_ms=ms_g, graph_fb_tflops=3 * gflop / ms_g, peak_mib=mem, first_call_s=warm_s)
        print(f"{shape:5s} T={T:6d} {mode:8s} {name:8s} fwd {row['fwd_tflops']:6.1f} fwd+bwd {row['fb_tflops']:6.1f} "
              f"TF/s ({ms_fb:8.2f} ms) peak {mem:8.0f} MiB", flush=True)
        out.append(row)
        del fn, fb, fwd
        gc.collect()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2b,16b,145b")
    p.add_argument("--tokens", default="4096,16384,65536")
    p.add_argument("--routing", default="balanced,skewed")
    p.add_argument("--backends", default="loop,grouped,triton,dense")
    p.add_argument("--loop-max-tokens", type=int, default=4096)
    p.add_argument("--skewed-tokens", default="16384", help="token counts that also run skewed routing")
    p.add_argument("--graph", default="triton", help="backends also timed as one CUDA-graph replay")
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    rows = []
    t0 = time.time()
    for shape in args.shapes.split(","):
        for T in (int(t) for t in args.tokens.split(",")):
            for mode in args.routing.split(","):
                if mode != "balanced" and str(T) not in args.skewed_tokens.split(","):
                    continue
                rows += run_case(shape, T, mode, args.backends.split(","), args)
                with open(os.path.join(args.out, "moe_layer.json"), "w") as f:  # partial results survive a kill
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
                gc.collect()
                torch.cuda.empty_cache()
    meta["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "moe_layer.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  "
          f"({meta['wall_s']:.0f} s)")
    print("TFLOP/s of activated routed-expert FLOPs (fwd 6TKDF, fwd+bwd 18TKDF); peak MiB above inputs, fwd+bwd")
    print("graph: fwd+bwd TFLOP/s replayed from a CUDA graph (no eager launch gaps)")
    print(f"{'shape':5s} {'tokens':>6s} {'routing':8s} {'load':>4s} {'backend':8s} {'fwd':>6s} {'fwd+bwd':>7s} "
          f"{'ms':>8s} {'graph':>6s} {'peak':>7s}")
    for r in rows:
        print(f"{r['shape']:5s} {r['tokens']:6d} {r['routing']:8s} {r['max_over_mean_load']:4.1f} {r['backend']:8s} "
              f"{r['fwd_tflops']:6.1f} {r['fb_tflops']:7.1f} {r['fb_ms']:8.2f} {r['graph_fb_tflops']:6.1f} "
              f"{r['peak_mib']:7.0f}")


if __name__ == "__main__":
    main()
