"""Training throughput and MFU on one device, with a profile of where the time goes.

    python benchmarks/train_throughput.py --json out.json     # GPU: deepseekmoe-2b and 16B cut to 4 layers
    python benchmarks/train_throughput.py --smoke             # CPU: the tiny preset, every code path

Each case runs the trainer's step (deepseekmoe.train): bf16 autocast forward with fp32 master
weights, backward, global-norm clipping at 1.0, the finiteness check (one host sync per step, as
in the trainer), fused AdamW with the paper's parameter groups. Fresh random token ids each step
(never zeros; note that random tokens route more evenly than text). Expert backend `grouped`
unless --backend says otherwise. Cases, each eager and with torch.compile of every block:
  deepseekmoe-2b       the paper's 2B validation model, 8 x 2048 tokens per step
  deepseekmoe-16b-4l   deepseek-moe-16b cut to 4 layers (1 dense + 3 MoE), 2 x 4096 tokens per step,
                       the shape of the released-code anchor: 16,400 tokens/s = 6.2% MFU on one H100
Figures: median step time over --steps timed steps (CUDA events) after --warmup steps (which
include compilation); tokens/s = tokens per step / median step time; MFU = flops_per_token(seq)
x tokens/s / peak, with the paper's FLOP convention (docs/accounting.md: 3x forward, attention
scores counted) and 989 TFLOP/s dense bf16 for H100/H200 SXM.
Profile: torch.profiler over 3 steps of each case; every CUDA kernel counted once and grouped by
its name into attention, expert GEMMs (CUTLASS grouped GEMM), dense GEMMs (cuBLAS/CUTLASS),
routing + permutation (sort, top-k, scan, index/gather/scatter), loss (head softmax), optimizer +
clipping, compiled (Inductor/Triton) kernels, and elementwise / norms / casts (the rest).
Results are written to JSON after every case, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.train.metrics import peak_flops  # noqa: E402
from deepseekmoe.train.optim import build_optimizer  # noqa: E402
from deepseekmoe.train.recipe import OptimSection  # noqa: E402

CASES = {
    "deepseekmoe-2b": dict(preset="deepseekmoe-2b", overrides={}, seq_len=2048, batch=8),
    "deepseekmoe-16b-4l": dict(preset="deepseekmoe-16b", overrides={"num_hidden_layers": 4}, seq_len=4096, batch=2),
}
SMOKE = {"tiny": dict(preset="tiny", overrides={}, seq_len=128, batch=4)}
ANCHOR = {"case": "deepseekmoe-16b-4l", "tokens_per_s": 16400, "mfu": 0.062,
          "what": "released reference code, one H100, 2 x 4096 tokens, bf16, fused AdamW"}
OP_CATEGORIES = [  # CPU smoke mode: (category, substrings of the aten op name), first match wins
    ("attention", ("flash", "attention", "sdpa")),
    ("expert GEMMs", ("grouped_mm",)),
    ("optimizer + clipping", ("adam", "_foreach", "addcdiv", "lerp")),
    ("loss (head softmax)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("dense GEMMs", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("routing + permutation", ("topk", "sort", "scatter", "gather", "aten::index", "index_put", "index_select",
                               "cumsum", "softmax", "nonzero", "bincount", "repeat_interleave", "aten::bmm",
                               "embedding")),
]
KERNEL_CATEGORIES = [  # GPU: (category, substrings of the CUDA kernel name), first match wins
    ("expert GEMMs", ("groupproblemshape", "ptrarray", "grouped")),
    # the triton backend's kernels (deepseekmoe/kernels/moe_kernels.py), named by their jit functions
    ("expert GEMMs", ("_gateup_fwd", "_rowtile_gemm", "_down_bwd", "_wgrad", "_sum_slots")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("optimizer + clipping", ("fusedadam", "adam", "multi_tensor_apply", "lpnorm")),
    ("compiled (Inductor) kernels", ("triton_",)),
    ("dense GEMMs", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("routing + permutation", ("radix", "sort", "topk", "scan", "index", "scatter", "gather", "histogram",
                               "cumsum")),
    ("loss (head softmax)", ("softmax", "nll", "cross_entropy")),
]
T0 = time.time()
RESULTS: dict = {"anchor": ANCHOR, "cases": [], "profiles": {}, "errors": {}}


def category(name: str, table=OP_CATEGORIES) -> str:
    low = name.lower()
    for cat, keys in table:
        if any(k in low for k in keys):
            return cat
    return "elementwise / norms / casts"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save(path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(RESULTS, indent=2, default=str))


class Case:
    """A model, its optimizer and the trainer's step, ready to time."""

    def __init__(self, name: str, spec: dict, device: torch.device, backend: str, compile_: bool):
        self.name, self.device, self.compile = name, device, compile_
        self.cfg = presets.get(spec["preset"], expert_backend=backend, **spec["overrides"])
        self.seq_len, self.batch = spec["seq_len"], spec["batch"]
        with torch.device(device):
            self.model = Transformer(self.cfg)
        self.model.set_routing(record=False)
        if compile_:
            for block in self.model.layers:
                block.compile()
        self.opt = build_optimizer(self.model, OptimSection(lr=1e-4), device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = device.type == "cuda"
        self.gen = torch.Generator(device=device).manual_seed(0)

    def batch_ids(self) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, (self.batch, self.seq_len), device=self.device,
                             generator=self.gen)

    def step(self, x: torch.Tensor) -> bool:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x, labels=x)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        ok = bool(torch.isfinite(out.loss.detach() + gnorm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return ok

    def close(self):
        del self.model, self.opt, self.params
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, warmup: int, steps: int) -> dict:
    dev = case.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    for _ in range(warmup):
        assert case.step(case.batch_ids()), "non-finite loss in warm-up"
    sync(dev)
    warm_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        x = case.batch_ids()
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            case.step(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            case.step(x)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    # Micro-batch rate: forward + backward only. Real recipes accumulate 128+ micro-batches per
    # optimizer step (2B: 2048 / 16), so the optimizer's per-step cost nearly vanishes per token.
    fb = []
    for _ in range(steps):
        x = case.batch_ids()
        t = time.perf_counter()
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=case.amp):
            out = case.model(x, labels=x)
        out.loss.backward()
        if dev.type == "cuda":
            b.record()
            b.synchronize()
            fb.append(a.elapsed_time(b) / 1e3)
        else:
            fb.append(time.perf_counter() - t)
    case.opt.zero_grad(set_to_none=True)
    fb_med = statistics.median(fb)
    seen = []  # the dtype the routed experts compute in (bf16 expected under autocast)
    moe = case.model.moe_layers()
    if moe:
        h = moe[0].experts.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))
        case.step(case.batch_ids())
        h.remove()
    tokens = case.batch * case.seq_len
    tps = tokens / med
    peak = peak_flops(dev)
    fpt = case.cfg.flops_per_token(case.seq_len)
    return {"case": case.name, "compile": case.compile, "backend": case.cfg.expert_backend,
            "batch": case.batch, "seq_len": case.seq_len, "tokens_per_step": tokens,
            "params": case.cfg.num_params(), "active_params": case.cfg.num_active_params(),
            "flops_per_token": fpt, "warmup_s": round(warm_s, 2), "step_s_median": med,
            "step_s_min": min(times), "step_s_max": max(times), "tokens_per_s": tps,
            "expert_dtype": seen[0] if seen else None, "tflops": fpt * tps / 1e12,
            "mfu": fpt * tps / peak if peak else None, "fwd_bwd_s_median": fb_med,
            "fwd_bwd_tokens_per_s": tokens / fb_med, "fwd_bwd_mfu": fpt * tokens / fb_med / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def profile_case(case: Case, steps: int = 3) -> dict:
    """Where the time goes. GPU: every CUDA kernel counted once, by its name (the sum is the
    GPU's busy time); CPU: self time of each aten op."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = case.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    xs = [case.batch_ids() for _ in range(steps)]
    sync(case.device)
    with profile(activities=acts) as prof:
        for x in xs:
            case.step(x)
        sync(case.device)
    cats: dict[str, float] = {}
    ops = []
    for ev in prof.key_averages():
        if cuda:
            # GPU-side ranges of record_function annotations (e.g. Optimizer.step#AdamW.step)
            # span kernels that are listed themselves: skip them.
            if ev.device_type != DeviceType.CUDA or getattr(ev, "is_user_annotation", False) \
                    or ev.key.startswith(("Optimizer.", "ProfilerStep")):
                continue
            t, cat = ev.self_device_time_total, category(ev.key, KERNEL_CATEGORIES)
        else:
            t, cat = ev.self_cpu_time_total, category(ev.key)
        if t <= 0:
            continue
        cats[cat] = cats.get(cat, 0.0) + t
        ops.append((ev.key, t, cat))
    total = sum(cats.values()) or 1.0
    ops.sort(key=lambda kv: -kv[1])
    return {"unit": "GPU kernel time per step" if cuda else "CPU time per step",
            "total_ms_per_step": total / steps / 1e3,
            "categories": {k: {"us_per_step": v / steps, "share": v / total}
                           for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"name": k, "us_per_step": v / steps, "category": c} for k, v, c in ops[:20]]}


def run_case(name, spec, device, args, compile_):
    label = f"{name}{' +compile' if compile_ else ''}"
    batch = spec["batch"]
    while batch >= 1:
        case = None
        try:
            log(f"{label}: building (batch {batch} x {spec['seq_len']})")
            case = Case(name, dict(spec, batch=batch), device, args.backend, compile_)
            res = time_case(case, args.warmup, args.steps)
            mfu = "-" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
            log(f"{label}: {res['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, warm-up {res['warmup_s']:.0f}s")
            RESULTS["cases"].append(res)
            if args.profile:
                RESULTS["profiles"][label] = profile_case(case)
            return
        except torch.cuda.OutOfMemoryError:
            log(f"{label}: out of memory at batch {batch}; halving")
            batch //= 2
        finally:
            if case is not None:
                case.close()
    RESULTS["errors"][label] = "out of memory even at batch 1"


def print_tables():
    print("\ntraining throughput (median step; MFU = paper FLOPs x tokens/s / 989 TFLOP/s bf16)")
    print(f"{'case':<22}{'compile':>8}{'tokens':>9}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'mem GiB':>9}{'fwd+bwd tok/s':>15}{'MFU':>7}")
    for r in RESULTS["cases"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        fmfu = "-" if r["fwd_bwd_mfu"] is None else f"{100 * r['fwd_bwd_mfu']:.1f}%"
        print(f"{r['case']:<22}{'yes' if r['compile'] else 'no':>8}{r['tokens_per_step']:>9}"
              f"{1e3 * r['step_s_median']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['tflops']:>9.1f}{mfu:>7}{mem:>9}"
              f"{r['fwd_bwd_tokens_per_s']:>15,.0f}{fmfu:>7}")
    print(f"anchor: {ANCHOR['what']}: {ANCHOR['tokens_per_s']:,} tokens/s = {100 * ANCHOR['mfu']:.1f}% MFU "
          f"({ANCHOR['case']} shape)")
    for label, prof in RESULTS["profiles"].items():
        print(f"\nwhere the time goes: {label} ({prof['unit']}, {prof['total_ms_per_step']:.1f} ms)")
        for cat, v in prof["categories"].items():
            print(f"  {cat:<30}{v['us_per_step'] / 1e3:>10.1f} ms{100 * v['share']:>7.1f}%")
        for o in prof["top"][:8]:
            print(f"    {o['us_per_step'] / 1e3:8.2f} ms  {o['category']:<28} {o['name'][:90]}")
    for k, v in RESULTS["errors"].items():
        print(f"error: {k}: {v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: the tiny preset, 2 timed steps")
    ap.add_argument("--cases", default=None, help="comma-separated cases (default: all of the mode)")
    ap.add_argument("--compile", default="both", choices=("no", "yes", "both"))
    ap.add_argument("--backend", default="grouped", help="expert backend (grouped, triton, auto, loop)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds; cases not started by then are skipped (reported as such)")
    ap.add_argument("--json", default=None, help="write results here (default $OUT/train_throughput.json if set)")
    args = ap.parse_args(argv)
    json_path = args.json or (os.path.join(os.environ["OUT"], "train_throughput.json") if os.environ.get("OUT")
                              else None)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cases = SMOKE if args.smoke else CASES
    if args.cases:
        cases = {k: (CASES | SMOKE)[k] for k in args.cases.split(",")}
    args.warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
    args.steps = args.steps if args.steps is not None else (2 if device.type == "cpu" else 10)
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    RESULTS["env"] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "triton": triton_v, "peak_flops": peak_flops(device),
                      "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    log(f"device {RESULTS['env']['device']}, torch {torch.__version__}, triton {triton_v}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for compile_ in modes:
        for name, spec in cases.items():
            label = f"{name}{' +compile' if compile_ else ''}"
            if time.time() - T0 > args.time_budget:
                RESULTS["errors"][label] = f"skipped: time budget {args.time_budget:.0f}s spent"
                continue
            try:
                run_case(name, spec, device, args, compile_)
            except Exception as e:  # keep going: one failing case must not hide the others
                RESULTS["errors"][label] = f"{type(e).__name__}: {e}"
                log(f"{label}: FAILED\n{traceback.format_exc()}")
            save(json_path)
    print_tables()
    save(json_path)
    return 0 if RESULTS["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
