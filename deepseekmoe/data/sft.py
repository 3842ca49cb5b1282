"""SFT data: chat record files -> tokenized conversations -> packed (or padded) batches.

    data = build_sft_data(["chat.jsonl"], tokenizer, SFTDataConfig(seq_len=4096), model_dir=ckpt)
    print(data.report)                      # one line: kept, truncated, dropped (and why), tokens
    train = SFTLoader(data.train, batch_size=8, seed=0, rank=r, world_size=w)
    batch = next(train)                     # SFTBatch; model(**batch.model_kwargs()).lm_loss

Files: .jsonl (also .gz / .xz), .parquet, .arrow, or a directory (a Hugging Face dataset saved with
`save_to_disk`: its .arrow shards; name one split directory of a DatasetDict). One record per line
or row (see data/chat.py for the record forms). A malformed record stops the build with one
DataError naming the file, the line or row, and the fix.

A conversation longer than `seq_len` is cut to its first `seq_len` tokens ("truncate") or left out
("drop"); one whose kept tokens carry no loss is left out either way; the report counts both.

Batches (`SFTBatch`, the fields `Transformer.forward` takes): with packing, conversations are laid
into rows of `seq_len` tokens, each into the first of the last few started rows with room (see
`pack_rows`); positions restart at 0 for each, and the boolean mask [B, 1, L, L] lets a
token see only earlier tokens of its own conversation. Padding tokens see only themselves (an
all-False row would give NaN in SDPA). Labels are aligned with the inputs (the model shifts them)
and the first token of every conversation carries none, so no token is predicted across a
boundary: packed and padded batches of the same conversations have the same mean loss over
labelled tokens. Without packing each row is one conversation, right-padded to the longest row of
the batch.

Order: epoch e packs the conversations in a permutation drawn from numpy's PCG64 seeded with
(seed, e). Rows of epoch 0, then epoch 1, ... form one endless sequence, and the cursor into it is
the whole loader state; a step takes the next batch_size * world_size rows and rank r rows
[r*B, (r+1)*B), as data/loader.py does for pretraining.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepseekmoe.data.chat import IGNORE_INDEX, Template, encode_conversation, get_template, normalize_record
from deepseekmoe.data.readers import Source, _pyarrow, _Raw, _utf8_error, classify, discover
from deepseekmoe.errors import ConfigError, DataError

STATE_FORMAT = "deepseekmoe-sft-loader"
RECORD_KINDS = ("jsonl", "parquet", "arrow")


# ---------------------------------------------------------------------- batches
@dataclass
class SFTBatch:
    """input_ids / labels / position_ids int64 [B, L]; attention_mask bool [B, 1, L, L] (True = attend)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_tokens: int = 0       # real (non-padding) tokens, for throughput

    def to(self, device, non_blocking: bool = False) -> SFTBatch:
        return SFTBatch(*(t.to(device, non_blocking=non_blocking) for t in
                          (self.input_ids, self.labels, self.position_ids, self.attention_mask)), self.num_tokens)

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "attention_mask": self.attention_mask}

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry loss after the model's shift (the lm_loss denominator)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], length: int, pad_id: int) -> SFTBatch:
    """One SFTBatch from rows, each a list of (ids, mask) conversations, in rows of `length` tokens."""
    B = len(rows)
    ids = np.full((B, length), pad_id, dtype=np.int64)
    labels = np.full((B, length), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, length), dtype=np.int64)
    doc = np.full((B, length), -1, dtype=np.int64)   # conversation number within its row; -1 = padding
    for b, row in enumerate(rows):
        at = 0
        for k, (c_ids, c_mask) in enumerate(row):
            n = len(c_ids)
            ids[b, at:at + n] = c_ids
            labels[b, at:at + n] = np.where(c_mask, c_ids, IGNORE_INDEX)
            pos[b, at:at + n] = np.arange(n)
            doc[b, at:at + n] = k
            at += n
    doc_t = torch.from_numpy(doc)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (doc_t[:, :, None] == doc_t[:, None, :]) & (doc_t[:, :, None] >= 0)
    mask = (same & causal) | torch.eye(length, dtype=torch.bool)
    return SFTBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos), mask[:, None],
                    int((doc >= 0).sum()))


# ---------------------------------------------------------------------- reading records
RECORD_FORMATS = "give .jsonl (.gz/.xz), .parquet, .arrow, or a dataset saved with save_to_disk"


