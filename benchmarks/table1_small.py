"""The paper's validation comparison (Table 1: Dense, Hash Layer, Switch, GShard, DeepSeekMoE; Table 2:
GShard x1.5, Dense x16) at a small scale: the 2B-validation presets shrunk to the same small
dimensions, trained with one shared recipe on the same data, over several seeds, compared by
validation loss; optionally the section-4.5 analyses (Figs 4-6) of the trained models.

Shrinking keeps the paper's proportions: every MoE layer has 16 experts of the dense FFN's width
(Hash, Switch top-1; GShard top-2), DeepSeekMoE has 1 shared + 63 routed experts of a quarter of
it (top-7), so GShard and DeepSeekMoE activate two FFNs' worth of parameters per token, Hash and
Switch one, like Dense; GShard x1.5 has experts 1.5 x as wide, Dense x16 one FFN 16 x as wide.
Each model and seed is one `deepseekmoe train` run (a subprocess; --parallel of them at once: small
models leave a GPU idle between kernel launches); its run directory is kept under --out (a finished
run is reused). Writes --results (default <out>/table1_small.json: every run's final validation
loss, curves, tokens/s, parameter counts and tokens per activated parameter), a table on the
terminal and val_loss.png. `--report` turns result JSONs into the Table 1 / 2 markdown (mean,
spread, standard error, adjacent-gap verdicts) and the plots (benchmarks/table1_report.py).

    python benchmarks/table1_small.py --data .devdata/gutenberg-8k --seeds 0,1 --parallel 4 --out runs/t1   # GPU
    python benchmarks/table1_small.py --raw .gpu/raw --tokenizer .gpu/raw/tokenizer.json --data /tmp/g8k ...
    python benchmarks/table1_small.py --measure-tokens-per-s --data /tmp/g8k --parallel 4 --steps 3000 ...
    python benchmarks/table1_small.py --report a.json b.json --report-out docs/img                         # CPU
    python benchmarks/table1_small.py --smoke --out /tmp/t1                                                 # CPU check
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
# Table 2's references: GShard x1.5 (16 experts of 1.5 FFN widths, top-2) and Dense x16 (one FFN 16
# widths wide: every expert always on, the MoE upper bound).
TABLE2 = ("gshard-2.9b", "dense-2b-x16")
ALIASES = {"dense": "dense-2b", "hash": "hash-2b", "switch": "switch-2b", "gshard": "gshard-2b",
           "deepseekmoe": "deepseekmoe-2b", "gshard-x1.5": "gshard-2.9b", "dense-x16": "dense-2b-x16"}
# The ablation of the paper's Fig. 3 between GShard (0 shared + 2 of 16) and DeepSeekMoE (1 shared
# + 7 of 63 quarter-width experts, m = 4): shared expert isolation at m = 1 (1 shared + 1 of 15
# full-width) and m = 2 (1 shared + 3 of 31 half-width). Every step activates two FFNs' worth.
ABLATIONS = {"shared-m1": (15, 1, 1), "shared-m2": (31, 3, 2)}  # name: (routed, top-k, segmentation m)
PAPER_PILE_LOSS = {"dense-2b": 2.060, "hash-2b": 1.932, "switch-2b": 1.881, "gshard-2b": 1.867,
                   "deepseekmoe-2b": 1.808,  # Table 1 (100B Pile tokens, 2B scale)
                   "gshard-2.9b": 1.808, "dense-2b-x16": 1.806}  # Table 2
ANALYZED = ("deepseekmoe-2b", "gshard-2b", "gshard-2.9b")  # Figs 4-6: DeepSeekMoE against both GShards


def overrides(model: str, hidden: int, layers: int, heads: int, ffn: int) -> list[str]:
    """Dotted recipe overrides that shrink one 2B-validation preset (or build an ablation variant
    of deepseekmoe-2b), keeping its proportions."""
    preset, extra = model, []
    expert = ffn // 4 if model == "deepseekmoe-2b" else ffn  # fine-grained: 0.25 x the FFN
    if model == "gshard-2.9b":
        expert = ffn * 3 // 2
    if model == "dense-2b-x16":
        ffn = 16 * ffn
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
    steady = train[2:] or train  # the first records hold start-up and compilation
    return {"val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"], "step": evals[-1]["step"],
            "curve": [(r["step"], r["val_loss"]) for r in evals],
            "train_curve": [(r["step"], r["lm_loss"]) for r in train],
            "tokens_per_s": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2] if train else None,
            "balance_loss": train[-1]["balance_loss"] if train else None,
            "expert_load": train[-1].get("expert_load") if train else None}


def config_of(ov: list[str], vocab: int, **fields):
    """The ModelConfig that the dotted overrides `ov` of `overrides()` build (and `fields` on top)."""
    from deepseekmoe.model import presets

    kw = {a.split("=")[0].removeprefix("--model."): int(a.split("=")[1]) for a in ov if "preset" not in a}
    base = [a.split("=")[1] for a in ov if a.startswith("--model.preset=")][0]
    return presets.get(base, vocab_size=vocab, **kw, **fields)


def model_config(model: str, vocab: int, hidden: int, layers: int, heads: int, ffn: int, **fields):
    """One shrunk Table 1 / 2 model (or Fig. 3 ablation) as a ModelConfig."""
    return config_of(overrides(model, hidden, layers, heads, ffn), vocab, **fields)


def counts(preset: str, vocab: int, ov: list[str]) -> tuple[int, int]:
    cfg = config_of(ov, vocab)
    return cfg.num_params(), cfg.num_active_params()


def embedding_params(vocab: int, hidden: int) -> int:
    return 2 * vocab * hidden  # input embedding + output head (untied)


def parse_models(text: str) -> list[str]:
    models = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    known = (*MODELS, *TABLE2, *ABLATIONS)
    bad = [m for m in models if m not in known]
    if bad:
        raise SystemExit(f"table1_small: unknown model {bad[0]!r}; choose from {', '.join(known)} "
                         f"(or {', '.join(ALIASES)})")
    return models


def parse_shards(spec: str, raw: Path) -> list[Path]:
    """'all', '0-30' or '0,3,7' -> the train_NNN.jsonl.xz files of `raw`."""
    have = sorted(raw.glob("train_*.jsonl.xz"))
    if spec == "all":
        picked = have
    else:
        ids = set()
        for part in spec.split(","):
            a, _, b = part.partition("-")
            ids.update(range(int(a), int(b or a) + 1))
        picked = [p for p in have if int(p.name[6:9]) in ids]
    if not picked:
        raise SystemExit(f"table1_small: no train_*.jsonl.xz shard of {raw} matches --shards {spec}")
    return picked


def prepare_raw(args) -> None:
    """Tokenise --raw's shards into --data (on the GPU machine, with all its cores), unless done."""
    data, raw = Path(args.data), Path(args.raw)
    if (data / "meta.json").exists():
        return
    shards = parse_shards(args.shards, raw)
    cmd = [sys.executable, "-m", "deepseekmoe", "prepare", *map(str, shards), "--val", str(raw / "val_000.jsonl.xz"),
           "--out", str(data), "--quiet", "--workers", str(args.workers or os.cpu_count() or 1)]
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else ["--vocab-size", str(args.vocab_size)]
    t0 = time.time()
    print(f"== prepare {len(shards)} shards: {' '.join(cmd[3:8])} ...", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("table1_small: tokenising --raw failed; see above")
    print(f"== prepared {data} in {time.time() - t0:.0f} s", flush=True)


def common_overrides(args, vocab: int, steps: int) -> list[str]:
    ev = max(1, steps // args.evals) if steps >= args.evals else steps
    warm = args.warmup if args.warmup is not None else max(1, steps // 50)
    out = [f"--data.path={args.data}", f"--train.steps={steps}", f"--train.batch_size={args.batch_size}",
           f"--train.seq_len={args.seq_len}", f"--optim.lr={args.lr}", f"--model.vocab_size={vocab}",
           f"--model.max_position_embeddings={max(512, args.seq_len)}", f"--eval.every={ev}",
           f"--eval.max_batches={args.eval_batches}", f"--checkpoint.every={steps}", "--checkpoint.keep=1",
           f"--log.every={args.log_every}", "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
           "--sample.max_new_tokens=0", f"--schedule.kind={args.schedule}", f"--schedule.warmup_steps={warm}",
           f"--schedule.decay_at=[{args.decay_at}]", f"--schedule.min_lr_ratio={args.min_lr_ratio}",
           f"--system.compile={'true' if args.compile else 'false'}", f"--model.expert_backend={args.backend}"]
    return out + ([f"--model.aux_loss_alpha={args.alpha}"] if args.alpha is not None else [])


def finished(run: Path, steps: int) -> bool:
    m = run / "metrics.jsonl"
    return m.exists() and any('"kind": "eval"' in ln and f'"step": {steps}' in ln for ln in m.read_text().splitlines())


def run_all(jobs: list[tuple[str, int, Path, list[str]]], parallel: int, deadline: float) -> dict:
    """Run the training commands, `parallel` at a time, each logging to <run>.log; start none that
    would end after `deadline` (time.time()) and stop the running ones there.
    -> {(model, seed): seconds, or None when failed, stopped or not started}."""
    import shutil

    pending, running, took = list(jobs), {}, {}
    # A run that cannot finish before the deadline is not started: its time would be lost. Its
    # length is guessed from the longest run finished so far (0 before the first one ends).
    longest = lambda: max([t for t in took.values() if t], default=0.0)
    while pending or running:
        while pending and len(running) < parallel and time.time() + longest() < deadline:
            model, seed, run, cmd = pending.pop(0)
            if run.exists():
                shutil.rmtree(run)
            run.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.parent / f"{run.name}.log", "w")
            print(f"== start {model} seed {seed}", flush=True)
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            running[p] = (model, seed, run, time.time(), log)
        if not running and pending:  # the deadline passed before these could start
            for model, seed, *_ in pending:
                took[(model, seed)] = None
            break
        time.sleep(0.5)
        for p in [p for p in running if p.poll() is not None or time.time() > deadline]:
            model, seed, run, t0, log = running.pop(p)
            if p.poll() is None:
                p.terminate()
                p.wait(30)
            log.close()
            ok = p.returncode == 0
            took[(model, seed)] = time.time() - t0 if ok else None
            tail = "" if ok else " -- FAILED or stopped; last lines:\n" + "".join(
                (run.parent / f"{run.name}.log").read_text().splitlines(True)[-8:])
            print(f"== end {model} seed {seed}: {time.time() - t0:.0f} s{tail}", flush=True)
    return took


def measure(args, models: list[str], vocab: int) -> dict:
    """--measure-tokens-per-s: a short run of each model (--parallel at once, as the real runs),
    steady tokens/s, and the minutes a run of --steps steps would take."""
    out = Path(args.out) / "measure"
    steps = args.measure_steps
    jobs = []
    for m in models:
        ov = overrides(m, args.hidden, args.layers, args.heads, args.ffn)
        c = common_overrides(args, vocab, steps)
        c = [x for x in c if not x.startswith(("--log.every", "--eval."))]  # one short validation, at the end
        c += ["--log.every=2", "--eval.every=0", "--eval.max_batches=1"]
        jobs.append((m, 0, out / m, [sys.executable, "-m", "deepseekmoe", "train", "--out", str(out / m), *ov, *c,
                                     *args.extra]))
    took = run_all(jobs, args.parallel, time.time() + args.deadline_s)
    tok_step = args.batch_size * args.seq_len
    rows = {}
    for m in models:
        if took.get((m, 0)) is None:
            rows[m] = {"failed": True}
            continue
        r = read(out / m)
        tps = r["tokens_per_s"]
        overhead = max(0.0, took[(m, 0)] - steps * tok_step / tps)  # start-up, compilation, the last save
        run_s = args.steps * tok_step / tps
        eval_s = args.evals * (args.eval_batches or 64) * tok_step / (3 * tps)  # forward only: ~1/3 of a step
        rows[m] = {"tokens_per_s": tps, "wall_s": took[(m, 0)], "overhead_s": overhead, "est_run_s": run_s,
                   "est_eval_s": eval_s, "est_total_s": run_s + eval_s + overhead}
    print(f"\n{'model':16s} {'tokens/s':>10s} {'wall s':>7s} {'est. s for --steps ' + str(args.steps):>22s}"
          f"   (concurrency {args.parallel})")
    for m, r in rows.items():
        print(f"{m:16s} " + ("failed" if r.get("failed") else
                             f"{r['tokens_per_s']:10.0f} {r['wall_s']:7.0f} {r['est_total_s']:22.0f}"))
    ok = [r for r in rows.values() if not r.get("failed")]
    if ok:
        per_seed = sum(r["est_total_s"] for r in ok) / args.parallel
        print(f"one seed of these {len(ok)} models, {args.parallel} at a time: about {per_seed / 60:.1f} min "
              "(the concurrent runs share the GPU, so tokens/s above are per run under that sharing)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default="", help="a directory from `deepseekmoe prepare` ('' = the shipped sample)")
    ap.add_argument("--raw", default="", help="raw Gutenberg shards (train_NNN.jsonl.xz, val_000.jsonl.xz) to "
                                              "tokenise into --data first, unless --data holds a dataset")
    ap.add_argument("--shards", default="all", help="which train shards of --raw: all, 0-30, 0,4,9")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json for --raw (default: train a BPE there)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE size when --raw has no --tokenizer")
    ap.add_argument("--workers", type=int, default=0, help="tokenising processes (0: all cores)")
    ap.add_argument("--out", default="runs/table1-small", help="parent of the run directories")
    ap.add_argument("--results", default="", help="the results JSON (default <out>/table1_small.json)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}, Table 2's {', '.join(TABLE2)}, "
                         f"the Fig. 3 ablations {', '.join(ABLATIONS)}, or the short names {', '.join(ALIASES)}")
    ap.add_argument("--seeds", default="0", help="initialisation seeds (train.seed), e.g. 0,1,2")
    ap.add_argument("--seeds-for", action="append", default=[], metavar="MODEL=SEEDS",
                    help="other seeds for one model, e.g. gshard-2b=0,1,2 (repeatable)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688, help="dense FFN width (2B: 3416 = 2.67 x hidden)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schedule", default="step", help="step (x0.316 at --decay-at), cosine, wsd, constant")
    ap.add_argument("--decay-at", default="0.8, 0.9", help="step schedule: fractions of the run")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine / wsd: the last lr / --lr")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps / 50)")
    ap.add_argument("--alpha", type=float, default=None, help="expert balance factor (default: the preset's 0.01)")
    ap.add_argument("--evals", type=int, default=10, help="validations per run")
    ap.add_argument("--eval-batches", type=int, default=64, help="validation batches (0: the whole split)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--backend", default="auto", help="expert backend of every run (auto, grouped, triton, ...)")
    ap.add_argument("--parallel", type=int, default=1, help="training processes at once (one GPU is shared)")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="stop starting runs, and stop running ones, this many seconds after the start")
    ap.add_argument("--measure-tokens-per-s", action="store_true",
                    help="only a short run of each model: tokens/s and the time a --steps run would take")
    ap.add_argument("--measure-steps", type=int, default=20)
    ap.add_argument("--measured", default="", help="a tokens_per_s.json of --measure-tokens-per-s (same sizes)")
    ap.add_argument("--fit-s", type=float, default=0,
                    help="with --measured: lower --steps (never raise it) so that this call's runs, --parallel at "
                         "a time, take about this many seconds; the steps chosen are printed and recorded")
    ap.add_argument("--analyze", action="store_true", help="after training: Figs 4-6 (deepseekmoe analyze) of "
                                                           f"{', '.join(ANALYZED)} for the first seed")
    ap.add_argument("--analyze-limit", type=int, default=64, help="validation windows the analyses use")
    ap.add_argument("--analyze-reserve-s", type=float, default=120,
                    help="with --analyze: the training stops this long before --deadline-s, for the analyses")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="build the Table 1 / 2 markdown and plots from result JSONs (no training)")
    ap.add_argument("--report-out", default="", help="folder of the report's markdown and PNGs")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and 6 steps: checks the script on a CPU")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more dotted override for every run, written --extra=--optim.lr=1e-3 (repeatable)")
    args = ap.parse_args(argv)
    if args.report:
        import importlib.util

        spec = importlib.util.spec_from_file_location("table1_report", Path(__file__).parent / "table1_report.py")
        rep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rep)
        return rep.report(args.report, Path(args.report_out or Path(args.report[0]).parent))
    if args.smoke:
        args.hidden, args.layers, args.heads, args.ffn = 32, 2, 2, 64
        args.steps, args.batch_size, args.seq_len, args.eval_batches, args.evals = 6, 4, 32, 8, 5
        args.measure_steps = 6
    models = parse_models(args.models)
    if args.raw:
        if not args.data:
            raise SystemExit("table1_small: --raw needs --data, the folder to tokenise into")
        prepare_raw(args)
    return train_set(args, models)


