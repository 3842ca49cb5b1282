"""The trainer under a real `torchrun --nproc-per-node 2 -m deepseekmoe train` (gloo, ep=2):
its losses match the single-process trainer on the same global batches, only rank 0 writes the
run directory, checkpoints are DCP, and one of them resumes in a single process (world size 1)
on the same loss trajectory; SIGTERM stops every rank after the same step with a checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepseekmoe import cli

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--train.steps=4", "--train.batch_size=4", "--train.seq_len=32", "--eval.every=0",
         "--eval.max_batches=2", "--checkpoint.every=2", "--checkpoint.keep=3", "--log.every=1",
         "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0",
         "--system.device=cpu"]


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _val(run: Path) -> float:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in recs if r["kind"] == "eval"][-1]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_torchrun_trainer_matches_single_process_and_resumes_at_world_size_1(tmp_path):
    from deepseekmoe.data import default_dataset

    default_dataset()  # prepare the shipped sample once, before two ranks look for it
    single, dist2, resumed = tmp_path / "single", tmp_path / "ep2", tmp_path / "resumed"
    assert cli.main(["train", "--out", str(single), *FLAGS]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "deepseekmoe", "train", "--out", str(dist2), *FLAGS, "--parallel.ep=2", "--parallel.timeout_s=60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 reports

    ref, got = _losses(single), _losses(dist2)
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in ref.items():
        assert abs(got[step] - loss) <= 1e-5 * loss, f"step {step}: torchrun ep=2 {got[step]} vs one process {loss}"
    assert abs(_val(dist2) - _val(single)) <= 1e-5 * _val(single)
    ckpts = sorted(p.name for p in (dist2 / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]
    assert (dist2 / "checkpoints" / "step_0000002" / ".metadata").is_file()  # DCP, sharded

    # The ep=2 checkpoint of step 2 continues in one process (world size 1): same losses.
    ckpt = dist2 / "checkpoints" / "step_0000002"
    assert cli.main(["train", "--resume", str(ckpt), "--out", str(resumed), "--parallel.ep=1"]) == 0
    again = _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert abs(again[step] - ref[step]) <= 1e-5 * ref[step], f"resumed step {step}: {again[step]} vs {ref[step]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo; /proc for the worker pids")
@pytest.mark.parametrize("target", ["agent", "workers"])
def test_torchrun_sigterm_saves_the_same_step_on_every_rank_and_prints_the_resume_command(tmp_path, target):
    """SIGTERM to torchrun's agent (it forwards it to every rank) or to every rank (as Slurm does
    before preempting): the ranks agree on a step through the step's stats all-reduce, save it (DCP)
    and exit 143 with the resume command, printed once; the run then continues in one process."""
    from deepseekmoe.data import default_dataset

    default_dataset()
    run, steps = tmp_path / "ep2", 40
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "deepseekmoe", "train", "--out", str(run), *FLAGS, f"--train.steps={steps}",
           "--checkpoint.every=0", "--parallel.ep=2", "--parallel.timeout_s=60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics, t0 = run / "metrics.jsonl", time.monotonic()
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()[1][-4000:]
        time.sleep(0.1)
    if target == "agent":
        os.killpg(proc.pid, signal.SIGTERM)  # the workers run in sessions of their own
    else:
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(workers) == 2
        for pid in workers:
            os.kill(int(pid), signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    resume = [line for line in err.splitlines() if "continue with: deepseekmoe train --resume" in line]
    assert len(resume) == 1, err[-4000:]  # rank 0 only
    m = re.search(r"SIGTERM received: stopped after step (\d+) of 40, checkpoint (\S+) saved; continue with: "
                  r"deepseekmoe train --resume (\S+)$", resume[0])
    assert m and m.group(3) == str(run), resume[0]
    stop = int(m.group(1))
    assert 1 <= stop < steps
    ckpt = run / "checkpoints" / f"step_{stop:07d}"
    assert m.group(2) == str(ckpt) and (ckpt / ".metadata").is_file()  # DCP, written by both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [ckpt.name]
    assert proc.returncode == 1, err[-4000:]  # torchrun's own status for a failed (or signalled) job
    if target == "agent":
        assert "Received 15 death signal, shutting down workers" in err
    else:  # the workers' status in torchrun's failure summary: it lists one or both, as they end in turn
        codes = re.findall(r"exitcode  : (\d+)", err)
        assert codes and set(codes) == {"143"}, err[-4000:]
    assert "no progress for" not in err and "stopped by SIGTERM" not in err  # the stop, not the watchdog

    assert cli.main(["train", "--resume", str(run), "--parallel.ep=1"]) == 0
    assert sorted(_losses(run)) == list(range(1, steps + 1))
