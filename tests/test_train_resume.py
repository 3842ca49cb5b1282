"""Exact resume: a real `deepseekmoe train` process killed with SIGKILL at a random step and
resumed with --resume must reproduce the uninterrupted run: the same loss trajectory (every
logged value, bit for bit) and bitwise-identical final weights and optimizer state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# A model much smaller than `tiny` (same code path: preset + overrides) so the three processes
# finish in seconds. torch's default thread count: the trainer's deterministic CPU kernels make
# multi-threaded runs reproducible.
TINIER = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
          "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
          "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", "--train.steps=24",
          "--train.micro_batch_size=2", "--schedule.warmup_steps=4", "--log.every=1", "--eval.every=8",
          "--eval.max_batches=2", "--checkpoint.every=3", "--checkpoint.keep=2", "--log.progress=false",
          "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "deepseekmoe", "train", *args]


def _train_records(run: Path) -> list[dict]:
    recs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k in ("tokens_per_s", "mfu"):  # wall-clock figures differ between runs
            r.pop(k, None)
        recs.append(r)
    return recs


def _last_step(run: Path) -> int:
    p = run / "metrics.jsonl"
    if not p.exists():
        return 0
    steps = [0]
    for line in p.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps)


@pytest.mark.timeout(240)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    seed = int.from_bytes(os.urandom(2), "little")
    kill_at = random.Random(seed).randint(4, 22)
    a, b = tmp_path / "a", tmp_path / "b"
    env = _env()

    full = subprocess.run(_cmd(*TINIER, "--out", str(a)), env=env, capture_output=True, text=True, timeout=200)
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(_cmd(*TINIER, "--out", str(b)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while _last_step(b) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"run finished before the kill at step {kill_at}: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = _last_step(b)
    assert killed_at < 24, f"killed too late (step {killed_at}); seed {seed}"

    resumed = subprocess.run(_cmd("--resume", str(b)), env=env, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0, f"seed {seed}, killed at {killed_at}: {resumed.stderr[-2000:]}"
    assert "resumed at step" in resumed.stderr

    ra, rb = _train_records(a), _train_records(b)
    assert [r["step"] for r in ra if r["kind"] == "train"] == list(range(1, 25))
    assert ra == rb, f"trajectories differ after a kill at step {killed_at} (seed {seed})"

    ca = a / "checkpoints" / "step_0000024"
    cb = b / "checkpoints" / "step_0000024"
    wa, wb = load_file(ca / "model" / "model.safetensors"), load_file(cb / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs (kill at step {killed_at}, seed {seed})"
    oa = torch.load(ca / "optimizer.pt", weights_only=True)
    ob = torch.load(cb / "optimizer.pt", weights_only=True)
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), f"optimizer state {i}.{k} differs"
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (ca, cb))
    assert sa["data"] == sb["data"] and sa["rng"] == sb["rng"]
    # keep-last-N held in both runs, and no half-written checkpoint survived the kill
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_0000021", "step_0000024"]
