"""The paper's validation comparison (Table 1: Dense, Hash Layer, Switch, GShard, DeepSeekMoE) at
a small scale: the five 2B-validation presets shrunk to the same small dimensions, trained with one
shared recipe on the same data, compared by validation loss.

Shrinking keeps the paper's proportions: every MoE layer has 16 experts of the dense FFN's width
(Hash, Switch top-1; GShard top-2), DeepSeekMoE has 1 shared + 63 routed experts of a quarter of
it (top-7), so GShard and DeepSeekMoE activate two FFNs' worth of parameters per token, Hash and
Switch one, like Dense. Each model is one `deepseekmoe train` run (a subprocess; its run directory
is kept under --out); this script reads the runs' metrics.jsonl and writes table1_small.json, a
table on the terminal and val_loss.png.

    python benchmarks/table1_small.py --data .devdata/gutenberg-16k --out runs/table1     # GPU
    python benchmarks/table1_small.py --smoke --out /tmp/t1                               # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("dense-2b", "hash-2b", "switch-2b", "gshard-2b", "deepseekmoe-2b")
# The ablation of the paper's Fig. 3 between GShard (0 shared + 2 of 16) and DeepSeekMoE (1 shared
# + 7 of 63 quarter-width experts, m = 4): shared expert isolation at m = 1 (1 shared + 1 of 15
# full-width) and m = 2 (1 shared + 3 of 31 half-width). Every step activates two FFNs' worth.
ABLATIONS = {"shared-m1": (15, 1, 1), "shared-m2": (31, 3, 2)}  # name: (routed, top-k, segmentation m)
PAPER_PILE_LOSS = {"dense-2b": 2.060, "hash-2b": 1.932, "switch-2b": 1.881, "gshard-2b": 1.867,
                   "deepseekmoe-2b": 1.808}  # Table 1 (100B Pile tokens, 2B scale)


def overrides(model: str, hidden: int, layers: int, heads: int, ffn: int) -> list[str]:
    """Dotted recipe overrides that shrink one 2B-validation preset (or build an ablation variant
    of deepseekmoe-2b), keeping its proportions."""
    preset, extra = model, []
    expert = ffn // 4 if model == "deepseekmoe-2b" else ffn  # fine-grained: 0.25 x the FFN
    if model in ABLATIONS:
        routed, k, m = ABLATIONS[model]
        preset, expert = "deepseekmoe-2b", ffn // m
        extra = [f"--model.n_routed_experts={routed}", f"--model.num_experts_per_tok={k}", "--model.n_shared_experts=1"]
    return [f"--model.preset={preset}", f"--model.hidden_size={hidden}", f"--model.num_hidden_layers={layers}",
            f"--model.num_attention_heads={heads}", f"--model.num_key_value_heads={heads}",
            f"--model.intermediate_size={ffn}", f"--model.moe_intermediate_size={expert}", *extra]


def read(run: Path) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not evals:
        raise SystemExit(f"table1_small: {run}/metrics.jsonl has no validation record; did the run finish?")
    return {"val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"], "step": evals[-1]["step"],
            "curve": [(r["step"], r["val_loss"]) for r in evals],
            "tokens_per_s": sorted(r["tokens_per_s"] for r in train)[len(train) // 2] if train else None,
            "balance_loss": train[-1]["balance_loss"] if train else None,
            "expert_load": train[-1].get("expert_load") if train else None}


def counts(preset: str, vocab: int, ov: list[str]) -> tuple[int, int]:
    from deepseekmoe.model import presets

    kw = {a.split("=")[0].removeprefix("--model."): int(a.split("=")[1]) for a in ov if "preset" not in a}
    base = [a.split("=")[1] for a in ov if a.startswith("--model.preset=")][0]
    cfg = presets.get(base, vocab_size=vocab, **kw)
    return cfg.num_params(), cfg.num_active_params()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default="", help="a directory from `deepseekmoe prepare` ('' = the shipped sample)")
    ap.add_argument("--out", default="runs/table1-small", help="parent of the five run directories")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)} and the Fig. 3 ablations {', '.join(ABLATIONS)}")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688, help="dense FFN width (2B: 3416 = 2.67 x hidden)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and 6 steps: checks the script on a CPU")
    ap.add_argument("--backend", default="auto", help="expert backend of every run (auto, grouped, triton, ...)")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more dotted override for every run, written --extra=--optim.lr=1e-3 (repeatable)")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.ffn = 32, 2, 2, 64
        args.steps, args.batch_size, args.seq_len = 6, 4, 32
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS and m not in ABLATIONS]
    if bad:
        raise SystemExit(f"table1_small: unknown model {bad[0]!r}; choose from {', '.join([*MODELS, *ABLATIONS])}")
    vocab = 4096
    if args.data:
        meta = json.loads((Path(args.data) / "meta.json").read_text())
        vocab = int(meta.get("vocab_size", vocab))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for m in models:
        ov = overrides(m, args.hidden, args.layers, args.heads, args.ffn)
        run = out / m
        common = [f"--data.path={args.data}", f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}",
                  f"--train.seq_len={args.seq_len}", f"--optim.lr={args.lr}", f"--model.vocab_size={vocab}",
                  f"--model.max_position_embeddings={max(512, args.seq_len)}",
                  f"--eval.every={max(1, args.steps // 5)}", "--eval.max_batches=64",
                  f"--checkpoint.every={args.steps}", "--checkpoint.keep=1", "--log.every=50",
                  "--log.progress=false", "--sample.max_new_tokens=0", "--schedule.warmup_steps="
                  + str(max(1, args.steps // 50)), f"--system.compile={'true' if args.compile else 'false'}",
                  f"--model.expert_backend={args.backend}"]
        if not (run / "metrics.jsonl").exists() or not any(
                '"kind": "eval"' in line and f'"step": {args.steps}' in line
                for line in (run / "metrics.jsonl").read_text().splitlines()):
            if run.exists():
                import shutil

                shutil.rmtree(run)
            cmd = [sys.executable, "-m", "deepseekmoe", "train", "--out", str(run), *ov, *common, *args.extra]
            print(f"== {m}: {' '.join(cmd[3:])}", flush=True)
            t0 = time.time()
            r = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if r.returncode != 0:
                raise SystemExit(f"table1_small: training {m} failed (exit {r.returncode}); see above")
            print(f"== {m}: {time.time() - t0:.0f} s", flush=True)
        total, active = counts(m, vocab, ov)
        rows[m] = {**read(run), "params": total, "active_params": active, "overrides": ov}
    print(f"\n{'model':16s} {'params':>8s} {'active':>8s} {'val loss':>9s} {'bits/byte':>9s} {'tok/s':>9s}"
          f"  paper Pile loss (2B, 100B tokens)")
    for m, r in rows.items():
        print(f"{m:16s} {r['params'] / 1e6:7.2f}M {r['active_params'] / 1e6:7.2f}M {r['val_loss']:9.4f} "
              f"{r['val_bpb']:9.4f} {r['tokens_per_s'] or 0:9.0f}  {PAPER_PILE_LOSS.get(m, float('nan')):.3f}")
    result = {"args": vars(args), "vocab_size": vocab, "rows": rows, "paper_pile_loss": PAPER_PILE_LOSS,
              "date": time.strftime("%Y-%m-%d")}
    import torch

    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["torch"] = torch.__version__
    tmp = out / "table1_small.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "table1_small.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, r in rows.items():
            s, v = zip(*r["curve"])
            ax.plot(s, v, marker="o", ms=3, label=f"{m} ({r['active_params'] / 1e6:.1f}M active)")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Table 1 at small scale")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "val_loss.png", dpi=120)
        wrote = f"{out / 'table1_small.json'} and {out / 'val_loss.png'}"
    except ImportError:
        wrote = f"{out / 'table1_small.json'} (no plot: matplotlib is not installed)"
    print(f"wrote {wrote}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