def train_set(args, models: list[str]) -> int:
    t_start = time.time()
    vocab = 4096
    if args.data:
        vocab = int(json.loads((Path(args.data) / "meta.json").read_text()).get("vocab_size", vocab))
    if args.measure_tokens_per_s:
        rows = measure(args, models, vocab)
        _write(Path(args.results or Path(args.out) / "tokens_per_s.json"),
               {"kind": "tokens_per_s", "args": vars(args), "rows": rows, **_env()})
        return 0
    seeds = {m: [int(s) for s in args.seeds.split(",") if s.strip()] for m in models}
    for spec in args.seeds_for:
        m, _, s = spec.partition("=")
        seeds[ALIASES.get(m, m)] = [int(x) for x in s.split(",") if x.strip()]
    out = Path(args.out)
    jobs, runs = _jobs(args, models, seeds, vocab, out)
    if args.fit_s and args.measured and jobs:
        args.steps = fit_steps(args, [m for m, *_ in jobs], json.loads(Path(args.measured).read_text())["rows"])
        jobs, runs = _jobs(args, models, seeds, vocab, out)
    reserve = args.analyze_reserve_s if args.analyze else 0.0
    took = run_all(jobs, args.parallel, t_start + args.deadline_s - reserve)
    table = []
    for m, seed, run, ov in runs:
        if not finished(run, args.steps):
            table.append({"model": m, "seed": seed, "finished": False})
            continue
        total, active = counts(m, vocab, ov)
        tokens = args.steps * args.batch_size * args.seq_len
        emb = embedding_params(vocab, args.hidden)
        table.append({"model": m, "seed": seed, "finished": True, **read(run), "params": total,
                      "active_params": active, "tokens": tokens, "tokens_per_active_param": tokens / active,
                      "tokens_per_active_nonemb_param": tokens / (active - emb), "seconds": took.get((m, seed)),
                      "overrides": ov})
    result = {"kind": "table1_small", "args": vars(args), "vocab_size": vocab, "runs": table,
              "paper_pile_loss": PAPER_PILE_LOSS, **_env()}
    if args.data:
        meta = json.loads((Path(args.data) / "meta.json").read_text())
        result["train_tokens"] = meta["splits"]["train"]["tokens"]
        result["epochs"] = args.steps * args.batch_size * args.seq_len / result["train_tokens"]
    if args.analyze:
        result["analysis"] = analyze(args, runs, t_start)
    results = Path(args.results or out / "table1_small.json")
    _write(results, result)
    _print_table(table)
    _plot(table, out / "val_loss.png")
    print(f"wrote {results} and {out / 'val_loss.png'} ({time.time() - t_start:.0f} s)")
    return 0


