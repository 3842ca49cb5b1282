"""`deepseekmoe tokenizer`: train a byte-level BPE, or inspect a tokenizer.json.

    deepseekmoe tokenizer train INPUT... --vocab-size N --out tokenizer.json
    deepseekmoe tokenizer show PATH [--text "some text"]

PATH may be any model directory the other commands take (a run directory: its newest checkpoint).
"""

from __future__ import annotations

import argparse

from deepseekmoe.errors import utf8_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE (bos <|bos|> = 0, eos <|eos|> = 1)")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories (any format prepare reads)")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="entries of the BPE, bos and eos included (at least 258; e.g. 16384)")
    t.add_argument("--out", required=True, metavar="PATH", help="tokenizer.json to write")
    t.add_argument("--field", default="text", help="jsonl field / parquet column (default text)")
    t.add_argument("--sample-mb", type=float, default=256, help="read at most this much text (default 256)")
    s = sub.add_parser("show", help="vocabulary size, bos/eos, and how a text is split")
    s.add_argument("path", help="tokenizer.json, or a directory with one (a model, a run directory or a "
                   "prepared dataset)")
    s.add_argument("--text", default="Hello world!\n  DeepSeekMoE splits experts finely.",
                   help="text to encode and decode")
    s.add_argument("--bos", help="bos token (default: detected)")
    s.add_argument("--eos", help="eos token (default: detected)")


def run(args) -> int:
    from deepseekmoe.data.tokenizer import Tokenizer, train_tokenizer

    if args.action == "train":
        from deepseekmoe.data.readers import discover

        discover(args.inputs)  # fail early, with the message, on a bad path
        tok = train_tokenizer(list(args.inputs), args.vocab_size, args.out, field=args.field,
                              max_bytes=int(args.sample_mb * 2**20), progress=True)
        print(f"wrote {args.out}: {tok!r}")
        return 0
    tok = Tokenizer.from_file(_tokenizer_location(args.path), args.bos, args.eos)
    ids = tok.encode(utf8_text(args.text, "--text"))
    back = tok.decode(ids)
    print(repr(tok))
    print(f"text ({len(args.text.encode())} bytes) -> {len(ids)} tokens: {ids[:32]}{' ...' if len(ids) > 32 else ''}")
    print("pieces:", [tok.backend.id_to_token(i) for i in ids[:32]])
    print("round trip exact:", back == args.text)
    return 0


def _tokenizer_location(spec: str):
    """`spec`, or for a model directory without a tokenizer.json at its top (a run directory, a
    training checkpoint) the folder of the model it stands for, as every model command reads it."""
    from pathlib import Path

    from deepseekmoe.checkpoint import hf
    from deepseekmoe.errors import CheckpointError

    path = Path(spec)
    if not path.is_dir() or (path / "tokenizer.json").is_file():
        return path
    try:
        return hf.find_checkpoint(path)[1]
    except CheckpointError:  # not a model directory either: the tokenizer's own "not found" says it
        return path
