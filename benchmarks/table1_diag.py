"""Diagnose the Table 1 recipe: train the shrunk Table 1 / 2 models of benchmarks/table1_small.py
under a grid of recipes (learning rates, schedules, seeds) with deepseekmoe.analysis.training, which
records per MoE layer the expert load, dead experts, router entropy and the balance loss's share of
the loss and of the router's gradient, and plot every run's curves in one figure.

    python benchmarks/table1_diag.py --models dense-2b,gshard-2b --lrs 2e-3,5e-4 --seeds 0,1,2 \\
        --schedules step,cosine --steps 600 --out runs/diag          # CPU: the shipped sample
    python benchmarks/table1_diag.py --smoke --out /tmp/d             # seconds: checks the script

Writes <out>/<label>.json per run (skipped when present: a grid can be resumed or extended),
<out>/diag.json (one summary row per run) and <out>/curves.png; prints the summary table.
A label is model_lr<lr>_<schedule>_s<seed>.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _table1():
    spec = importlib.util.spec_from_file_location("table1_small", HERE / "table1_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_one(args, label: str, model: str, lr: float, kind: str, seed: int, data: str, vocab: int, out: Path) -> dict:
    """One diagnosed run of the grid, or its JSON when <out>/<label>.json exists."""
    from deepseekmoe.analysis.training import DiagRun, train_with_diagnostics
    from deepseekmoe.train.recipe import OptimSection, ScheduleSection

    path = out / f"{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    extra = {} if args.alpha is None else {"aux_loss_alpha": args.alpha}
    cfg = _table1().model_config(model, vocab, args.hidden, args.layers, args.heads, args.ffn,
                                 expert_backend=args.backend, max_position_embeddings=max(512, args.seq_len), **extra)
    run = DiagRun(model=cfg, data=data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=seed,
                  data_seed=args.data_seed, optim=OptimSection(lr=lr),
                  schedule=ScheduleSection(kind=kind, warmup_steps=args.warmup or max(1, args.steps // 50)),
                  probe_every=args.probe_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
                  device=args.device, bf16=args.device.startswith("cuda"))
    print(f"== {label}", flush=True)
    t0 = time.time()
    res = train_with_diagnostics(run, echo=lambda s: print(s, flush=True))
    res["label"] = label
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(path)
    print(f"== {label}: {time.time() - t0:.0f} s", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default="", help="a prepared dataset ('' = the shipped sample)")
    ap.add_argument("--out", default="runs/table1-diag")
    ap.add_argument("--models", default="dense-2b,gshard-2b")
    ap.add_argument("--lrs", default="2e-3")
    ap.add_argument("--schedules", default="step", help="comma-separated: step, cosine, constant, wsd")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (0: steps / 50, as table1_small)")
    ap.add_argument("--alpha", type=float, default=None, help="expert balance factor (default: the preset's)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=172)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--probe-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--backend", default="grouped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="2 tiny runs of 6 steps")
    ap.add_argument("--replot", action="store_true", help="no training: the table and figure of every run JSON "
                                                          "in --out (grids run one after another into one --out)")
    args = ap.parse_args(argv)
    import torch

    from deepseekmoe.analysis.plots import plot_training
    from deepseekmoe.analysis.training import summarize
    from deepseekmoe.data import default_dataset, load_meta

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.ffn, args.steps = 32, 2, 2, 64, 6
        args.batch_size, args.seq_len, args.probe_every, args.eval_every, args.eval_batches = 4, 32, 3, 3, 2
    data = args.data or str(default_dataset())
    vocab = int(load_meta(Path(data))["vocab_size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, rows = {}, {}
    if args.replot:
        for path in sorted(out.glob("*_s*.json")):
            res = json.loads(path.read_text())
            results[path.stem], rows[path.stem] = res, summarize(res)
        args.models = ""
    for model in [m for m in args.models.split(",") if m]:
        for lr in _floats(args.lrs):
            for kind in [k for k in args.schedules.split(",") if k]:
                for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
                    label = f"{model}_lr{lr:g}_{kind}_s{seed}"
                    res = run_one(args, label, model, lr, kind, seed, data, vocab, out)
                    results[label] = res
                    rows[label] = summarize(res)
    cols = ["final_val", "best_val", "max_rise", "drop_mid", "drop_end", "load_max_over_mean",
            "dead_experts", "router_entropy", "gate_sum", "bal_over_lm_router_grad", "epochs"]
    print(f"\n{'run':34s} " + " ".join(f"{c[:12]:>12s}" for c in cols))
    for label, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>12s}" if v is None else f"{v:12.4g}")
        print(f"{label:34s} " + " ".join(cells))
    (out / "diag.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot_training(results, out / "curves.png")
    print(f"wrote {out / 'diag.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