def _jobs(args, models: list[str], seeds: dict, vocab: int, out: Path):
    """(training commands still to run, every (model, seed, run dir, overrides)), seed-major so that a
    cut-off call loses whole seeds last."""
    jobs, runs = [], []
    for seed in sorted({s for v in seeds.values() for s in v}):
        for m in models:
            if seed not in seeds.get(m, []):
                continue
            ov = overrides(m, args.hidden, args.layers, args.heads, args.ffn)
            run = out / f"{m}-s{seed}"
            runs.append((m, seed, run, ov))
            if not finished(run, args.steps):
                cmd = [sys.executable, "-m", "deepseekmoe", "train", "--out", str(run), *ov,
                       *common_overrides(args, vocab, args.steps), f"--train.seed={seed}", *args.extra]
                jobs.append((m, seed, run, cmd))
    return jobs, runs


def fit_steps(args, planned: list[str], measured: dict) -> int:
    """The most steps (a multiple of 100, at least 100, never above --steps) at which the planned runs,
    --parallel at a time, take about --fit-s seconds by the measured tokens/s, start-up and
    validation of each model (a model not measured counts as the slowest one measured)."""
    ok = {m: r for m, r in measured.items() if not r.get("failed")}
    if not ok:
        raise SystemExit("table1_small: --measured holds no successful measurement")
    slow = min(ok.values(), key=lambda r: r["tokens_per_s"])
    tok_step = args.batch_size * args.seq_len
    fixed = sum(ok.get(m, slow)["overhead_s"] + ok.get(m, slow)["est_eval_s"] for m in planned)
    per_step = sum(tok_step / ok.get(m, slow)["tokens_per_s"] for m in planned)
    steps = int((args.fit_s * args.parallel - fixed) / per_step) // 100 * 100
    chosen = min(args.steps, max(100, steps))
    print(f"== --fit-s {args.fit_s:.0f}: {len(planned)} runs, {args.parallel} at a time -> {chosen} steps "
          f"(at most {args.steps}); give the next round --steps {chosen}", flush=True)
    return chosen


