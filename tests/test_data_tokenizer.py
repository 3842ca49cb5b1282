"""Tokenizer: exact UTF-8 round trip, special ids, loading released-style tokenizer.json files."""

from __future__ import annotations

import json
import random

import pytest

from deepseekmoe.data import Tokenizer, train_tokenizer
from deepseekmoe.errors import DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n\nIt was the best of times, it was the worst of times.",
    "Über Straße naïve café — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 emoji 😀🚀 and tabs\tend\n",
    "def f(x):\n    return x * 2  # code with  double  spaces\r\nWindows line\r\n" * 3,
] * 10


def _weird_texts() -> list[str]:
    rng = random.Random(0)
    # Random code points from many planes (no surrogates: those are not valid UTF-8 text).
    pool = [chr(c) for c in list(range(0x20, 0x7F)) + list(range(0xA0, 0x800)) + [0x3000, 0x4E2D, 0xFEFF,
                                                                                   0x1F600, 0x10FFFF]]
    rand = "".join(rng.choice(pool + ["\n", "\t", " ", "\r", "\x00", "\x0b"]) for _ in range(3000))
    return ["", " ", "\n", "\n\n\n", "  leading and trailing  ", "\t\tTabs\t", "a\r\nb\rc\n", "\x00\x01\x7f",
            "<|eos|> literal special text <|bos|>", "\ufeffBOM kept", "e\u0301 vs \u00e9 (no normalisation)",
            rand]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 400)


def test_round_trip_exact_for_arbitrary_utf8(tok):
    for text in CORPUS[:3] + _weird_texts():
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(CORPUS[:3]) == [tok.encode(t) for t in CORPUS[:3]]


def test_special_ids_and_vocab(tok, tmp_path):
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the tiny preset's bos_token_id / eos_token_id
    assert (tok.bos_token, tok.eos_token) == ("<|bos|>", "<|eos|>")
    assert 258 < tok.vocab_size <= 400
    # Special-token text inside a document is plain text; it never becomes a document boundary.
    ids = tok.encode("a <|eos|> b")
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.encode("<|eos|>", allow_special=True) == [tok.eos_id]
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "<|bos|>hi<|eos|>"
    # Saving writes tokenizer.json + tokenizer_config.json; loading finds the same specials.
    tok.save(tmp_path / "tokenizer.json")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|bos|>", "<|eos|>")
    back = Tokenizer.from_file(tmp_path)
    assert (back.bos_id, back.eos_id, back.vocab_size) == (0, 1, tok.vocab_size)
    assert back.encode(CORPUS[1]) == tok.encode(CORPUS[1])


def test_training_is_deterministic(tok, tmp_path):
    again = train_tokenizer(CORPUS, 400, tmp_path / "t.json")
    assert again.to_str() == tok.to_str()
    assert (tmp_path / "t.json").read_text() == tok.to_str()


def test_train_from_files_and_cap(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS[0] * 20)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    from_files = train_tokenizer([tmp_path / "a.txt", str(tmp_path / "b.jsonl")], 300)
    assert from_files.decode(from_files.encode(CORPUS[1])) == CORPUS[1]
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(CORPUS, 100)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "   "], 300)


