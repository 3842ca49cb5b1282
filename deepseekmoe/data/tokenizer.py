"""The tokenizer: a thin wrapper over a Hugging Face `tokenizers` object that knows bos/eos.

`train_tokenizer` trains a byte-level BPE (GPT-2 style: every byte is in the base alphabet, so
encode -> decode gives back any UTF-8 text exactly, whitespace and newlines included) with two
special tokens, bos = id 0 and eos = id 1, as the `tiny` preset expects. `Tokenizer.from_file`
loads any tokenizer.json (for example the released deepseek-moe-16b one) and finds its bos/eos
from, in order: explicit arguments, the meta.json of a prepared dataset directory beside it, a
tokenizer_config.json beside it, or the names of its special tokens ("<｜begin▁of▁sentence｜>",
"<s>", "<|endoftext|>", ...). A malformed meta.json or tokenizer_config.json is an error, not
skipped: bos/eos would silently be guessed instead.

Text is always encoded with special-token strings treated as plain text, so a document that
happens to contain "<|eos|>" cannot inject a document boundary; `allow_special=True` opts in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from deepseekmoe.checkpoint.files import atomic_write_text, check_output
from deepseekmoe.errors import DataError

DEFAULT_BOS = "<|bos|>"
DEFAULT_EOS = "<|eos|>"
MAX_VOCAB = 1 << 21  # far above any released model's (~100k); the BPE trainer aborts the process on huge sizes

# Substrings (after normalising "▁"->"_", "｜"->"|", lower case) that name a document start/end.
_BOS_HINTS = ("begin_of_sentence", "begin_of_text", "startoftext", "start_of_text", "<s>", "<|bos|>",
              "<bos>", "[bos]")
_EOS_HINTS = ("end_of_sentence", "end_of_text", "endoftext", "</s>", "<|eos|>", "<eos>", "[eos]")


def _norm(token: str) -> str:
    return token.replace("▁", "_").replace("｜", "|").lower()


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids that start and end a document."""

    def __init__(self, tk, bos_id: int | None = None, eos_id: int | None = None, source: str = ""):
        self._tk = tk
        self.source = source
        # Special-token strings inside documents are encoded as text (see module docstring).
        self._tk.encode_special_tokens = True
        self.vocab_size = _vocab_size(tk)
        found_bos, found_eos = _detect_specials(tk)
        self.eos_id = self._resolve(eos_id, found_eos, "eos")
        bos = self._resolve(bos_id, found_bos, "bos") if (bos_id is not None or found_bos is not None) else None
        # GPT-2 style vocabularies have one <|endoftext|> that both ends and starts documents.
        self.bos_id = self.eos_id if bos is None else bos

    def _resolve(self, given, found, role: str) -> int:
        if given is None:
            if found is None:
                specials = sorted(t.content for t in self._tk.get_added_tokens_decoder().values())
                raise DataError(
                    f"{self.source or 'tokenizer'}: cannot tell which token is {role} (special tokens: "
                    f"{', '.join(specials[:12]) or 'none'}); pass it explicitly (--{role} TOKEN)")
            return found
        if isinstance(given, str):
            tid = self._tk.token_to_id(given)
            if tid is None:
                raise DataError(f"{self.source or 'tokenizer'}: {role} token {given!r} is not in the vocabulary")
            return tid
        given = int(given)
        if not 0 <= given < self.vocab_size:
            raise DataError(f"{self.source or 'tokenizer'}: {role} id {given} is outside the vocabulary "
                            f"(0..{self.vocab_size - 1})")
        return given

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, bos: int | str | None = None,
                  eos: int | str | None = None) -> Tokenizer:
        """Load a tokenizer.json, or a directory holding one (a HF model dir or a prepared dataset)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found (give a tokenizer.json or a directory with one)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"{path}: not a Hugging Face `tokenizers` file ({str(e)[:200]})") from e
        if bos is None or eos is None:
            cfg_bos, cfg_eos = _specials_beside(path)
            bos = cfg_bos if bos is None else bos
            eos = cfg_eos if eos is None else eos
        return cls(tk, bos, eos, source=str(path))

    @classmethod
    def from_str(cls, text: str, bos=None, eos=None) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text), bos, eos)

    def to_str(self) -> str:
        # encode_special_tokens is runtime state, not part of the file format; keep the file standard.
        return self._tk.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (atomically) and a tokenizer_config.json naming bos/eos beside it."""
        path = Path(path)
        atomic_write_text(path, self.to_str())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        atomic_write_text(path.with_name("tokenizer_config.json"), json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------------------ encode / decode
    @property
    def bos_token(self) -> str:
        return self._tk.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._tk.id_to_token(self.eos_id)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, no bos/eos added."""
        if not allow_special:
            return self._tk.encode(text, add_special_tokens=False).ids
        self._tk.encode_special_tokens = False
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        finally:
            self._tk.encode_special_tokens = True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (the fast path: no offsets computed)."""
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: ~4x faster, same ids.
        fast = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}:{self.bos_id}, "
                f"eos={self.eos_token!r}:{self.eos_id})")


