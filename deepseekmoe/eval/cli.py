"""`deepseekmoe eval`: language-modelling metrics and the paper's benchmarks on local files.

    deepseekmoe eval --model runs/tiny-20261123-234232                      # lm on the shipped sample
    deepseekmoe eval --model deepseek-moe-16b-base --tasks paper --data-dir ~/benchmarks --dtype bf16
    deepseekmoe eval --model M --tasks lm,hellaswag,lambada --data-dir D --limit 50 --out results.json

Task names and groups: see `--help` and docs/evaluation.md. Errors a user can cause (unknown task,
missing --data-dir or task files, mismatched tokenizer) are reported before the model is loaded.
`open_model` is shared with `deepseekmoe analyze`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepseekmoe.errors import ConfigError


def add_model_arguments(p) -> None:
    from deepseekmoe.model.config import EXPERT_BACKENDS
    from deepseekmoe.model.dtypes import CLI_NAMES

    p.add_argument("--model", required=True,
                   help="checkpoint: released Hugging Face format, native model dir, a training checkpoint, "
                        "or a run directory (its newest checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=list(CLI_NAMES),
                   help="auto: the checkpoint's dtype on GPU, fp32 on CPU")
    p.add_argument("--expert-backend", default=None, help=f"routed-expert backend ({', '.join(EXPERT_BACKENDS)})")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--prefix", default="auto", choices=["auto", "bos", "eos"],
                   help="token each document starts after: auto = bos when the tokenizer_config says "
                        "add_bos_token (released models), else eos (how `deepseekmoe prepare` packs documents)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deepseekmoe.eval.harness import GROUPS
    from deepseekmoe.eval.tasks import TASKS

    add_model_arguments(p)
    names = ", ".join(["lm", *TASKS])
    p.add_argument("--tasks", default="lm",
                   help=f"comma-separated tasks: {names}; groups: {', '.join(GROUPS)}")
    p.add_argument("--data-dir", default=None,
                   help="local benchmark directory (hellaswag/, piqa/, ... as in docs/evaluation.md); "
                        "required by every task except lm")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N documents per task (lm: N windows of a prepared split, or N text documents)")
    p.add_argument("--num-fewshot", type=int, default=None, help="override every task's number of exemplars")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot exemplar draw")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: the model's max_position_embeddings); longer "
                        "contexts lose their beginning")
    p.add_argument("--lm-data", default="sample",
                   help="prepared dataset for the lm task ('sample' = the shipped one; must use the model's tokenizer)")
    p.add_argument("--lm-split", default="val", help="split of --lm-data")
    p.add_argument("--lm-text", nargs="+", default=None, metavar="FILE",
                   help="raw text/jsonl/parquet files or directories for the lm task instead of --lm-data")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    p.add_argument("--log-samples", action="store_true", help="keep per-document predictions in the JSON")


def open_model(args):
    """(model in eval mode, tokenizer, tokenizer directory, generation mode) from the model flags,
    through the loader `deepseekmoe generate` uses."""
    from deepseekmoe.checkpoint import hf
    from deepseekmoe.inference.cli import load_for_inference

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    _, model_dir = hf.find_checkpoint(args.model)
    ns = argparse.Namespace(model=str(model_dir), tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                            expert_backend=args.expert_backend, mode="auto", max_new_tokens=1, temperature=0.0,
                            top_k=0, top_p=1.0)
    model, tok, mode = load_for_inference(ns)
    return model, tok, Path(args.tokenizer) if args.tokenizer else model_dir, mode


def make_scorer(args, model, tok, tok_dir, mode):
    from deepseekmoe.eval.scoring import Scorer, default_prefix

    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length {args.max_length}: need at least 2 tokens")
    prefix = default_prefix(model, tok, tok_dir.parent if tok_dir.is_file() else tok_dir, args.prefix)
    return Scorer(model, tok, prefix, batch_size=args.batch_size, max_length=getattr(args, "max_length", None),
                  gen_mode=mode)


def run(args) -> int:
    from deepseekmoe.checkpoint.files import atomic_write_text
    from deepseekmoe.eval import lm
    from deepseekmoe.eval.harness import LM_TASK, check_data, format_table, resolve_tasks, run_tasks

    names = resolve_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    data_dir = check_data(names, args.data_dir)  # before the (slow) model load
    if LM_TASK in names and args.lm_text is None:
        from deepseekmoe.data import load_meta

        load_meta(lm.resolve_dataset(args.lm_data))  # a missing or damaged dataset fails here too
    start = time.time()
    model, tok, tok_dir, mode = open_model(args)
    scorer = make_scorer(args, model, tok, tok_dir, mode)
    results: dict = {}
    if LM_TASK in names:
        if args.lm_text is not None:
            r = lm.eval_text(scorer, args.lm_text, args.limit)
        else:
            r = lm.eval_prepared(scorer, args.lm_data, args.lm_split, scorer.max_length, args.limit, tok_dir)
        results[LM_TASK] = r.to_dict()
    results.update(run_tasks(scorer, names, data_dir, args.limit, args.num_fewshot, args.seed, args.log_samples))
    report = {"model": str(args.model), "config": model.config.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {"tasks": names, "data_dir": None if data_dir is None else str(data_dir),
                           "limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed,
                           "batch_size": args.batch_size, "max_length": scorer.max_length,
                           "prefix_id": scorer.prefix_id, "device": str(scorer.device),
                           "dtype": str(model.embed_tokens.weight.dtype).replace("torch.", "")},
              "seconds": round(time.time() - start, 1), "results": results}
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text if args.json else format_table(results))
    if args.out and not args.json:
        print(f"results written to {args.out}")
    return 0
