"""prepare: every input format, exact shard contents and meta counts, dtype, splits, workers."""

from __future__ import annotations

import gzip
import importlib
import json
import lzma

import numpy as np
import pytest

from deepseekmoe.data import Tokenizer, load_meta, load_tokenizer, prepare, train_tokenizer
from deepseekmoe.data.dataset import TokenStream

prepare_mod = importlib.import_module("deepseekmoe.data.prepare")  # the package re-exports the function

WORDS = ("the of and a to in is was he that it his her with as for had you not be on at by which "
         "über café naïve 日本 😀").split()


def make_docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words))
        docs.append(f"Document {i}.\n\n{body}\n  indented\tline\n")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(make_docs(40, seed=1), 320, path)
    return Tokenizer.from_file(path)


def expected_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in tok.encode(d) + [tok.eos_id]], dtype=np.int64)


def read_split(out, split) -> np.ndarray:
    s = TokenStream.open(out, split)
    return s.read(0, len(s)).astype(np.int64)


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "other": 1}, ensure_ascii=False) + "\n")


def write_table(path, docs, kind):
    pa = pytest.importorskip("pyarrow")  # the dev extra installs it; the parquet extra for users
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=3)
    else:
        import pyarrow.ipc as ipc

        with ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "jsonl.xz", "parquet", "arrow", "dir"])
