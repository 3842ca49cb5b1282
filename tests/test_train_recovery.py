"""The recovery harness: a training process killed (SIGKILL) at named points - at startup, between
micro-batches, mid-save, before and during pruning, during validation, twice in a row - and
continued with the one command a user would type ends bitwise identical to the uninterrupted run
(weights, optimizer, RNG, data cursor, every logged value); SIGINT / SIGTERM save a checkpoint and
print the resume command.

Each run is a forked child of the test process (no interpreter start-up per run) that kills itself
at an exact point: a wrapper around the function it names sends SIGKILL (or SIGTERM / SIGINT) to
its own process on the n-th call, so nothing after that point runs - not even `finally` blocks or
the cleanup of atomic_directory - as with a real kill, and every kill point is deterministic. All
runs use one CPU thread (the thread count is part of bitwise reproducibility).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepseekmoe.checkpoint import files
from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.cli import main
from deepseekmoe.data import default_dataset
from deepseekmoe.model.transformer import Transformer
from deepseekmoe.train import step as step_mod
from deepseekmoe.train import trainer as trainer_mod
from deepseekmoe.train.metrics import MetricsLogger

# 12 steps of 2 micro-batches; checkpoints at 3, 6, 9, 12 (the last 2 kept); validation at 4, 8, 12.
STEPS = 12
RUN = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
       "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
       "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", f"--train.steps={STEPS}",
       "--train.micro_batch_size=2", "--schedule.warmup_steps=4", "--log.every=1", "--eval.every=4",
       "--eval.max_batches=1", "--checkpoint.every=3", "--checkpoint.keep=2", "--system.threads=1",
       "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0"]
PATCH_TARGETS = {"trainer": trainer_mod, "Trainer": trainer_mod.Trainer, "LocalStep": step_mod.LocalStep,
                 "ckpt_io": ckpt_io, "files": files, "torch": torch, "Transformer": Transformer,
                 "MetricsLogger": MetricsLogger}


def _at(target: str, name: str, n: int, after: bool = False, sig: int = signal.SIGKILL):
    """A point: the n-th call of target.name, just before it runs (or just after it returned)."""
    return (target, name, n, after, sig)


def _install(point) -> None:
    target, name, n, after, sig = point
    obj = PATCH_TARGETS[target]
    real, calls = getattr(obj, name), [0]

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), sig)
        out = real(*a, **k)
        if calls[0] == n and after:
            os.kill(os.getpid(), sig)
        return out

    setattr(obj, name, hooked)


def _half_deleted_prune(n: int) -> None:
    """The n-th deletion of a pruned (`.old`) checkpoint removes half of its files, then SIGKILL."""
    real, calls = shutil.rmtree, [0]

    def rmtree(path, *a, **k):
        if Path(path).name.endswith(files.OLD_SUFFIX):
            calls[0] += 1
            if calls[0] == n:
                doomed = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for p in doomed[: len(doomed) // 2]:
                    p.unlink()
                os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *a, **k)

    shutil.rmtree = rmtree


def _child(argv: list[str], point, log: str) -> None:
    # Before any torch op: the parent's OpenMP thread pool does not survive fork, and a parallel
    # region with more than one thread in the child can hang on it (the runs use one thread anyway).
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the child
    rc = 1
    try:
        if point == "prune":
            _half_deleted_prune(1)
        elif point is not None:
            _install(point)
        rc = main(["train", *argv])
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(rc)


def _train(argv: list[str], log: Path, point=None) -> int:
    """Run `deepseekmoe train argv` in a forked child; its exit status (-9: killed by SIGKILL)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, point, str(log)))
    proc.start()
    proc.join(120)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"train {argv} hung: {log.read_text()[-2000:]}")
    return proc.exitcode


def _continue(run: Path, log: Path, point=None) -> int:
    """The one command a user types after a kill: `--resume RUN` (it restarts a run that had no
    checkpoint yet), or the original command when the kill left no run directory."""
    return _train(["--resume", str(run)] if run.exists() else [*RUN, "--out", str(run)], log, point)


def _final(run: Path) -> dict:
    """Everything a run ends with, wall-clock figures and its own path left out."""
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k in ("tokens_per_s", "mfu"):
            r.pop(k, None)
        records.append(r)
    ck = ckpt_io.step_dir(run, STEPS)
    state = ckpt_io.verify(ck)
    state.pop("elapsed_s")
    state["config"].pop("out")
    return {"records": records, "listing": sorted(p.name for p in (run / "checkpoints").iterdir()),
            "weights": load_file(ck / "model" / "model.safetensors"),
            "optimizer": torch.load(ck / "optimizer.pt", weights_only=True), "state": state}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got["records"] == want["records"], f"{what}: the logged values differ"
    assert got["listing"] == want["listing"], what
    assert got["state"] == want["state"], f"{what}: step, data cursor, RNG or counters differ"
    assert got["weights"].keys() == want["weights"].keys()
    for k, v in want["weights"].items():
        assert torch.equal(got["weights"][k], v), f"{what}: weight {k} differs"
    ga, wa = got["optimizer"], want["optimizer"]
    assert ga["param_groups"] == wa["param_groups"] and ga["state"].keys() == wa["state"].keys()
    for i, st in wa["state"].items():
        for k, v in st.items():
            assert torch.equal(ga["state"][i][k], v), f"{what}: optimizer state {i}.{k} differs"


