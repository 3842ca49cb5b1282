"""The fast training path's loss against the reference path's: the same model, data and seed, N steps.

    python benchmarks/train_loss_ab.py --json $OUT/loss_ab.json --png $OUT/loss_ab.png   # GPU: deepseekmoe-2b
    python benchmarks/train_loss_ab.py --tiny                                           # CPU smoke, seconds
    python benchmarks/train_loss_ab.py --plot-from RUN.json --png loss_ab.png           # table + PNG of a run

Runs, one after another in one process, each from the same initial weights (init_weights(seed)) on the
same batches in the same order (PackedLoader over the data, seed 0):
  ref     the reference path: LocalStep(weights=None), autocast casting each fp32 weight at every use,
          the plain head (logits, then F.cross_entropy; ModelConfig.lm_loss_chunk = 0)
  fast    the new path: ComputeWeights (bf16 copies cast once per optimizer step, fp32 gradient sums)
          and the fused chunked head + loss (lm_loss_chunk = --loss-chunk, 8192)
  reverse the yardstick of "bf16 noise": the reference path with each micro-batch's rows in reverse
          order. Every step sees the same tokens and the same mathematics (each loss term is a mean
          over the step's tokens, attention is per row), only the order of the sums (weight gradients,
          means) changes: the runs part by rounding alone, as ref and fast do
  repeat  (--noise reverse,repeat) the reference path again, unchanged: the run-to-run nondeterminism of
          the device (atomic adds, autotuning); 0 where the run is deterministic
The noise runs (--noise) are the yardstick; --runs names the runs compared against ref.
Training as the trainer does it (train/trainer.py): bf16 autocast with fp32 master weights, AdamW with
the paper's groups (betas 0.9/0.95, weight decay 0.1; fused on CUDA), lr --lr with --warmup linear steps
then a cosine to 0.1x, global-norm clipping at 1.0, a non-finite step skipped; every block compiled on
the GPU (--compile); expert backend triton where it runs, else grouped. Data: the shipped public-domain
sample (deepseekmoe.data.default_dataset(): 3.77M tokens, 4096-entry BPE; 200 steps of 8 x 2048 read
1,600 of its 1,839 windows, under one epoch) or --data DIR (a dataset `deepseekmoe prepare` wrote).

Recorded per step and run (JSON, --json): the trained loss, the LM loss, the balance loss, the gradient
norm, the lr; per run the step time (median), its wall time, and the LM loss on --val-batches batches of
the validation split after training. Compared (table, JSON "comparison"): each run's LM loss minus ref's,
per step; over the last --window steps (50) the mean |difference|, its max and its mean. Verdict: the
fast path tracks the reference within bf16 noise when its mean |difference| over the window is at most
--tolerance (2) x the largest such figure of the noise runs. The PNG (--png; matplotlib, Agg) shows the
runs' LM losses and each one's difference from ref.

GPU time (one H200, deepseekmoe-2b, 8 x 2048 tokens per step, measured 122 ms a step with the fast path and
compile ~30 s a run): per run ~30 s compile + steps x ~0.125 s + ~10 s (build, init, validation), plus
~20 s once (imports, the sample's tokenizer and shards): 200 steps x 3 runs (ref, fast, reverse) ~3.5 min;
with repeat, 4 runs, ~4.5 min. --time-budget (540 s) stops a run that would pass it (its steps so far are
kept) and skips the runs after it.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402 - benchmarks/common.py

RUNS = {"ref": "reference path (autocast casts at every use, plain head + cross-entropy)",
        "fast": "the trainer's default: ComputeWeights, fused chunked head loss, TritonAdamW (GPU)",
        "reverse": "reference path, each micro-batch's rows reversed (same math, other summation order)",
        "repeat": "reference path again (run-to-run nondeterminism)"}
NOISE = ("reverse", "repeat")
T0 = time.time()


def gpu_minutes(steps: int, runs: int) -> float:
    """The estimate of the docstring's last paragraph: minutes on one H200 at the 2B shape."""
    return (20 + runs * (30 + 0.125 * steps + 10)) / 60


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def save(res: dict, path) -> None:
    if path:
        write_json(path, res, indent=1)