def _deepseek_like(tmp_path, n_filler=100_000 - 256, with_config=False):
    """A byte-level tokenizer shaped like deepseek-moe-16b's: specials at ids 100000/100001."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": 256 + i for i in range(n_filler)})
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(tk.to_str())
    if with_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"__type": "AddedToken", "content": "<｜fim▁hole｜>"}, "eos_token": "<｜end▁of▁sentence｜>"}))
    return path


def test_released_style_tokenizer_detects_specials(tmp_path):
    path = _deepseek_like(tmp_path)
    tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (100000, 100001, 100003)
    text = "Hello, world!\n  déjà vu 😀"
    assert tok.decode(tok.encode(text)) == text
    # Explicit arguments (token text or id) win over detection.
    assert Tokenizer.from_file(path, bos="<｜fim▁hole｜>", eos=100000).bos_id == 100002
    assert Tokenizer.from_file(path, eos=100000).eos_id == 100000
    with pytest.raises(DataError, match="not in the vocabulary"):
        Tokenizer.from_file(path, eos="<nope>")
    with pytest.raises(DataError, match="outside the vocabulary"):
        Tokenizer.from_file(path, eos=200000)


def test_tokenizer_config_beside_file_wins(tmp_path):
    path = _deepseek_like(tmp_path, n_filler=10, with_config=True)
    tok = Tokenizer.from_file(path)
    assert (tok.bos_token, tok.eos_token) == ("<｜fim▁hole｜>", "<｜end▁of▁sentence｜>")


def test_gpt2_style_single_endoftext_and_undetectable(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    tk = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tk.add_special_tokens(["<|endoftext|>"])
    tok = Tokenizer(tk)
    assert tok.bos_id == tok.eos_id == 2  # one token starts and ends documents
    tk2 = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tk2.add_special_tokens(["<mystery>"])
    (tmp_path / "tokenizer.json").write_text(tk2.to_str())
    with pytest.raises(DataError, match=r"cannot tell which token is eos.*<mystery>.*--eos"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path, eos="<mystery>").eos_id == 2


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a Hugging Face `tokenizers` file"):
        Tokenizer.from_file(tmp_path)


def test_malformed_companion_files_are_errors_not_skipped(tmp_path):
    """bos/eos come from a meta.json / tokenizer_config.json beside tokenizer.json: a damaged one
    is reported (naming the file and the fix), never skipped for a guess by token names."""
    path = _deepseek_like(tmp_path, n_filler=10)
    cfg, meta = tmp_path / "tokenizer_config.json", tmp_path / "meta.json"
    cfg.write_text('{"bos_token": "<｜fim▁hole｜>",')
    with pytest.raises(DataError, match=r"tokenizer_config.json: unreadable .*fix or remove it"):
        Tokenizer.from_file(path)
    cfg.write_text('["<｜fim▁hole｜>"]')
    with pytest.raises(DataError, match=r"tokenizer_config.json: expected a JSON object, found list"):
        Tokenizer.from_file(path)
    cfg.unlink()
    meta.write_text("{not json")
    with pytest.raises(DataError, match=r"meta.json: unreadable .*deepseekmoe prepare"):
        Tokenizer.from_file(path)
    meta.write_text(json.dumps({"format": "deepseekmoe-tokens", "bos_id": "x", "eos_id": 1}))
    with pytest.raises(DataError, match=r"meta.json: a prepared dataset's meta.json needs integer bos_id"):
        Tokenizer.from_file(path)
    # Another tool's meta.json says nothing about bos/eos: skipped, the token names decide.
    meta.write_text(json.dumps({"format": "something-else"}))
    assert Tokenizer.from_file(path).bos_id == 10 + 256
    meta.write_text(json.dumps({"format": "deepseekmoe-tokens", "bos_id": 3, "eos_id": 4}))
    assert (Tokenizer.from_file(path).bos_id, Tokenizer.from_file(path).eos_id) == (3, 4)


def test_tokenizer_train_refuses_a_bad_out_before_training(tmp_path, capsys, monkeypatch):
    from deepseekmoe import cli
    from deepseekmoe.data import tokenizer as tokenizer_mod

    (tmp_path / "in.txt").write_text(CORPUS[0])
    (tmp_path / "file").write_text("user data")
    (tmp_path / "dir").mkdir()

    def no_training():
        raise AssertionError("the BPE was trained before the output was checked")

    monkeypatch.setattr(tokenizer_mod, "new_bpe", no_training)
    for out, needle in ((tmp_path / "dir", "dir is a directory"),
                        (tmp_path / "file" / "tokenizer.json", "file is a file, not a folder")):
        rc = cli.main(["tokenizer", "train", str(tmp_path / "in.txt"), "--vocab-size", "300", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and f"cannot write {out} (" in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "in.txt"]
    assert (tmp_path / "file").read_text() == "user data" and not any((tmp_path / "dir").iterdir())


def test_tokenizer_show_takes_a_run_directory(tok, tmp_path, capsys):
    from deepseekmoe import cli

    model_dir = tmp_path / "run" / "checkpoints" / "step_0000004" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"format": "deepseekmoe", "model": {}}))
    tok.save(model_dir / "tokenizer.json")
    for spec in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_0000004"):
        assert cli.main(["tokenizer", "show", str(spec), "--text", "hello"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "vocab_size=400" in out and "round trip exact: True" in out
