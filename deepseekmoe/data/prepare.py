"""`prepare`: a corpus (text / jsonl / parquet files or directories) -> a token dataset directory.

Steps: find the inputs; get a tokenizer (load the given tokenizer.json, or train a byte-level BPE
on the training documents); read documents in order in this process and hand batches of them to
a pool of worker processes that encode them (one tokenizer per worker, results consumed in order,
so the output is identical for any number of workers); append each document's ids and an eos to
the shards of its split; write the tokenizer and meta.json. Everything lands in a temporary
directory that is renamed into place at the end, so a failure leaves no half-written dataset.

Validation split, document level: either given explicitly (`val_inputs`), or each document goes
to val when a keyed hash of its bytes (key = `seed`) falls below `val_fraction`, so the choice
does not depend on file order or worker count. If that picks no document, the one with the lowest
hash moves to val, so a small corpus still gets a validation split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepseekmoe.checkpoint.files import atomic_directory
from deepseekmoe.data.dataset import FORMAT, VERSION, dtype_for
from deepseekmoe.data.readers import Source, discover, read_documents
from deepseekmoe.data.tokenizer import Tokenizer, train_tokenizer
from deepseekmoe.errors import DataError

PREPARE_VERSION = 1                    # bump when the same input would give different shards
DEFAULT_VOCAB = 16384
DEFAULT_VAL_FRACTION = 0.01
SHARD_TOKENS = 1 << 27                 # 128M tokens: 256 MiB uint16 shards
TOKENIZER_SAMPLE_BYTES = 256 << 20     # BPE training reads at most this much text
PIECE_CHARS = 1 << 20                  # longer documents are encoded in pieces (memory, parallelism)
JOB_CHARS = 1 << 20                    # text per worker task
MIN_POOL_BYTES = 1 << 20               # smaller corpora are encoded in-process (pool start-up costs more)


_LINE_START = re.compile(r"\n(?=\S)")
_WORD_START = re.compile(r"(?<=\S) (?=\S)")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def val_score(data: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's bytes and the seed."""
    h = hashlib.blake2b(data, digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64


def split_pieces(text: str, max_chars: int | None = None) -> list[str]:
    """Cut a long text into pieces of about `max_chars` (default PIECE_CHARS) to twice that.

    The tokenizer holds ~150 bytes of state per character while it encodes (or trains on) one
    string, so a 60 MB single-line document must not reach it whole. A cut falls at a line start
    (a newline followed by a non-space character), else before a single space between two words:
    for GPT-2-style byte-level pre-tokenisation (ours) no pre-token spans either point, so encoding
    the pieces gives exactly the ids of encoding the whole text. Only a stretch of 2 x `max_chars`
    without either (no space or newline at all) is cut hard, which may split one pre-token there.
    """
    max_chars = max_chars or PIECE_CHARS  # read at call time: tests lower it
    pieces, start = [], 0
    while len(text) - start > max_chars:
        lo, hi = start + max_chars, min(len(text), start + 2 * max_chars)
        line = _LINE_START.search(text, lo, hi)
        word = None if line else _WORD_START.search(text, lo, hi)
        if line or word:
            cut = line.end() if line else word.start()
        elif hi == len(text):
            break  # the rest fits in one piece
        else:
            cut = lo
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# ------------------------------------------------------------------------------------ workers
_WORKER_TOK: Tokenizer | None = None


def _worker_init(tok_json: str, bos: int, eos: int) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer.from_str(tok_json, bos, eos)


def _encode_job(pieces: list[str], ends: list[bool], dtype: str, tok: Tokenizer | None = None):
    """Encode pieces; append eos after each piece that ends a document. -> (ids, lengths)."""
    tok = tok or _WORKER_TOK
    ids = tok.encode_batch(pieces)
    for seq, end in zip(ids, ends):
        if end:
            seq.append(tok.eos_id)
    lengths = np.array([len(s) for s in ids], dtype=np.int64)
    flat = np.concatenate([np.array(s, dtype=dtype) for s in ids]) if ids else np.zeros(0, dtype)
    return flat, lengths


@contextlib.contextmanager
def _pool(workers: int, tok: Tokenizer, dtype: str):
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # Children must not use the tokenizers thread pool (already used here to train the BPE); saying
    # so in the environment before the fork also silences tokenizers' fork warning.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context(method).Pool(workers, _worker_init, (tok.to_str(), tok.bos_id, tok.eos_id))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------------------------------ shards
class ShardWriter:
    """Appends token ids to `<prefix>_000.bin`, `<prefix>_001.bin`, ... of at most `shard_tokens`."""

    def __init__(self, directory: Path, prefix: str, dtype: str, shard_tokens: int):
        self.dir, self.prefix, self.dtype, self.cap = directory, prefix, np.dtype(dtype), shard_tokens
        self.names: list[str] = []
        self.tokens = 0
        self._f = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self._f is None or self._in_shard == self.cap:
                self._roll()
            take = min(len(ids), self.cap - self._in_shard)
            self._f.write(ids[:take].tobytes())
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _roll(self):
        self.close()
        name = f"{self.prefix}_{len(self.names):03d}.bin"
        self.names.append(name)
        self._f = open(self.dir / name, "wb")  # noqa: SIM115 (closed in close())
        self._in_shard = 0

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class _Split:
    writer: ShardWriter
    documents: int = 0
    bytes: int = 0


@dataclass
class _Doc:
    split: str
    n_bytes: int
    score: float
    source: int
    start: int = 0            # where its tokens begin in its split


def _move_doc_to_val(tmp: Path, train: _Split, val: _Split, span: tuple[int, int], dtype: str,
                     shard_tokens: int) -> None:
    """Move train tokens [a, b) (one document with its eos) to val, rewriting the train shards."""
    from deepseekmoe.data.dataset import TokenStream

    a, b = span
    train.writer.close()
    stream = TokenStream([tmp / n for n in train.writer.names], dtype)
    val.writer.write(stream.read(a, b - a))
    new = ShardWriter(tmp, "train.new", dtype, shard_tokens)
    step = 1 << 24
    for lo, hi in ((0, a), (b, stream.n_tokens)):
        for s in range(lo, hi, step):
            new.write(stream.read(s, min(step, hi - s)))
    new.close()
    del stream
    for n in train.writer.names:
        (tmp / n).unlink()
    for i, n in enumerate(new.names):
        os.replace(tmp / n, tmp / f"train_{i:03d}.bin")
    train.writer.names = [f"train_{i:03d}.bin" for i in range(len(new.names))]
    train.writer.tokens = new.tokens


# ------------------------------------------------------------------------------------ prepare
def prepare(inputs, out_dir, tokenizer=None, vocab_size: int | None = None,
            val_fraction: float | None = None, workers: int | None = None, *, val_inputs=None,
            seed: int = 0, field: str = "text", bos: int | str | None = None, eos: int | str | None = None,
            shard_tokens: int = SHARD_TOKENS, tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
            progress: bool = True) -> Path:
    """Tokenize `inputs` into the dataset directory `out_dir` (see the module docstring).

    tokenizer: None (train a byte-level BPE of `vocab_size` entries, default 16384), a path to a
        tokenizer.json (or a directory holding one), or a `Tokenizer`. With a given tokenizer,
        `vocab_size`, when set, is an upper bound its ids must respect (e.g. the model's).
    val_fraction: share of documents drawn for validation (default 0.01); `val_inputs` instead
        names files or directories that form the validation split (then no document is drawn).
    """
    train_srcs = discover(inputs)
    val_srcs = discover(val_inputs) if val_inputs else []
    if val_inputs and val_fraction:
        raise DataError("give either a validation fraction or validation inputs, not both")
    frac = 0.0 if val_srcs else (DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction))
    if not 0.0 <= frac < 1.0:
        raise DataError(f"validation fraction {frac} must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens} must be a positive number of tokens")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers={workers}: need at least 1")
    both = {s.path.resolve() for s in train_srcs} & {s.path.resolve() for s in val_srcs}
    if both:
        raise DataError(f"--val {min(both)} is also a training input; validation text must be held out: name "
                        "other files with --val, or leave --val out to hold out a fraction of the documents")
    out = Path(out_dir)
    _check_out(out, train_srcs + val_srcs)

    if tokenizer is None:
        vocab = DEFAULT_VOCAB if vocab_size is None else int(vocab_size)
        docs = (piece for s in train_srcs for d in read_documents(s, field)
                if frac == 0 or val_score(d.data, seed) >= frac for piece in split_pieces(d.text))
        try:
            tok = train_tokenizer(docs, vocab, max_bytes=tokenizer_sample_bytes, progress=progress)
        except DataError as e:
            if "no text" in str(e):
                raise DataError(f"empty corpus: no non-empty document in {_names(train_srcs)}") from e
            raise
        origin = f"byte-level BPE trained on the training split, vocab_size {vocab}"
    else:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer, bos, eos)
        origin = str(tokenizer) if not isinstance(tokenizer, Tokenizer) else (tok.source or "given")
        if vocab_size is not None and tok.vocab_size > int(vocab_size):
            raise DataError(f"{origin}: the tokenizer has {tok.vocab_size} entries (ids up to "
                            f"{tok.vocab_size - 1}), beyond the vocab size {vocab_size} asked for; it does "
                            "not match: use a tokenizer of that size, or raise --vocab-size to the model's")
    dtype = dtype_for(tok.vocab_size)
    try:
        with atomic_directory(out) as tmp:
            splits, sources, max_id = _encode_all(tok, dtype, train_srcs, val_srcs, frac, seed, field, workers,
                                          tmp, shard_tokens, progress)
            tok.save(tmp / "tokenizer.json")
            meta = {
                "format": FORMAT, "version": VERSION, "vocab_size": tok.vocab_size, "dtype": dtype,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "max_token_id": max_id,
                "splits": {k: {"tokens": s.writer.tokens, "bytes": s.bytes, "documents": s.documents,
                               "shards": s.writer.names} for k, s in splits.items()},
                "tokenizer": "tokenizer.json", "tokenizer_origin": origin, "sources": sources,
                "text_field": field, "seed": seed, "val_fraction": frac,
                "val_from": "inputs" if val_srcs else "fraction",
                "document_separator": "eos after every document",
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise DataError(f"{out}: cannot write the dataset ({e.strerror or e}); check the path and free space") from e
    return out


def _names(srcs: list[Source]) -> str:
    names = ", ".join(str(s.path) for s in srcs[:3])
    return names + (f" and {len(srcs) - 3} more" if len(srcs) > 3 else "")


def _check_out(out: Path, srcs: list[Source]) -> None:
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "meta.json").is_file():
            raise DataError(f"--out {out} exists and is not a prepared dataset; choose a new directory "
                            "(a previous dataset there would be replaced, anything else is left alone)")
    resolved = out.resolve()
    for s in srcs:
        if resolved == s.path.resolve().parent or resolved in s.path.resolve().parents:
            raise DataError(f"--out {out} contains the input {s.path}; write the dataset elsewhere")


