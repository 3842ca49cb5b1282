"""The shipped sample (size, provenance, content) and default_dataset (result and cache logic)."""

from __future__ import annotations

import importlib
import json
import lzma
import time

import numpy as np
import pytest

from deepseekmoe.data import check_vocab, default_dataset, load_meta, load_tokenizer, unigram_entropy
from deepseekmoe.data.dataset import TokenStream
from deepseekmoe.model import presets

sample = importlib.import_module("deepseekmoe.data.sample")


def _books(split):
    train, val = sample.sample_files()
    with lzma.open(train if split == "train" else val, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sample_size_books_and_provenance():
    train, val = sample.sample_files()
    assert train.stat().st_size + val.stat().st_size <= 5_000_000
    books = {s: _books(s) for s in ("train", "val")}
    assert [b["title"] for b in books["train"] + books["val"]] == [
        t for _, t, _, _, s in sorted(sample.BOOKS, key=lambda b: b[4] == "val")]
    assert len(books["val"]) == 2 and len(books["train"]) == 24
    provenance = (sample.asset_dir().parent / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "rcdm-uga/Gutenberg_Text" in provenance and "public domain" in provenance.lower()
    for b in books["train"] + books["val"]:
        assert b["title"] in provenance and b["author"] in provenance and b["file"] in provenance
        assert b["source"] == "rcdm-uga/Gutenberg_Text" and b["published"] < 1929
        assert "Project Gutenberg" not in b["text"] and b["text"].endswith("\n")
        assert len(b["text"]) > 100_000  # whole books, not excerpts


@pytest.fixture(scope="module")
def default_dir():
    # The user's cache (shared with the trainer's tests, so the suite builds it once per machine).
    return default_dataset(progress=False)


def test_default_dataset_contents(default_dir):
    meta = load_meta(default_dir)
    assert (meta["vocab_size"], meta["dtype"], meta["bos_id"], meta["eos_id"]) == (4096, "uint16", 0, 1)
    tiny = presets.get("tiny")
    assert (tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_id) == (4096, 0, 1)
    check_vocab(meta, tiny.vocab_size)
    for split in ("train", "val"):
        books = _books(split)
        info = meta["splits"][split]
        assert info["documents"] == len(books)
        assert info["bytes"] == sum(len(b["text"].encode("utf-8")) for b in books)
    assert 3_000_000 < meta["splits"]["train"]["tokens"] < 5_000_000
    # The val stream is exactly Alice, eos, A Christmas Carol, eos.
    tok = load_tokenizer(default_dir)
    val = TokenStream.open(default_dir, "val")
    ids = val.read(0, len(val))
    ends = np.flatnonzero(ids == tok.eos_id)
    assert list(ends) == [ends[0], len(ids) - 1] and len(ends) == 2
    assert tok.decode(ids[: ends[0]].tolist()) == _books("val")[0]["text"]
    assert tok.decode(ids[ends[0] + 1: -1].tolist()) == _books("val")[1]["text"]
    assert 4.5 < unigram_entropy(default_dir, "val") < 7.5  # nats/token of a 4K English BPE
    t = time.perf_counter()
    assert default_dataset(progress=False) == default_dir
    assert time.perf_counter() - t < 2.0  # cached


def test_cache_key_reuse_and_rebuild(tmp_path, monkeypatch):
    # The cache logic on a two-book stand-in for the sample (the real build is covered above).
    books = _books("val")
    files = []
    for name, book in (("train", books[0]), ("val", books[1])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"text": book["text"][:20_000]}) + "\n")
        files.append(path)
    monkeypatch.setattr(sample, "sample_files", lambda: tuple(files))
    monkeypatch.setattr(sample, "SAMPLE_VOCAB", 300)
    out = sample.default_dataset(tmp_path / "cache", progress=False)
    assert out.parent == tmp_path / "cache" / "data" and sample.sample_key() in out.name
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert sample.default_dataset(tmp_path / "cache", progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (out / "train_000.bin").unlink()  # damaged cache: rebuilt, and said so
    with pytest.warns(RuntimeWarning, match="rebuilding the default dataset: .*train_000.bin .* is missing"):
        assert sample.default_dataset(tmp_path / "cache", progress=False) == out
    assert load_meta(out)["splits"]["val"]["documents"] == 1
    monkeypatch.setenv("DEEPSEEKMOE_CACHE", str(tmp_path / "env"))
    assert sample.cache_root() == tmp_path / "env"
    key = sample.sample_key()
    files[0].write_text(json.dumps({"text": "changed"}) + "\n")
    assert sample.sample_key() != key  # a different sample is a different cache entry
