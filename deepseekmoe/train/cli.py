"""`deepseekmoe train [RECIPE] [--section.key=value ...] [--resume [PATH]] [--out DIR]`, and
`deepseekmoe sft --model DIR|RUN --data FILE... [RECIPE] [--lora] [--key=value ...]` (`add_sft_arguments`,
`run_sft`; the command table reaches them through train/sft.py).

With no arguments `train` runs the default job: the `tiny` DeepSeekMoE on the shipped public-domain
sample, a few minutes on a 2-core CPU, ending with the validation loss, a generated sample, the
expert-load summary and a run directory (checkpoint, metrics.jsonl, loss.png).

`sft` fine-tunes a base model (released-format directory, native model directory, or a `train`
run) on chat / instruction records with the same trainer (train/sft.py; docs/finetuning.md):
recipe keys as for `train` plus the [sft] and [lora] sections; `--resume RUN` continues a
fine-tuning run exactly, as `train --resume` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from deepseekmoe.errors import ConfigError
from deepseekmoe.train import recipe as recipe_mod

SECTIONS = ("name", "out", "model", "data", "optim", "schedule", "train", "eval", "checkpoint", "log", "system",
            "sample", "parallel")


def _key_listing(sections=SECTIONS) -> str:
    cfg = recipe_mod.TrainConfig()
    lines = ["recipe keys (override any with --KEY=VALUE; model.* takes any ModelConfig field):"]
    for section in sections:
        v = getattr(cfg, section)
        if section == "model":
            lines.append("  model.preset = 'tiny'   model.<field> = ... (see `deepseekmoe info --list`)")
        elif isinstance(v, str):
            lines.append(f"  {section} = {v!r}")
        else:
            # an unset (None) option is decided at run time: system.compute_weights
            items = ", ".join(f"{k}={'auto' if getattr(v, k) is None else repr(getattr(v, k))}" for k in vars(v))
            lines.append(f"  {section}: {items}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="a TOML recipe (path, or a name in configs/ such as deepseekmoe-2b); default: the tiny job")
    _add_run_arguments(p)
    p.epilog = _key_listing()


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--resume / --out / --print-config and the dotted overrides, for `train` and `sft`."""
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run exactly: a run or checkpoint directory (a run that stopped before its "
                        "first checkpoint restarts from step 0 with its config.toml); alone, the newest run "
                        "(of --out if given, else runs/<name>-*)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    _take_overrides(p)


def _take_overrides(p: argparse.ArgumentParser) -> None:
    """Dotted overrides are open-ended (every ModelConfig field), so they are split off before
    argparse sees the rest (into `args.overrides`); their keys are checked in run(), where errors
    print as one line."""
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


def _resumed_config(args, overrides, default_name: str):
    """(config, checkpoint to resume or None, run directory to restart from step 0 or None) for --resume."""
    from deepseekmoe.checkpoint import training as ckpt_io
    from deepseekmoe.train.recovery import restartable

    resume, restart = None, None
    if args.recipe:
        raise ConfigError("give a recipe or --resume, not both: a resumed run keeps its own config "
                          "(change single keys with --section.key=value)")
    if args.resume == "latest":
        spec = Path(args.out) if args.out else _latest_run(dict(overrides).get("name", default_name))
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
    return cfg, resume, restart


def run(args) -> int:
    overrides = getattr(args, "overrides", [])
    resume, restart = None, None
    if args.resume is not None:
        cfg, resume, restart = _resumed_config(args, overrides, recipe_mod.TrainConfig().name)
    else:
        cfg = recipe_mod.build(args.recipe, overrides)
    return _launch(args, cfg, resume, restart, "train")


def _launch(args, cfg, resume, restart, command: str) -> int:
    """Run the resolved config (or print it) and report the result, as `deepseekmoe COMMAND`."""
    from deepseekmoe.train.recovery import Interrupted
    from deepseekmoe.train.trainer import train

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
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun: every rank stopped at that step, rank 0 says so
            print(f"deepseekmoe {command}: {e}", file=sys.stderr)
        return e.exit_code
    _report(cfg, res, time.perf_counter() - t0)
    return 0


def _report(cfg, res, wall: float) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports for the job
        return
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


def _hms(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------------------- deepseekmoe sft
# Without a recipe, fine-tuning starts from these (on top of TrainConfig's defaults): a small
# constant-ish rate for a pretrained model, a short warmup, a cosine to 10%, no weight decay (the
# base's weights are the prior, not zero), two epochs, validation and a checkpoint at the end.
SFT_DEFAULTS = {"name": "sft", "optim": {"lr": 2e-5, "weight_decay": 0.0}, "schedule": {"kind": "cosine",
                "warmup_steps": 10}, "sft": {"epochs": 2}, "eval": {"every": 0, "max_batches": 0},
                "checkpoint": {"every": 0}, "sample": {"prompt": "Hello! Who are you?", "temperature": 0.0}}
SFT_SEQ_LEN = 4096  # without a recipe: packed rows of the base's context, at most this long


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="a TOML recipe (path, or a name in configs/ such as sft-16b-chat, sft-tiny); a .toml after "
                        "--data is taken as the recipe too; default: AdamW at 2e-5, a cosine schedule, 2 epochs, rows "
                        "of the base's context up to 4096 tokens")
    p.add_argument("--model", default=None, metavar="DIR|RUN",
                   help="the base model: a released-format or native model directory, or a `deepseekmoe train` run "
                        "or checkpoint directory (= --sft.model)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="record files: .jsonl(.gz/.xz), .parquet, or a saved HF dataset directory; records with "
                        "`messages` (system/user/assistant) or `instruction`/`output` (= --sft.data)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning (= --lora.enabled)")
    _add_run_arguments(p)
    p.epilog = _key_listing((*SECTIONS, "sft", "lora"))


def run_sft(args) -> int:
    recipes = [f for f in args.data or [] if f.endswith(".toml")]  # `--data A B RECIPE.toml`: records are never TOML
    if recipes:
        if args.recipe or len(recipes) > 1:
            raise ConfigError(f"more than one recipe: {', '.join(([args.recipe] if args.recipe else []) + recipes)}; "
                              "give one")
        args.recipe, args.data = recipes[0], [f for f in args.data if not f.endswith(".toml")]
    overrides = list(getattr(args, "overrides", []))
    keys = dict(overrides)
    if args.model:
        overrides.append(("sft.model", json.dumps(args.model)))
    if args.data:
        overrides.append(("sft.data", json.dumps(list(args.data))))
    if args.lora:
        overrides.append(("lora.enabled", "true"))
    if "train.steps" in keys and "sft.epochs" not in keys:  # a step count asked for replaces the recipe's epochs
        overrides.append(("sft.epochs", "0"))
    if args.model and not args.recipe and args.resume is None and "train.seq_len" not in keys:
        from deepseekmoe.train.sft import base_model_config

        # no recipe: rows of the base's context, up to 4K (the packed length chat fine-tuning usually takes)
        context = base_model_config(args.model).max_position_embeddings
        overrides.append(("train.seq_len", str(min(SFT_SEQ_LEN, context))))
    resume, restart = None, None
    if args.resume is not None:
        if args.model or args.data:
            raise ConfigError("--resume continues a fine-tuning run with its own base model and data; drop "
                              "--model / --data")
        cfg, resume, restart = _resumed_config(args, overrides, SFT_DEFAULTS["name"])
    else:
        cfg = recipe_mod.build(args.recipe, overrides, base=None if args.recipe else SFT_DEFAULTS)
    if not cfg.is_sft:
        raise ConfigError("deepseekmoe sft needs a base model: --model DIR|RUN (or sft.model in the recipe)")
    if resume is None and restart is None:
        _pin_inputs(cfg)
    return _launch(args, cfg, resume, restart, "sft")


def _pin_inputs(cfg) -> None:
    """Absolute paths, and a run given as the base pinned to its checkpoint of today, so that a
    resume from another directory, or after the base run saved again, reads the same inputs."""
    from deepseekmoe.train.sft import resolve_base

    cfg.sft.model = str(resolve_base(cfg.sft.model))
    cfg.sft.data = [str(Path(f).resolve()) for f in cfg.sft.data]
    cfg.sft.val_data = [str(Path(f).resolve()) for f in cfg.sft.val_data]
    if cfg.sft.template.startswith("jinja:"):
        cfg.sft.template = "jinja:" + str(Path(cfg.sft.template[len("jinja:"):]).resolve())

