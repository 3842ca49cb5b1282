"""PackedLoader / iter_eval_batches / unigram_entropy on datasets whose every token is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepseekmoe.data import PackedLoader, bits_per_byte, iter_eval_batches, load_meta, unigram_entropy
from deepseekmoe.data.dataset import FORMAT, VERSION
from deepseekmoe.errors import ConfigError, DataError

VOCAB = 5000


def make_dataset(root, splits: dict[str, np.ndarray], shard_tokens: int = 1 << 30, vocab: int = VOCAB):
    """Write a dataset directory in the prepared format from explicit token arrays."""
    root.mkdir(parents=True, exist_ok=True)
    meta_splits = {}
    for name, arr in splits.items():
        names = []
        for i, a in enumerate(range(0, len(arr), shard_tokens)):
            names.append(f"{name}_{i:03d}.bin")
            np.asarray(arr[a:a + shard_tokens], dtype=np.uint16).tofile(root / names[-1])
        meta_splits[name] = {"tokens": len(arr), "bytes": 3 * len(arr), "documents": 1, "shards": names}
    meta = {"format": FORMAT, "version": VERSION, "vocab_size": vocab, "dtype": "uint16", "bos_id": 0,
            "eos_id": 1, "max_token_id": int(max(a.max() for a in splits.values())), "splits": meta_splits,
            "tokenizer": "tokenizer.json", "sources": []}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Token i of train is i (all distinct), so a row tells exactly which window it is. Shards of 97
    # tokens make most windows span a shard boundary.
    root = tmp_path_factory.mktemp("ds")
    return make_dataset(root, {"train": np.arange(2, 1002), "val": np.arange(2000, 2301)}, shard_tokens=97)


L, B = 9, 4  # windows of 9 tokens overlap by 1: (1000 - 1) // 8 = 124 windows per epoch
N_WIN = (1000 - 1) // (L - 1)


def window_of(row: torch.Tensor) -> int:
    start = int(row[0]) - 2
    assert start % (L - 1) == 0
    assert torch.equal(row, torch.arange(start + 2, start + 2 + L)), "a row is one contiguous window"
    return start // (L - 1)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_windows_and_an_epoch_visits_each_once(data):
    ld = PackedLoader(data, "train", seq_len=L, batch_size=B, seed=0)
    assert ld.n_windows == N_WIN
    seen = []
    while ld.epoch == 0:
        x = next(ld)
        assert x.dtype == torch.int64 and x.shape == (B, L)
        seen += [window_of(r) for r in x]
    # 124 windows / 4 per batch = 31 batches exactly; epoch 1 starts a new permutation.
    assert sorted(seen) == list(range(N_WIN)) and seen != sorted(seen)
    assert ld.tokens_seen == N_WIN * L and ld.epoch == 1
    nxt = [window_of(r) for b in take(ld, N_WIN // B) for r in b]
    assert sorted(nxt) == list(range(N_WIN)) and nxt != seen


def test_same_seed_same_order_other_seed_other_order(data):
    a = torch.cat(take(PackedLoader(data, seq_len=L, batch_size=B, seed=7), 10))
    b = torch.cat(take(PackedLoader(data, seq_len=L, batch_size=B, seed=7), 10))
    c = torch.cat(take(PackedLoader(data, seq_len=L, batch_size=B, seed=8), 10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("k", [0, 5, 30, 31, 45])  # start, mid-epoch, before/at/after an epoch end
def test_exact_resume(data, k):
    ref = PackedLoader(data, seq_len=L, batch_size=B, seed=3)
    take(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))  # JSON-serialisable
    expected = take(ref, 12)
    resumed = PackedLoader(data, seq_len=L, batch_size=B, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert resumed.tokens_seen == k * B * L and resumed.epoch == (k * B) // N_WIN
    for want, got in zip(expected, take(resumed, 12)):
        assert torch.equal(want, got)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_union_equals_single_process(data, world):
    single = PackedLoader(data, seq_len=L, batch_size=B * world, seed=1)
    ranks = [PackedLoader(data, seq_len=L, batch_size=B, seed=1, rank=r, world_size=world) for r in range(world)]
    windows = []
    for _ in range(N_WIN // (B * world) + 3):  # past the end of epoch 0
        parts = [next(ld) for ld in ranks]
        assert torch.equal(torch.cat(parts), next(single))
        windows.append([[window_of(row) for row in p] for p in parts])
    assert all(ld.tokens_seen == single.tokens_seen for ld in ranks)
    # Within epoch 0, no window is read twice, by any rank at any step.
    flat = [w for step in windows for part in step for w in part][:N_WIN]
    assert len(set(flat)) == N_WIN


def test_resume_at_another_world_size_continues_the_stream(data):
    ref = PackedLoader(data, seq_len=L, batch_size=8, seed=5)  # global batch 8 throughout
    expected = take(ref, 20)
    two = [PackedLoader(data, seq_len=L, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    got = [torch.cat([next(ld) for ld in two]) for _ in range(7)]
    state = two[0].state_dict()
    four = [PackedLoader(data, seq_len=L, batch_size=2, seed=5, rank=r, world_size=4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    got += [torch.cat([next(ld) for ld in four]) for _ in range(6)]
    one = PackedLoader(data, seq_len=L, batch_size=8, seed=5)
    one.load_state_dict(four[3].state_dict())
    got += take(one, 7)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and len(got) == 20


def test_eval_batches_cover_the_split_in_order(data):
    n = (301 - 1) // (L - 1)  # 37 windows of the 301-token val split
    batches = list(iter_eval_batches(data, "val", seq_len=L, batch_size=B))
    assert [len(b) for b in batches] == [B] * (n // B) + [n % B]
    rows = torch.cat(batches)
    assert torch.equal(rows[:, 0], 2000 + torch.arange(n) * (L - 1))
    # Every token but the first and the short tail is a prediction target exactly once.
    targets = torch.cat([r[1:] for r in rows])
    assert torch.equal(targets, torch.arange(2001, 2001 + n * (L - 1)))
    assert all(torch.equal(a, b) for a, b in zip(batches, iter_eval_batches(data, "val", seq_len=L, batch_size=B)))
    # max_batches: windows spread evenly over the whole split, still deterministic.
    few = torch.cat(list(iter_eval_batches(data, "val", seq_len=L, batch_size=B, max_batches=2)))
    assert torch.equal((few[:, 0] - 2000) // (L - 1), torch.tensor([0, 4, 9, 13, 18, 23, 27, 32]))
    # Ranks take alternate batches; together they are the full pass.
    r0 = list(iter_eval_batches(data, "val", seq_len=L, batch_size=B, rank=0, world_size=2))
    r1 = list(iter_eval_batches(data, "val", seq_len=L, batch_size=B, rank=1, world_size=2))
    assert torch.equal(torch.cat([b for pair in zip(r0, r1 + [None]) for b in pair if b is not None]), rows)


def test_unigram_entropy_and_bits_per_byte(tmp_path):
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    tokens = rng.choice(np.arange(10, 14), size=4000, p=probs)
    root = make_dataset(tmp_path / "ds", {"train": tokens, "val": np.array([7, 7, 9, 9])}, shard_tokens=333)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / len(tokens)
    assert unigram_entropy(root, "train") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert unigram_entropy(root, "train") == pytest.approx(-(probs * np.log(probs)).sum(), abs=0.01)
    assert unigram_entropy(root, "val") == pytest.approx(math.log(2))
    meta = load_meta(root)  # val: 4 tokens from 12 bytes
    assert bits_per_byte(math.log(2), meta, "val") == pytest.approx(4 / 12)
    assert bits_per_byte(1.0, root, "val") == pytest.approx(4 / 12 / math.log(2))


def test_shape_and_size_errors(data):
    with pytest.raises(DataError, match=r"split 'val' has 301 tokens, fewer than seq_len=400"):
        PackedLoader(data, "val", seq_len=400, batch_size=1)
    with pytest.raises(DataError, match="nothing to evaluate"):
        list(iter_eval_batches(data, "val", seq_len=400, batch_size=1))
    with pytest.raises(DataError, match=r"no split 'test' \(has: train, val\)"):
        PackedLoader(data, "test", seq_len=L, batch_size=1)
    with pytest.raises(ConfigError, match="seq_len=1"):
        PackedLoader(data, seq_len=1, batch_size=1)
    with pytest.raises(ConfigError, match=r"rank=2 must be in \[0, world_size=2\)"):
        PackedLoader(data, seq_len=L, batch_size=1, rank=2, world_size=2)
    with pytest.raises(DataError, match="not a data loader state"):
        PackedLoader(data, seq_len=L, batch_size=1).load_state_dict({"cursor": 3})
