"""SFT data: record files of every supported form, packed batches (mask, positions, labels), packed
and padded batches give the same loss and gradients on a tiny fp32 model, overlong conversations
truncated or dropped and counted, the loader's exact resume, rank sharding and per-epoch shuffle,
the held-out split, and one clear message for each kind of bad file."""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseekmoe.data.sft import (
    SFTDataConfig,
    SFTDataset,
    SFTLoader,
    build_sft_data,
    collate,
    pack_rows,
    sft_loaders,
)
from deepseekmoe.data.tokenizer import Tokenizer
from deepseekmoe.errors import DataError
from tests.helpers import tiny_model


def _conv(turns: int, i: int = 0):
    msgs = [{"role": "system", "content": f"Be brief ({i})."}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {i}.{t}: what is {t} plus {i}?"},
                 {"role": "assistant", "content": f"It is {t + i}."}]
    return {"messages": msgs}


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([json.dumps(_conv(3, i)) for i in range(20)], trainer)
    return Tokenizer(tk)


def _write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _synthetic(lengths, seq_len=32, seed=0) -> SFTDataset:
    """Conversations of random ids in [2, 64) (the tiny model's vocabulary), loss after a prompt."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for n in lengths:
        c = rng.integers(2, 64, n).astype(np.int32)
        c[0] = 0
        m = np.zeros(n, bool)
        m[n // 2:] = True
        ids.append(c)
        masks.append(m)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return SFTDataset(np.concatenate(ids), np.concatenate(masks), offsets, seq_len, pad_id=1)


# ---------------------------------------------------------------------- batches
def test_packed_row_mask_positions_labels():
    a = (np.array([0, 5, 6], np.int32), np.array([0, 1, 1], bool))
    b = (np.array([0, 7], np.int32), np.array([0, 1], bool))
    batch = collate([[a, b], [b]], 6, pad_id=1)
    assert batch.input_ids.tolist() == [[0, 5, 6, 0, 7, 1], [0, 7, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[-100, 5, 6, -100, 7, -100], [-100, 7, -100, -100, -100, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert batch.attention_mask.shape == (2, 1, 6, 6) and batch.attention_mask.dtype == torch.bool
    assert torch.equal(batch.attention_mask[0, 0], want)
    assert torch.equal(batch.attention_mask[1, 0, 2:, :], torch.eye(6, dtype=torch.bool)[2:])
    assert batch.num_label_tokens == 4 and batch.num_tokens == 7
    assert set(batch.model_kwargs()) == {"input_ids", "labels", "position_ids", "attention_mask"}


def test_pack_rows_first_fit_over_open_rows():
    index, starts = pack_rows(np.array([3, 4, 2, 5, 1]), 7)
    assert index.tolist() == [0, 1, 2, 3, 4] and starts.tolist() == [0, 2, 4, 5]
    index, starts = pack_rows(np.array([5, 4, 2, 3]), 7)  # 2 goes back into the first row
    assert index.tolist() == [0, 2, 1, 3] and starts.tolist() == [0, 2, 4]
    index, starts = pack_rows(np.array([5, 4, 2, 3]), 7, open_rows=1)  # only the newest row is open
    assert index.tolist() == [0, 1, 2, 3] and starts.tolist() == [0, 1, 3, 4]
    lengths = np.random.default_rng(0).integers(1, 8, 200)
    index, starts = pack_rows(lengths, 8)
    assert sorted(index.tolist()) == list(range(200))
    assert all(lengths[index[a:b]].sum() <= 8 for a, b in zip(starts[:-1], starts[1:]))


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch.model_kwargs())
    out.lm_loss.backward()
    return out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    model = tiny_model().float()
    ds = _synthetic([9, 14, 5, 11, 7, 3], seq_len=32)
    packed = next(SFTLoader(ds, batch_size=6, pack=True, endless=False))
    padded = next(SFTLoader(ds, batch_size=6, pack=False, endless=False))
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0] == 6  # several conversations per row
    assert packed.num_label_tokens == padded.num_label_tokens == sum(n - n // 2 for n in [9, 14, 5, 11, 7, 3])
    loss_p, grads_p = _loss_and_grads(model, packed)
    loss_u, grads_u = _loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 10
    for n in grads_p:
        torch.testing.assert_close(grads_p[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)
    # The mask matters: the same packed rows with plain causal attention give another loss.
    with torch.no_grad():
        leaky = model(packed.input_ids, labels=packed.labels).lm_loss
    assert abs(float(leaky) - float(loss_p)) > 1e-4


# ---------------------------------------------------------------------- loader order and resume
def _rows_of(batch):
    return [tuple(r) for r in batch.input_ids.tolist()]


def test_loader_resume_is_exact():
    ds = _synthetic([5, 9, 12, 3, 7, 8, 15, 4, 6, 10, 11, 2 + 3], seq_len=20)
    a = SFTLoader(ds, batch_size=2, seed=3)
    for _ in range(5):  # into the second epoch
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(6)]
    b = SFTLoader(ds, batch_size=2, seed=99)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    got = [next(b) for _ in range(6)]
    for w, g in zip(want, got):
        for k in ("input_ids", "labels", "position_ids", "attention_mask"):
            assert torch.equal(getattr(w, k), getattr(g, k))
    assert a.epoch >= 1


def test_loader_shards_ranks_and_reshuffles_epochs():
    ds = _synthetic([4] * 24, seq_len=4)  # one conversation per row
    one = SFTLoader(ds, batch_size=4, seed=1)
    ranks = [SFTLoader(ds, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):
        whole = _rows_of(next(one))
        assert _rows_of(next(ranks[0])) + _rows_of(next(ranks[1])) == whole
    epochs = SFTLoader(ds, batch_size=24, seed=1)
    e0, e1 = _rows_of(next(epochs)), _rows_of(next(epochs))
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert len(set(e0)) == 24


def test_val_loader_is_one_pass_in_order():
    ds = _synthetic([4] * 7, seq_len=4)
    rank_batches = [list(SFTLoader(ds, batch_size=2, rank=r, world_size=2, endless=False)) for r in range(2)]
    assert [len(b) for b in rank_batches] == [2, 2]
    assert len(SFTLoader(ds, batch_size=2, rank=1, world_size=2, endless=False)) == 2
    rows = [r for bs in zip(*rank_batches) for b in bs for r in _rows_of(b)]
    assert rows == [tuple(ds[i][0].tolist()) for i in range(7)]


def test_loader_refuses_a_state_for_other_data():
    a = SFTLoader(_synthetic([5, 6, 7]), batch_size=1)
    b = SFTLoader(_synthetic([5, 6, 7, 8]), batch_size=1)
    with pytest.raises(DataError, match="same data files, template and sequence settings"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="not an SFT data loader state"):
        b.load_state_dict({"cursor": 3})


# ---------------------------------------------------------------------- files and the builder
def _records(n=12):
    return [_conv(1 + i % 3, i) for i in range(n)] + [{"instruction": "Say hi.", "output": "hi"}]


@pytest.mark.parametrize("form", ["jsonl", "jsonl.gz", "jsonl.xz", "parquet", "saved_dataset"])
def test_every_file_form_reads_the_same(tmp_path, tok, form):
    recs = _records()
    want = build_sft_data([_write_jsonl(tmp_path / "ref.jsonl", recs)], tok, SFTDataConfig(seq_len=128))
    if form.startswith("jsonl"):
        opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.xz": lzma.open}[form]
        path = _write_jsonl(tmp_path / f"d.{form}", recs, opener)
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([{"messages": r.get("messages"), "instruction": r.get("instruction"),
                                              "output": r.get("output")} for r in recs]), path)
    else:
        import datasets

        path = tmp_path / "saved"
        rows = [{"messages": r.get("messages", [])} for r in recs[:-1]]
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        want = build_sft_data([_write_jsonl(tmp_path / "ref2.jsonl", recs[:-1])], tok, SFTDataConfig(seq_len=128))
    got = build_sft_data([path], tok, SFTDataConfig(seq_len=128))
    assert np.array_equal(got.train.ids, want.train.ids) and np.array_equal(got.train.mask, want.train.mask)
    assert np.array_equal(got.train.offsets, want.train.offsets)


def test_overlong_conversations_truncated_or_dropped_and_counted(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [_conv(1, 0), _conv(8, 1), _conv(1, 2)])
    lens = build_sft_data([path], tok, SFTDataConfig(seq_len=4096)).train.lengths.tolist()
    L = max(lens[0], lens[2]) + 5
    assert lens[1] > L
    cut = build_sft_data([path], tok, SFTDataConfig(seq_len=L))
    assert cut.train.lengths.tolist() == [lens[0], L, lens[2]] and cut.train.counts.truncated == 1
    assert "3 records -> 3 conversations kept (1 truncated), dropped: none" in cut.report
    drop = build_sft_data([path], tok, SFTDataConfig(seq_len=L, overlong="drop"))
    assert drop.train.lengths.tolist() == [lens[0], lens[2]]
    assert f"3 records -> 2 conversations kept (0 truncated), dropped: 1 longer than seq_len={L}" in drop.report
    long_prompt = {"messages": [{"role": "user", "content": "tell me " * 80}, {"role": "assistant", "content": "no"}]}
    path2 = _write_jsonl(tmp_path / "e.jsonl", [_conv(1, 0), long_prompt])
    cut2 = build_sft_data([path2], tok, SFTDataConfig(seq_len=L))  # cut before its reply: left out
    assert f"2 records -> 1 conversations kept (0 truncated), dropped: 1 no reply within seq_len={L}" in cut2.report
    with pytest.raises(DataError, match="no training conversation left .* dropped: 3 no reply within seq_len=12"):
        build_sft_data([path], tok, SFTDataConfig(seq_len=12))


def test_val_split_by_fraction_and_by_file(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(20))
    full = build_sft_data([path], tok, SFTDataConfig(seq_len=128))
    data = build_sft_data([path], tok, SFTDataConfig(seq_len=128, val_fraction=0.25, seed=4))
    assert len(data.val) == 6 and len(data.train) == 15
    seen = sorted(tuple(data.val[i][0]) for i in range(6)) + sorted(tuple(data.train[i][0]) for i in range(15))
    assert sorted(seen) == sorted(tuple(full.train[i][0]) for i in range(21))
    again = build_sft_data([path], tok, SFTDataConfig(seq_len=128, val_fraction=0.25, seed=4))
    assert np.array_equal(again.val.ids, data.val.ids)
    assert "val: 6 records" in data.report
    assert "21 records -> 21 conversations kept (0 truncated, 6 of them held out for val)" in data.report
    train_loader, val_loader = sft_loaders(data, 4, seed=1)
    assert sum(b.num_label_tokens for b in val_loader) == data.val.counts.label_tokens > 0
    assert next(train_loader).input_ids.shape == (4, 128)
    padded = build_sft_data([path], tok, SFTDataConfig(seq_len=128, val_fraction=0.25, seed=4, pack=False))
    row = next(sft_loaders(padded, 4)[0])
    lengths = row.position_ids.max(1).values + 1  # one conversation per row, right-padded
    assert row.input_ids.shape[1] == int(lengths.max()) < 128 and row.num_tokens == int(lengths.sum())
    assert len(set(lengths.tolist())) > 1
    val_file = _write_jsonl(tmp_path / "v.jsonl", _records(3))
    by_file = build_sft_data([path], tok, SFTDataConfig(seq_len=128, val_fraction=0.5), val_files=[val_file])
    assert len(by_file.train) == 21 and len(by_file.val) == 4


# ---------------------------------------------------------------------- bad files
def test_bad_files_one_clear_message(tmp_path, tok):
    cfg = SFTDataConfig(seq_len=128)
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text(json.dumps(_conv(1)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"a.jsonl:line 2: not valid JSON"):
        build_sft_data([bad_json], tok, cfg)
    no_reply = _write_jsonl(tmp_path / "b.jsonl", [_conv(1), {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"b.jsonl:line 2: no assistant turn"):
        build_sft_data([no_reply], tok, cfg)
    role = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:line 1: message 0 has role 'bot'"):
        build_sft_data([role], tok, cfg)
    trunc = tmp_path / "d.jsonl.gz"
    data = gzip.compress(("\n".join(json.dumps(_conv(2, i)) for i in range(50)) + "\n").encode())
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"d.jsonl.gz: corrupted or truncated gz file"):
        build_sft_data([trunc], tok, cfg)
    latin = tmp_path / "e.jsonl"
    latin.write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"e.jsonl: not valid UTF-8 .* \(line 1\)"):
        build_sft_data([latin], tok, cfg)
    bad_parquet = tmp_path / "f.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"f.parquet: not a readable parquet file"):
        build_sft_data([bad_parquet], tok, cfg)
    text = tmp_path / "g.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"g.txt: text files hold no chat records"):
        build_sft_data([text], tok, cfg)
    with pytest.raises(DataError, match="no such file"):
        build_sft_data([tmp_path / "missing.jsonl"], tok, cfg)


def test_saved_dataset_dict_asks_for_a_split(tmp_path, tok):
    import datasets

    d = datasets.DatasetDict({"train": datasets.Dataset.from_list([_conv(1)]),
                              "test": datasets.Dataset.from_list([_conv(1)])})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a saved DatasetDict with splits test, train; name one split directory"):
        build_sft_data([tmp_path / "dd"], tok, SFTDataConfig(seq_len=128))
    assert len(build_sft_data([tmp_path / "dd" / "train"], tok, SFTDataConfig(seq_len=128)).train) == 1


# ---------------------------------------------------------------------- the example file and the records script
ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "data" / "eval"


def test_example_file_builds(tok):
    data = build_sft_data([ROOT / "examples" / "sft" / "tiny_chat.jsonl"], tok, SFTDataConfig(seq_len=256))
    assert len(data.train) == 35 and "35 records -> 35 conversations kept (0 truncated), dropped: none" in data.report
    with pytest.raises(DataError, match=r"tiny_chat.jsonl:line \d+: the instruction template takes one user message"):
        build_sft_data([ROOT / "examples" / "sft" / "tiny_chat.jsonl"], tok,
                       SFTDataConfig(seq_len=256, template="instruction"))


def _script():
    spec = importlib.util.spec_from_file_location("make_sft_records", ROOT / "scripts" / "make_sft_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_records_script_on_small_files(tmp_path, tok, capsys):
    ev = tmp_path / "eval"
    (ev / "mbpp").mkdir(parents=True)
    rows = [{"task_id": t, "text": f"Write f{t}.", "code": f"def f{t}():\r\n\treturn {t}",
             "test_list": [f"assert f{t}() == {t}"]} for t in (600, 601, 974)]
    _write_jsonl(ev / "mbpp" / "mbpp.jsonl", rows)
    out = tmp_path / "out" / "r.jsonl"
    main = _script().main
    assert main(["--eval-dir", str(ev), "--out", str(out), "--tasks", "mbpp,arc_easy"]) == 2
    assert "ARC-Easy-train.jsonl: no such file" in capsys.readouterr().err and not out.exists()
    (ev / "arc_easy").mkdir()
    _write_jsonl(ev / "arc_easy" / "ARC-Easy-train.jsonl", [
        {"id": "q1", "question": "Which is a liquid?", "choices": {"text": ["ice", "water"], "label": ["A", "B"]},
         "answerKey": "B"}])
    assert main(["--eval-dir", str(ev), "--out", str(out), "--tasks", "mbpp,arc_easy", "--system", "Be exact."]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in recs] == ["mbpp/601", "mbpp/974", "arc_easy/q1"]
    assert recs[0]["messages"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Write f601.\nYour code should pass these tests:\nassert f601() == 601"},
        {"role": "assistant", "content": "def f601():\n\treturn 601"}]
    assert recs[2]["messages"][1]["content"] == ("Which is a liquid?\nA. ice\nB. water\n"
                                                 "Answer with the letter of the correct choice.")
    assert recs[2]["messages"][2]["content"] == "B. water"
    assert len(build_sft_data([out], tok, SFTDataConfig(seq_len=256)).train) == 3


@pytest.mark.skipif(not (EVAL / "mbpp" / "mbpp.jsonl").is_file(), reason=f"MBPP / ARC not found under {EVAL}")
def test_records_script_on_the_benchmark_files(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert _script().main(["--eval-dir", str(EVAL), "--out", str(out)]) == 0
    assert "wrote 3744 records" in capsys.readouterr().out
    ids = {json.loads(line)["source"] for line in out.read_text().splitlines()}
    assert len(ids) == 3744 and "mbpp/600" not in ids and {"mbpp/601", "mbpp/974"} <= ids
