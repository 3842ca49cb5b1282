"""Bad input to `deepseekmoe train`: one clear line on stderr, exit status != 0, nothing
half-written. Also: a full disk during a save keeps the previous checkpoint loadable, and NaN/inf
losses are skipped, logged, and stop the run after `train.max_nonfinite_steps`."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.cli import main
from deepseekmoe.data import default_dataset
from deepseekmoe.model.transformer import Transformer
from deepseekmoe.train import recipe
from deepseekmoe.train.metrics import read_metrics
from deepseekmoe.train.trainer import DivergedError, Trainer

TINIER = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
          "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
          "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", "--train.steps=4",
          "--log.every=1", "--eval.every=0", "--eval.max_batches=1", "--checkpoint.every=2",
          "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0"]


def _fail(capsys, *argv) -> str:
    """Run the CLI expecting a user error; return its single stderr line."""
    rc = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("deepseekmoe train: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *TINIER, "--out", str(out)]) == 0
    return out


def _copy_run(trained, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(trained, dst)
    return dst


def test_unknown_recipe_key_suggests_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, "--train.stpes=3", "--out", str(out))
    assert "unknown key 'train.stpes'" in msg and "did you mean 'train.steps'" in msg
    r = tmp_path / "r.toml"
    r.write_text("[optim]\nlearning_rate = 1e-3\n")
    msg = _fail(capsys, str(r), "--out", str(out))
    assert "unknown key 'optim.learning_rate'" in msg
    assert not out.exists()


def test_missing_and_unprepared_corpus(capsys, tmp_path):
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, f"--data.path={tmp_path / 'nope'}", "--out", str(out))
    assert "no such dataset directory" in msg and "deepseekmoe prepare" in msg
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "book.txt").write_text("text that was never prepared")
    msg = _fail(capsys, *TINIER, f"--data.path={tmp_path / 'raw'}", "--out", str(out))
    assert "not a prepared dataset" in msg
    assert not out.exists()


def test_empty_training_split(capsys, tmp_path):
    src = default_dataset()
    d = tmp_path / "empty"
    d.mkdir()
    meta = json.loads((src / "meta.json").read_text())
    shutil.copy(src / meta["tokenizer"], d / meta["tokenizer"])
    for split in ("train", "val"):
        meta["splits"][split].update(tokens=0, bytes=0, documents=0, shards=[f"{split}_000.bin"])
        (d / f"{split}_000.bin").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, f"--data.path={d}", "--out", str(out))
    assert "training split is empty" in msg
    assert not out.exists()


def test_token_ids_beyond_the_vocab(capsys, tmp_path):
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, "--model.vocab_size=1000", "--out", str(out))
    assert "vocab_size is 1000" in msg and "4095" in msg
    assert not out.exists()
    # A shard whose ids exceed the dataset's own vocabulary (corrupted) is caught at the first batch.
    src = default_dataset()
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    meta = json.loads((d / "meta.json").read_text())
    shard = d / meta["splits"]["train"]["shards"][0]
    arr = np.fromfile(shard, dtype=meta["dtype"])
    arr[:] = 4095 + 7
    arr.tofile(shard)
    msg = _fail(capsys, *TINIER, f"--data.path={d}", "--out", str(out))
    assert "token id 4102" in msg
    assert not out.exists()


def test_new_run_into_an_existing_run_dir(capsys, trained):
    msg = _fail(capsys, *TINIER, "--out", str(trained))
    assert "already holds a run" in msg and "--resume" in msg


def test_resume_from_nothing(capsys, tmp_path):
    msg = _fail(capsys, "--resume", str(tmp_path / "nothing"))
    assert "no such checkpoint or run directory" in msg
    msg = _fail(capsys, "--resume", str(tmp_path))
    assert "no checkpoint in this directory" in msg
    msg = _fail(capsys, "configs/tiny.toml", "--resume", str(tmp_path))
    assert "not both" in msg


def _flip(p: Path, where: float = 0.5) -> None:
    b = bytearray(p.read_bytes())
    b[int(len(b) * where)] ^= 0xFF
    p.write_bytes(bytes(b))


def _rewrite(ck: Path, rel: str, data: bytes) -> None:
    """Replace a file and update the manifest to match: damage only the loader can see."""
    (ck / rel).write_bytes(data)
    man = json.loads((ck / "manifest.json").read_text())
    man["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(man))


def _state(ck: Path, **changes) -> bytes:
    st = json.loads((ck / "state.json").read_text())
    st.update(changes)
    return json.dumps({k: v for k, v in st.items() if v is not None}).encode()


# Each damage to the newest checkpoint (step 4) and the words the one-line refusal must hold.
CORRUPTIONS = {
    "flipped weights": (lambda ck: _flip(ck / "model" / "model.safetensors"),
                        "model/model.safetensors does not match its checksum"),
    "flipped optimizer": (lambda ck: _flip(ck / "optimizer.pt", 0.9), "optimizer.pt does not match its checksum"),
    "flipped state.json": (lambda ck: _flip(ck / "state.json", 0.1), "state.json does not match its checksum"),
    "truncated optimizer": (lambda ck: (ck / "optimizer.pt").write_bytes((ck / "optimizer.pt").read_bytes()[:1000]),
                            "optimizer.pt has 1000 bytes"),
    "empty weights": (lambda ck: (ck / "model" / "model.safetensors").write_bytes(b""),
                      "model/model.safetensors has 0 bytes"),
    "deleted state.json": (lambda ck: (ck / "state.json").unlink(), "state.json is missing"),
    "deleted weights": (lambda ck: (ck / "model" / "model.safetensors").unlink(),
                        "model/model.safetensors is missing"),
    "deleted manifest": (lambda ck: (ck / "manifest.json").unlink(), "incomplete (no manifest.json)"),
    "manifest not JSON": (lambda ck: (ck / "manifest.json").write_text("{not json"), "unreadable manifest.json"),
    "manifest without files": (lambda ck: (ck / "manifest.json").write_text('{"format": "deepseekmoe-train"}'),
                               "unreadable manifest.json"),
    "manifest files a list": (lambda ck: (ck / "manifest.json").write_text('{"files": ["state.json"]}'),
                              "unreadable manifest.json"),
    "manifest entry without size": (lambda ck: (ck / "manifest.json").write_text(
        '{"files": {"state.json": {"sha256": "0"}}}'), "unreadable manifest.json"),
    "state.json not JSON": (lambda ck: _rewrite(ck, "state.json", b"{torn"), "unreadable state.json"),
    "state.json binary": (lambda ck: _rewrite(ck, "state.json", b"\xff\xfe\x00"), "unreadable state.json"),
    "wrong format": (lambda ck: _rewrite(ck, "state.json", _state(ck, format="other-trainer")),
                     "is not a deepseekmoe training checkpoint (format='other-trainer')"),
    "state.json without a step": (lambda ck: _rewrite(ck, "state.json", _state(ck, step=None)),
                                  "state.json is damaged (no step)"),
    "state.json a list": (lambda ck: _rewrite(ck, "state.json", b"[1, 2]"),
                          "is not a deepseekmoe training checkpoint (format='list')"),
    "model config.json not JSON": (lambda ck: _rewrite(ck, "model/config.json", b"{"), "corrupted JSON"),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_on_resume(capsys, trained, tmp_path, damage):
    run = _copy_run(trained, tmp_path)
    ck = run / "checkpoints" / "step_0000004"
    before = (run / "metrics.jsonl").read_bytes()
    spoil, want = CORRUPTIONS[damage]
    spoil(ck)
    msg = _fail(capsys, "--resume", str(run))
    assert "step_0000004" in msg and want in msg
    if damage != "model config.json not JSON":  # found by the manifest: the earlier checkpoint is named
        assert "step_0000002" in msg
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing touched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A run whose checkpoint step 2 is a sharded (DCP) one, as torchrun writes them."""
    from deepseekmoe.parallel.mesh import ParallelConfig
    from deepseekmoe.parallel.runtime import Runtime

    run = tmp_path_factory.mktemp("dcp") / "r"
    cfg = recipe.build(None, recipe_overrides(TINIER))
    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": 2, "config": cfg.to_dict(),
             "data": {}, "rng": ckpt_io.rng_state()}
    Runtime(None, ParallelConfig()).save(ckpt_io.step_dir(run, 2), Transformer(cfg.model_config()), None, state,
                                         1, lambda: ckpt_io.list_checkpoints(run))
    return run


