"""Inference benchmark: load, prefill and decode of the deepseek-moe-16b architecture.

    python benchmarks/inference.py --json out.json            # GPU: the full 16B, random bf16 weights
    python benchmarks/inference.py --quick --decode-backends gather fused   # GPU, ~3-4 minutes (below)
    python benchmarks/inference.py --quick --compile-batches 1 8 --decode-backends fused_nopack fused fused_shared
    python benchmarks/inference.py --quick --decode-backends fused --decode-attention sdpa splitkv   # A/B attention
    python benchmarks/inference.py --smoke                    # CPU: a tiny shape, every code path

What it does, in one process (JSON written after every phase: a run cut short keeps what it did):
  1. copy bandwidth: a large device-to-device copy, counting bytes read + written;
  2. random bf16 weights built on the GPU, written to local disk in the released format
     (save_pretrained, 5 GB shards), then `Transformer.from_pretrained(dir, device="cuda")`:
     wall time and peak GPU memory of the load (files are in the page cache right after being
     written; a cold read of the first GiB of one shard gives the disk's own rate);
  3. prefill of a 2,048-token prompt (batch 1; `--prefill` takes several lengths) on each of
     `--prefill-backends` (grouped, and the triton expert kernels where they run), tokens/s;
  4. decode at batch 1, 8, 32 (prompt 256 tokens, greedy), per execution mode (eager, CUDA
     graph, torch.compile + CUDA graph) and decode path (`--decode-backends`: grouped, gather,
     fused = the decode kernels of inference/fast_path.py, fused_shared = with the shared experts
     and dense MLPs on them too; every path with q|k|v and gate|up packed into one GEMV each,
     inference/packing.py, unless its name ends in _nopack), and decode attention (`--decode-attention`:
     sdpa = the masked SDPA over the whole cache, splitkv = the split-KV kernel over the visible
     slots, inference/splitkv.py; a path with splitkv is named NAME+splitkv), tokens/s; each step function is also
     run once under torch.cuda.set_sync_debug_mode("error") to prove it has no host sync, and
     every step's first logits are compared with the eager reference step's (the model's own
     backend, unpacked); with --profile, the kernel launches per step and a per-kernel device-time table;
  4b. with the fused path on a GPU: the decode kernels alone on one layer's weights against their
     torch twins (us per call from a CUDA graph; GB/s of the distinct selected experts' weights),
     and the projections packing merges (q|k|v, the dense and shared MLPs: separate, packed, on the
     decode kernels; benchmarks/inference_micro.py);
  4c. with splitkv in --decode-attention on a GPU: one layer's attention at --attention-batches, SDPA
     against split-KV, at the benchmark's cache and a full 4K one (us per call, GB/s of the K/V read);
  5. greedy parity: --greedy-tokens tokens of a fixed prompt set at batch --greedy-batch on each
     compiled path against the eager reference, token for token (first divergence and both
     logit margins there when they differ; inference/parity.py);
  6. batch-1 decode against the memory-bandwidth bound: activated bytes per token (every weight
     a token multiplies through: attention, dense / shared / its K routed experts, router, norms,
     lm_head; the embedding table contributes one row) over the measured copy bandwidth.
--quick (GPU): bandwidth, prefill 2K (grouped, triton), no disk round trip or uncompiled modes; compiled
decode at batch 1, 8, 32 for each of --decode-backends (fused at every batch first, then the others,
b1 first, while the time budget lasts: a compile is ~50 s), kernel profiles, greedy parity (256, b8).
Anchors (the released remote code on one H100, random bf16 weights): 5.5 tok/s decode at batch
1, 16 tok/s at batch 8, 4,350 tok/s prefill at a 2K prompt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.checkpoint import files as dio  # noqa: E402
from deepseekmoe.checkpoint import hf  # noqa: E402
from deepseekmoe.inference.fast_path import fused_unavailable_reason  # noqa: E402
from deepseekmoe.inference.generate import Decoder, expert_backend  # noqa: E402
from deepseekmoe.inference.parity import compare_greedy, greedy_run  # noqa: E402
from deepseekmoe.inference.splitkv import ATTENTIONS, splitkv_unavailable_reason  # noqa: E402


def _load(name: str):
    """A sibling file of this script as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REPORT = _load("inference_report")  # the printed tables
MICRO = _load("inference_micro")  # the decode kernels and projections alone (micro-benchmarks)
timed, graph_time = MICRO.timed, MICRO.graph_time
NOPACK = "_nopack"  # a decode path's name with this suffix: the same path without packed projections

