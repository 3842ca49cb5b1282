"""Balance losses under expert parallel (torchrun, gloo, ep=2): the expert- and device-level terms
the metrics log are the terms that are trained, i.e. those one process computes on the whole
global batch, and they add up to the logged objective.

The device-level loss is configured with `n_device_groups=1` for the ep=2 run: expert parallel
uses the real placement (D = 2 ranks), which the single-process reference states explicitly
(`n_device_groups=2`). Before balance losses had one source, this layout trained the device term
but never logged it, and the logged split used each rank's own counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseekmoe import cli

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--train.steps=3", "--train.batch_size=4", "--train.seq_len=32", "--eval.every=0",
         "--eval.max_batches=1", "--checkpoint.every=0", "--log.every=1", "--log.progress=false",
         "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0", "--system.device=cpu",
         "--model.seq_aux=false", "--model.aux_loss_alpha=0.01", "--model.device_balance_alpha=0.05"]
TERMS = ("loss", "lm_loss", "balance_loss", "expert_balance_loss", "device_balance_loss")


def _train_records(run: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["kind"] == "train"}


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_ep2_logs_exactly_the_trained_balance_terms(tmp_path):
    from deepseekmoe.data import default_dataset

    default_dataset()  # prepare the shipped sample once, before two ranks look for it
    single, ep2 = tmp_path / "single", tmp_path / "ep2"
    assert cli.main(["train", "--out", str(single), *FLAGS, "--model.n_device_groups=2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "deepseekmoe", "train", "--out", str(ep2), *FLAGS, "--model.n_device_groups=1",
           "--parallel.ep=2", "--parallel.timeout_s=60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ref, got = _train_records(single), _train_records(ep2)
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step, r in ref.items():
        g = got[step]
        assert r["expert_balance_loss"] > 0 and r["device_balance_loss"] > 0
        for key in TERMS:
            assert abs(g[key] - r[key]) <= 1e-5 * abs(r[key]), \
                f"step {step} {key}: ep=2 {g[key]} vs one process {r[key]}"
        # what is logged adds up to what is trained
        assert g["expert_balance_loss"] + g["device_balance_loss"] == pytest.approx(g["balance_loss"], rel=1e-6)
        assert g["lm_loss"] + g["balance_loss"] == pytest.approx(g["loss"], rel=1e-6)
