"""Language-modelling evaluation: loss, perplexity and bits per byte on a corpus.

Two kinds of corpus:
- a prepared dataset split (`deepseekmoe prepare`, or "sample" for the shipped one): windows of
  `seq_len` tokens overlapping by one token, as the trainer's validation reads them, so every token
  after the first is scored once; bits/byte uses the split's recorded token and byte counts.
  `limit` reads that many windows spread evenly over the split instead of all of them.
- raw text files (txt / jsonl / parquet / arrow, as `prepare` reads them), tokenised with the
  model's tokenizer: each document starts after the prefix token and every one of its tokens is
  scored; bits/byte divides by the documents' UTF-8 bytes exactly. `limit` takes the first N
  documents.

The result is an `LMResult`: nats/token, perplexity, bits/byte, tokens and bytes counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from deepseekmoe.errors import DataError
from deepseekmoe.eval.scoring import Scorer, perplexity


@dataclass
class LMResult:
    source: str
    loss: float          # mean next-token NLL, nats
    ppl: float
    bpb: float | None    # bits per UTF-8 byte of the source text
    tokens: int          # tokens scored
    bytes: int | None    # bytes the bits/byte divides by (None: the split's ratio was used)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_dataset(spec: str | Path) -> Path:
    """A prepared dataset directory; 'sample' is the shipped sample (built and cached on first use)."""
    if str(spec) == "sample":
        from deepseekmoe.data import default_dataset

        return default_dataset()
    return Path(spec)


def check_same_tokenizer(data_dir: Path, meta: dict, tokenizer_dir: str | Path | None) -> None:
    """DataError when the dataset was tokenised with a different vocabulary than the model's tokenizer
    (the loss would be meaningless, not merely worse)."""
    if tokenizer_dir is None:
        return
    mine = Path(tokenizer_dir)
    mine = mine / "tokenizer.json" if mine.is_dir() else mine
    theirs = data_dir / meta.get("tokenizer", "tokenizer.json")
    if not (mine.is_file() and theirs.is_file()):
        return
    from tokenizers import Tokenizer as HFTokenizer

    if HFTokenizer.from_file(str(mine)).get_vocab() != HFTokenizer.from_file(str(theirs)).get_vocab():
        raise DataError(f"{data_dir} was tokenised with {theirs}, whose vocabulary differs from the model's "
                        f"{mine}; prepare the corpus with the model's tokenizer "
                        f"(`deepseekmoe prepare ... --tokenizer {mine}`) or pass raw text with --lm-text")


def prepared_batches(data_dir: Path, split: str, seq_len: int, batch_size: int, limit: int | None = None):
    """(list of (ids [b, seq_len], None) batches, meta). Loaded eagerly: analyses reuse them."""
    from deepseekmoe.data import iter_eval_batches, load_meta

    meta = load_meta(data_dir)
    max_batches = None if limit is None else max(1, -(-int(limit) // batch_size))
    batches = [(b, None) for b in iter_eval_batches(data_dir, split, seq_len, batch_size, max_batches)]
    if limit is not None:
        batches = _trim(batches, int(limit))
    return batches, meta


def _trim(batches, n: int):
    out, left = [], n
    for ids, valid in batches:
        if left <= 0:
            break
        out.append((ids[:left], None if valid is None else valid[:left]))
        left -= ids.shape[0]
    return out


def eval_prepared(scorer: Scorer, data, split: str = "val", seq_len: int | None = None,
                  limit: int | None = None, tokenizer_dir=None) -> LMResult:
    from deepseekmoe.data import bits_per_byte, check_vocab

    d = resolve_dataset(data)
    seq_len = min(int(seq_len or scorer.max_length), scorer.max_length)
    batches, meta = prepared_batches(d, split, seq_len, scorer.batch_size, limit)
    check_vocab(meta, scorer.model.config.vocab_size)
    check_same_tokenizer(d, meta, tokenizer_dir)
    nll, n = scorer.window_nll(batches, total=len(batches), desc=f"lm {split}")
    loss = nll / n
    return LMResult(source=f"{d}:{split}", loss=loss, ppl=perplexity(nll, n),
                    bpb=bits_per_byte(loss, meta, split), tokens=n, bytes=None)


def read_text_documents(paths, limit: int | None = None, field: str = "text") -> list[str]:
    from deepseekmoe.data.readers import discover, read_documents

    docs: list[str] = []
    for src in discover([str(p) for p in paths]):
        for doc in read_documents(src, field):
            docs.append(doc.text)
            if limit is not None and len(docs) >= limit:
                return docs
    if not docs:
        raise DataError(f"{', '.join(map(str, paths))}: no non-empty documents to evaluate")
    return docs


def text_batches(scorer: Scorer, docs: list[str], seq_len: int, batch_size: int):
    """Right-padded (ids [b, L], valid [b, L]) batches of every document's windows.

    Each document is the prefix token + its tokens, cut into windows of `seq_len` that overlap by
    one token, so every token after the prefix is scored exactly once."""
    import torch

    rows = []
    for text in docs:
        seq = [scorer.prefix_id] + scorer.encode(text)
        rows += [seq[a:a + seq_len] for a in range(0, max(1, len(seq) - 1), seq_len - 1) if len(seq[a:a + seq_len]) > 1]
    rows.sort(key=len, reverse=True)
    out = []
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        L = len(chunk[0])
        ids = torch.full((len(chunk), L), scorer.prefix_id, dtype=torch.long)
        valid = torch.zeros((len(chunk), L), dtype=torch.bool)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            valid[i, :len(r)] = True
        out.append((ids, valid))
    return out


def eval_text(scorer: Scorer, paths, limit: int | None = None, field: str = "text",
              seq_len: int | None = None) -> LMResult:
    docs = read_text_documents(paths, limit, field)
    seq_len = min(int(seq_len or scorer.max_length), scorer.max_length)
    batches = text_batches(scorer, docs, seq_len, scorer.batch_size)
    nll, n = scorer.window_nll(batches, total=len(batches), desc="lm text")
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    return LMResult(source=", ".join(map(str, paths)), loss=nll / n, ppl=perplexity(nll, n),
                    bpb=nll / math.log(2) / n_bytes, tokens=n, bytes=n_bytes)
