"""Bad input: one DataError naming the problem; via the CLI exit 2, one line, nothing half-written."""

from __future__ import annotations

import builtins
import gzip
import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepseekmoe.cli import main
from deepseekmoe.data import PackedLoader, Tokenizer, check_vocab, load_meta, prepare, train_tokenizer
from deepseekmoe.data.dataset import TokenStream
from deepseekmoe.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DOCS = [f"Document number {i}.\nSome text here, and more text there.\n" for i in range(6)]


def jsonl(path: Path, rows, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(DOCS * 3, 300, path)
    return path


def _case(tmp: Path, name: str, tok_path: Path):
    """(argv after `prepare`, expected message regex) for each bad input."""
    good = jsonl(tmp / "good.jsonl", [{"text": d} for d in DOCS])
    if name == "missing":
        return [str(tmp / "nope.jsonl")], r"nope\.jsonl: no such file or directory"
    if name == "empty_dir":
        (tmp / "empty").mkdir()
        return [str(tmp / "empty")], r"empty: no supported files in this directory \(it is empty\)"
    if name == "empty_corpus":
        (tmp / "blank.txt").write_text("  \n\n\t")
        p = jsonl(tmp / "blank.jsonl", ['{"text": ""}', "", '{"text": "   "}'])
        return [str(tmp / "blank.txt"), str(p)], r"empty corpus: no non-empty document in .*blank\.txt"
    if name == "unsupported":
        (tmp / "data.csv").write_text("a,b\n")
        return [str(tmp / "data.csv")], r"data\.csv: unsupported file type; supported: \.txt"
    if name == "utf8_txt":
        (tmp / "latin1.txt").write_bytes("caf\u00e9 ok\nna\u00efve".encode("latin-1"))
        return [str(tmp / "latin1.txt")], (r"latin1\.txt: not valid UTF-8 at byte offset 3 \(line 1\): byte 0xe9.*"
                                           r"convert the file to UTF-8")
    if name == "utf8_jsonl_xz":
        with lzma.open(tmp / "bad.jsonl.xz", "wb") as f:
            f.write(b'{"text": "fine"}\n{"text": "bad \xff here"}\n')
        return [str(tmp / "bad.jsonl.xz")], (r"bad\.jsonl\.xz: not valid UTF-8 at byte offset 31 of the "
                                              r"decompressed data \(line 2\): byte 0xff")
    if name == "no_text_field":
        p = jsonl(tmp / "c.jsonl", [{"text": "ok"}, {"content": "x", "id": 3}])
        return [str(p)], r"c\.jsonl:line 2: no 'text' field \(found: 'content', 'id'\).*--field"
    if name == "bad_json":
        p = jsonl(tmp / "c.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
        return [str(p)], r"c\.jsonl:line 2: not valid JSON"
    if name == "text_not_string":
        p = jsonl(tmp / "c.jsonl", [{"text": ["a", "list"]}])
        return [str(p)], r"c\.jsonl:line 1: 'text' is list, expected a string"
    if name == "surrogate":
        p = jsonl(tmp / "c.jsonl", ['{"text": "half a pair \\ud83d here"}'])
        return [str(p)], r"c\.jsonl:line 1: the text holds an unpaired surrogate \(\\ud83d\)"
    if name == "truncated_gz":
        blob = gzip.compress(("\n".join(json.dumps({"text": d}) for d in DOCS * 50)).encode())
        (tmp / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
        return [str(tmp / "cut.jsonl.gz")], r"cut\.jsonl\.gz: corrupted or truncated gz file"
    if name == "parquet_no_column":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["a", "b"]}), tmp / "t.parquet")
        return [str(tmp / "t.parquet")], r"t\.parquet: no 'text' column \(columns: body\)"
    if name == "vocab_mismatch":
        v = Tokenizer.from_file(tok_path).vocab_size
        return [str(good), "--tokenizer", str(tok_path), "--vocab-size", "256"], (
            rf"the tokenizer has {v} entries \(ids up to {v - 1}\), beyond the vocab size 256.*does not match")
    if name == "single_document":
        (tmp / "book.txt").write_text(DOCS[0])
        return [str(tmp / "book.txt")], r"single document.*--val-fraction 0"
    if name == "bad_fraction":
        return [str(good), "--val-fraction", "1.5"], r"validation fraction 1\.5 must be in \[0, 1\)"
    if name == "not_a_dataset_out":
        (tmp / "ds").mkdir()
        (tmp / "ds" / "precious.txt").write_text("keep me")
        return [str(good)], r"exists and is not a prepared dataset"
    raise AssertionError(name)