def analyze(args, runs, t_start: float) -> dict:
    """Figs 4-6 on the first finished seed of each analysed model; one dict per model (the JSONs
    `deepseekmoe analyze` writes), so that one results file carries them."""
    got = {}
    for m in ANALYZED:
        mine = [r for r in runs if r[0] == m and finished(r[2], args.steps)]
        if not mine or time.time() > t_start + args.deadline_s:
            continue
        _, seed, run, _ = mine[0]
        dest = run.parent / f"analyze-{m}-s{seed}"
        k = 7 if m == "deepseekmoe-2b" else 2
        cmd = [sys.executable, "-m", "deepseekmoe", "analyze", "--model", str(run), "--data", args.data or "sample",
               "--experiments", "redundancy,shared,topk", "--limit", str(args.analyze_limit),
               "--seq-len", str(args.seq_len), "--out", str(dest), "--fractions", "0,1/16,2/16,3/16,4/16",
               "--top-k-values", ",".join(map(str, range(1, k + 3)))]
        print(f"== analyze {m} seed {seed}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            got[m] = {"failed": True}
            continue
        got[m] = {"seed": seed, **{p.stem: json.loads(p.read_text()) for p in sorted(dest.glob("fig*.json"))}}
    return got


def _env() -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _print_table(table: list[dict]) -> None:
    print(f"\n{'model':16s} {'seed':>4s} {'params':>8s} {'active':>8s} {'tok/act':>7s} {'val loss':>9s} "
          f"{'bits/byte':>9s} {'tok/s':>9s}  paper Pile loss (2B, 100B tokens)")
    for r in table:
        if not r["finished"]:
            print(f"{r['model']:16s} {r['seed']:4d}  not finished")
            continue
        print(f"{r['model']:16s} {r['seed']:4d} {r['params'] / 1e6:7.2f}M {r['active_params'] / 1e6:7.2f}M "
              f"{r['tokens_per_active_param']:7.1f} {r['val_loss']:9.4f} {r['val_bpb'] or 0:9.4f} "
              f"{r['tokens_per_s'] or 0:9.0f}  {PAPER_PILE_LOSS.get(r['model'], float('nan')):.3f}")


def _plot(table: list[dict], path: Path) -> None:
    curves = {f"{r['model']}_s{r['seed']}": r["curve"] for r in table if r["finished"]}
    if not curves:
        return
    try:
        from deepseekmoe.analysis.plots import plot_curves

        plot_curves(curves, path, title="Table 1 / 2 at small scale: validation loss of every run")
    except ImportError:  # matplotlib is optional: the JSON holds the curves, --report plots them
        print("no plot: matplotlib is not installed")


if __name__ == "__main__":
    raise SystemExit(main())
