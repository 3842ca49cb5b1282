"""Micro-benchmarks of benchmarks/inference.py: single decode pieces on one layer's weights, timed
from a CUDA graph on a GPU (no launch overhead; plainly on the CPU): the decode kernels against
their torch twins (kernel_rows), the projections packing merges (projection_rows: q|k|v and
gate|up as one GEMV against separate ones), and one layer's decode attention (attention_rows: the
masked SDPA against the split-KV kernel). Each row: batch, what, us per call, GB/s of weights (of
keys and values for attention)."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, dev, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn() over `reps` runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def graph_time(fn, dev, n: int = 20) -> float:
    """Seconds per call of fn(), replayed from a CUDA graph of n calls on a GPU (no launch
    overhead); timed plainly on the CPU."""
    fn()
    if dev.type != "cuda":
        return timed(fn, dev, reps=3, warmup=0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return timed(g.replay, dev, reps=5, warmup=2) / n


def kernel_rows(moe, dev, B: int, with_gather: bool, log=print) -> list[dict]:
    """The decode kernels and their torch twins on one MoE layer's weights at batch B."""
    from deepseekmoe.kernels.decode_moe import decode_experts, decode_shared
    from deepseekmoe.kernels.decode_routing import decode_router, decode_router_reference
    from deepseekmoe.model.moe.experts import experts_gather

    gate, ex = moe.gate, moe.experts
    x = torch.randn(B, ex.w13.shape[-1], device=dev, dtype=ex.w13.dtype)
    idx, w = decode_router(x, gate.weight, gate.top_k, gate.normalize)
    expert_bytes = idx.unique().numel() * (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
    fns = {"router_kernel": lambda: decode_router(x, gate.weight, gate.top_k, gate.normalize, 1),
           "router_kernel_split8": lambda: decode_router(x, gate.weight, gate.top_k, gate.normalize, 8),
           "router_torch": lambda: decode_router_reference(x, gate.weight, gate.top_k, gate.normalize),
           "experts_fused": lambda: decode_experts(x, idx, w, ex.w13, ex.w2)}
    if with_gather:
        fns["experts_gather_eager"] = lambda: experts_gather(x, idx, w, ex.w13, ex.w2)
    mlp = moe.shared_experts
    if mlp is not None:
        fns["shared_kernels"] = lambda: decode_shared(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        fns["shared_torch"] = lambda: mlp(x)
    rows = []
    for name, fn in fns.items():
        with torch.no_grad():
            t = graph_time(fn, dev)
        row = {"batch": B, "what": name, "us": t * 1e6}
        if name.startswith("experts"):
            row["GB_s"] = expert_bytes / t / 1e9
        elif name.startswith("shared"):
            row["GB_s"] = sum(p.numel() * p.element_size() for p in mlp.parameters()) / t / 1e9
        rows.append(row)
        log(f"kernel b{B} {name}: {t * 1e6:.1f} us" + (f", {row['GB_s']:,.0f} GB/s" if "GB_s" in row else ""))
    return rows


def projection_rows(model, dev, B: int, log=print) -> list[dict]:
    """The GEMVs that packing merges, alone at batch B (from a CUDA graph on a GPU): q, k, v as three
    launches against one over the packed weight; the dense MLP and the first shared experts as the
    module's own forward, packed (gate|up in one GEMV), and on the decode kernels where they run."""
    import torch.nn.functional as F

    from deepseekmoe.inference.fast_path import fused_unavailable_reason
    from deepseekmoe.inference.packing import DecodePacking
    from deepseekmoe.model.layers import MLP

    packing = DecodePacking(model)
    packed = {id(e.module) for e in packing.entries}
    blocks = list(model.layers.values())
    attn = blocks[0].self_attn
    x = torch.randn(B, model.config.hidden_size, device=dev, dtype=attn.q_proj.weight.dtype)
    fns, nbytes = {}, {}
    with torch.no_grad(), packing.active():
        if id(attn) in packed:
            w, b = attn._decode_packed_w, attn._decode_packed_b
            fns["qkv_separate"] = lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
            fns["qkv_packed"] = lambda: F.linear(x, w, b)
            nbytes["qkv"] = w.numel() * w.element_size()
        dense = next((blk.mlp for blk in blocks if isinstance(blk.mlp, MLP)), None)
        shared = next((m.shared_experts for m in model.moe_layers() if m.shared_experts is not None), None)
        for label, mlp in (("dense_mlp", dense), ("shared_mlp", shared)):
            if mlp is None or id(mlp) not in packed:
                continue
            nbytes[label] = sum(p.numel() * p.element_size() for p in mlp.parameters())
            fns[f"{label}_torch"] = lambda m=mlp: MLP.forward(m, x)
            fns[f"{label}_packed"] = lambda m=mlp: m(x)
            if fused_unavailable_reason(model, B) is None:
                from deepseekmoe.kernels.decode_moe import decode_shared

                fns[f"{label}_kernels"] = lambda m=mlp: decode_shared(x, m.gate_proj.weight, m.up_proj.weight,
                                                                      m.down_proj.weight)
        rows = []
        for name, fn in fns.items():
            t = graph_time(fn, dev)
            group = name.rsplit("_", 1)[0]
            rows.append({"batch": B, "what": name, "us": t * 1e6, "GB_s": nbytes[group] / t / 1e9})
            log(f"projection b{B} {name}: {t * 1e6:.1f} us, {rows[-1]['GB_s']:,.0f} GB/s")
    return rows


def attention_rows(model, dev, B: int, contexts, log=print) -> list[dict]:
    """One layer's decode attention at batch B for each (cache slots S, step slot pos) of `contexts`:
    the masked SDPA over the whole cache that decode steps run by default (the kernel's reference
    twin, with its mask and GQA repeat) against the split-KV kernel (deepseekmoe.kernels.decode_attention).
    GB/s counts the keys and values the step needs (slots 0..pos of every row), for both."""
    from deepseekmoe.kernels.decode_attention import decode_attention, decode_attention_reference

    cfg = model.config
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = model.embed_tokens.weight.dtype
    rows = []
    for S, pos in contexts:
        q = torch.randn(B, H, d, device=dev, dtype=dtype)
        k, v = (torch.randn(B, K, S, d, device=dev, dtype=dtype) for _ in range(2))
        pos_1, pad_B = torch.tensor([pos], device=dev), torch.zeros(B, dtype=torch.long, device=dev)
        nbytes = 2 * B * K * (pos + 1) * d * k.element_size()
        args = (q, k, v, pos_1, pad_B, d ** -0.5)
        for name, fn in (("attention_sdpa", decode_attention_reference), ("attention_splitkv", decode_attention)):
            with torch.no_grad():
                t = graph_time(lambda f=fn, a=args: f(*a), dev)
            rows.append({"batch": B, "what": name, "slots": S, "visible": pos + 1, "us": t * 1e6,
                         "GB_s": nbytes / t / 1e9})
            log(f"attention b{B} S={S} pos={pos} {name}: {t * 1e6:.1f} us, {rows[-1]['GB_s']:,.0f} GB/s")
    return rows
