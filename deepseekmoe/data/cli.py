"""`deepseekmoe prepare`: tokenize a corpus into a dataset directory (see docs/data.md)."""

from __future__ import annotations

import argparse

from deepseekmoe.errors import DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deepseekmoe.data.prepare import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB, SHARD_TOKENS, TOKENIZER_SAMPLE_BYTES

    p.epilog = ("examples:\n  deepseekmoe prepare books/ --out data/books --vocab-size 16384\n"
                "  deepseekmoe prepare corpus.jsonl.xz --val held_out.jsonl.xz --out data/c "
                "--tokenizer deepseek-moe-16b-base/tokenizer.json")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text (.txt/.md), .jsonl/.jsonl.gz/.jsonl.xz, .parquet, .arrow files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write (atomically)")
    p.add_argument("--tokenizer", metavar="PATH",
                     help="use this tokenizer.json (or a directory holding one) instead of training a BPE")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help=f"BPE vocabulary to train (default {DEFAULT_VOCAB}); with --tokenizer, an upper "
                        "bound its ids must respect (e.g. the model's vocab_size)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    val.add_argument("--val", nargs="+", metavar="INPUT", help="files/directories forming the validation split")
    p.add_argument("--workers", type=int, metavar="N", help="encoding processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default 0)")
    p.add_argument("--field", default="text", help="jsonl field / parquet column holding the text (default text)")
    p.add_argument("--bos", metavar="TOKEN", help="bos token of a given tokenizer (default: detected)")
    p.add_argument("--eos", metavar="TOKEN", help="eos token of a given tokenizer (default: detected)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {SHARD_TOKENS})")
    p.add_argument("--tokenizer-sample-mb", type=float, default=TOKENIZER_SAMPLE_BYTES / 2**20, metavar="MB",
                   help="train the BPE on at most this much text, taken in order (default %(default)g)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _token_arg(v: str | None):
    return int(v) if v is not None and v.isdigit() else v


def run(args) -> int:
    from deepseekmoe.data.dataset import load_meta
    from deepseekmoe.data.prepare import prepare

    if not args.tokenizer_sample_mb > 0:
        raise DataError(f"--tokenizer-sample-mb {args.tokenizer_sample_mb:g}: must be a positive number of MB "
                        "(how much text the BPE is trained on)")
    if args.tokenizer is None and (args.bos or args.eos):
        raise DataError("--bos/--eos name the special tokens of a given --tokenizer; a trained BPE uses "
                        "<|bos|> (id 0) and <|eos|> (id 1)")
    out = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, workers=args.workers, val_inputs=args.val, seed=args.seed,
                  field=args.field, bos=_token_arg(args.bos), eos=_token_arg(args.eos),
                  shard_tokens=args.shard_tokens, tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 2**20),
                  progress=not args.quiet)
    meta = load_meta(out)
    s = meta["splits"]
    print(f"wrote {out}: vocab {meta['vocab_size']} ({meta['dtype']}), bos {meta['bos_id']}, eos {meta['eos_id']}")
    for name in ("train", "val"):
        i = s[name]
        ratio = f", {i['bytes'] / i['tokens']:.2f} bytes/token" if i["tokens"] else ""
        print(f"  {name}: {i['tokens']:,} tokens, {i['documents']:,} documents, {i['bytes']:,} bytes{ratio}, "
              f"{len(i['shards'])} shard(s)")
    return 0
