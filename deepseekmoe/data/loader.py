"""Reading a prepared split as packed training batches, resumable to the exact token.

A split is one flat token stream (documents separated by eos). It is cut into windows of
`seq_len` tokens that overlap by one token (window w covers [w*(L-1), w*(L-1)+L)), so with the
model's internal shift every token after the first is a prediction target exactly once per
epoch. Windows cross document boundaries; the eos between documents tells the model where one
ends.

Order: epoch e visits all windows in a permutation drawn from numpy's PCG64 seeded with
(seed, e). The infinite sequence of windows is epoch 0's permutation, then epoch 1's, ... and a
single integer, the cursor into it, is the whole loader state. A step reads the next
`batch_size * world_size` windows (the global batch); rank r takes rows [r*B, (r+1)*B). So ranks
are disjoint, their union is what one process with batch size B*W reads, and a run resumed at
another world size with the same global batch continues the same token stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepseekmoe.data.dataset import TokenStream, check_vocab, load_meta
from deepseekmoe.errors import ConfigError, DataError

STATE_FORMAT = "deepseekmoe-loader"


def _n_windows(n_tokens: int, seq_len: int) -> int:
    return 0 if n_tokens < seq_len else (n_tokens - 1) // (seq_len - 1)


def _check_shape(seq_len: int, batch_size: int) -> None:
    if int(seq_len) < 2:
        raise ConfigError(f"seq_len={seq_len}: need at least 2 tokens per sequence")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size}: need at least 1")


class PackedLoader:
    """Infinite iterator of int64 tensors [batch_size, seq_len]; see the module docstring."""

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 512, batch_size: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        _check_shape(seq_len, batch_size)
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        if vocab_size is not None:
            check_vocab(self.meta, int(vocab_size))
        self.stream = TokenStream.open(self.data_dir, split, self.meta)
        self.split, self.seq_len, self.batch_size = split, int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.n_windows = _n_windows(len(self.stream), self.seq_len)
        if self.n_windows == 0:
            raise DataError(f"{self.data_dir}: split {split!r} has {len(self.stream)} tokens, fewer than "
                            f"seq_len={self.seq_len}; use more data or a shorter sequence")
        self.vocab = int(self.meta["vocab_size"])
        self.cursor = 0                      # global index of the next window to read
        self._perms: dict[int, np.ndarray] = {}

    # -------------------------------------------------------------------------------- order
    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:        # a batch spans at most two epochs... unless tiny
                self._perms.pop(min(self._perms))
            dtype = np.uint32 if self.n_windows < 2**32 else np.int64
            perm = np.arange(self.n_windows, dtype=dtype)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._perms[epoch] = perm
        return perm

    def window_index(self, position: int) -> int:
        """Which window the stream position `position` (0, 1, 2, ...) reads."""
        epoch, i = divmod(position, self.n_windows)
        return int(self._perm(epoch)[i])

    def _window(self, w: int) -> np.ndarray:
        return self.stream.read(w * (self.seq_len - 1), self.seq_len)

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        first = self.cursor + self.rank * self.batch_size
        rows = np.stack([self._window(self.window_index(first + j)) for j in range(self.batch_size)])
        self.cursor += self.batch_size * self.world_size
        top = int(rows.max())
        if top >= self.vocab:
            raise DataError(f"{self.data_dir}: token id {top} >= vocab_size {self.vocab} in split "
                            f"{self.split!r} (corrupted shard); prepare the dataset again")
        return torch.from_numpy(rows.astype(np.int64))

    @property
    def tokens_seen(self) -> int:
        """Tokens in all batches read so far, summed over all ranks."""
        return self.cursor * self.seq_len

    @property
    def epoch(self) -> int:
        """The epoch the next window belongs to."""
        return self.cursor // self.n_windows

    # -------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": 1, "split": self.split, "seq_len": self.seq_len,
                "seed": self.seed, "cursor": self.cursor, "n_windows": self.n_windows,
                "split_tokens": len(self.stream)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last batch read before `state_dict()` (its seed wins)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError("not a data loader state (missing format 'deepseekmoe-loader')")
        if state.get("split_tokens") != len(self.stream) or state.get("seq_len") != self.seq_len:
            raise DataError(
                f"the saved data position is for a split of {state.get('split_tokens')} tokens read at "
                f"seq_len {state.get('seq_len')}, but {self.data_dir} split {self.split!r} has "
                f"{len(self.stream)} tokens at seq_len {self.seq_len}: resume with the same dataset and "
                "sequence length")
        self.seed = int(state["seed"])
        self.cursor = int(state["cursor"])
        self._perms.clear()


def iter_eval_batches(data_dir: str | Path, split: str = "val", seq_len: int = 512, batch_size: int = 8,
                      max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """A deterministic, finite pass over a split: int64 tensors [b, seq_len], b <= batch_size.

    Windows overlap by one token as in training, in stream order, so the whole pass predicts
    every token of the split except the first and the tail shorter than a window. With
    `max_batches`, that many batches of windows spread evenly over the split are read instead.
    Ranks take batches r, r + W, r + 2W, ... of the same sequence.
    """
    _check_shape(seq_len, batch_size)
    seq_len, batch_size = int(seq_len), int(batch_size)
    stream = TokenStream.open(data_dir, split)
    n = _n_windows(len(stream), seq_len)
    if n == 0:
        raise DataError(f"{data_dir}: split {split!r} has {len(stream)} tokens, fewer than seq_len={seq_len}; "
                        "nothing to evaluate")
    windows = np.arange(n)
    if max_batches is not None and int(max_batches) * batch_size < n:
        windows = (np.arange(int(max_batches) * batch_size) * n) // (int(max_batches) * batch_size)
    for b, lo in enumerate(range(0, len(windows), batch_size)):
        if b % world_size != rank:
            continue
        rows = np.stack([stream.read(int(w) * (seq_len - 1), seq_len) for w in windows[lo:lo + batch_size]])
        yield torch.from_numpy(rows.astype(np.int64))