CASES = ["missing", "empty_dir", "empty_corpus", "unsupported", "utf8_txt", "utf8_jsonl_xz", "no_text_field",
         "bad_json", "text_not_string", "surrogate", "truncated_gz", "parquet_no_column", "vocab_mismatch",
         "single_document", "bad_fraction", "not_a_dataset_out"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_cli_exit_2_one_line_nothing_written(name, tmp_path, tok_path, capsys):
    argv, pattern = _case(tmp_path, name, tok_path)
    out = tmp_path / "ds"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["prepare", *argv, "--out", str(out), "--quiet", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("deepseekmoe prepare: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    # Nothing half-written: the directory listing is unchanged (no dataset, no temporaries).
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if name == "not_a_dataset_out":
        assert (out / "precious.txt").read_text() == "keep me"


def test_library_raises_data_error(tmp_path, tok_path):
    argv, _ = _case(tmp_path, "no_text_field", tok_path)
    with pytest.raises(DataError, match="no 'text' field"):
        prepare(argv, tmp_path / "ds", tokenizer=tok_path, progress=False)


def test_missing_pyarrow_is_explained(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"reading parquet files needs pyarrow: pip install 'deepseekmoe\[parquet\]'"):
        prepare([tmp_path / "t.parquet"], tmp_path / "ds", vocab_size=300, progress=False)


def test_failure_mid_encoding_keeps_the_previous_dataset(tmp_path, tok_path):
    good = jsonl(tmp_path / "good.jsonl", [{"text": d} for d in DOCS])
    out = prepare([good], tmp_path / "ds", tokenizer=tok_path, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The bad line comes after good documents were already written to the temporary shards.
    bad = jsonl(tmp_path / "bad.jsonl", [{"text": d} for d in DOCS] + [{"nope": 1}])
    with pytest.raises(DataError, match="line 7: no 'text' field"):
        prepare([bad], out, tokenizer=tok_path, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds", "good.jsonl"]


def test_damaged_datasets_and_vocab_beyond_model(tmp_path, tok_path):
    good = jsonl(tmp_path / "good.jsonl", [{"text": d} for d in DOCS * 4])
    out = prepare([good], tmp_path / "ds", tokenizer=tok_path, workers=1, progress=False)
    meta = load_meta(out)
    stream = TokenStream.open(out, "train")
    top = int(stream.read(0, len(stream)).max())
    assert meta["max_token_id"] == top > 256
    with pytest.raises(DataError, match=rf"token ids up to {top} .* model's vocab_size is 256"):
        check_vocab(meta, 256)
    with pytest.raises(DataError, match="model's vocab_size is 100"):
        PackedLoader(out, seq_len=8, batch_size=2, vocab_size=100)
    check_vocab(meta, top + 1)  # fits exactly
    with pytest.raises(DataError):
        check_vocab(meta, top)
    with pytest.raises(DataError, match="not a prepared dataset \\(no meta.json\\)"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="no such dataset directory"):
        load_meta(tmp_path / "nowhere")
    # A truncated shard and a corrupted meta.json are caught before any batch is read.
    shard = out / "train_000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(DataError, match="should hold .* tokens but its shards hold"):
        PackedLoader(out, seq_len=8, batch_size=2)
    shard.write_bytes(data[:-1])
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        load_meta(out)
    # An id beyond the vocabulary inside a shard (bit rot) stops the loader with a message.
    bad = np.frombuffer(data, dtype=np.uint16).copy()
    bad[:] = 65000
    shard.write_bytes(bad.tobytes())
    with pytest.raises(DataError, match=f"token id 65000 >= vocab_size {meta['vocab_size']}"):
        next(PackedLoader(out, seq_len=8, batch_size=2))
    (out / "meta.json").write_text('{"format": "deepseekmoe-tokens", "vers')
    with pytest.raises(DataError, match="meta.json: corrupted"):
        load_meta(out)
    # Loader state from another dataset / sequence length is refused.
    (out / "meta.json").write_text(json.dumps(meta))
    shard.write_bytes(data)
    state = PackedLoader(out, seq_len=8, batch_size=2).state_dict()
    with pytest.raises(DataError, match="resume with the same dataset and sequence length"):
        PackedLoader(out, seq_len=16, batch_size=2).load_state_dict(state)


def test_real_process_prints_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "deepseekmoe", "prepare", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "ds")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"deepseekmoe prepare: error: {tmp_path / 'missing'}: no such file or directory"
    assert not (tmp_path / "ds").exists()