def record_sources(inputs) -> list[Source]:
    """The record files named by `inputs` (files or directories; see the module docstring)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    for item in inputs or []:
        p = Path(item)
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            splits = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
            raise DataError(f"{p}: a saved DatasetDict with splits {', '.join(splits)}; name one split "
                            f"directory, e.g. {p / (splits[0] if splits else 'train')}")
        if p.is_file() and classify(p) is None:  # discover's message would list the pretraining text types
            raise DataError(f"{p}: unsupported file type for chat records; {RECORD_FORMATS}")
    srcs = discover(inputs)
    for s in srcs:
        if s.kind not in RECORD_KINDS:
            raise DataError(f"{s.path}: {s.kind} files hold no chat records; {RECORD_FORMATS}")
    return srcs


def read_records(src: Source) -> Iterator[tuple[object, str]]:
    """(record, "file:line N" / "file:row N") for every record of one source, in order."""
    try:
        yield from {"jsonl": _jsonl_records, "parquet": _parquet_records, "arrow": _arrow_records}[src.kind](src)
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise DataError(f"{src.path}: cannot read ({e.strerror})") from e
        raise DataError(f"{src.path}: corrupted or truncated {src.compression or src.kind} file ({e}); "
                        "write it again") from e


def _jsonl_records(src: Source):
    r = _Raw(src, lambda n: None)
    offset = 0
    try:
        for lineno, raw in enumerate(r.f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(src, e, start, lineno) from e
            if not line.strip():
                continue
            where = f"{src.path}:line {lineno}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                'object such as {"messages": [...]}') from e
    finally:
        r.close()


def _rows(src: Source, batches):
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row += 1
            yield rec, f"{src.path}:row {row}"


def _parquet_records(src: Source):
    _pyarrow(src)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        yield from _rows(src, pq.ParquetFile(src.path).iter_batches(batch_size=1024))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{src.path}: not a readable parquet file ({e}); write it again") from e


def _arrow_records(src: Source):
    _pyarrow(src)
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(src.path)) as f:
            try:
                batches = iter(ipc.open_stream(f))  # what datasets' save_to_disk writes
            except pa.ArrowInvalid:
                f.seek(0)
                reader = ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _rows(src, batches)
    except pa.ArrowInvalid as e:
        raise DataError(f"{src.path}: not a readable Arrow IPC file ({e}); write it again") from e


# ---------------------------------------------------------------------- tokenized conversations
@dataclass
class SFTDataConfig:
    """How records become training sequences."""
    seq_len: int = 4096
    pack: bool = True               # False: one conversation per row, right-padded per batch
    overlong: str = "truncate"      # a conversation over seq_len: "truncate" (keep the start) or "drop"
    template: str = "auto"          # see data/chat.py get_template
    val_fraction: float = 0.0       # held out from the training files (ignored with val files)
    seed: int = 0                   # the held-out split's draw

    def check(self) -> None:
        if int(self.seq_len) < 2:
            raise ConfigError(f"sft seq_len={self.seq_len}: need at least 2 tokens per sequence")
        if self.overlong not in ("truncate", "drop"):
            raise ConfigError(f"sft overlong={self.overlong!r}: choose truncate or drop")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError(f"sft val_fraction={self.val_fraction}: give a fraction in [0, 1)")


@dataclass
class BuildCounts:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)   # reason -> count
    tokens: int = 0
    label_tokens: int = 0
    held_out: int = 0           # kept conversations moved to the validation split

    def line(self, name: str) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items())) or "none"
        held = f", {self.held_out} of them held out for val" if self.held_out else ""
        return (f"{name}: {self.records} records -> {self.kept + self.held_out} conversations kept "
                f"({self.truncated} truncated{held}), dropped: {why}; {self.tokens} tokens, "
                f"{self.label_tokens} with loss")


class SFTDataset:
    """Tokenized conversations: flat `ids` int32 / `mask` bool and `offsets` int64 [n + 1]."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int,
                 counts: BuildCounts | None = None, name: str = "train"):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.seq_len, self.pad_id, self.name = int(seq_len), int(pad_id), name
        self.counts = counts or BuildCounts(kept=len(offsets) - 1)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, index: np.ndarray, name: str) -> SFTDataset:
        parts = [self[int(i)] for i in index]
        lens = np.array([len(p[0]) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        mask = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
        counts = BuildCounts(records=len(parts), kept=len(parts), tokens=int(lens.sum()), label_tokens=int(mask.sum()))
        return SFTDataset(ids, mask, offsets, self.seq_len, self.pad_id, counts, name)

    @classmethod
    def from_conversations(cls, convs, template: Template, tokenizer, cfg: SFTDataConfig, bos_id=None,
                           eos_id=None, name: str = "train") -> SFTDataset:
        """Tokenize (conversation, where) pairs; overlong ones are truncated or dropped and counted."""
        cfg.check()
        L = int(cfg.seq_len)
        counts = BuildCounts()
        ids, masks, lens = [], [], []
        for conv, where in convs:
            counts.records += 1
            try:
                enc = encode_conversation(conv, template, tokenizer, bos_id, eos_id)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            c_ids, c_mask = enc.ids, enc.mask
            if len(c_ids) > L:
                if cfg.overlong == "drop":
                    counts.dropped[f"longer than seq_len={L}"] += 1
                    continue
                c_ids, c_mask = c_ids[:L], c_mask[:L]
                if not c_mask[1:].any():
                    counts.dropped[f"no reply within seq_len={L}"] += 1
                    continue
                counts.truncated += 1
            elif not c_mask[1:].any():
                counts.dropped["no token with loss"] += 1
                continue
            ids.append(c_ids)
            masks.append(c_mask)
            lens.append(len(c_ids))
        counts.kept = len(ids)
        counts.tokens = int(sum(lens))
        counts.label_tokens = int(sum(int(m[1:].sum()) for m in masks))
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lens, dtype=np.int64))]).astype(np.int64)
        pad = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", 0)
        return cls(np.concatenate(ids) if ids else np.zeros(0, np.int32),
                   np.concatenate(masks) if masks else np.zeros(0, bool), offsets, L, int(pad or 0), counts, name)