ANCHORS = {"decode_b1": 5.5, "decode_b8": 16.0, "prefill_2k": 4350.0}
T0 = time.time()
RESULTS: dict = {"anchors_tok_s": ANCHORS, "errors": {}}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save_json(path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(RESULTS, indent=2, default=str))


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev, nbytes: int) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of `nbytes`."""
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), dev, reps=10, warmup=3)
    return 2 * nbytes / t


def activated_bytes(cfg, bytes_per_param: int = 2) -> int:
    """Weight bytes one decoded token reads: active parameters, the embedding table as one row."""
    emb_unread = cfg.vocab_size * cfg.hidden_size - cfg.hidden_size
    return (cfg.num_active_params() - emb_unread) * bytes_per_param


def random_model(cfg, dtype, dev):
    model = hf.empty_model(Transformer, cfg, dtype, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    model.init_weights(generator=g)
    return model.eval()


def phase_disk(cfg, dtype, dev, out_dir: Path) -> Transformer | None:
    """Save random weights in the released format, load them back; time and peak memory."""
    size = cfg.num_params() * torch.finfo(dtype).bits // 8
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    RESULTS["disk"] = {"dir": str(out_dir), "free_bytes": free, "checkpoint_bytes": size}
    if free < size * 1.1:
        log(f"only {free / 1e9:.1f} GB free under {out_dir}, the checkpoint needs {size / 1e9:.1f} GB; "
            "skipping the disk round trip")
        RESULTS["errors"]["disk"] = "not enough free disk"
        return None
    t = time.time()
    model = random_model(cfg, dtype, dev)
    sync(dev)
    RESULTS["disk"]["init_s"] = time.time() - t
    ckpt = out_dir / "deepseekmoe-16b-random"
    # Durability is not what is measured: fsync of ~33 GB would time the disk's writeback.
    real_fsync = dio.fsync_tree
    dio.fsync_tree = lambda root: None
    t = time.time()
    try:
        model.save_pretrained(ckpt, max_shard_size="5GB")
    finally:
        dio.fsync_tree = real_fsync
    RESULTS["disk"]["save_s"] = time.time() - t
    log(f"saved {size / 1e9:.1f} GB in {RESULTS['disk']['save_s']:.1f}s "
        f"({len(list(ckpt.glob('*.safetensors')))} shards)")
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    t = time.time()
    model = Transformer.from_pretrained(ckpt, dtype=dtype, device=dev)
    sync(dev)
    load_s = time.time() - t
    RESULTS["load"] = {"seconds": load_s, "GB_per_s": size / load_s / 1e9, "bytes": size,
                       "note": "files in the page cache (just written)"}
    if dev.type == "cuda":
        RESULTS["load"]["peak_gpu_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        RESULTS["load"]["peak_gpu_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    log(f"loaded in {load_s:.1f}s ({size / load_s / 1e9:.2f} GB/s)"
        + (f", peak GPU {RESULTS['load']['peak_gpu_GiB']:.2f} GiB" if dev.type == "cuda" else ""))
    if dev.type == "cuda":  # dropping the page cache is for the lent machine, not a shared CPU box
        RESULTS["load"]["cold_disk_read_GB_per_s"] = cold_read_rate(sorted(ckpt.glob("*.safetensors"))[-1])
    return model


def cold_read_rate(file: Path, nbytes: int = 1 << 30) -> float | None:
    """Read rate of the first `nbytes` of `file` after dropping the page cache (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return None
    t = time.time()
    got = 0
    with open(file, "rb", buffering=0) as f:
        while got < nbytes:
            chunk = f.read(64 << 20)
            if not chunk:
                break
            got += len(chunk)
    return got / (time.time() - t) / 1e9


def phase_prefill(model, dev, L: int, backend: str, key: str | None = None) -> None:
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, L), device=dev)
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    dec = Decoder(model, 1, L + 64, decode_backend=None, pack=False)
    with expert_backend(model, backend):
        t = timed(lambda: dec.prefill(ids, pad), dev, reps=3, warmup=1)
    RESULTS.setdefault("prefill", {})[key or backend] = {"prompt": L, "backend": backend, "seconds": t, "tok_s": L / t}
    log(f"prefill {L} tokens ({backend}): {t * 1e3:.1f} ms, {L / t:,.0f} tok/s")


