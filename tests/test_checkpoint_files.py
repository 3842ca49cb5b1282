"""Crash-safe outputs (deepseekmoe.checkpoint.files): one temporary-name convention, one pruning
routine. A kill while an old checkpoint is being deleted never leaves a half-deleted `step_N`
under its real name, and whatever a killed process left (`.tmp`, `.old`, a distributed save's
partial folder) is removed at the next start, in one process too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepseekmoe.checkpoint import dcp as dcp_ckpt
from deepseekmoe.checkpoint import files
from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.checkpoint.native import load_native
from deepseekmoe.cli import main
from deepseekmoe.data import default_dataset
from deepseekmoe.errors import CheckpointError
from deepseekmoe.model import presets
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.transformer import Transformer

TINIER = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
          "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
          "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", "--train.steps=4",
          "--log.every=1", "--eval.every=0", "--eval.max_batches=1", "--checkpoint.every=2",
          "--checkpoint.keep=1", "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
          "--sample.max_new_tokens=0"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def _kill_while_deleting(monkeypatch, half: bool = True):
    """shutil.rmtree that deletes about half of a `.old` directory's files, then dies."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if not path.name.endswith(files.OLD_SUFFIX):
            return real(path, *args, **kwargs)
        doomed = sorted(p for p in path.rglob("*") if p.is_file())
        for p in doomed[: len(doomed) // 2 if half else 0]:
            p.unlink()
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", rmtree)


def _checkpoint_dir(root: Path, n_files: int = 4) -> Path:
    root.mkdir(parents=True)
    for i in range(n_files):
        (root / f"shard{i}").write_bytes(b"x" * 10)
    return root


def test_names_follow_one_convention(tmp_path):
    step = tmp_path / "checkpoints" / "step_0000010"
    assert files.temp_name(step, "partial").name == ".step_0000010.partial.tmp"
    assert files.old_name(step).name == ".step_0000010.old"
    for name in (".step_0000010.partial.tmp", ".step_0000010.k3j2.tmp", ".step_0000010.old"):
        assert files.is_temporary(name, ckpt_io.PREFIX)
    for name in ("step_0000010", "step_0000010.tmp", ".other.old", ".step_0000010"):
        assert not files.is_temporary(name, ckpt_io.PREFIX)
    # What atomic_directory and a distributed save actually create follows it.
    with files.atomic_directory(step) as tmp:
        assert files.is_temporary(tmp.name, step.name)
    assert dcp_ckpt.PARTIAL_TAG == "partial"


def test_kill_during_prune_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    old, new = ckpt_io.step_dir(run, 2), ckpt_io.step_dir(run, 4)
    _checkpoint_dir(old), _checkpoint_dir(new)
    _kill_while_deleting(monkeypatch)
    with pytest.raises(Killed):
        files.prune(ckpt_io.list_checkpoints(run)[:-1])
    monkeypatch.undo()
    # Renamed out of the way before any file went: the listing shows only complete checkpoints.
    assert not old.exists() and ckpt_io.list_checkpoints(run) == [new]
    half = files.old_name(old)
    assert half.is_dir() and len(list(half.iterdir())) == 2
    assert ckpt_io.remove_stale_temporaries(run) == [half]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [new.name]


def test_replacing_a_directory_keeps_one_whole_copy(tmp_path, monkeypatch):
    target = _checkpoint_dir(tmp_path / "out")
    # Killed while the replaced copy is deleted: the new one is already in place, whole.
    _kill_while_deleting(monkeypatch)
    with pytest.raises(Killed), files.atomic_directory(target) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert files.remove_temporaries(tmp_path) == [files.old_name(target)]
    # The rename into place fails: the previous copy is put back under its name.
    real_replace = files.os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).name.endswith(files.TEMP_SUFFIX):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(files.WriteError, match="Input/output error"), files.atomic_directory(target) as tmp:
        (tmp / "newer").write_text("newer")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_prune_and_killed_distributed_save_are_cleaned_at_resume(tmp_path, monkeypatch):
    default_dataset()  # built (and cached) before rmtree is patched
    run = tmp_path / "run"
    # keep=1: the save of step 4 prunes step 2, and the process dies half-way through deleting it.
    _kill_while_deleting(monkeypatch)
    with pytest.raises(Killed):
        main(["train", *TINIER, "--out", str(run)])
    monkeypatch.undo()
    root = run / "checkpoints"
    assert ckpt_io.list_checkpoints(run) == [ckpt_io.step_dir(run, 4)]
    assert (root / ".step_0000002.old").is_dir()
    # A distributed save of step 5 whose rank 0 died before state.json: shards in its partial folder.
    cfg = presets.get("tiny").replace(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

    def die(*_):
        raise Killed

    monkeypatch.setattr(dcp_ckpt, "atomic_write_text", die)
    with pytest.raises(Killed):
        dcp_ckpt.save(ckpt_io.step_dir(run, 5), Transformer(cfg), extra={})
    monkeypatch.undo()
    partial = files.temp_name(ckpt_io.step_dir(run, 5), dcp_ckpt.PARTIAL_TAG)
    assert (partial / ".metadata").is_file() and ckpt_io.list_checkpoints(run) == [ckpt_io.step_dir(run, 4)]
    with pytest.raises(CheckpointError, match="an unfinished save"):
        dcp_ckpt.verify(partial)
    # A single-process resume removes both leftovers before it writes anything.
    assert main(["train", "--resume", str(run), "--train.steps=6"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["step_0000006"]
    # state.json records the resolved model config (what `convert` reads from a DCP checkpoint).
    state = ckpt_io.verify(root / "step_0000006")
    assert ModelConfig.from_dict(state["model"]) == load_native(root / "step_0000006" / "model")[0]


def test_distributed_save_prunes_with_the_same_routine(tmp_path, monkeypatch):
    """Runtime.save (DCP) prunes like the single-process save: renamed away first, then deleted."""
    from deepseekmoe.parallel.mesh import ParallelConfig
    from deepseekmoe.parallel.runtime import Runtime

    rt = Runtime(None, ParallelConfig())  # one process: the same code path rank 0 runs
    cfg = presets.get("tiny").replace(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                                      num_attention_heads=2, first_k_dense_replace=0)
    model, run = Transformer(cfg), tmp_path / "run"
    listing = lambda: ckpt_io.list_checkpoints(run)
    for step in (2, 4):
        rt.save(ckpt_io.step_dir(run, step), model, None, {"step": step}, 1, listing)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004"]
    _kill_while_deleting(monkeypatch)
    with pytest.raises(Killed):
        rt.save(ckpt_io.step_dir(run, 6), model, None, {"step": 6}, 1, listing)
    monkeypatch.undo()
    assert listing() == [ckpt_io.step_dir(run, 6)] and dcp_ckpt.verify(ckpt_io.step_dir(run, 6)) == {"step": 6}
    assert ckpt_io.remove_stale_temporaries(run) == [root / ".step_0000004.old"]