def _shard(ck: Path) -> Path:
    return next(p for p in sorted(ck.iterdir()) if p.suffix == ".distcp")


DCP_CORRUPTIONS = {
    "dcp truncated .metadata": (lambda ck: (ck / ".metadata").write_bytes((ck / ".metadata").read_bytes()[:50]),
                                "unreadable .metadata"),
    "dcp garbage .metadata": (lambda ck: (ck / ".metadata").write_bytes(b"not a pickle"), "unreadable .metadata"),
    "dcp deleted shard": (lambda ck: _shard(ck).unlink(), "is missing"),
    "dcp truncated shard": (lambda ck: _shard(ck).write_bytes(b"x"), "is truncated: shard"),
    "dcp deleted state.json": (lambda ck: (ck / "state.json").unlink(), "is not a complete distributed checkpoint"),
    "dcp wrong format": (lambda ck: (ck / "state.json").write_text('{"format": "x", "step": 2}'),
                         "not a deepseekmoe training checkpoint (format='x')"),
}


@pytest.mark.parametrize("damage", sorted(DCP_CORRUPTIONS))
def test_corrupted_distributed_checkpoint_on_resume(capsys, dcp_run, tmp_path, damage):
    run = tmp_path / "copy"
    shutil.copytree(dcp_run, run)
    ck = run / "checkpoints" / "step_0000002"
    spoil, want = DCP_CORRUPTIONS[damage]
    spoil(ck)
    msg = _fail(capsys, "--resume", str(ck))
    assert "step_0000002" in msg and want in msg
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # nothing written