# ------------------------------------------------------------------------------------ one run
def build(name: str, args, dev: torch.device):
    """(model, optimizer, LocalStep) of one run: the same config and initial weights for every run."""
    from deepseekmoe import Transformer, presets
    from deepseekmoe.parallel.fsdp import apply_compile
    from deepseekmoe.train.optim import ComputeWeights, build_optimizer, torch_adamw_impl
    from deepseekmoe.train.recipe import OptimSection
    from deepseekmoe.train.step import LocalStep

    fast = name == "fast"
    cfg = presets.get(args.preset, expert_backend=args.backend, lm_loss_chunk=args.loss_chunk if fast else 0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=dev)
    model.init_weights(seed=args.seed)
    model.set_routing(record=False)
    model.train()
    if args.compile:
        apply_compile(model)
    # fast: the trainer's default AdamW (triton on one GPU); the others: torch's, the reference twin
    opt = build_optimizer(model, OptimSection(lr=args.lr, impl="auto" if fast else torch_adamw_impl(dev)), dev)
    weights = ComputeWeights(model, optimizer=opt, defer_grads=True) if fast else None

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16)

    return cfg, model, opt, LocalStep(model, args.accum, autocast, None, dev, weights=weights)


def train_run(name: str, args, dev: torch.device, data_dir: Path, deadline: float) -> dict:
    """One run of args.steps optimizer steps; per-step figures (stops early at `deadline`)."""
    from deepseekmoe.data import PackedLoader
    from deepseekmoe.train.optim import ClippedStep, Schedule
    from deepseekmoe.train.recipe import ScheduleSection

    t_start = time.time()
    torch.manual_seed(args.seed)
    cfg, model, opt, stepper = build(name, args, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    # the trainer's clip: folded into the fast run's AdamW kernel; in place (clip_grad_norm_) for the others
    clipped = ClippedStep(opt, params, 1.0, impl="fused" if name == "fast" else "inplace")
    sched = Schedule(ScheduleSection(kind="cosine", warmup_steps=args.warmup), args.lr, args.steps)
    loader = PackedLoader(data_dir, "train", seq_len=args.seq_len, batch_size=args.micro, seed=0,
                          vocab_size=cfg.vocab_size)
    rec = {k: [] for k in ("loss", "lm", "balance", "gnorm", "lr", "finite", "step_s")}
    stopped = None
    try:
        for step in range(args.steps):
            if step > 0 and time.time() + 2 * statistics.median(rec["step_s"]) > deadline:
                stopped = f"time budget: stopped after {step} steps"
                break
            lr = sched.set(opt, step)
            batches = [next(loader).to(dev) for _ in range(args.accum)]
            if name == "reverse":
                batches = [x.flip(0) for x in batches]
            t = time.perf_counter()
            stats = stepper.run(batches)
            gnorm = clipped.clip(stats.loss)  # fused: the update is taken here (skipped on device if non-finite)
            vals = torch.stack([stats.loss, stats.lm, stats.balance, gnorm.float()]).tolist()  # the one sync
            finite = all(math.isfinite(v) for v in vals)
            if finite:
                clipped.update()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            rec["step_s"].append(time.perf_counter() - t)
            for k, v in zip(("loss", "lm", "balance", "gnorm"), vals):
                rec[k].append(v)
            rec["lr"].append(lr)
            rec["finite"].append(finite)
            if step % args.log_every == 0 or step == args.steps - 1:
                log(f"{name} step {step}: loss {vals[0]:.4f} (lm {vals[1]:.4f}), gnorm {vals[3]:.3f}, lr {lr:.2e}")
        val = None
        if args.val_batches:  # full [micro, seq_len] batches, in train mode and with grad on as the steps
            # ran: the compiled blocks' guards hold and nothing recompiles; the fast run evaluates on its
            # bf16 compute copies (what autocast's cast at each use gives)
            if stepper.weights is not None:
                stepper.weights.begin()
            try:
                val = validate(stepper, data_dir, args, dev)
            finally:
                if stepper.weights is not None:
                    stepper.weights.end()
    finally:
        if stepper.weights is not None:
            stepper.weights.remove()
        del model, opt, stepper, params
        gc.collect()
        torch._dynamo.reset()  # the next run's new modules compile afresh (Inductor's caches still help)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    times = rec["step_s"]
    return {"what": RUNS[name], **rec, "steps_done": len(times), "stopped": stopped, "val_lm": val,
            "first_step_s": times[0] if times else None,  # includes compilation
            "step_s_median": statistics.median(times[1:] or times) if times else None,
            "wall_s": time.time() - t_start}


def validate(stepper, data_dir: Path, args, dev: torch.device) -> float:
    """The mean LM loss over args.val_batches batches of the validation split. Not LocalStep.eval_sums:
    its running sum would keep every batch's graph alive (grad stays on, see train_run)."""
    from deepseekmoe.data import iter_eval_batches
    from deepseekmoe.train.step import forward

    total, count = 0.0, 0
    for x in iter_eval_batches(data_dir, "val", args.seq_len, args.micro, max_batches=args.val_batches):
        with stepper.autocast():
            out, n = forward(stepper.model, x.to(dev))
        total += float(out.lm_loss.detach()) * n
        count += n
        del out
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ comparison
def compare(runs: dict, window: int, tolerance: float) -> dict:
    """Each run's LM loss minus ref's over their common steps; figures over the last `window` of them;
    the verdict on fast against the noise runs (None where a figure is missing)."""
    out: dict = {"window": window, "tolerance": tolerance, "runs": {}}
    ref = runs.get("ref", {}).get("lm") or []
    for name, r in runs.items():
        if name == "ref" or not r.get("lm") or not ref:
            continue
        n = min(len(ref), len(r["lm"]))
        diff = [a - b for a, b in zip(r["lm"][:n], ref[:n])]
        tail = diff[-window:]
        out["runs"][name] = {"diff": diff, "common_steps": n, "window_steps": len(tail),
                             "mean_abs": statistics.fmean(abs(d) for d in tail) if tail else None,
                             "max_abs": max((abs(d) for d in tail), default=None),
                             "mean": statistics.fmean(tail) if tail else None}
    fast = out["runs"].get("fast", {}).get("mean_abs")
    noise = [out["runs"][k]["mean_abs"] for k in NOISE if out["runs"].get(k, {}).get("mean_abs") is not None]
    yard = max(noise) if noise else None
    out["noise_mean_abs"] = yard
    out["fast_over_noise"] = fast / yard if fast is not None and yard else None
    out["within_noise"] = None if fast is None or not yard else fast <= tolerance * yard
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    cmp_ = res["comparison"]
    w = cmp_["window"]
    lines = [f"LM loss, {res['settings']['preset']}, {res['settings']['tokens_per_step']:,} tokens per step",
             f"{'run':<9}{'steps':>6}{'first':>9}{f'last {w} mean':>14}{'val':>9}{'step ms':>9}"
             f"{f'mean|d| last {w}':>17}{'max|d|':>9}{'mean d':>10}"]
    for name, r in res["runs"].items():
        if not r.get("lm"):
            lines.append(f"{name:<9} {r.get('error', 'no steps')}")
            continue
        c = cmp_["runs"].get(name, {})
        ms = None if r["step_s_median"] is None else 1e3 * r["step_s_median"]
        lines.append(f"{name:<9}{r['steps_done']:>6}{r['lm'][0]:>9.4f}{statistics.fmean(r['lm'][-w:]):>14.4f}"
                     f"{_fmt(r.get('val_lm'), '.4f'):>9}{_fmt(ms, '.1f'):>9}{_fmt(c.get('mean_abs'), '.2e'):>17}"
                     f"{_fmt(c.get('max_abs'), '.2e'):>9}{_fmt(c.get('mean'), '+.1e'):>10}")
    v = cmp_["within_noise"]
    lines.append(f"fast vs ref / noise vs ref (mean |d| over the last {w} steps): "
                 f"{_fmt(cmp_['fast_over_noise'], '.2f')}; within bf16 noise (<= {cmp_['tolerance']:g}x): "
                 f"{'-' if v is None else 'yes' if v else 'NO'}")
    return "\n".join(lines)


def plot(res: dict, path) -> Path | None:
    """Top: every run's LM loss per step; bottom: each run's difference from ref. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7.5, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for name, r in res["runs"].items():
        if r.get("lm"):
            top.plot(range(len(r["lm"])), r["lm"], label=f"{name}: {r['what']}", lw=1.0)
    for name, c in res["comparison"]["runs"].items():
        bottom.plot(range(len(c["diff"])), c["diff"], label=f"{name} - ref", lw=0.8)
    bottom.axhline(0.0, color="grey", lw=0.5)
    s = res["settings"]
    top.set_title(f"{s['preset']}: LM loss, {s['tokens_per_step']:,} tokens/step, lr {s['lr']:g}", fontsize=9)
    top.set_ylabel("LM loss")
    bottom.set_ylabel("LM loss - ref")
    bottom.set_xlabel("optimizer step")
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny preset, 64-token rows, 12 steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; 12 with --tiny); "
                    f"one H200 at the 2B shape: ~{gpu_minutes(200, 3):.1f} min for 200 steps x 3 runs, "
                    f"~{gpu_minutes(200, 4):.1f} with 4")
    ap.add_argument("--runs", default="ref,fast", help="the runs compared (default ref,fast; the noise runs follow)")
    ap.add_argument("--noise", default="reverse", help="comma-separated noise runs, of reverse, repeat "
                    "(default reverse); 'none' for no yardstick")
    ap.add_argument("--preset", default=None, help="model preset (default deepseekmoe-2b; tiny with --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; 64 with --tiny)")
    ap.add_argument("--micro", type=int, default=None, help="rows per micro-batch (default 8; 4 with --tiny)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (default 4e-4)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 20; 2 with --tiny)")
    ap.add_argument("--loss-chunk", type=int, default=None, help="fused head loss chunk of the fast run "
                    "(default 8192; 50 with --tiny, several chunks)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights (default 0)")
    ap.add_argument("--data", default=None, help="a prepared dataset folder (default: the shipped sample, "
                    "deepseekmoe.data.default_dataset())")
    ap.add_argument("--backend", default=None, help="expert backend (default triton where it runs, else grouped)")
    ap.add_argument("--compile", default="auto", choices=("auto", "yes", "no"), help="compile every block "
                    "(auto: on CUDA)")
    ap.add_argument("--val-batches", type=int, default=None, help="validation batches after training (default 4)")
    ap.add_argument("--window", type=int, default=None, help="last steps compared (default 50; 4 with --tiny)")
    ap.add_argument("--tolerance", type=float, default=2.0, help="fast within noise: mean |d| <= this x noise's")
    ap.add_argument("--log-every", type=int, default=20, help="log a step every this many")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds (default 540); see the notes below")
    ap.add_argument("--json", default=None, help="results (default $OUT/train_loss_ab.json if $OUT is set)")
    ap.add_argument("--png", default=None, help="the figure (default beside --json, .png)")
    ap.add_argument("--plot-from", default=None, help="no training: the table and the PNG of this JSON")
    args = ap.parse_args(argv)
    t = args.tiny
    args.steps = args.steps if args.steps is not None else (12 if t else 200)
    args.preset = args.preset or ("tiny" if t else "deepseekmoe-2b")
    args.seq_len = args.seq_len or (64 if t else 2048)
    args.micro = args.micro or (4 if t else 8)
    args.warmup = args.warmup if args.warmup is not None else (2 if t else 20)
    args.loss_chunk = args.loss_chunk or (50 if t else 8192)
    args.val_batches = args.val_batches if args.val_batches is not None else (2 if t else 4)
    args.window = args.window or (4 if t else 50)
    if args.json is None and os.environ.get("OUT") and not t:
        args.json = os.path.join(os.environ["OUT"], "train_loss_ab.json")
    if args.png is None and (args.json or args.plot_from):
        args.png = str(Path(args.json or args.plot_from).with_suffix(".png"))
    noise = [] if args.noise == "none" else args.noise.split(",")
    args.names = list(dict.fromkeys(args.runs.split(",") + noise))
    bad = [n for n in args.names if n not in RUNS]
    if bad:
        ap.error(f"--runs/--noise: unknown {bad[0]!r}; choose from {', '.join(RUNS)}")
    for flag in ("steps", "seq_len", "micro", "accum", "window"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: give at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        res = json.loads(Path(args.plot_from).read_text())
        print(table(res))
        png = plot(res, args.png)
        print(f"figure: {png}" if png else "no figure: matplotlib is not installed")
        return 0
    from deepseekmoe import kernels
    from deepseekmoe.data import default_dataset

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.backend = args.backend or ("triton" if kernels.triton_unavailable_reason(dev) is None else "grouped")
    args.compile = args.compile == "yes" or (args.compile == "auto" and dev.type == "cuda")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer does
    data_dir = Path(args.data) if args.data else default_dataset(progress=False)
    settings = {k: getattr(args, k) for k in ("preset", "steps", "seq_len", "micro", "accum", "lr", "warmup",
                                              "loss_chunk", "seed", "backend", "compile", "val_batches")}
    settings.update(tokens_per_step=args.seq_len * args.micro * args.accum, data=str(data_dir),
                    optimizer="AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, cosine to 0.1x", autocast="bf16")
    res = {"settings": settings, "runs": {}, "errors": {},
           "env": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}}
    log(f"{dev}: runs {', '.join(args.names)}; data {data_dir}"
        + (f"; estimate ~{gpu_minutes(args.steps, len(args.names)):.1f} min on one H200 at the 2B shape"
           if dev.type == "cuda" else ""))
    deadline = T0 + args.time_budget
    for name in args.names:
        if time.time() > deadline - 30:
            res["runs"][name] = {"what": RUNS[name], "error": "skipped: time budget spent"}
            continue
        try:
            res["runs"][name] = train_run(name, args, dev, data_dir, deadline)
        except Exception as e:  # noqa: BLE001 - the other runs still run
            res["runs"][name] = {"what": RUNS[name], "error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
        res["comparison"] = compare(res["runs"], args.window, args.tolerance)
        save(res, args.json)
    print(table(res))
    png = plot(res, args.png) if args.png else None
    if args.png:
        print(f"figure: {png}" if png else "no figure: matplotlib is not installed (--plot-from the JSON elsewhere)")
    return 0 if all(r.get("lm") for r in res["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