def iter_conversations(inputs) -> Iterator[tuple[list[dict], str]]:
    """(normalised conversation, where) for every record of the files `inputs`."""
    for src in record_sources(inputs):
        for rec, where in read_records(src):
            yield normalize_record(rec, where), where


@dataclass
class SFTData:
    train: SFTDataset
    val: SFTDataset | None
    template: Template
    report: str                     # one line per split, for the trainer to print
    config: SFTDataConfig = field(default_factory=SFTDataConfig)


def build_sft_data(files, tokenizer, cfg: SFTDataConfig | None = None, *, val_files=None, model_dir=None,
                   bos_id: int | None = None, eos_id: int | None = None) -> SFTData:
    """Read and tokenize the record files; hold out a validation split (`val_files`, or
    `cfg.val_fraction` of the conversations drawn with `cfg.seed`). Nothing is written."""
    cfg = cfg or SFTDataConfig()
    cfg.check()
    template = get_template(cfg.template, model_dir)
    train = SFTDataset.from_conversations(iter_conversations(files), template, tokenizer, cfg, bos_id, eos_id)
    val = None
    if val_files:
        val = SFTDataset.from_conversations(iter_conversations(val_files), template, tokenizer, cfg, bos_id,
                                            eos_id, name="val")
    elif cfg.val_fraction > 0 and len(train):  # nothing kept: the message below says why
        n = len(train)
        n_val = math.ceil(n * float(cfg.val_fraction))
        if n_val >= n:
            raise DataError(f"val_fraction={cfg.val_fraction} of {n} conversations leaves none to train on; "
                            "use a smaller fraction or more data")
        order = np.random.default_rng([cfg.seed, 0x5F7]).permutation(n)
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        counts = train.counts
        val, train = train.subset(val_idx, "val"), train.subset(train_idx, "train")
        counts.kept, counts.tokens, counts.label_tokens = len(train), train.counts.tokens, train.counts.label_tokens
        counts.held_out = len(val)
        train.counts = counts
    if len(train) == 0:
        raise DataError(f"no training conversation left ({train.counts.line('train')}); check seq_len and "
                        "the records")
    lines = [train.counts.line(f"sft data ({template.name} template)")]
    if val is not None:
        lines.append(val.counts.line("val"))
    return SFTData(train, val, template, "; ".join(lines), cfg)