def _assert_no_torn_checkpoint(run: Path) -> None:
    """What a kill leaves: only complete checkpoints under their real names."""
    for ck in ckpt_io.list_checkpoints(run):
        ckpt_io.verify(ck)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    default_dataset()  # built (and cached) before any fork
    import torch._dynamo  # noqa: F401 - what use_deterministic_algorithms imports (1.5 s), once, not per child
    run = tmp_path_factory.mktemp("ref") / "run"
    assert _train([*RUN, "--out", str(run)], run.parent / "log") == 0, (run.parent / "log").read_text()[-3000:]
    return _final(run)


# name -> the kill points of successive runs (the first run is the original command).
KILLS = {
    "startup, before the run directory exists": [_at("Trainer", "_build", 1)],
    "startup, after config.toml, before step 1": [_at("trainer", "atomic_write_text", 1, after=True)],
    "step 1, between its micro-batches": [_at("Transformer", "forward", 2, after=True)],
    "step 5, after backward, before the update": [_at("LocalStep", "run", 5, after=True)],
    "step 7, before its metrics record": [_at("MetricsLogger", "write", 8)],
    "validation at step 8": [_at("Trainer", "evaluate", 2)],
    "save of step 6, model written": [_at("ckpt_io", "save_native", 2, after=True)],
    "save of step 6, optimizer written": [_at("torch", "save", 2, after=True)],
    "save of step 9, complete, before its rename": [_at("files", "replace_directory", 6)],
    "save of step 9, renamed, before pruning": [_at("ckpt_io", "prune", 3)],
    "pruning step 3, half deleted": ["prune"],
    "final save (step 12), model written": [_at("ckpt_io", "save_native", 4, after=True)],
    "double: step 5, then loading the checkpoint at resume": [_at("LocalStep", "run", 5, after=True),
                                                               _at("ckpt_io", "load_weights", 1)],
    "double: save of step 6, then step 5 of the resumed run": [_at("ckpt_io", "save_native", 2, after=True),
                                                               _at("LocalStep", "run", 2, after=True)],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_then_continue_is_bitwise_identical(reference, tmp_path, name):
    run, log = tmp_path / "run", tmp_path / "log"
    points = KILLS[name]
    assert _train([*RUN, "--out", str(run)], log, points[0]) == -signal.SIGKILL, log.read_text()[-3000:]
    for point in points[1:]:
        _assert_no_torn_checkpoint(run)
        assert _continue(run, log, point) == -signal.SIGKILL, log.read_text()[-3000:]
    _assert_no_torn_checkpoint(run)
    assert _continue(run, log) == 0, log.read_text()[-3000:]
    _assert_same(_final(run), reference, name)
    assert not [p for p in (run / "checkpoints").iterdir() if files.is_temporary(p.name)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, point", [
    (signal.SIGTERM, _at("LocalStep", "run", 5, after=True, sig=signal.SIGTERM)),  # mid-step
    (signal.SIGINT, _at("Trainer", "evaluate", 1, sig=signal.SIGINT)),  # during the validation of step 4
    (signal.SIGTERM, _at("Trainer", "_build", 1, sig=signal.SIGTERM)),  # before the first step
])
def test_sigterm_and_sigint_save_and_print_the_resume_command(reference, tmp_path, sig, point):
    run, log = tmp_path / "run", tmp_path / "log"
    assert _train([*RUN, "--out", str(run)], log, point) == 128 + sig
    text = log.read_text()
    line = [t for t in text.splitlines() if t.startswith("deepseekmoe train:")]
    name = signal.Signals(sig).name
    if point[1] == "_build":  # nothing trained yet: nothing saved, and --resume restarts the run
        assert line == [f"deepseekmoe train: {name} received before step 1, nothing to save; restart with: "
                        f"deepseekmoe train --resume {run}"], text[-3000:]
        assert ckpt_io.list_checkpoints(run) == [] and (run / "config.toml").is_file()
    else:
        stopped = {signal.SIGTERM: 5, signal.SIGINT: 4}[sig]
        assert line == [f"deepseekmoe train: {name} received: stopped after step {stopped} of {STEPS}, checkpoint "
                        f"{ckpt_io.step_dir(run, stopped)} saved; continue with: deepseekmoe train --resume {run}"], \
            text[-3000:]
        assert ckpt_io.list_checkpoints(run)[-1] == ckpt_io.step_dir(run, stopped)
    assert "Traceback" not in text
    assert _continue(run, log) == 0, log.read_text()[-3000:]
    _assert_same(_final(run), reference, f"{signal.Signals(sig).name} then --resume")


def test_resume_with_another_thread_count_warns(reference, tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "log"
    assert _train([*RUN, "--out", str(run)], log, _at("LocalStep", "run", 5, after=True)) == -signal.SIGKILL
    assert ckpt_io.verify(ckpt_io.step_dir(run, 3))["threads"] == 1
    # In this process: a forked child must not start a thread pool (OpenMP does not survive fork).
    n = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(run), "--system.threads=2", "--train.steps=4"]) == 0
    finally:
        torch.set_num_threads(n)
    warn = [t for t in capsys.readouterr().err.splitlines() if t.startswith("warning:")]
    assert warn == [f"warning: {ckpt_io.step_dir(run, 3)} was written by a run with 1 CPU thread(s), this one has "
                    "2: it continues correctly but not bit-identically to an uninterrupted run (set "
                    "--system.threads=1 for that)"]
