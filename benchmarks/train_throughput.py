"""Training throughput and MFU per optimizer step on one device, with a profile of where the time goes.

    python benchmarks/train_throughput.py --backend triton --json out.json   # GPU: the three cases below
    python benchmarks/train_throughput.py --smoke                            # CPU: the tiny preset, every code path
    python benchmarks/train_throughput.py --backend triton --cases deepseekmoe-16b-4l --site SITE --code CODE
                                                                  # + the released code's column, same run

Each case runs the trainer's step (deepseekmoe.train.step.LocalStep, then clipping, the finiteness check and
AdamW as train/trainer.py does them): bf16 autocast forward with fp32 master weights, backward, global-norm
clipping at 1.0 (`fast`: the trainer's default, TritonAdamW on CUDA with the clip in its kernel, which reads
the bf16 grads of a one-micro-batch step and writes the compute copies: train/optim.py; `ref`: clip_grad_norm_
in place, then torch's fused AdamW), one host sync per step, the paper's AdamW groups. Fresh random tokens
every micro-batch (they route more evenly than text). Each case is timed at two sizes of step, same micro-batch:
  small  one micro-batch per step (8-16K tokens: the optimizer and clipping every micro-batch)
  large  gradient accumulation to >= 0.5M tokens per step (the paper's recipes use millions), so
         the optimizer is amortised as in real training (--tokens-per-step changes it)
Cases (micro-batch x accumulation for the large step):
  deepseekmoe-2b         the paper's 2B validation model, 8 x 2048 tokens, x32 = 524,288 tokens
  deepseekmoe-16b-4l     deepseek-moe-16b cut to 4 layers (1 dense + 3 MoE), 2 x 4096, x64 = 524,288
  deepseekmoe-16b-8l-ac  deepseek-moe-16b cut to 8 layers, activation checkpointing of every block,
                         2 x 4096, x64 = 524,288 (MFU counts the model's FLOPs, not the recompute)
Variants (--variants): `fast` = bf16 compute weights (train/optim.py ComputeWeights) + the fused chunked
LM-head loss (model/loss.py, --loss-chunk tokens per chunk); `ref` = the reference twins (autocast casts
at every use, plain logits + F.cross_entropy), the path of every earlier measurement.
Figures: median over timed steps (CUDA events) after warm-up steps (which include compilation);
tokens/s = tokens per step / median step time; MFU = flops_per_token(seq) x tokens/s / peak, with
the paper's FLOP convention (docs/accounting.md: 3x forward, attention scores counted) and 989
TFLOP/s dense bf16 for H100/H200 SXM. "fwd+bwd" is the part of the step before clipping (with the
fast variant it includes the one cast of the weights); "opt" is clipping + check + AdamW.
Profile: torch.profiler over 3 small steps of each case, every CUDA kernel grouped by name: attention,
expert / dense GEMMs, routing + permutation, loss, optimizer + clipping, Inductor, elementwise (the rest).
Released column (--site DIR, optionally --code DIR): before our cases, the released reference code
(deepseek-moe-16b's modeling_deepseek.py under transformers 4.46, in a child process with the site first
on its path: benchmarks/released_stack.py) trains --released-case's shape (default deepseekmoe-16b-4l)
from random bf16 weights: sdpa attention, bf16 weights without autocast, fp32 master weights + fp32
AdamW state as DeepSpeed's bf16 mode keeps them (bf16 gradients summed into fp32 per micro-batch),
fused AdamW, the same micro-batch and random tokens, clipping at 1.0, the same small and large step
sizes, median step time (CUDA events) after warm-up, peak memory of the child. The table gets its
rows and, per step size, ours / released tokens/s and peak memory against the goal (GOAL). Without
--site the anchor (ANCHOR, its figure measured elsewhere) is printed instead.
Results are written to JSON after every case, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.parallel.fsdp import apply_activation_checkpointing, apply_compile  # noqa: E402
from deepseekmoe.train.metrics import peak_flops  # noqa: E402
from deepseekmoe.train.optim import ClippedStep, ComputeWeights, build_optimizer, torch_adamw_impl  # noqa: E402
from deepseekmoe.train.recipe import OptimSection  # noqa: E402
from deepseekmoe.train.step import LocalStep  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import released_stack  # noqa: E402 - benchmarks/released_stack.py, beside this file

CASES = {
    "deepseekmoe-2b": dict(preset="deepseekmoe-2b", overrides={}, seq_len=2048, micro=8, accum=32),
    "deepseekmoe-16b-4l": dict(preset="deepseekmoe-16b", overrides={"num_hidden_layers": 4}, seq_len=4096,
                               micro=2, accum=64),
    "deepseekmoe-16b-8l-ac": dict(preset="deepseekmoe-16b", overrides={"num_hidden_layers": 8}, seq_len=4096,
                                  micro=2, accum=64, ac=True),
}
SMOKE = {"tiny": dict(preset="tiny", overrides={}, seq_len=64, micro=2, accum=3),
         "tiny-ac": dict(preset="tiny", overrides={}, seq_len=64, micro=2, accum=2, ac=True)}
VARIANTS = ("fast", "ref")
ANCHOR = {"case": "deepseekmoe-16b-4l", "tokens_per_s": 16400, "mfu": 0.062,
          "what": "released reference code, one H100, 2 x 4096 tokens, bf16, fused AdamW"}
OP_CATEGORIES = [  # CPU smoke mode: (category, substrings of the aten op name), first match wins
    ("attention", ("flash", "attention", "sdpa")),
    ("expert GEMMs", ("grouped_mm",)),
    ("optimizer + clipping", ("adam", "_foreach", "addcdiv", "lerp")),
    ("loss (head softmax)", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
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
    ("loss (head softmax)", ("_ce_grad_rows",)),  # the fused head loss's kernel (kernels/linear_ce.py)
    ("optimizer + clipping", ("fusedadam", "adam", "multi_tensor_apply", "lpnorm")),
    ("compiled (Inductor) kernels", ("triton_",)),
    ("dense GEMMs", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("routing + permutation", ("radix", "sort", "topk", "scan", "index", "scatter", "gather", "histogram",
                               "cumsum")),
    ("loss (head softmax)", ("softmax", "nll", "cross_entropy")),
]
GOAL = {"speed": 5.0, "memory": 1.0,
        "what": ">= 5x the released code's tokens/s at the 16B-4l shape, at no more (peak allocated) memory"}
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
    """A model, its optimizer and the trainer's step (LocalStep + clip + check + AdamW), ready to time."""

    def __init__(self, name: str, spec: dict, device: torch.device, args, compile_: bool, variant: str):
        self.name, self.device, self.compile, self.variant = name, device, compile_, variant
        fast = variant == "fast"
        overrides = dict(spec["overrides"], lm_loss_chunk=args.loss_chunk if fast else 0)
        self.cfg = presets.get(spec["preset"], expert_backend=args.backend, **overrides)
        self.seq_len, self.micro, self.ac = spec["seq_len"], spec["micro"], bool(spec.get("ac"))
        with torch.device(device):
            self.model = Transformer(self.cfg)
        self.model.set_routing(record=False)
        if self.ac:
            apply_activation_checkpointing(self.model)
        if compile_:
            apply_compile(self.model)
        impl = args.optim_impl if fast or args.optim_impl != "auto" else torch_adamw_impl(device)
        self.opt = build_optimizer(self.model, OptimSection(lr=1e-4, impl=impl), device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        clip = args.clip if fast else "inplace"
        self.clipped = ClippedStep(self.opt, self.params, 1.0, impl=clip)
        self.amp = args.amp == "yes" or (args.amp == "auto" and device.type == "cuda")
        self.weights = ComputeWeights(self.model, optimizer=self.opt, defer_grads=True) if fast and self.amp else None
        self.stepper = LocalStep(self.model, 1, self.autocast, None, device, weights=self.weights)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def batch_ids(self) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, (self.micro, self.seq_len), device=self.device,
                             generator=self.gen)

    def step(self, accum: int, batches=None) -> tuple[bool, float, float]:
        """One optimizer step over `accum` micro-batches: (finite, fwd+bwd seconds, whole step seconds)."""
        self.stepper.accum = accum
        batches = batches if batches is not None else (self.batch_ids() for _ in range(accum))
        cuda = self.device.type == "cuda"
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        stats = self.stepper.run(batches)
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        gnorm = self.clipped.clip(stats.loss)  # --clip fused: AdamW's update is taken here
        ok = bool(torch.isfinite(stats.loss + gnorm))
        self.clipped.update()  # inplace: the step, even a non-finite one, as before (fused: done in clip())
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            ev[2].record()
            ev[2].synchronize()
            return ok, ev[0].elapsed_time(ev[1]) / 1e3, ev[0].elapsed_time(ev[2]) / 1e3
        return ok, t1 - t0, time.perf_counter() - t0

    def close(self):
        if self.weights is not None:
            self.weights.remove()
        del self.model, self.opt, self.params, self.stepper, self.weights, self.clipped
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _record(case: Case, accum: int, times: list[tuple[bool, float, float]], warm_s: float) -> dict:
    peak_mem = torch.cuda.max_memory_allocated(case.device) / 2**30 if case.device.type == "cuda" else None
    meta = {"case": case.name, "variant": case.variant, "compile": case.compile, "backend": case.cfg.expert_backend,
            "activation_checkpointing": case.ac, "loss_chunk": case.cfg.lm_loss_chunk,
            "compute_weights": case.weights is not None,
            "clip": case.clipped.mode, "micro_batch": case.micro, "seq_len": case.seq_len,
            "params": case.cfg.num_params(), "active_params": case.cfg.num_active_params(),
            "flops_per_token": case.cfg.flops_per_token(case.seq_len)}
    return figures(meta, accum, times, warm_s, peak_flops(case.device), peak_mem)


