"""The prepared dataset directory on disk: meta.json, token shards, and reading them back.

Layout (written by `deepseekmoe prepare`, see docs/data.md):
    meta.json              {"format": "deepseekmoe-tokens", "version": 1, "vocab_size", "dtype",
                            "bos_id", "eos_id", "splits": {"train": {...}, "val": {...}},
                            "tokenizer": "tokenizer.json", "sources": [...], ...}
    tokenizer.json         the tokenizer (HF `tokenizers` format), tokenizer_config.json beside it
    train_000.bin ...      flat token ids (uint16 when vocab_size <= 65536, else uint32),
    val_000.bin ...        each document followed by eos; a split is its shards concatenated
A split's "tokens" counts every id in its shards (eos included) and "bytes" the UTF-8 bytes of the
source text it came from, so bits/byte = (nats/token) * tokens / bytes / ln 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from deepseekmoe.errors import DataError

FORMAT = "deepseekmoe-tokens"
VERSION = 1


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_meta(data_dir: str | Path) -> dict:
    """Read and check meta.json and the shard files it names; DataError on anything amiss."""
    d = Path(data_dir)
    hint = f"create one with `deepseekmoe prepare INPUT... --out {d}`"
    if d.is_file():  # a corpus given where its prepared dataset belongs: never suggest writing over it
        raise DataError(f"{d}: a file, not a prepared dataset directory; tokenize it first with "
                        f"`deepseekmoe prepare {d} --out {d.parent / (d.stem + '-tokens')}` and pass that directory")
    if not d.is_dir():
        raise DataError(f"{d}: no such dataset directory; {hint}")
    p = d / "meta.json"
    if not p.is_file():
        raise DataError(f"{d}: not a prepared dataset (no meta.json); {hint}")
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: corrupted ({e}); prepare the dataset again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{p}: not a deepseekmoe token dataset (format={fmt!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{p}: dataset format version {meta.get('version')} is not supported (this "
                        f"deepseekmoe reads version {VERSION}); prepare the dataset again")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for key in ("vocab_size", "bos_id", "eos_id"):
            int(meta[key])
        for split, info in meta["splits"].items():
            total = 0
            for name in info["shards"]:
                f = d / name
                if not f.is_file():
                    raise DataError(f"{d}: shard {name} of split {split!r} is missing; prepare the dataset again")
                size = f.stat().st_size
                if size % itemsize:
                    raise DataError(f"{f}: size {size} is not a whole number of {meta['dtype']} tokens "
                                    "(truncated?); prepare the dataset again")
                total += size // itemsize
            if total != int(info["tokens"]):
                raise DataError(f"{d}: split {split!r} should hold {info['tokens']} tokens but its shards "
                                f"hold {total} (truncated or modified); prepare the dataset again")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{p}: malformed meta.json ({type(e).__name__}: {e}); prepare the dataset again") from e
    return meta


def split_info(meta: dict, split: str, data_dir="") -> dict:
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (has: {', '.join(meta['splits'])})")
    return meta["splits"][split]


def check_vocab(meta_or_dir, vocab_size: int) -> None:
    """DataError unless every token id of the dataset is < `vocab_size` (a model's embedding rows)."""
    meta = meta_or_dir if isinstance(meta_or_dir, dict) else load_meta(meta_or_dir)
    top = int(meta.get("max_token_id", int(meta["vocab_size"]) - 1))
    if top >= vocab_size:
        raise DataError(f"the dataset holds token ids up to {top} (tokenizer vocab {meta['vocab_size']}) but "
                        f"the model's vocab_size is {vocab_size}: set the model's vocab_size to at least "
                        f"{top + 1}, or prepare the data with a tokenizer of at most {vocab_size} entries")


class TokenStream:
    """Token shards read as one read-only sequence of ids (numpy memmaps, nothing loaded)."""

    def __init__(self, paths: list[Path], dtype):
        self.dtype = np.dtype(dtype)
        self.shards = [np.memmap(p, dtype=self.dtype, mode="r") for p in paths if Path(p).stat().st_size > 0]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])

    @classmethod
    def open(cls, data_dir: str | Path, split: str, meta: dict | None = None) -> TokenStream:
        """The shards of one split of a prepared dataset (meta.json checked unless given)."""
        d = Path(data_dir)
        meta = meta if meta is not None else load_meta(d)
        info = split_info(meta, split, d)
        stream = cls([d / n for n in info["shards"]], meta["dtype"])
        stream.meta, stream.split = meta, split
        return stream

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as a fresh array (may span shards)."""
        if start < 0 or start + n > self.n_tokens:
            raise IndexError(f"read [{start}, {start + n}) outside {self.n_tokens} tokens")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = np.empty(n, dtype=self.dtype)
        done = 0
        while done < n:
            off = start + done - int(self.starts[i])
            take = min(n - done, len(self.shards[i]) - off)
            out[done:done + take] = self.shards[i][off:off + take]
            done += take
            i += 1
        return out

    def chunks(self, size: int = 1 << 24):
        for s in self.shards:
            for a in range(0, len(s), size):
                yield np.asarray(s[a:a + size])


def unigram_entropy(data_dir: str | Path, split: str = "val") -> float:
    """Entropy (nats/token) of the split's token unigram distribution, eos included.

    This is the loss of the best model that ignores context; a trained LM should be well below it.
    """
    stream = TokenStream.open(data_dir, split)
    if len(stream) == 0:
        raise DataError(f"{data_dir}: split {split!r} is empty")
    counts = np.zeros(int(stream.meta["vocab_size"]), dtype=np.int64)
    for chunk in stream.chunks():
        c = np.bincount(chunk, minlength=len(counts))
        if len(c) > len(counts):
            raise DataError(f"{data_dir}: split {split!r} holds token id {len(c) - 1} >= vocab_size "
                            f"{len(counts)} (corrupted shard); prepare the dataset again")
        counts += c
    p = counts[counts > 0] / len(stream)
    return float(-(p * np.log(p)).sum())


def bits_per_byte(loss_nats_per_token: float, meta_or_dir, split: str = "val") -> float:
    """Convert a mean next-token loss on `split` to bits per UTF-8 byte of its source text."""
    meta = meta_or_dir if isinstance(meta_or_dir, dict) else load_meta(meta_or_dir)
    info = split_info(meta, split)
    if not info["bytes"]:
        raise DataError(f"split {split!r} is empty: no bits-per-byte")
    return loss_nats_per_token * info["tokens"] / info["bytes"] / math.log(2)
