"""`deepseekmoe eval`: language-modelling metrics and the paper's benchmarks on local files.

    deepseekmoe eval --model runs/tiny-20261123-234232                      # lm on the shipped sample
    deepseekmoe eval --model deepseek-moe-16b-base --tasks paper --data-dir ~/benchmarks --dtype bf16
    deepseekmoe eval --model M --tasks lm,hellaswag,lambada --data-dir D --limit 50 --out results.json
    deepseekmoe eval --model M --tasks humaneval,mbpp --data-dir D --samples 20 --temperature 0.8   # pass@1/10

Task names and groups: see `--help` and docs/evaluation.md. Errors a user can cause (unknown task,
missing --data-dir or task files, mismatched tokenizer, an unwritable --out, a sandbox that does not
work here) are reported before the model is loaded; --max-length beyond the model's window is refused.
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
    p.add_argument("--samples", type=int, default=1,
                   help="code tasks: completions per problem (1: greedy pass@1; n > 1 needs --temperature "
                        "and reports pass@k for k in 1, 10, 100 up to n)")
    p.add_argument("--temperature", type=float, default=0.0, help="code tasks: sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="code tasks: nucleus filter when sampling")
    p.add_argument("--code-timeout", type=float, default=10.0, help="code tasks: wall seconds per program")
    p.add_argument("--code-workers", type=int, default=None,
                   help="code tasks: programs run at once (default: the CPU count)")
    p.add_argument("--sandbox", default="auto", choices=["auto", "bwrap", "unshare", "rlimits"],
                   help="code tasks: isolation of the generated programs (auto: the best that works here; "
                        "docs/evaluation.md)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    p.add_argument("--log-samples", action="store_true", help="keep per-document predictions in the JSON")


def open_model(args):
    """(model in eval mode, tokenizer, tokenizer directory, generation mode) from the model flags,
    through the loader `deepseekmoe generate` uses."""
    from deepseekmoe.checkpoint import hf
    from deepseekmoe.checkpoint.finetuned import finetuned_model
    from deepseekmoe.inference.cli import load_for_inference

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    found = finetuned_model(args.model)  # a LoRA fine-tuning run: its merged model, or base + adapter
    model_dir, adapter = found or (hf.find_checkpoint(args.model)[1], None)
    ns = argparse.Namespace(model=str(model_dir), tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                            expert_backend=args.expert_backend, mode="auto", max_new_tokens=1, temperature=0.0,
                            top_k=0, top_p=1.0, adapter=str(adapter) if adapter else None)
    model, tok, mode = load_for_inference(ns)
    return model, tok, Path(args.tokenizer) if args.tokenizer else model_dir, mode


def make_scorer(args, model, tok, tok_dir, mode):
    from deepseekmoe.eval.scoring import Scorer, default_prefix

    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length {args.max_length}: need at least 2 tokens")
    limit = model.config.max_position_embeddings
    if args.max_length is not None and args.max_length > limit:
        raise ConfigError(f"--max-length {args.max_length}: beyond the model's max_position_embeddings ({limit}); "
                          f"pass at most {limit}, or leave it out for the whole window")
    prefix = default_prefix(model, tok, tok_dir.parent if tok_dir.is_file() else tok_dir, args.prefix)
    return Scorer(model, tok, prefix, batch_size=args.batch_size, max_length=getattr(args, "max_length", None),
                  gen_mode=mode)


def code_settings(args, names: list[str]):
    """The code tasks' settings, checked (and the sandbox probed) before the model loads; None
    when no code task runs."""
    from deepseekmoe.eval.code import CodeSettings, check_shots
    from deepseekmoe.eval.sandbox import probe
    from deepseekmoe.eval.tasks import TASKS

    code_tasks = [n for n in names if n in TASKS and TASKS[n].kind == "code"]
    if not code_tasks:
        return None
    for n in code_tasks:
        if args.num_fewshot is not None:
            check_shots(n, args.num_fewshot)
    tool = None if args.sandbox == "auto" else args.sandbox
    settings = CodeSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                            timeout=args.code_timeout, workers=args.code_workers, seed=args.seed, tool=tool)
    settings.check()
    probe(tool)
    return settings


def run(args) -> int:
    from deepseekmoe.checkpoint.files import atomic_write_text, check_output
    from deepseekmoe.eval import lm
    from deepseekmoe.eval.harness import LM_TASK, check_data, format_table, resolve_tasks, run_tasks

    names = resolve_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.out:
        check_output(args.out, directory=False)  # before hours of evaluation, not after
    data_dir = check_data(names, args.data_dir)  # before the (slow) model load
    code = code_settings(args, names)
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
    results.update(run_tasks(scorer, names, data_dir, args.limit, args.num_fewshot, args.seed, args.log_samples,
                             code))
    report = {"model": str(args.model), "config": model.config.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {"tasks": names, "data_dir": None if data_dir is None else str(data_dir),
                           "limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed,
                           "batch_size": args.batch_size, "max_length": scorer.max_length,
                           "prefix_id": scorer.prefix_id, "device": str(scorer.device),
                           "dtype": str(model.embed_tokens.weight.dtype).replace("torch.", "")},
              "seconds": round(time.time() - start, 1), "results": results}
    text = json.dumps(report, indent=2)
    print(text if args.json else format_table(results))  # first: a write failing now loses nothing shown
    if args.out:
        atomic_write_text(args.out, text + "\n")
        if not args.json:
            print(f"results written to {args.out}")
    return 0