def _encode_all(tok: Tokenizer, dtype: str, train_srcs, val_srcs, frac, seed, field, workers, tmp: Path,
                shard_tokens: int, progress: bool):
    from tqdm.auto import tqdm

    all_srcs = [(s, "train") for s in train_srcs] + [(s, "val") for s in val_srcs]
    total = sum(s.size for s, _ in all_srcs)
    splits = {k: _Split(ShardWriter(tmp, k, dtype, shard_tokens)) for k in ("train", "val")}
    sources = [{"path": str(s.path), "role": role, "documents": 0, "bytes": 0} for s, role in all_srcs]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress or None,
               dynamic_ncols=True)
    best: list = [2.0, None, None]  # lowest-scoring train document: score, (start, end), _Doc
    max_id = [-1]

    def documents():
        for i, (src, role) in enumerate(all_srcs):
            for doc in read_documents(src, field, bar.update):
                score = val_score(doc.data, seed) if frac else 1.0
                split = role if role == "val" else ("val" if score < frac else "train")
                yield doc, _Doc(split, len(doc.data), score, i)

    def jobs():
        pieces, ends, info, size = [], [], [], 0
        for doc, d in documents():
            parts = split_pieces(doc.text)
            for j, part in enumerate(parts):
                pieces.append(part)
                ends.append(j == len(parts) - 1)
                info.append((d, j == 0, j == len(parts) - 1))
                size += len(part)
                if size >= JOB_CHARS:
                    yield pieces, ends, info
                    pieces, ends, info, size = [], [], [], 0
        if pieces:
            yield pieces, ends, info

    def consume(result, info):
        flat, lengths = result
        if len(flat):
            max_id[0] = max(max_id[0], int(flat.max()))
        pos = 0
        for (d, first, last), n in zip(info, lengths):
            sp = splits[d.split]
            if first:
                d.start = sp.writer.tokens
            sp.writer.write(flat[pos:pos + n])
            pos += n
            if last:
                sp.documents += 1
                sp.bytes += d.n_bytes
                sources[d.source]["documents"] += 1
                sources[d.source]["bytes"] += d.n_bytes
                if d.split == "train" and d.score < best[0]:
                    best[:] = [d.score, (d.start, sp.writer.tokens), d]

    _run_jobs(jobs(), consume, tok, dtype, workers if workers > 1 and total >= MIN_POOL_BYTES else 1)
    bar.close()
    for s in splits.values():
        s.writer.close()
    _finish_splits(splits, train_srcs, val_srcs, frac, best, tmp, dtype, shard_tokens)
    return splits, sources, max_id[0]