def figures(meta: dict, accum: int, times: list, warm_s: float, peak: float | None, peak_mem: float | None) -> dict:
    """One row of the table: `meta` (case, variant, micro_batch, seq_len, flops_per_token, ...) and the
    medians of `times` [(finite, fwd+bwd s, step s)] of steps of `accum` micro-batches."""
    step = statistics.median(t for _, _, t in times)
    fb = statistics.median(f for _, f, _ in times)
    tokens = meta["micro_batch"] * meta["seq_len"] * accum
    fpt = meta["flops_per_token"]
    tps = tokens / step
    return {**meta, "accum": accum, "tokens_per_step": tokens, "warmup_s": round(warm_s, 2),
            "timed_steps": len(times), "step_s_median": step, "step_s_min": min(t for _, _, t in times),
            "step_s_max": max(t for _, _, t in times), "fwd_bwd_s_median": fb, "opt_s_median": step - fb,
            "tokens_per_s": tps, "tflops": fpt * tps / 1e12, "mfu": fpt * tps / peak if peak else None,
            "fwd_bwd_mfu": fpt * tokens / fb / peak if peak else None,
            "all_finite": all(ok for ok, _, _ in times), "peak_mem_gib": peak_mem}


def time_case(case: Case, args, big_accum: int) -> list[dict]:
    """Warm-up, then the small steps (1 micro-batch) and the large ones (`big_accum`), as records."""
    dev = case.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    # + one 2-micro-batch step when large steps follow: fp32 gradient sums, the kernels' fp32-grad variants
    for accum in [1] * args.warmup + ([2] if big_accum > 1 else []):
        assert case.step(accum)[0], "non-finite loss in warm-up"
    sync(dev)
    warm_s = time.perf_counter() - t
    seen, moe = [], case.model.moe_layers()  # the dtype the routed experts compute in (bf16 under autocast)
    if moe:
        h = moe[0].experts.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))
        case.step(1)
        h.remove()
    small = [case.step(1) for _ in range(args.steps)]
    records = [_record(case, 1, small, warm_s)]
    records[0]["expert_dtype"] = seen[0] if seen else None
    est = records[0]["fwd_bwd_s_median"] * big_accum + records[0]["opt_s_median"]
    left = args.time_budget - (time.time() - T0) - 30  # keep time for the profile and the tables
    n = min(args.big_steps, int(left // est)) if big_accum > 1 else 0
    if n >= 1:
        big = [case.step(big_accum) for _ in range(n)]
        records.append(_record(case, big_accum, big, warm_s))
    elif big_accum > 1:
        RESULTS["errors"][f"{case.name}/{case.variant} x{big_accum}"] = \
            f"skipped: a large step takes ~{est:.0f}s, {max(left, 0):.0f}s of the time budget left"
    return records


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
            case.step(1, [x])
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


def check_fused_loss(device: torch.device, vocab: int, tokens: int = 4096, dim: int = 2048) -> dict:
    """The fused head loss against the plain one at the real vocabulary, under bf16 autocast on this
    device (on CUDA: the Triton kernel and the fp32-output wgrad GEMM): relative errors, and the time
    and peak memory of each (forward + backward)."""
    from deepseekmoe.model.loss import lm_head_loss_fused, lm_head_loss_plain

    if device.type == "cpu":
        tokens, dim = 256, 64
    g = torch.Generator(device=device).manual_seed(0)
    h0 = torch.randn(2, tokens // 2, dim, device=device, generator=g)
    w0 = torch.randn(vocab, dim, device=device, generator=g) * 0.02
    labels = torch.randint(0, vocab, (2, tokens // 2), device=device, generator=g)
    labels[0, :100] = -100
    res = {"tokens": tokens, "vocab": vocab, "dim": dim}
    grads = {}
    for name, fn in (("plain", lm_head_loss_plain), ("fused", lm_head_loss_fused)):
        for _ in range(2):  # the second call is timed (the first compiles the kernel)
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fn(h, w, labels)
            loss.backward()
            sync(device)
            res[f"{name}_ms"] = 1e3 * (time.perf_counter() - t)
        if device.type == "cuda":
            res[f"{name}_extra_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        grads[name] = (loss.detach().double(), h.grad.double(), w.grad.double())
    for i, what in enumerate(("loss", "dh", "dw")):
        a, b = grads["fused"][i], grads["plain"][i]
        res[f"rel_err_{what}"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return res


def run_case(name, spec, device, args, compile_, variant):
    label = f"{name}{' +compile' if compile_ else ''} [{variant}]"
    micro, accum = spec["micro"], big_accum(spec, args)
    while micro >= 1:
        case = None
        try:
            log(f"{label}: building (micro-batch {micro} x {spec['seq_len']}, large step x{accum})")
            case = Case(name, dict(spec, micro=micro), device, args, compile_, variant)
            for res in time_case(case, args, accum):
                mfu = "-" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
                log(f"{label} x{res['accum']}: {res['tokens_per_s']:,.0f} tokens/s, MFU {mfu} per optimizer step, "
                    f"warm-up {res['warmup_s']:.0f}s")
                RESULTS["cases"].append(res)
            if args.profile:
                RESULTS["profiles"][label] = profile_case(case)
            return
        except torch.cuda.OutOfMemoryError:
            log(f"{label}: out of memory at micro-batch {micro}; halving it (twice the accumulation)")
            micro, accum = micro // 2, accum * 2
        finally:
            if case is not None:
                case.close()
    RESULTS["errors"][label] = "out of memory even at micro-batch 1"


def big_accum(spec: dict, args) -> int:
    """Micro-batches of the large step: the case's own, or enough for --tokens-per-step."""
    if args.tokens_per_step:
        return max(1, math.ceil(args.tokens_per_step / (spec["micro"] * spec["seq_len"])))
    return spec["accum"]


# ------------------------------------------------------------------------------------ the released code
def child_main(spec_file: Path, out_file: Path) -> int:
    spec = json.loads(spec_file.read_text())
    try:
        res = released_stack.pretrain_child(spec)
    except Exception as e:  # noqa: BLE001 - the parent records it
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    out_file.write_text(json.dumps(res, default=str))
    return 0


def run_released(name: str, spec: dict, device: torch.device, args) -> None:
    """The released code at the case's shape in a child process; its rows into RESULTS["cases"]."""
    from deepseekmoe.checkpoint.hf import config_to_hf

    cfg = presets.get(spec["preset"], **spec["overrides"])
    accum = big_accum(spec, args)
    budget = max(60.0, args.released_timeout)
    child = {"hf_config": config_to_hf(cfg, torch.bfloat16), "code": str(Path(args.code).resolve()),
             "device": str(device), "micro": spec["micro"], "seq_len": spec["seq_len"], "warmup": args.warmup,
             "steps": args.steps, "big_accum": accum, "big_steps": args.big_steps,
             "deadline": time.time() + budget - 15}
    log(f"{name} [released]: child process (micro-batch {spec['micro']} x {spec['seq_len']}, large step x{accum})")
    res = released_stack.run_child(__file__, child, args.site, budget)
    if res.get("status") != "ok":
        RESULTS["errors"][f"{name} [released]"] = res.get("error", "?") + ("\n" + res["traceback"]
                                                                        if "traceback" in res else "")
        log(f"{name} [released]: FAILED: {res.get('error')}")
        return
    meta = {"case": name, "variant": "released", "compile": False, "backend": "released (per-expert loop)",
            "activation_checkpointing": False, "loss_chunk": 0, "compute_weights": False,
            "micro_batch": spec["micro"], "seq_len": spec["seq_len"], "params": res["params"],
            "active_params": cfg.num_active_params(), "flops_per_token": cfg.flops_per_token(spec["seq_len"]),
            "weights": res["weights"], "attention": res["attention"], "versions": res["versions"]}
    for acc, key in ((1, "small"), (accum, "big")):
        if res.get(key):
            row = figures(meta, acc, res[key], res["warmup_s"], peak_flops(device), res["peak_mem_gib"])
            RESULTS["cases"].append(row)
            log(f"{name} [released] x{acc}: {row['tokens_per_s']:,.0f} tokens/s, MFU {_pct(row['mfu'])}")
    if "big_skipped" in res:
        RESULTS["errors"][f"{name}/released x{accum}"] = "skipped: " + res["big_skipped"]


def side_by_side(rows: list[dict], goal: dict = GOAL) -> list[dict]:
    """Per case and step size with a released row: the fastest of our rows at the same tokens per step,
    ours / released tokens/s and peak memory, and whether each half of the goal is met (None: no figure)."""
    out = []
    for ref in (r for r in rows if r["variant"] == "released"):
        ours = [r for r in rows if r["variant"] != "released" and r["case"] == ref["case"]
                and r["tokens_per_step"] == ref["tokens_per_step"]]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        speed = best["tokens_per_s"] / ref["tokens_per_s"]
        mem = (best["peak_mem_gib"] / ref["peak_mem_gib"] if best["peak_mem_gib"] is not None and ref["peak_mem_gib"]
               else None)
        out.append({"case": ref["case"], "accum": ref["accum"], "tokens_per_step": ref["tokens_per_step"],
                    "ours": f"{best['variant']}{' +compile' if best['compile'] else ''}",
                    "ours_tokens_per_s": best["tokens_per_s"], "released_tokens_per_s": ref["tokens_per_s"],
                    "speed_ratio": speed, "memory_ratio": mem, "speed_met": speed >= goal["speed"],
                    "memory_met": None if mem is None else mem <= goal["memory"]})
    return out


def _met(v) -> str:
    return "-" if v is None else "met" if v else "NOT met"


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def print_tables():
    print("\ntraining throughput per optimizer step (median; MFU = paper FLOPs x tokens/s / 989 TFLOP/s bf16)")
    print(f"{'case':<23}{'variant':>8}{'compile':>8}{'accum':>6}{'tokens':>9}{'step ms':>10}{'opt ms':>8}"
          f"{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'fwd+bwd MFU':>12}{'mem GiB':>9}")
    for r in RESULTS["cases"]:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['case']:<23}{r['variant']:>8}{'yes' if r['compile'] else 'no':>8}{r['accum']:>6}"
              f"{r['tokens_per_step']:>9}{1e3 * r['step_s_median']:>10.1f}{1e3 * r['opt_s_median']:>8.1f}"
              f"{r['tokens_per_s']:>11,.0f}{r['tflops']:>9.1f}{_pct(r['mfu']):>7}{_pct(r['fwd_bwd_mfu']):>12}{mem:>9}")
    sbs = RESULTS["side_by_side"] = side_by_side(RESULTS["cases"])
    if not any(r["variant"] == "released" for r in RESULTS["cases"]):
        print(f"anchor: {ANCHOR['what']}: {ANCHOR['tokens_per_s']:,} tokens/s = {100 * ANCHOR['mfu']:.1f}% MFU "
              f"({ANCHOR['case']} shape)")
    for r in sbs:
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        print(f"vs released, {r['case']} x{r['accum']} ({r['tokens_per_step']:,} tokens/step): ours ({r['ours']}) "
              f"{r['ours_tokens_per_s']:,.0f} / released {r['released_tokens_per_s']:,.0f} tokens/s = "
              f"{r['speed_ratio']:.2f}x, peak memory {mem}")
    if sbs:
        print(f"goal: {GOAL['what']}")
        for r in sbs:
            print(f"  {r['case']} x{r['accum']}: >= {GOAL['speed']:g}x tokens/s {_met(r['speed_met'])}; "
                  f"no more memory {_met(r['memory_met'])}")
    for label, prof in RESULTS["profiles"].items():
        print(f"\nwhere the time goes: {label}, small step ({prof['unit']}, {prof['total_ms_per_step']:.1f} ms)")
        for cat, v in prof["categories"].items():
            print(f"  {cat:<30}{v['us_per_step'] / 1e3:>10.1f} ms{100 * v['share']:>7.1f}%")
        for o in prof["top"][:8]:
            print(f"    {o['us_per_step'] / 1e3:8.2f} ms  {o['category']:<28} {o['name'][:90]}")
    chk = RESULTS.get("fused_loss_check")
    if chk:
        print(f"\nfused head loss vs plain ({chk['tokens']} tokens, vocabulary {chk['vocab']}, bf16 autocast): "
              f"rel. error loss {chk['rel_err_loss']:.1e}, dh {chk['rel_err_dh']:.1e}, dW {chk['rel_err_dw']:.1e}; "
              f"{chk['plain_ms']:.1f} ms -> {chk['fused_ms']:.1f} ms (forward + backward)"
              + (f"; extra memory {chk['plain_extra_mem_gib']:.2f} -> {chk['fused_extra_mem_gib']:.2f} GiB"
                 if "fused_extra_mem_gib" in chk else ""))
    for k, v in RESULTS["errors"].items():
        print(f"error: {k}: {v}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: the tiny preset, bf16 autocast, few steps")
    ap.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES | SMOKE)} "
                    "(default: all of the mode)")
    ap.add_argument("--variants", default="fast", help="comma-separated, from fast, ref (default fast)")
    ap.add_argument("--compile", default="yes", choices=("no", "yes", "both"))
    ap.add_argument("--backend", default="grouped", help="expert backend (grouped, triton, auto, loop)")
    ap.add_argument("--loss-chunk", type=int, default=8192,
                    help="tokens per chunk of the fused LM-head loss in the fast variant; 0: the plain loss")
    ap.add_argument("--optim-impl", default="auto", choices=("auto", "fused", "foreach", "single", "triton"),
                    help="AdamW of the fast variant (auto: train/optim.py resolve_impl, triton on one GPU; the ref "
                    "variant's auto is torch's fused AdamW)")
    ap.add_argument("--clip", default="fused", choices=("fused", "inplace"), help="the fast variant's clipping: "
                    "folded into the optimizer's step (fused, needs --optim-impl fused / auto on CUDA, or triton: in "
                    "its kernel, which also writes the compute copies) or clip_grad_norm_ in place, then step")
    ap.add_argument("--amp", default="auto", choices=("auto", "yes", "no"),
                    help="bf16 autocast (auto: on CUDA only; --smoke turns it on to run the fast paths)")
    ap.add_argument("--tokens-per-step", type=int, default=None,
                    help="tokens of the large (accumulated) step; default: each case's (~0.5M)")
    ap.add_argument("--warmup", type=int, default=None, help="small steps before timing (include compilation)")
    ap.add_argument("--steps", type=int, default=None, help="timed small steps")
    ap.add_argument("--big-steps", type=int, default=None, help="timed large steps")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--time-budget", type=float, default=380.0,
                    help="seconds; cases not started by then are skipped, large steps cut (reported as such); "
                    "a case started just before it may run ~1.5 minutes past it (compilation)")
    ap.add_argument("--site", default=None, help=released_stack.SITE_HELP + "; runs the released code's column")
    ap.add_argument("--code", default=str(released_stack.DEFAULT_CODE),
                    help="folder of the released modeling_deepseek.py / configuration_deepseek.py")
    ap.add_argument("--released-case", default=None,
                    help="the case the released code runs (default deepseekmoe-16b-4l; tiny with --smoke)")
    ap.add_argument("--released-timeout", type=float, default=300.0,
                    help="seconds for the released child (build, warm-up, small and large steps)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write results here (default $OUT/train_throughput.json if set)")
    args = ap.parse_args(argv)
    if args.child:
        return args
    args.released_case = args.released_case or ("tiny" if args.smoke else "deepseekmoe-16b-4l")
    if args.released_case not in CASES | SMOKE:
        ap.error(f"--released-case: unknown {args.released_case!r}; choose from {', '.join(CASES | SMOKE)}")
    if args.site is not None and not Path(args.site).is_dir():
        ap.error(f"--site {args.site}: no such folder")
    if args.site is not None and not (Path(args.code) / "modeling_deepseek.py").is_file():
        ap.error(f"--code {args.code}: no modeling_deepseek.py there; name the released code's folder")
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.cases:
        bad = [c for c in args.cases.split(",") if c not in CASES | SMOKE]
        if bad:
            ap.error(f"--cases: unknown {bad[0]!r}; choose from {', '.join(CASES | SMOKE)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(Path(args.child[0]), Path(args.child[1]))
    json_path = args.json or (os.path.join(os.environ["OUT"], "train_throughput.json") if os.environ.get("OUT")
                              else None)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cases = SMOKE if args.smoke else CASES
    if args.cases:
        cases = {k: (CASES | SMOKE)[k] for k in args.cases.split(",")}
    cpu = device.type == "cpu"
    if args.smoke:
        args.amp = "yes" if args.amp == "auto" else args.amp
        args.loss_chunk = min(args.loss_chunk, 50)  # several chunks at the tiny shape
        if args.compile == "yes":
            args.compile = "no"
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.steps = args.steps if args.steps is not None else (2 if cpu else 5)
    args.big_steps = args.big_steps if args.big_steps is not None else (1 if cpu else 2)
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
    if "fast" in args.variants.split(",") and args.loss_chunk:
        try:
            vocab = max(presets.get(spec["preset"]).vocab_size for spec in cases.values())
            RESULTS["fused_loss_check"] = check_fused_loss(device, vocab)
            log(f"fused head loss vs plain: {RESULTS['fused_loss_check']}")
        except Exception as e:
            RESULTS["errors"]["fused_loss_check"] = f"{type(e).__name__}: {e}"
            log(f"fused loss check FAILED\n{traceback.format_exc()}")
    if args.site:  # first, on an idle device: a bounded child (--released-timeout)
        try:
            run_released(args.released_case, (CASES | SMOKE)[args.released_case], device, args)
        except Exception as e:  # noqa: BLE001 - our cases still run
            RESULTS["errors"][f"{args.released_case} [released]"] = f"{type(e).__name__}: {e}"
            log(f"released: FAILED\n{traceback.format_exc()}")
        save(json_path)
    for compile_ in modes:
        for variant in args.variants.split(","):
            for name, spec in cases.items():
                label = f"{name}{' +compile' if compile_ else ''} [{variant}]"
                if time.time() - T0 > args.time_budget:
                    RESULTS["errors"][label] = f"skipped: time budget {args.time_budget:.0f}s spent"
                    continue
                try:
                    run_case(name, spec, device, args, compile_, variant)
                except Exception as e:  # keep going: one failing case must not hide the others
                    RESULTS["errors"][label] = f"{type(e).__name__}: {e}"
                    log(f"{label}: FAILED\n{traceback.format_exc()}")
                save(json_path)
    print_tables()
    save(json_path)
    return 0 if RESULTS["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