def test_each_format_gives_exact_tokens_and_counts(fmt, tok, tmp_path):
    docs = make_docs(7, seed=hash(fmt) % 1000)
    src = tmp_path / "in"
    src.mkdir()
    if fmt == "txt":
        for i, d in enumerate(docs):
            (src / f"doc{i}.txt").write_text(d, encoding="utf-8")
        inputs = [src / f"doc{i}.txt" for i in range(len(docs))]
    elif fmt == "dir":  # mixed formats, nested, sorted walk, hidden and unknown files ignored
        (src / "a.txt").write_text(docs[0])
        write_jsonl(src / "b.jsonl", docs[1:3])
        (src / "sub").mkdir()
        write_jsonl(src / "sub" / "c.jsonl.gz", docs[3:5], gzip.open)
        write_jsonl(src / "sub" / "d.jsonl.xz", docs[5:], lzma.open)
        (src / ".hidden.txt").write_text("never read")
        (src / "notes.csv").write_text("ignored")
        inputs = [src]
    elif fmt in ("parquet", "arrow"):
        write_table(src / f"x.{fmt}", docs, fmt)
        inputs = [src / f"x.{fmt}"]
    else:
        opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.xz": lzma.open}[fmt]
        write_jsonl(src / f"x.{fmt}", docs, opener)
        inputs = [src / f"x.{fmt}"]
    out = prepare(inputs, tmp_path / "ds", tokenizer=tok, val_fraction=0, workers=1, progress=False)
    meta = load_meta(out)
    assert np.array_equal(read_split(out, "train"), expected_stream(tok, docs))
    train = meta["splits"]["train"]
    assert train["documents"] == len(docs)
    assert train["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert train["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["splits"]["val"] == {"tokens": 0, "bytes": 0, "documents": 0, "shards": []}
    assert (meta["dtype"], meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == ("uint16", tok.vocab_size, 0, 1)
    assert sum(s["documents"] for s in meta["sources"]) == len(docs)
    assert load_tokenizer(out).to_str() == tok.to_str()


def test_trained_bpe_and_val_fraction_are_deterministic(tmp_path):
    docs = make_docs(60)
    write_jsonl(tmp_path / "c.jsonl", docs)
    a = prepare([tmp_path / "c.jsonl"], tmp_path / "a", vocab_size=300, val_fraction=0.2, seed=3,
                workers=1, progress=False)
    b = prepare([tmp_path / "c.jsonl"], tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=3,
                workers=1, progress=False)
    ma, mb = load_meta(a), load_meta(b)
    assert ma == mb
    for split in ("train", "val"):
        assert np.array_equal(read_split(a, split), read_split(b, split))
    n_val = ma["splits"]["val"]["documents"]
    assert 3 <= n_val <= 24 and n_val + ma["splits"]["train"]["documents"] == 60
    # The split is decided per document by its bytes and the seed: recompute it independently.
    tok = load_tokenizer(a)
    val_docs = [d for d in docs if prepare_mod.val_score(d.encode(), 3) < 0.2]
    assert len(val_docs) == n_val
    assert np.array_equal(read_split(a, "val"), expected_stream(tok, val_docs))
    assert ma["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)
    # The BPE saw only training documents; a different seed draws different documents.
    c = prepare([tmp_path / "c.jsonl"], tmp_path / "c", vocab_size=300, val_fraction=0.2, seed=4,
                workers=1, progress=False)
    assert not np.array_equal(read_split(c, "val"), read_split(a, "val"))


def test_explicit_val_inputs(tok, tmp_path):
    train_docs, val_docs = make_docs(5), make_docs(2, seed=9)
    write_jsonl(tmp_path / "t.jsonl", train_docs)
    write_jsonl(tmp_path / "v.jsonl.xz", val_docs, lzma.open)
    out = prepare([tmp_path / "t.jsonl"], tmp_path / "ds", tokenizer=tok, val_inputs=[tmp_path / "v.jsonl.xz"],
                  workers=1, progress=False)
    assert np.array_equal(read_split(out, "val"), expected_stream(tok, val_docs))
    assert np.array_equal(read_split(out, "train"), expected_stream(tok, train_docs))
    assert load_meta(out)["val_from"] == "inputs"


def test_small_corpus_still_gets_one_val_document(tok, tmp_path):
    # 12 documents at 1%: the hash draw picks none, so the lowest-hash document moves to val and
    # the train shards are rewritten without it (across several small shards).
    docs = make_docs(12)
    write_jsonl(tmp_path / "c.jsonl", docs)
    assert not any(prepare_mod.val_score(d.encode(), 0) < 0.01 for d in docs)
    out = prepare([tmp_path / "c.jsonl"], tmp_path / "ds", tokenizer=tok, workers=1, progress=False,
                  shard_tokens=50)
    meta = load_meta(out)
    moved = min(docs, key=lambda d: prepare_mod.val_score(d.encode(), 0))
    rest = [d for d in docs if d is not moved]
    assert np.array_equal(read_split(out, "val"), expected_stream(tok, [moved]))
    assert np.array_equal(read_split(out, "train"), expected_stream(tok, rest))
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (11, 1)
    assert meta["splits"]["val"]["bytes"] == len(moved.encode())
    assert len(meta["splits"]["train"]["shards"]) == -(-meta["splits"]["train"]["tokens"] // 50)


def test_workers_give_identical_output(tok, tmp_path, monkeypatch):
    docs = make_docs(40, words=200)
    write_jsonl(tmp_path / "c.jsonl", docs)
    monkeypatch.setattr(prepare_mod, "MIN_POOL_BYTES", 0)   # use the pool even for a small corpus
    monkeypatch.setattr(prepare_mod, "JOB_CHARS", 2000)     # many tasks in flight, out of order
    one = prepare([tmp_path / "c.jsonl"], tmp_path / "one", tokenizer=tok, val_fraction=0.1, workers=1,
                  progress=False)
    two = prepare([tmp_path / "c.jsonl"], tmp_path / "two", tokenizer=tok, val_fraction=0.1, workers=2,
                  progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(one, split), read_split(two, split))
    assert load_meta(one)["splits"] == load_meta(two)["splits"]


def test_long_documents_are_encoded_in_pieces_exactly(tok, tmp_path, monkeypatch):
    doc = "".join(make_docs(30, words=40))  # one long document with many line starts
    (tmp_path / "long.txt").write_text(doc)
    monkeypatch.setattr(prepare_mod, "PIECE_CHARS", 300)
    pieces = prepare_mod.split_pieces(doc, 300)
    assert len(pieces) > 10 and "".join(pieces) == doc
    out = prepare([tmp_path / "long.txt"], tmp_path / "ds", tokenizer=tok, val_fraction=0, workers=1,
                  progress=False)
    assert np.array_equal(read_split(out, "train"), expected_stream(tok, [doc]))
    assert load_meta(out)["splits"]["train"]["documents"] == 1


def test_single_line_documents_are_cut_between_words_exactly(tok, tmp_path):
    line = " ".join(make_docs(30, words=40)).replace("\n", " ")  # no line start anywhere
    pieces = prepare_mod.split_pieces(line, 300)
    assert len(pieces) > 10 and "".join(pieces) == line and max(map(len, pieces)) <= 600
    assert all(p[0] == " " and not p[1].isspace() for p in pieces[1:])  # each cut is before " word"
    assert [t for p in pieces for t in tok.encode(p)] == tok.encode(line)
    hard = prepare_mod.split_pieces("x" * 1000, 300)  # no space at all: cut hard, nothing lost
    assert [len(p) for p in hard] == [300, 300, 400]


def test_a_huge_single_line_file_is_prepared_in_bounded_memory(tok, tmp_path):
    """A 16 MB one-line text: before the cut between words the tokenizer took ~150 bytes per character
    (2.0 GB more here, 10.4 GB for 60 MB); now ~180 MB: the text itself plus one piece's state."""
    import subprocess
    import sys

    (tmp_path / "line.txt").write_text("lorem ipsum dolor sit amet, " * 600_000)  # 16.8 MB, no newline
    tok.save(tmp_path / "tokenizer.json")
    code = ("import resource, sys; from deepseekmoe.data.prepare import prepare; base = resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss; prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], "
            "val_fraction=0, workers=1, progress=False); print(resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss - base)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "line.txt"), str(tmp_path / "ds"),
                        str(tmp_path / "tokenizer.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    grown_mb = int(r.stdout) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mb < 500, f"prepare of a 16.8 MB single line grew the process by {grown_mb:.0f} MB"
    assert load_meta(tmp_path / "ds")["splits"]["train"]["documents"] == 1


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"filler{i}": 256 + i for i in range(70_000 - 256)})
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(tk.to_str())
    docs = make_docs(3)
    write_jsonl(tmp_path / "c.jsonl", docs)
    out = prepare([tmp_path / "c.jsonl"], tmp_path / "ds", tokenizer=tmp_path / "tok", val_fraction=0,
                  workers=1, progress=False)
    meta = load_meta(out)
    assert (meta["dtype"], meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == ("uint32", 70_002, 70_000, 70_001)
    stream = read_split(out, "train")
    assert stream.dtype == np.int64 and (out / "train_000.bin").stat().st_size == 4 * len(stream)
    assert int(stream.max()) == 70_001 == meta["max_token_id"]  # the eos, beyond uint16
    tok = load_tokenizer(out)
    assert tok.eos_id == 70_001 and tok.decode(stream[:-1].tolist()).startswith(docs[0])


def test_overwrites_a_previous_dataset_atomically(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    write_jsonl(tmp_path / "b.jsonl", make_docs(4, seed=5))
    out = tmp_path / "ds"
    prepare([tmp_path / "a.jsonl"], out, tokenizer=tok, val_fraction=0, workers=1, progress=False)
    prepare([tmp_path / "b.jsonl"], out, tokenizer=tok, val_fraction=0, workers=1, progress=False)
    assert load_meta(out)["splits"]["train"]["documents"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "ds"]  # no temporaries left