# ---------------------------------------------------------------------- the loader
def pack_rows(lengths: np.ndarray, seq_len: int, open_rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Lay conversations of `lengths` (in this order) into rows of `seq_len` tokens, each into the
    first of the `open_rows` most recently started rows with room (a new row when none has).
    Returns (index int64 [n], starts int64 [rows + 1]): row k holds conversations
    index[starts[k]:starts[k+1]], rows in the order they were started. Looking back a few rows fills
    ~99% of 4K rows where taking the next row only fills ~85% (typical chat length spread)."""
    rows: list[list[int]] = []
    room: list[list[int]] = []          # [free tokens, row number] of the open rows, oldest first
    for i, n in enumerate(lengths.tolist()):
        for r in room:
            if r[0] >= n:
                r[0] -= n
                rows[r[1]].append(i)
                break
        else:
            rows.append([i])
            room.append([seq_len - n, len(rows) - 1])
            if len(room) > open_rows:
                room.pop(0)
    index = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    starts = np.concatenate([[0], np.cumsum([len(row) for row in rows], dtype=np.int64)]).astype(np.int64)
    return index, starts


class SFTLoader:
    """SFTBatches of `batch_size` rows per rank; endless and reshuffled per epoch for training, or one
    pass in file order (`endless=False`, for validation: rank r takes global batches r, r+W, ...
    so ranks may get one batch fewer than others). See the module docstring for the order."""

    def __init__(self, dataset: SFTDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pack: bool = True, endless: bool = True):
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size}: need at least 1")
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(dataset) == 0:
            raise DataError(f"the {dataset.name} split has no conversations; give more data")
        self.dataset, self.batch_size, self.pack, self.endless = dataset, int(batch_size), bool(pack), bool(endless)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.row = 0, 0            # the next global row to read
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(conversation order, row starts) of one epoch."""
        plan = self._plans.get(epoch)
        if plan is None:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            n = len(self.dataset)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.endless
                     else np.arange(n))
            starts = np.arange(n + 1, dtype=np.int64)
            if self.pack:
                index, starts = pack_rows(self.dataset.lengths[order], self.dataset.seq_len)
                order = order[index]
            plan = self._plans[epoch] = (order, starts)
        return plan

    def rows_in_epoch(self, epoch: int = 0) -> int:
        return len(self._plan(epoch)[1]) - 1

    def _take_rows(self, count: int) -> list[list[int]]:
        """The next `count` global rows (conversation indices), advancing the position."""
        rows = []
        while len(rows) < count:
            order, starts = self._plan(self.epoch)
            if self.row >= len(starts) - 1:
                if not self.endless:
                    break
                self.epoch, self.row = self.epoch + 1, 0
                continue
            rows.append(order[starts[self.row]:starts[self.row + 1]].tolist())
            self.row += 1
        return rows

    def __iter__(self):
        return self

    def __next__(self) -> SFTBatch:
        B = self.batch_size
        mine = self._take_rows(B * self.world_size)[self.rank * B:(self.rank + 1) * B]
        if not mine:
            raise StopIteration
        rows = [[self.dataset[i] for i in row] for row in mine]
        length = self.dataset.seq_len if self.pack else max(len(r[0][0]) for r in rows)
        return collate(rows, length, self.dataset.pad_id)

    def __len__(self) -> int:
        """Batches this rank reads in one epoch (the first epoch's packing for endless loaders)."""
        full, rest = divmod(self.rows_in_epoch(0), self.batch_size * self.world_size)
        return full + (1 if rest > self.rank * self.batch_size else 0)

    # -------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        ds = self.dataset
        return {"format": STATE_FORMAT, "version": 1, "epoch": self.epoch, "row": self.row, "seed": self.seed,
                "pack": self.pack, "seq_len": ds.seq_len, "conversations": len(ds), "tokens": int(ds.offsets[-1])}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last batch read before `state_dict()` (its seed wins)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not an SFT data loader state (missing format {STATE_FORMAT!r})")
        ds = self.dataset
        want = {"conversations": len(ds), "tokens": int(ds.offsets[-1]), "seq_len": ds.seq_len, "pack": self.pack}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise DataError(f"the saved data position is for {got['conversations']} conversations of "
                            f"{got['tokens']} tokens (seq_len {got['seq_len']}, pack {got['pack']}), but the data "
                            f"now has {want['conversations']} of {want['tokens']} (seq_len {want['seq_len']}, pack "
                            f"{want['pack']}): resume with the same data files, template and sequence settings")
        self.seed, self.epoch, self.row = int(state["seed"]), int(state["epoch"]), int(state["row"])
        self._plans.clear()


def sft_loaders(data: SFTData, batch_size: int, *, pack: bool | None = None, seed: int = 0, rank: int = 0,
                world_size: int = 1, val_batch_size: int | None = None) -> tuple[SFTLoader, SFTLoader | None]:
    """The endless training loader and the one-pass validation loader (None without a val split);
    `pack` defaults to the data's config."""
    pack = data.config.pack if pack is None else pack
    train = SFTLoader(data.train, batch_size, seed, rank, world_size, pack=pack)
    val = None
    if data.val is not None and len(data.val):
        val = SFTLoader(data.val, val_batch_size or batch_size, seed, rank, world_size, pack=pack, endless=False)
    return train, val