def _run_jobs(jobs, consume, tok: Tokenizer, dtype: str, workers: int) -> None:
    """Encode each job (in a worker pool when workers > 1, at most 2 x workers in flight) and hand
    the results to `consume` in job order."""
    with _pool(workers, tok, dtype) as pool:
        if pool is None:
            for pieces, ends, info in jobs:
                consume(_encode_job(pieces, ends, dtype, tok), info)
            return
        pending: deque = deque()
        for pieces, ends, info in jobs:
            pending.append((pool.apply_async(_encode_job, (pieces, ends, dtype)), info))
            while len(pending) > 2 * workers:
                r, i = pending.popleft()
                consume(r.get(), i)
        while pending:
            r, i = pending.popleft()
            consume(r.get(), i)


def _finish_splits(splits, train_srcs, val_srcs, frac, best, tmp: Path, dtype: str, shard_tokens: int) -> None:
    """Refuse empty splits; with a validation fraction that held out nothing, move the lowest-scoring
    training document to validation."""
    train, val = splits["train"], splits["val"]
    if train.documents + val.documents == 0:
        raise DataError(f"empty corpus: no non-empty document in {_names(train_srcs + val_srcs)}")
    if val_srcs and val.documents == 0:
        raise DataError(f"the validation inputs hold no text: {_names(val_srcs)}")
    if frac and val.documents == 0:
        if train.documents < 2:
            raise DataError("the corpus is a single document, so there is nothing to hold out for validation: "
                            "split it into several files (or jsonl lines), name validation files with --val, "
                            "or pass --val-fraction 0")
        d = best[2]
        _move_doc_to_val(tmp, train, val, best[1], dtype, shard_tokens)
        train.documents, val.documents = train.documents - 1, 1
        train.bytes, val.bytes = train.bytes - d.n_bytes, d.n_bytes
    if train.documents == 0:
        raise DataError(f"the training split is empty (validation fraction {frac} took every document); "
                        "lower --val-fraction")