def phase_prefills(model, dev, args) -> None:
    """Prefill at each --prefill length on each --prefill-backends backend that runs here; results
    keyed by the backend (the first length) or backend_L (the others)."""
    from deepseekmoe.kernels import triton_unavailable_reason

    for backend in args.prefill_backends:
        reason = triton_unavailable_reason(dev) if backend == "triton" else None
        if reason:
            RESULTS.setdefault("skipped", {})[f"prefill_{backend}"] = reason
            log(f"prefill ({backend}): skipped, {reason}")
            continue
        for i, L in enumerate(args.prefill):
            phase_prefill(model, dev, L, backend, key=backend if i == 0 else f"{backend}_{L}")


def kernel_profile(dec, n: int = 4) -> dict:
    """Device time per decode step by kernel (the step run outside its graph, same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), dec.decode_block():
        dec._fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                dec._fn()
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:120], "calls_per_step": e.count / n, "us_per_step": t / n})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:25]}


def decode_max_len(args) -> int:
    """Cache slots of a timing decoder: prompt, warm-up, sync check, timed steps, profile, and the
    greedy parity run (which reuses the compiled decoders), rounded up to 64."""
    need = max(args.prompt + 3 * args.steps + 16, max(GREEDY_LENGTHS) + args.greedy_tokens + 1)
    return -(-need // 64) * 64


def sync_free(dec) -> dict:
    """Run the step function once (outside any graph) under sync-debug 'error'."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), dec.decode_block():
            dec._fn()
        return {"host_sync_free": True}
    except RuntimeError as e:
        return {"host_sync_free": False, "sync_error": str(e).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode(0)


def decode_run(model, dev, B: int, mode: str, backend: str, args, profile: bool = False):
    """tokens/s of `args.steps` greedy decode steps at batch B after a prompt of `args.prompt`
    tokens; returns (info, first step's logits, the decoder)."""
    V = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(B)
    ids = torch.randint(0, V, (B, args.prompt), device=dev, generator=g)
    pad = torch.zeros(B, dtype=torch.long, device=dev)
    dec = Decoder(model, B, decode_max_len(args), mode=mode, **decoder_args(backend))
    nxt = dec.prefill(ids, pad).argmax(-1)
    first = None
    for i in range(3):  # warm-up; in graph modes the first call captures
        logits = dec.step(nxt)
        if i == 0:
            first = logits.clone()
        nxt = logits.argmax(-1)
    info = sync_free(dec) if dev.type == "cuda" else {}

    def run():
        nonlocal nxt
        for _ in range(args.steps):
            nxt = dec.step(nxt).argmax(-1)

    t = timed(run, dev, reps=3, warmup=0)
    info.update({"batch": B, "mode": mode, "backend": backend, "prompt": args.prompt, "steps": args.steps,
                 "ms_per_step": t / args.steps * 1e3, "tok_s": B * args.steps / t,
                 "graph": dec.graph is not None, "graph_error": dec.graph_error,
                 "packed_modules": len(dec.packing.entries) if dec.packing else 0,
                 "unpacked_modules": dict(list(dec.packing.skipped.items())[:4]) if dec.packing else None,
                 "finite": bool(torch.isfinite(first).all())})
    if profile and dev.type == "cuda" and mode != "eager":
        try:
            info["profile"] = kernel_profile(dec)
            log(f"  kernels: {info['profile']['kernel_us_per_step'] / 1e3:.2f} ms of device time in "
                f"{info['profile']['kernels_per_step']:.0f} launches per step")
        except Exception as e:  # noqa: BLE001
            info["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    return info, first, dec


def reference_logits(model, dev, B: int, args):
    """First decode step's logits of the eager reference path (the model's own backend) on the
    prompt decode_run uses at batch B."""
    V = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(B)
    ids = torch.randint(0, V, (B, args.prompt), device=dev, generator=g)
    dec = Decoder(model, B, decode_max_len(args), decode_backend=None, pack=False)
    nxt = dec.prefill(ids, torch.zeros(B, dtype=torch.long, device=dev)).argmax(-1)
    return dec.step(nxt).clone()


def decoder_args(name: str) -> dict:
    """Decoder keywords of a benchmark decode path: packed projections (inference/packing.py) unless
    the backend's name ends in _nopack (the path as it ran before them); a "+splitkv" suffix asks
    for the split-KV decode attention."""
    backend, _, attention = name.partition("+")
    extra = {"attention": attention} if attention else {}
    if backend.endswith(NOPACK):
        return {"decode_backend": backend[:-len(NOPACK)], "pack": False, **extra}
    return {"decode_backend": backend, "pack": True, **extra}


def variants_at(model, B: int, args, compiled: bool) -> list[str]:
    """backends_at for every --decode-attention: NAME (sdpa) or NAME+splitkv (where it can run)."""
    reason = splitkv_unavailable_reason(model) if "splitkv" in args.decode_attention else None
    if reason:
        RESULTS["errors"][f"b{B}/+splitkv"] = f"skipped: {reason}"
    return [b + ("" if a == "sdpa" else "+" + a) for b in backends_at(model, B, args.decode_backends, compiled)
            for a in args.decode_attention if a == "sdpa" or not reason]


def backends_at(model, B: int, names, compiled: bool) -> list[str]:
    """The decode paths of `names` that apply at batch B. gather reads every slot's expert, so
    past E slots it is replaced by grouped (compiled runs) or skipped; fused needs the decode
    kernels (a CUDA GPU, B <= 64); compiled runs skip grouped where gather applies."""
    cfg = model.config
    gather_ok = B * cfg.num_experts_per_tok <= cfg.n_routed_experts
    out = []
    for full in names:
        base = full[:-len(NOPACK)] if full.endswith(NOPACK) else full
        suffix = full[len(base):]
        name = base
        if base == "gather" and not gather_ok:
            name = "grouped" if compiled else None
        elif base.startswith("fused") and fused_unavailable_reason(model, B):
            RESULTS["errors"][f"b{B}/{full}"] = f"skipped: {fused_unavailable_reason(model, B)}"
            name = None
        elif base == "grouped" and compiled and gather_ok and "gather" + suffix in names:
            name = None
        name = name and name + suffix
        if name and name not in out:
            out.append(name)
    return out


def record_decode(model, dev, args, B, mode, backend, refs, keep) -> None:
    """One decode variant: run, compare its first logits with the eager reference, log, keep."""
    name = f"b{B}/{mode}/{backend}"
    t = time.time()
    try:
        info, first, dec = decode_run(model, dev, B, mode, backend, args, profile=args.profile)
    except Exception as e:  # noqa: BLE001 - record and go on to the next variant
        RESULTS["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        log(f"{name}: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()
        return
    if mode != "eager":
        info["compile_and_capture_s" if mode == "compile" else "capture_s"] = time.time() - t
    if B not in refs:
        refs[B] = reference_logits(model, dev, B, args)
    info["max_abs_diff_vs_eager_reference"] = (first - refs[B]).abs().max().item()
    info["logit_scale"] = refs[B].abs().max().item()
    RESULTS.setdefault("decode", []).append(info)
    log(f"decode {name}: {info['ms_per_step']:.2f} ms/step, {info['tok_s']:,.1f} tok/s, max |logit diff| vs "
        f"eager {info['max_abs_diff_vs_eager_reference']:.3g}"
        + (f", sync-free={info.get('host_sync_free')}" if "host_sync_free" in info else "")
        + (f" ({info['compile_and_capture_s']:.0f}s to compile)" if "compile_and_capture_s" in info else ""))
    if B == args.greedy_batch and args.greedy_tokens and mode != "eager":
        keep[name] = dec
    save_json(args.json)


def phase_decode(model, dev, args, refs, keep) -> None:
    """Uncompiled modes (eager, CUDA graph) for every batch and decode path."""
    modes = [m for m in args.modes if m == "eager" or dev.type == "cuda"]
    for B in args.batches:
        for mode in modes:
            for backend in variants_at(model, B, args, compiled=False):
                record_decode(model, dev, args, B, mode, backend, refs, keep)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def phase_kernels(model, dev, args) -> None:
    """The decode kernels alone on the first MoE layer's weights, against their torch twins (eager,
    in a CUDA graph): microseconds per call and the GB/s of the distinct experts' weights read."""
    cfg = model.config
    rows = RESULTS.setdefault("kernels", [])
    for B in args.kernel_batches:
        if fused_unavailable_reason(model, B):
            continue
        try:
            gather = B * cfg.num_experts_per_tok <= cfg.n_routed_experts
            rows += MICRO.kernel_rows(model.moe_layers()[0], dev, B, gather, log)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"][f"kernels/b{B}"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
    save_json(args.json)


def phase_projections(model, dev, args) -> None:
    """projection_rows at each of --kernel-batches."""
    rows = RESULTS.setdefault("projections", [])
    for B in args.kernel_batches:
        try:
            rows += MICRO.projection_rows(model, dev, B, log)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"][f"projections/b{B}"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
    save_json(args.json)


def phase_attention(model, dev, args) -> None:
    """MICRO.attention_rows at each of --attention-batches: the benchmark's cache at its prompt's
    slot, and a full 4K cache."""
    rows = RESULTS.setdefault("attention", [])
    for B in args.attention_batches:
        try:
            rows += MICRO.attention_rows(model, dev, B, [(decode_max_len(args), args.prompt), (4096, 4095)], log)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"][f"attention/b{B}"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
    save_json(args.json)


def phase_compile(model, dev, args, refs, keep) -> None:
    """torch.compile + CUDA graph inside the time budget: the fused path at every batch first
    (batch 1 first), then the baselines (batch 1 first)."""
    runs = [(B, b) for B in args.compile_batches for b in variants_at(model, B, args, compiled=True)]
    runs.sort(key=lambda r: (not r[1].startswith("fused"), r[0] != 1, r[0], r[1]))
    for B, backend in runs:
        left = args.time_budget - (time.time() - T0)
        if left < args.compile_reserve + (args.greedy_reserve if args.greedy_tokens else 0):
            RESULTS["errors"][f"b{B}/compile/{backend}"] = f"skipped: {left:.0f}s left of the time budget"
            log(f"compile b{B}/{backend}: skipped ({left:.0f}s left)")
            continue
        record_decode(model, dev, args, B, "compile", backend, refs, keep)


GREEDY_LENGTHS = (3, 7, 12, 20, 31, 40, 48, 16)


def phase_greedy(model, dev, args, keep) -> None:
    """Greedy parity of each kept decoder (batch --greedy-batch) against the eager reference path;
    on the CPU (no compiled decoders) the uncompiled decode paths are compared instead."""
    B, n = args.greedy_batch, args.greedy_tokens
    g = torch.Generator().manual_seed(1234)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (GREEDY_LENGTHS[i % len(GREEDY_LENGTHS)],), generator=g).tolist()
               for i in range(B)]
    max_len = decode_max_len(args)
    if not keep:
        keep = {f"b{B}/eager/{b}": Decoder(model, B, max_len, **decoder_args(b))
                for b in variants_at(model, B, args, compiled=False)}
    t = time.time()
    ref = greedy_run(Decoder(model, B, max_len, decode_backend=None, pack=False), prompts, n)
    out = RESULTS.setdefault("greedy", {"batch": B, "tokens": n, "prompt_lengths": [len(p) for p in prompts],
                                        "reference": "eager, the model's own expert backend", "paths": {}})
    for name, dec in keep.items():
        rep = compare_greedy(ref, greedy_run(dec, prompts, n))
        out["paths"][name] = rep
        log(f"greedy {n} tokens, {name} vs eager: {rep['rows_matching']}/{rep['rows']} rows match"
            + (f"; first divergence at token {rep['first_divergence']}, largest reference margin there "
               f"{rep['max_margin_at_divergence']:.3g}" if rep["first_divergence"] is not None else ""))
    out["seconds"] = time.time() - t
    save_json(args.json)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="deepseekmoe-16b")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU: exercise every code path quickly")
    p.add_argument("--out-dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--json", default=None, help="write results here (default: $OUT/inference.json if set)")
    p.add_argument("--prefill", type=int, nargs="+", default=[2048], help="prompt lengths of the prefill timing")
    p.add_argument("--prefill-backends", nargs="+", default=["grouped", "triton"],
                   choices=["grouped", "triton", "gather"],
                   help="expert backends of the prefill timing (triton only where it runs: CUDA with triton)")
    p.add_argument("--prompt", type=int, default=256, help="prompt length before decode timing")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed repeat (3 repeats)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--compile-batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; compile runs only inside it")
    p.add_argument("--compile-reserve", type=float, default=150.0, help="seconds a compile may need")
    p.add_argument("--no-disk", action="store_true", help="skip the save/load round trip")
    p.add_argument("--modes", nargs="+", default=["eager", "cuda_graph"], choices=["eager", "cuda_graph"],
                   help="uncompiled decode modes to time (compiled ones: --compile-batches)")
    p.add_argument("--profile", action="store_true", help="kernel time breakdown of graph/compiled steps")
    p.add_argument("--decode-backends", nargs="+", default=["grouped", "gather", "fused"],
                   choices=[b + s for b in ("grouped", "gather", "fused", "fused_shared") for s in ("", NOPACK)],
                   help="decode paths to compare (fused_shared: the shared experts and dense MLPs on the decode "
                        "kernels too; a _nopack suffix: without the packed q|k|v and gate|up projections)")
    p.add_argument("--decode-attention", nargs="+", default=["sdpa"], choices=ATTENTIONS,
                   help="decode-step attention of every path: sdpa (masked, whole cache) and/or splitkv (the "
                        "split-KV kernel over the visible slots; its paths are named NAME+splitkv)")
    p.add_argument("--attention-batches", type=int, nargs="*", default=[1, 8],
                   help="batches of the attention micro-benchmark (with splitkv among --decode-attention)")
    p.add_argument("--kernel-batches", type=int, nargs="*", default=[1],
                   help="batches of the decode-kernel micro-benchmark (each new batch tunes the kernels: ~10 s)")
    p.add_argument("--greedy-tokens", type=int, default=256, help="greedy parity length (0: skip)")
    p.add_argument("--greedy-batch", type=int, default=8, help="prompts of the greedy parity check")
    p.add_argument("--greedy-reserve", type=float, default=20.0, help="seconds kept for the greedy check")
    p.add_argument("--quick", action="store_true",
                   help="GPU, ~3-4 min: bandwidth, prefill, compiled decode at 1/8/32 with profiles, greedy parity")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="torch._inductor coordinate_descent_tuning for compiled steps (longer compile)")
    args = p.parse_args(argv)
    if args.quick:
        args.no_disk, args.profile, args.batches, args.modes = True, True, [], []
        if "--compile-batches" not in (argv or sys.argv):
            args.compile_batches = [1, 8, 32]
        if "--time-budget" not in (argv or sys.argv):
            args.time_budget, args.compile_reserve = 230.0, 35.0
    # Every compiled Decoder recompiles its step (dynamo's per-code limit is 8 by default).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "inference.json")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = presets.get(args.preset)
    if args.smoke:
        cfg = presets.get("tiny")
        args.prefill = [min(L, 128) for L in args.prefill]
        args.prompt, args.steps = min(args.prompt, 32), min(args.steps, 4)
        args.compile_batches, args.greedy_tokens, args.greedy_batch = [], min(args.greedy_tokens, 8), 2
    cfg = cfg.replace(expert_backend="grouped")
    RESULTS.update({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "preset": cfg.name, "dtype": str(dtype),
                    "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]})
    try:
        import triton

        RESULTS["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"{RESULTS['device']}, {cfg.name}: {cfg.num_params() / 1e9:.2f}B params, "
        f"{cfg.num_active_params() / 1e9:.2f}B activated")
    RESULTS["copy_bandwidth_GB_s"] = copy_bandwidth(dev, (2 << 30) if dev.type == "cuda" else (64 << 20)) / 1e9
    log(f"copy bandwidth {RESULTS['copy_bandwidth_GB_s']:.0f} GB/s (read + write)")
    save_json(args.json)
    model = None
    tmp = None
    if not args.no_disk:
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp := tempfile.mkdtemp(prefix="dsm-bench-"))
        try:
            model = phase_disk(cfg, dtype, dev, out_dir)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"]["disk"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        save_json(args.json)
    if model is None:
        model = random_model(cfg, dtype, dev)
    # Compiles come last (slowest, and guarded by the time budget); batch 1 first among them.
    refs, keep = {}, {}  # eager reference logits per batch; decoders kept for the greedy check
    for phase, fn in (("prefill", lambda: phase_prefills(model, dev, args)),
                      ("decode", lambda: phase_decode(model, dev, args, refs, keep)),
                      ("kernels", lambda: any(b.startswith("fused") for b in args.decode_backends)
                       and phase_kernels(model, dev, args)),
                      ("projections", lambda: phase_projections(model, dev, args)),
                      ("attention", lambda: "splitkv" in args.decode_attention and not splitkv_unavailable_reason(model)
                       and phase_attention(model, dev, args)),
                      ("compile", lambda: phase_compile(model, dev, args, refs, keep)),
                      ("greedy", lambda: args.greedy_tokens and phase_greedy(model, dev, args, keep))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"][phase] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        save_json(args.json)
    if dev.type == "cuda":
        RESULTS["peak_gpu_GiB_overall"] = torch.cuda.max_memory_allocated() / 2**30
    REPORT.summary(RESULTS, cfg, activated_bytes(cfg), ANCHORS)
    save_json(args.json)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
