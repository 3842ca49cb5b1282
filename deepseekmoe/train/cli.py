"""`deepseekmoe train [RECIPE] [--section.key=value ...] [--resume [PATH]] [--out DIR]`.

With no arguments it runs the default job: the `tiny` DeepSeekMoE on the shipped public-domain
sample, a few minutes on a 2-core CPU, ending with the validation loss, a generated sample, the
expert-load summary and a run directory (checkpoint, metrics.jsonl, loss.png).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from deepseekmoe.errors import ConfigError
from deepseekmoe.train import recipe as recipe_mod


def _key_listing() -> str:
    cfg = recipe_mod.TrainConfig()
    lines = ["recipe keys (override any with --KEY=VALUE; model.* takes any ModelConfig field):"]
    for section in ("name", "out", "model", "data", "optim", "schedule", "train", "eval", "checkpoint", "log",
                    "system", "sample", "parallel"):
        v = getattr(cfg, section)
        if section == "model":
            lines.append("  model.preset = 'tiny'   model.<field> = ... (see `deepseekmoe info --list`)")
        elif isinstance(v, str):
            lines.append(f"  {section} = {v!r}")
        else:
            items = ", ".join(f"{k}={getattr(v, k)!r}" for k in vars(v))
            lines.append(f"  {section}: {items}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="a TOML recipe (path, or a name in configs/ such as deepseekmoe-2b); default: the tiny job")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run exactly: a run or checkpoint directory (a run that stopped before its "
                        "first checkpoint restarts from step 0 with its config.toml); alone, the newest run "
                        "(of --out if given, else runs/<name>-*)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.epilog = _key_listing()
    # Dotted overrides are open-ended (every ModelConfig field), so they are split off before
    # argparse sees the rest; their keys are checked in run(), where errors print as one line.
    parse = p.parse_args

    def parse_args(args=None, namespace=None):
        rest, overrides = split_overrides(list(sys.argv[1:] if args is None else args))
        ns = parse(rest, namespace)
        ns.overrides = overrides
        return ns

    p.parse_args = parse_args


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--a.b=v` / `--a.b v` / `--name=v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        key = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if key and ("." in key or key == "name"):
            if "=" in tok:
                overrides.append((key, tok.split("=", 1)[1]))
            elif i + 1 < len(argv):
                overrides.append((key, argv[i + 1]))
                i += 1
            else:
                overrides.append((key, ""))
            i += 1
            continue
        rest.append(tok)
        i += 1
    return rest, overrides


def _latest_run(name: str) -> Path:
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    runs = [r for r in runs if (r / "checkpoints").is_dir() or (r / "config.toml").is_file()]
    if not runs:
        raise ConfigError(f"--resume: no run of {name!r} under runs/; pass the run directory: --resume DIR")
    return runs[-1]


def run(args) -> int:
    from deepseekmoe.checkpoint import training as ckpt_io
    from deepseekmoe.train.recovery import Interrupted, restartable
    from deepseekmoe.train.trainer import train

    overrides = getattr(args, "overrides", [])
    resume, restart = None, None
    if args.resume is not None:
        if args.recipe:
            raise ConfigError("give a recipe or --resume, not both: a resumed run keeps its own config "
                              "(change single keys with --section.key=value)")
        if args.resume == "latest":
            name = dict(overrides).get("name", recipe_mod.TrainConfig().name)
            spec = Path(args.out) if args.out else _latest_run(name)
        else:
            spec = Path(args.resume)
        if restartable(spec):  # stopped before its first checkpoint: from step 0, with its own config
            # (with another --out: a new run of that config there, checked like any new run)
            restart = spec if not args.out or Path(args.out) == spec else None
            cfg = recipe_mod.build(str(spec / "config.toml"), overrides)
        else:
            resume = ckpt_io.resolve(spec)
            state = ckpt_io.verify(resume)
            cfg = recipe_mod.build(base=state["config"], overrides=overrides)
    else:
        cfg = recipe_mod.build(args.recipe, overrides)
    if args.out:
        cfg.out = args.out
    if args.print_config:
        print(recipe_mod.to_toml(cfg), end="")
        return 0
    t0 = time.perf_counter()
    try:
        res = train(cfg, run_dir=Path(args.out) if args.out else restart, resume=resume,
                    echo=lambda s: print(s, file=sys.stderr, flush=True), restart=restart is not None)
    except Interrupted as e:  # SIGINT / SIGTERM: checkpoint saved; exit as the signal would (130 / 143)
        print(f"deepseekmoe train: {e}", file=sys.stderr)
        return e.exit_code
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports for the job
        return 0
    print(f"\ndone: {res.step} steps, {res.tokens:,} tokens in {_hms(wall)}")
    if res.val_loss is not None:
        bpb = f" ({res.val_bpb:.3f} bits/byte)" if res.val_bpb is not None else ""
        print(f"validation loss: {res.val_loss:.4f}{bpb}")
    if res.sample is not None:
        print(f"sample ({cfg.sample.prompt!r}, temperature {cfg.sample.temperature}): {res.sample!r}")
    if res.expert_load:
        loads = ", ".join(f"{x:.2f}" for x in res.expert_load)
        print(f"expert load, max/mean tokens per expert for each MoE layer (1.00 = balanced): {loads}")
    print(f"run directory: {res.run_dir}/ (checkpoint {res.checkpoint.name if res.checkpoint else '-'}, "
          f"metrics.jsonl, {'loss.png, ' if cfg.log.plot else ''}config.toml)")
    return 0


def _hms(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
