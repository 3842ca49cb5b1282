"""Writes that fail or land in the wrong place (issue 15): every failure to write is one user error
naming the path, the reason, the free space and the fix; nothing half-written is left (metrics.jsonl
included); outputs get the umask's permissions, not the temporaries' private ones; a killed
first-use sample build leaves nothing that outlives the next build; `info` takes what every
model command takes and refuses a non-positive --seq-len."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from deepseekmoe.checkpoint import files
from deepseekmoe.checkpoint.native import save_native
from deepseekmoe.cli import main
from deepseekmoe.model import presets
from deepseekmoe.train import metrics
from deepseekmoe.train.metrics import MetricsLogger, plot_losses, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = presets.get("tiny").replace(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


# ---------------------------------------------------------------------- permissions
def test_outputs_honour_the_umask(umask, tmp_path):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    files.atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    assert _mode(tmp_path / "config.toml") == file_mode
    with files.atomic_directory(tmp_path / "converted") as tmp:
        (tmp / "weights.bin").write_bytes(b"\0")
        files.atomic_write_text(tmp / "state.json", "{}")  # a temporary file inside a temporary folder
    assert _mode(tmp_path / "converted") == dir_mode
    assert _mode(tmp_path / "converted" / "weights.bin") == file_mode
    assert _mode(tmp_path / "converted" / "state.json") == file_mode
    torch.manual_seed(0)
    from deepseekmoe import Transformer

    save_native(tmp_path / "model", CFG, Transformer(CFG).state_dict())
    assert _mode(tmp_path / "model") == dir_mode
    assert {p.name: _mode(p) for p in (tmp_path / "model").iterdir()} == {
        "config.json": file_mode, "model.safetensors": file_mode}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "lm_loss": 5.0}) + "\n")
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert _mode(tmp_path / "loss.png") == file_mode
    from deepseekmoe.data import prepare

    (tmp_path / "corpus.txt").write_text(" ".join(f"word{i % 50} text" for i in range(2000)))
    data = prepare([tmp_path / "corpus.txt"], tmp_path / "data", vocab_size=300, val_fraction=0, workers=1,
                   progress=False)
    assert _mode(data) == dir_mode and {_mode(p) for p in data.iterdir()} == {file_mode}


# ---------------------------------------------------------------------- wrong and unwritable paths
def test_path_under_a_file_or_onto_a_directory_is_one_write_error(tmp_path):
    (tmp_path / "file").write_text("user data")
    (tmp_path / "dir").mkdir()
    with pytest.raises(files.WriteError, match=r"cannot write .*file/sub \(.*file is a file, not a folder"):
        files.atomic_write_text(tmp_path / "file" / "sub", "x")
    with pytest.raises(files.WriteError, match=r"dir is a directory.*choose another output path"):
        files.atomic_write_bytes(tmp_path / "dir", b"x")
    with pytest.raises(files.WriteError, match="is a file, not a folder"):
        with files.atomic_directory(tmp_path / "file" / "out"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # no temporary left
    assert (tmp_path / "file").read_text() == "user data"
    with pytest.raises(files.WriteError, match="is a file, not a folder"):
        files.check_output(tmp_path / "file", directory=True)
    with pytest.raises(files.WriteError, match="is a directory"):
        files.check_output(tmp_path / "dir", directory=False)


def test_permission_denied_at_rename_and_mkdtemp(tmp_path, monkeypatch):
    """Tests run as root, which chmod does not stop: the refusal the OS would give is injected."""
    (tmp_path / "out.txt").write_text("old")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(a[0] if a else k["dir"]))

    monkeypatch.setattr(files.os, "replace", denied)
    with pytest.raises(files.WriteError) as err:
        files.atomic_write_text(tmp_path / "out.txt", "new")
    msg = str(err.value)
    assert f"cannot write {tmp_path / 'out.txt'} (Permission denied; " in msg
    assert "GB free on its filesystem" in msg and "choose a writable location" in msg
    monkeypatch.undo()
    assert (tmp_path / "out.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.txt"]
    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    with pytest.raises(files.WriteError, match="Permission denied"):
        with files.atomic_directory(tmp_path / "d"):
            pass


def test_full_disk_inside_an_atomic_directory_is_a_write_error_and_inputs_keep_theirs(tmp_path):
    with pytest.raises(files.WriteError, match=r"cannot write .*out \(the disk is full: [\d.]+ GB free"):
        with files.atomic_directory(tmp_path / "out"):
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                               '"No space left on device" })')  # safetensors' words for a full disk
    with pytest.raises(FileNotFoundError):  # an input missing on the way is not a write failure
        with files.atomic_directory(tmp_path / "out"):
            open(tmp_path / "missing-input.txt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- metrics.jsonl on a full disk
class _FillingFile:
    """The unbuffered metrics file, whose disk fills after `ok` whole writes and `room` more bytes:
    the write that crosses it lands partly, the next one raises ENOSPC (what a real full disk does)."""

    def __init__(self, raw, ok: int, room: int):
        self.raw, self.ok, self.room = raw, ok, room

    def write(self, b) -> int:
        if self.ok > 0:
            self.ok -= 1
            return self.raw.write(b)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.raw.write(bytes(b[:self.room]))
        self.room -= n
        return n

    def __getattr__(self, name):
        return getattr(self.raw, name)


def test_metrics_record_is_whole_or_absent_on_a_full_disk(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path, 10, 0, progress=False, tensorboard=False)
    log.write({"kind": "train", "step": 1, "loss": 5.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    log.file = _FillingFile(log.file, ok=0, room=10)
    with pytest.raises(files.WriteError) as err:
        log.write({"kind": "train", "step": 2, "loss": 4.0})
    msg = str(err.value)
    assert f"cannot write {tmp_path / 'metrics.jsonl'} (the disk is full: " in msg and "GB free" in msg
    assert f"--resume {tmp_path}" in msg
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # the 10 bytes that landed are cut back
    log.close()  # nothing buffered to fail again
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_train_on_a_full_disk_at_metrics_write_exits_2_with_the_resume_command(tmp_path, monkeypatch, capsys):
    from tests.test_train_errors import TINIER

    real_open = open
    writes = {"n": 0}

    def metrics_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            writes["n"] += 1
            return _FillingFile(f, ok=1, room=10)  # the first record fits, the second is cut by the full disk
        return f

    monkeypatch.setattr(metrics, "open", metrics_open, raising=False)
    out = tmp_path / "run"
    rc = main(["train", *TINIER, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and writes["n"] == 1, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "metrics.jsonl (the disk is full" in lines[0] and f"--resume {out}" in lines[0]
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


# ---------------------------------------------------------------------- the first-use sample build
def test_a_killed_sample_build_leaves_nothing_after_the_next_build(tmp_path, monkeypatch):
    from deepseekmoe.data import sample

    src = tmp_path / "src"
    src.mkdir()
    text = " ".join(f"word{i % 97} and more text {i}" for i in range(3000))
    for name in ("train", "val"):
        (src / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.setattr(sample, "sample_files", lambda: (src / "train.jsonl", src / "val.jsonl"))
    monkeypatch.setattr(sample, "SAMPLE_VOCAB", 300)
    data = tmp_path / "cache" / "data"
    name = f"gutenberg-sample-{sample.sample_key()}"
    killed = data / f".{name}.k1ll3d.tmp"  # what a kill during prepare's atomic_directory leaves
    (killed / "train_000.bin").parent.mkdir(parents=True)
    (killed / "train_000.bin").write_bytes(b"\0" * 64)
    other = data / "user-notes.txt"  # not a temporary of the build: kept
    other.write_text("mine")
    out = sample.default_dataset(tmp_path / "cache", progress=False)
    assert out == data / name
    assert sorted(p.name for p in data.iterdir()) == [".lock", name, "user-notes.txt"]


# ---------------------------------------------------------------------- info
def test_info_takes_model_run_and_native_directories_and_refuses_bad_seq_len(tmp_path, capsys):
    from deepseekmoe import Transformer

    run = tmp_path / "run"
    save_native(run / "checkpoints" / "step_0000004" / "model", CFG, Transformer(CFG).state_dict())
    for spec in (run, run / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004" / "model"):
        assert main(["info", str(spec), "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["params"] == CFG.num_params()
    for bad in ("-5", "0"):
        assert main(["info", "tiny", "--seq-len", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--seq-len {bad}: must be a positive number" in err, err
    assert main(["info", "tiny", "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 64


def test_train_out_under_a_file_is_one_line_before_the_build(tmp_path, capsys):
    from tests.test_train_errors import TINIER

    (tmp_path / "file").write_text("user data")
    rc = main(["train", *TINIER, "--out", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"cannot write {tmp_path / 'file' / 'run'} (" in lines[0], err
    assert "file is a file, not a folder" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "user data"