def test_full_disk_during_save_keeps_previous_checkpoint(capsys, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4): write part of the file, then ENOSPC
            Path(f).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", save_then_fill_disk)
    msg = _fail(capsys, *TINIER, "--out", str(out))
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    assert "disk is full" in msg and "step_0000002 is intact" in msg and "--resume" in msg
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000002"]  # no temporary or partial directory left
    state = ckpt_io.verify(out / "checkpoints" / "step_0000002")
    assert state["step"] == 2
    cfg = recipe.build(base=state["config"])
    model = Transformer(cfg.model_config())
    ckpt_io.load_weights(out / "checkpoints" / "step_0000002", model, None, torch.device("cpu"))
    # ... and the run continues from it.
    assert main(["train", "--resume", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_real_write_failure_during_save_keeps_previous_checkpoint(capsys, tmp_path, monkeypatch):
    """Not a mock: the process's file-size limit makes the real safetensors / torch.save writes of
    the second checkpoint fail (EFBIG, which they report as SafetensorError / RuntimeError, as they
    do ENOSPC)."""
    import resource
    import signal

    out = tmp_path / "o"
    real_save = ckpt_io.save
    calls = {"n": 0}

    def save_with_file_limit(*a, **k):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_save(*a, **k)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return real_save(*a, **k)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(ckpt_io, "save", save_with_file_limit)
    msg = _fail(capsys, *TINIER, "--out", str(out))
    assert "could not save checkpoint" in msg and "step_0000004" in msg and "File too large" in msg
    assert "step_0000002 is intact" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert ckpt_io.verify(out / "checkpoints" / "step_0000002")["step"] == 2


def _nan_after(monkeypatch, bad_calls: set[int]):
    """Make the model's loss NaN on the given (1-based) forward calls in training mode."""
    real = Transformer.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls or (0 in bad_calls and calls["n"] >= max(bad_calls)):
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


def test_nonfinite_steps_are_skipped_and_logged(monkeypatch, tmp_path):
    cfg = recipe.build(None, recipe_overrides(TINIER, ["--train.steps=6"]))
    _nan_after(monkeypatch, {3, 4})
    trainer = Trainer(cfg, run_dir=tmp_path / "o", echo=lambda s: None)
    res = trainer.run()
    assert res.step == 6
    recs = read_metrics(tmp_path / "o" / "metrics.jsonl")
    bad = [r["step"] for r in recs if r["kind"] == "nonfinite"]
    good = [r["step"] for r in recs if r["kind"] == "train"]
    assert bad == [3, 4] and good == [1, 2, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_streak_stops_with_last_good_checkpoint(monkeypatch, tmp_path):
    cfg = recipe.build(None, recipe_overrides(TINIER, ["--train.steps=10", "--train.max_nonfinite_steps=3"]))
    _nan_after(monkeypatch, {0, 5})  # every step from the 5th on
    out = tmp_path / "o"
    with pytest.raises(DivergedError, match=r"3 consecutive steps \(up to step 7\).*step_0000006.*--resume"):
        Trainer(cfg, run_dir=out, echo=lambda s: None).run()
    # The skipped step 6 still saved its checkpoint: the weights of step 4, unchanged by the skips.
    # No finite loss judged step 4's weights, so step 2 (judged good) is kept beyond checkpoint.keep=2.
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_0000002", "step_0000004", "step_0000006"]
    assert ckpt_io.verify(out / "checkpoints" / "step_0000006")["nonfinite_streak"] == 2
    w4, w6 = (load_file(out / "checkpoints" / f"step_000000{s}" / "model" / "model.safetensors") for s in (4, 6))
    assert w4.keys() == w6.keys() and all(torch.equal(w4[k], w6[k]) for k in w4)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [5, 6, 7]


def recipe_overrides(*argvs) -> list[tuple[str, str]]:
    from deepseekmoe.train.cli import split_overrides

    return split_overrides([a for argv in argvs for a in argv])[1]


def test_compile_on_cpu_fp32_is_refused_up_front(capsys, tmp_path):
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, "--system.compile=true", "--system.device=cpu", "--out", str(out))
    assert "parallel.compile=true (or system.compile) on CPU" in msg and "expert_backend=loop" in msg
    assert not out.exists()


# ---------------------------------------------------------------------- every stop leaves a way forward
def _cfg(*extra: str):
    return recipe.build(None, recipe_overrides(TINIER, list(extra)))


def test_nan_at_a_checkpoint_step_and_at_the_last_step_keep_the_cadence(monkeypatch, tmp_path):
    """A skipped step leaves the weights unchanged; its checkpoint and the final validation and
    checkpoint are still made (they used to be jumped over while the run said done)."""
    out = tmp_path / "o"
    _nan_after(monkeypatch, {4, 6})  # step 4 (a checkpoint step) and step 6 (the last)
    res = Trainer(_cfg("--train.steps=6", "--checkpoint.keep=3"), run_dir=out, echo=lambda s: None).run()
    assert res.step == 6 and res.checkpoint == ckpt_io.step_dir(out, 6) and res.val_loss is not None
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_0000002", "step_0000004", "step_0000006"]
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [4, 6]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [6]
    # Step 5 trained, step 6 was skipped: the final weights are those after step 5, not after step 4.
    w = {s: load_file(ckpt_io.step_dir(out, s) / "model" / "model.safetensors") for s in (4, 6)}
    assert not all(torch.equal(w[4][k], w[6][k]) for k in w[4])
    assert ckpt_io.verify(ckpt_io.step_dir(out, 6))["nonfinite_streak"] == 1


def test_nan_abort_before_the_first_checkpoint_restarts_with_resume(capsys, monkeypatch, tmp_path):
    out = tmp_path / "o"
    _nan_after(monkeypatch, {0, 1})  # every step
    msg = _fail(capsys, *TINIER, "--checkpoint.every=10", "--train.steps=8", "--train.max_nonfinite_steps=3",
                "--out", str(out))
    assert msg.endswith(f"no checkpoint was saved yet; lower --optim.lr or raise --train.max_nonfinite_steps, "
                        f"then --resume {out} (restarts from step 0)")
    monkeypatch.undo()
    # A new run into it names the same command ...
    msg = _fail(capsys, *TINIER, "--out", str(out))
    assert msg.endswith(f"{out} already holds a run that has no checkpoint yet; restart it from step 0 with "
                        f"--resume {out}, or choose another --out")
    # ... which restarts it from step 0 with its saved config (8 steps), the old log cut away.
    assert main(["train", "--resume", str(out)]) == 0
    assert "restarted from step 0 (it had no checkpoint)" in capsys.readouterr().err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    assert not [r for r in recs if r["kind"] == "nonfinite"]
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_0000008"]


def test_full_disk_at_the_first_save_restarts_with_resume(capsys, tmp_path, monkeypatch):
    out = tmp_path / "o"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    msg = _fail(capsys, *TINIER, "--out", str(out))
    monkeypatch.undo()
    assert "disk is full" in msg and "no earlier checkpoint exists" in msg and msg.endswith(f"--resume {out}")
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert main(["train", "--resume", str(out)]) == 0  # the command the message names works
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_0000002", "step_0000004"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MB tmpfs (root only): room for one checkpoint of the TINIER model (3.5 MB), not two."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the disk-full case is still "
                    "covered by test_full_disk_during_save_keeps_previous_checkpoint (simulated ENOSPC)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk_at_a_checkpoint(capsys, small_tmpfs):
    out = small_tmpfs / "o"
    msg = _fail(capsys, *TINIER, "--checkpoint.keep=2", "--out", str(out))
    assert "could not save checkpoint" in msg and "step_0000004" in msg and "step_0000002 is intact" in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # no temporary left
    assert ckpt_io.verify(out / "checkpoints" / "step_0000002")["step"] == 2


def test_diverging_run_is_stopped_keeping_the_last_good_checkpoint(capsys, tmp_path):
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, "--optim.lr=10", "--train.steps=40", "--checkpoint.every=1",
                "--checkpoint.keep=1", "--out", str(out))
    import re

    m = re.search(r"diverged: ([\d.e+]+) at step (\d+), above 3 x its running minimum ([\d.]+) for 5 consecutive "
                  r"logged steps \(since step (\d+)\); stopped\. the last good checkpoint \(before the loss rose\) "
                  r"is (\S+); lower --optim.lr \(now 10\) or raise --train.divergence_factor \(0 = off\), then "
                  r"--resume (\S+)$", msg)
    assert m, msg
    loss, step, best, since, good, again = m.groups()
    assert float(loss) > 3 * float(best) and int(step) == int(since) + 4 and int(step) < 40 and good == again
    # keep=1, yet the good checkpoint survived the bad ones saved while the loss was up.
    names = [p.name for p in ckpt_io.list_checkpoints(out)]
    assert names == [Path(good).name, f"step_{int(step) - 1:07d}"]
    assert int(Path(good).name[5:]) == int(since) - 2  # the weights that gave step since-1 its loss
    assert main(["train", "--resume", good, "--optim.lr=1e-3", "--train.steps=8", "--checkpoint.every=4"]) == 0
    last = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert last["step"] == 8 and last["loss"] < 3 * float(best)  # the fix named works


def test_divergence_defaults_never_fire_on_the_reference_curve():
    from deepseekmoe.train.recovery import Divergence

    losses = json.loads((Path(__file__).parent / "assets" / "tiny_loss_curve.json").read_text())["loss"]
    t = recipe.TrainConfig().train
    div = Divergence(t.divergence_factor, t.divergence_steps)
    assert not any(div.update(i + 1, v) for i, v in enumerate(losses))
    assert max(v / min(losses[: i + 1]) for i, v in enumerate(losses)) < 1.05  # far below the factor 3
    div = Divergence(3.0, 2)
    assert [div.update(s, v) for s, v in enumerate([5.0, 4.0, 13.0, 4.5, 13.0, 12.5], 1)] == \
        [False, False, False, False, False, True]
    assert (div.best, div.streak, div.since) == (4.0, 2, 5)


@pytest.mark.parametrize("value", ["1", "0.5", "-2"])
def test_divergence_factor_must_exceed_one(capsys, value, tmp_path):
    msg = _fail(capsys, *TINIER, f"--train.divergence_factor={value}", "--out", str(tmp_path / "o"))
    assert f"train.divergence_factor={float(value)}: must be > 1" in msg and "0 to turn" in msg


def test_out_among_unrelated_files_is_refused(capsys, tmp_path):
    mine = tmp_path / "papers"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    msg = _fail(capsys, *TINIER, "--out", str(mine))
    assert msg.endswith(f"--out {mine} holds files that are not a training run (notes.txt); choose a new or "
                        "empty directory")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert main(["train", *TINIER, "--out", str(tmp_path / "empty")]) == 0


def test_validation_split_shorter_than_seq_len_is_refused_up_front(capsys, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(default_dataset(), d)
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"].update(tokens=20, bytes=60)
    np.arange(20, dtype=meta["dtype"]).tofile(d / meta["splits"]["val"]["shards"][0])
    (d / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "o"
    msg = _fail(capsys, *TINIER, f"--data.path={d}", "--out", str(out))
    assert msg.endswith(f"{d}: the 'val' split has 20 tokens, fewer than train.seq_len=32; use a shorter "
                        "--train.seq_len or prepare a larger validation split")
    assert not out.exists()