def _vocab_size(tk) -> int:
    """1 + the largest id (ids are normally dense; the full vocab dict is built only if not)."""
    n = tk.get_vocab_size(with_added_tokens=True)
    top_added = max(tk.get_added_tokens_decoder(), default=-1)
    if n and tk.id_to_token(n - 1) is not None and top_added < n:
        return n
    return max(tk.get_vocab(with_added_tokens=True).values()) + 1


def _detect_specials(tk) -> tuple[int | None, int | None]:
    """Find bos/eos among the special added tokens by name; None where nothing matches."""
    bos = eos = None
    for tid, tok in sorted(tk.get_added_tokens_decoder().items()):
        name = _norm(tok.content)
        if bos is None and any(h in name for h in _BOS_HINTS):
            bos = tid
        elif eos is None and any(h in name for h in _EOS_HINTS):
            eos = tid
    return bos, eos


def _token_name(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file holding one object; DataError naming the file and `fix` when it is unreadable
    (a tokenizer's companion file silently skipped would leave bos/eos guessed, perhaps wrongly)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); {fix}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix}")
    return obj


def _specials_beside(path: Path) -> tuple[int | str | None, int | str | None]:
    """bos/eos named by a prepared dataset's meta.json or else a tokenizer_config.json next to
    `path`; DataError when either file is there but malformed."""
    meta = path.with_name("meta.json")
    if meta.is_file():
        m = read_json_object(meta, "prepare the dataset again (`deepseekmoe prepare`) or remove the file")
        if m.get("format") == "deepseekmoe-tokens":  # another tool's meta.json says nothing about bos/eos
            try:
                return int(m["bos_id"]), int(m["eos_id"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{meta}: a prepared dataset's meta.json needs integer bos_id and eos_id "
                                f"({type(e).__name__}: {e}); prepare the dataset again") from e
    cfg = path.with_name("tokenizer_config.json")
    if cfg.is_file():
        c = read_json_object(cfg, "fix or remove it (bos/eos are then found by their token names)")
        return _token_name(c.get("bos_token")), _token_name(c.get("eos_token"))
    return None, None


# ---------------------------------------------------------------------------------- training
def new_bpe():
    """An untrained byte-level BPE `tokenizers.Tokenizer` (no normaliser, GPT-2 pre-tokenisation)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tk = HFTokenizer(models.BPE())
    # No normaliser: NFC/NFKC or lower-casing would break the exact round trip.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts_or_files, vocab_size: int, out_path: str | os.PathLike | None = None, *,
                    bos: str = DEFAULT_BOS, eos: str = DEFAULT_EOS, field: str = "text",
                    max_bytes: int | None = None, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (bos = id 0, eos = id 1).

    `texts_or_files`: an iterable whose items are texts (str) or input files/directories
    (`pathlib.Path`, or a str naming an existing path): any format `deepseekmoe prepare` reads.
    `max_bytes` caps the UTF-8 bytes fed to the trainer (whole documents, in order).
    The result is deterministic for a given input (independent of the thread count).
    """
    from tokenizers import pre_tokenizers, trainers

    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    vocab_size = int(vocab_size)
    min_size = 256 + 2
    if vocab_size < min_size:
        raise DataError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {min_size} "
                        "(256 bytes + bos + eos)")
    if vocab_size > MAX_VOCAB:
        raise DataError(f"vocab size {vocab_size} is too large: a trained BPE has at most {MAX_VOCAB} entries "
                        "(released models use about 100,000; 16384 suits a small corpus)")
    if out_path is not None:  # refuse an unwritable output now, not after the training
        check_output(out_path, directory=False)
    texts = _texts(texts_or_files, field, max_bytes)
    first = next(texts, None)
    if first is None:
        raise DataError("no text to train the tokenizer on (every input is empty)")
    tk = new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_chain(first, texts), trainer)
    tok = Tokenizer(tk, tk.token_to_id(bos), tk.token_to_id(eos), source=f"byte-level BPE ({vocab_size})")
    if out_path is not None:
        tok.save(out_path)
    return tok


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _texts(items, field: str, max_bytes: int | None) -> Iterator[str]:
    from deepseekmoe.data.readers import discover, read_documents

    seen = 0
    for item in items:
        is_path = isinstance(item, os.PathLike) or (
            isinstance(item, str) and "\n" not in item and len(item) < 4096 and os.path.exists(item))
        if is_path:
            for src in discover([item]):
                for doc in read_documents(src, field):
                    yield doc.text
                    seen += len(doc.data)
                    if max_bytes is not None and seen >= max_bytes:
                        return
        elif isinstance(item, str):
            if item.strip():
                yield item
                seen += len(item.encode("utf-8", "surrogatepass"))
                if max_bytes is not None and seen >= max_bytes:
                    return
        else:
            raise DataError(f"train_tokenizer: expected text or a path, got {type(item).__name__}")
