"""`deepseekmoe analyze`: routing statistics and the paper's section-4.5 experiments on a corpus.

    deepseekmoe analyze --model runs/tiny-20261123-234232                 # all, on the shipped sample
    deepseekmoe analyze --model M --data my-prepared-dir --experiments topk,shared --limit 256
    deepseekmoe analyze --model M --text notes/*.txt --experiments routing --layer 5

Writes into --out (default runs/analyze-<time>/): routing.json + routing_load.png, and for each
experiment fig4_redundancy / fig5_shared / fig6_topk .json + .png; prints a table for each.
An experiment the model's architecture cannot run (Fig 5 on a model without shared experts) is
skipped with one line and the others run; only when none of the chosen ones can run is it an error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepseekmoe.errors import ConfigError, UserError, suggest

EXPERIMENTS = ("routing", "redundancy", "shared", "topk")
FILES = {"redundancy": "fig4_redundancy", "shared": "fig5_shared", "topk": "fig6_topk"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deepseekmoe.eval.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--experiments", default="all",
                   help=f"comma-separated: {', '.join(EXPERIMENTS)} (routing statistics; Fig 4 redundancy; "
                        "Fig 5 shared experts off; Fig 6 top_k sweep) or all")
    p.add_argument("--data", default="sample", help="prepared dataset ('sample' = the shipped one)")
    p.add_argument("--split", default="val", help="split of --data")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="raw text/jsonl/parquet files or directories instead of --data")
    p.add_argument("--limit", type=int, default=64,
                   help="windows of the prepared split (spread evenly), or text documents, to use")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window, up to the model's max_position_embeddings (default: that maximum)")
    p.add_argument("--fractions", default=None,
                   help="Fig 4 ratios of disabled top routed experts, e.g. 0,0.0625,0.125 (default 0..4/16 by 1/16)")
    p.add_argument("--top-k-values", default=None, help="Fig 6 numbers of routed experts, e.g. 1,2,3,4 "
                                                        "(default 1 .. configured top_k + 2)")
    p.add_argument("--layer", type=int, default=None, help="layer whose experts' tokens are printed "
                                                           "(default: the last MoE layer)")
    p.add_argument("--top-n", type=int, default=10, help="tokens listed per expert in routing.json")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/analyze-<time>)")


def _parse_list(text: str | None, cast, flag: str):
    if text is None:
        return None
    try:
        vals = [cast(eval_fraction(x) if cast is float else x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise ConfigError(f"{flag} {text!r}: no values")
    return vals


def eval_fraction(x: str) -> float:
    """'0.125' or '2/16' -> float."""
    x = x.strip()
    if "/" in x:
        a, b = x.split("/", 1)
        return float(a) / float(b)
    return float(x)


def resolve_experiments(spec: str) -> list[str]:
    out = []
    for raw in spec.split(","):
        n = raw.strip().lower()
        if not n:
            continue
        if n == "all":
            out += [e for e in EXPERIMENTS if e not in out]
        elif n in EXPERIMENTS:
            out += [n] if n not in out else []
        else:
            raise UserError(f"unknown experiment {raw.strip()!r}{suggest(n, [*EXPERIMENTS, 'all'])}; "
                            f"choose from {', '.join(EXPERIMENTS)} or all")
    if not out:
        raise UserError("no experiment given: pass --experiments routing,redundancy,shared,topk or all")
    return out


def run(args) -> int:
    from deepseekmoe.analysis import experiments as X
    from deepseekmoe.analysis.plots import plot_experiment, plot_load
    from deepseekmoe.analysis.routing import check_routed, format_expert_table, format_layer_table, routing_statistics
    from deepseekmoe.checkpoint.files import atomic_write_text, check_output
    from deepseekmoe.eval import lm
    from deepseekmoe.eval.cli import make_scorer, open_model

    chosen = resolve_experiments(args.experiments)
    explicit = args.experiments.strip().lower() != "all"
    fractions = _parse_list(args.fractions, float, "--fractions")
    ks = _parse_list(args.top_k_values, int, "--top-k-values")
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len}: need at least 2 tokens")
    out = Path(args.out or f"runs/analyze-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output(out, directory=True)  # before the model is loaded and run: a file in the way, a read-only folder
    data = None if args.text else lm.resolve_dataset(args.data)
    model, tok, tok_dir, mode = open_model(args)
    check_routed(model)
    skipped = {n: r for n in chosen if (r := X.not_applicable(n, model))}
    if len(skipped) == len(chosen):
        raise ConfigError("nothing to run: " + "; ".join(f"{n}: {r}" for n, r in skipped.items()))
    limit = model.config.max_position_embeddings
    if args.seq_len is not None and args.seq_len > limit:
        raise ConfigError(f"--seq-len {args.seq_len}: beyond this model's context of {limit} tokens "
                          f"(max_position_embeddings); use --seq-len {limit} or less")
    moe_ids = [i for i, blk in enumerate(model.layers) if blk.is_moe]
    if "routing" in chosen and args.layer is not None and args.layer not in moe_ids:
        raise ConfigError(f"--layer {args.layer}: not an MoE layer of this model (MoE layers: "
                          f"{', '.join(map(str, moe_ids))})")
    args.max_length = None
    scorer = make_scorer(args, model, tok, tok_dir, mode)
    seq_len = args.seq_len or scorer.max_length
    batches, to_bpb, source = _batches(args, data, scorer, model, tok_dir, seq_len)
    header = {"model": str(args.model), "config": model.config.name, "source": source, "windows": sum(
        b[0].shape[0] for b in batches), "seq_len": seq_len, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    written = []
    for name in chosen:
        if name in skipped:  # the model lacks what the experiment acts on: one line, the others still run
            print(f"{name}: skipped ({skipped[name]})\n")
            continue
        if name == "routing":
            stats = routing_statistics(model, batches, tokenizer=tok, top_n=args.top_n)
            layer = args.layer if args.layer is not None else stats["layers"][-1]["layer"]
            expert_table = format_expert_table(stats, layer)
            atomic_write_text(out / "routing.json", json.dumps({**header, **stats}, indent=1) + "\n")
            written += [out / "routing.json", plot_load(stats, out / "routing_load.png")]
            print(f"routing statistics ({stats['tokens']} tokens, {source})")
            print(format_layer_table(stats))
            print()
            print(expert_table)
            print()
            continue
        try:
            if name == "redundancy":
                res = X.redundancy_sweep(scorer, batches, fractions or X.DEFAULT_FRACTIONS, to_bpb)
            elif name == "shared":
                res = X.shared_ablation(scorer, batches, to_bpb)
            else:
                res = X.topk_sweep(scorer, batches, ks, to_bpb)
        except ConfigError as e:
            if explicit:
                raise
            print(f"{name}: skipped ({e})\n")
            continue
        stem = FILES[name]
        atomic_write_text(out / f"{stem}.json", json.dumps({**header, **res}, indent=1) + "\n")
        written += [out / f"{stem}.json", plot_experiment(res, out / f"{stem}.png")]
        print(X.format_rows(res))
        print()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _batches(args, data, scorer, model, tok_dir, seq_len: int):
    """(batches, loss -> bits per byte, source name) from a prepared dataset or text files."""
    from deepseekmoe.eval import lm

    if data is not None:
        from deepseekmoe.data import bits_per_byte, check_vocab

        batches, meta = lm.prepared_batches(data, args.split, seq_len, args.batch_size, args.limit)
        check_vocab(meta, model.config.vocab_size)
        lm.check_same_tokenizer(data, meta, tok_dir)
        return batches, (lambda loss: bits_per_byte(loss, meta, args.split)), f"{data}:{args.split}"
    docs = lm.read_text_documents(args.text, args.limit)
    batches = lm.text_batches(scorer, docs, seq_len, args.batch_size)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    # Bits per byte needs the loss summed over all the documents' tokens: scale by tokens / bytes.
    n_tok = sum(int((v[:, :-1] & v[:, 1:]).sum()) for _, v in batches)
    return batches, (lambda loss: loss * n_tok / n_bytes / 0.6931471805599453), ", ".join(args.text)
