"""`system.compute_weights` through `deepseekmoe train`: bf16 compute copies of the weights cast once
per optimizer step (train/optim.py ComputeWeights) against autocast casting at every use, on the
CPU under bf16 autocast.

Both paths compute the same bf16 products and sum the same gradients in fp32 in the same order
(tests/test_train_step_fast.py checks the step itself), so a whole run — every logged loss and
gradient norm, the validation losses, the final weights and AdamW state — is compared bit for bit;
so is a run resumed from one of its checkpoints (which hold the fp32 masters), with the option on
or off after the resume. Then the option's resolution (auto / true / false) and its errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepseekmoe.errors import ConfigError
from deepseekmoe.train import recipe
from deepseekmoe.train.optim import ComputeWeights
from deepseekmoe.train.recipe import compute_weights_on
from deepseekmoe.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# The tiny preset made smaller (as tests/test_train_resume.py does), bf16 autocast on the CPU,
# two micro-batches per step (the fp32 sums of their gradients), a checkpoint every 4 steps kept.
ARGS = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
        "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
        "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", f"--train.steps={STEPS}",
        "--train.micro_batch_size=2", "--schedule.warmup_steps=4", "--log.every=1", "--eval.every=4",
        "--eval.max_batches=2", "--checkpoint.every=4", "--checkpoint.keep=10", "--log.progress=false",
        "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0", "--system.dtype=bfloat16"]


def _train(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "deepseekmoe", "train", *args], env=env, capture_output=True,
                         text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for k in ("tokens_per_s", "mfu"):  # wall-clock figures
            r.pop(k, None)
    return recs


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert ra == rb
    ca, cb = (r / "checkpoints" / f"step_{STEPS:07d}" for r in (a, b))
    wa, wb = load_file(ca / "model" / "model.safetensors"), load_file(cb / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == torch.float32 and torch.equal(wa[k], wb[k]), k
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True)["state"] for c in (ca, cb))
    assert oa.keys() == ob.keys()
    for i in oa:
        for k, v in oa[i].items():
            assert torch.equal(v, ob[i][k]), f"optimizer state {i}.{k}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run with the option off (autocast casts at each use) and the same run with it on."""
    root = tmp_path_factory.mktemp("cw")
    off = _train(*ARGS, "--system.compute_weights=false", "--out", str(root / "off"))
    on = _train(*ARGS, "--system.compute_weights=true", "--out", str(root / "on"))
    assert "(compute weights)" in on.stderr and "(compute weights)" not in off.stderr
    return root / "off", root / "on"


@pytest.mark.timeout(240)
def test_compute_weights_run_equals_reference(runs):
    off, on = runs
    _assert_same_run(off, on)
    assert all(r["loss"] == r["loss"] for r in _records(on) if r["kind"] == "train")  # finite, not NaN


@pytest.mark.timeout(240)
@pytest.mark.parametrize("at,after", [(4, "true"), (4, "false")])
def test_compute_weights_resume_is_exact(runs, tmp_path, at, after):
    """A copy of the run cut back to its step-`at` checkpoint, resumed with the option `after`."""
    _, on = runs
    cut = tmp_path / "cut"
    shutil.copytree(on, cut)
    for c in (cut / "checkpoints").iterdir():
        if int(c.name.split("_")[1]) > at:
            shutil.rmtree(c)
    resumed = _train("--resume", str(cut), f"--system.compute_weights={after}")
    assert f"resumed at step {at}" in resumed.stderr
    assert ("(compute weights)" in resumed.stderr) == (after == "true")
    _assert_same_run(on, cut)


def test_resolution():
    # auto: one-process CUDA under autocast; off on CPU and under torchrun
    assert compute_weights_on(None, "cuda", True, False)
    for args in (("cpu", True, False), ("cuda", False, False), ("cuda", True, True)):
        assert not compute_weights_on(None, *args), args
    assert compute_weights_on(True, "cpu", True, False)
    assert not compute_weights_on(False, "cuda", True, False)
    with pytest.raises(ConfigError, match="system.compute_weights=true needs bf16"):
        compute_weights_on(True, "cuda", False, False)
    with pytest.raises(ConfigError, match="system.compute_weights=true runs in one process only"):
        compute_weights_on(True, "cuda", True, True)
    cfg = recipe.build(overrides=[("system.compute_weights", "true")])
    assert cfg.system.compute_weights is True
    assert recipe.build(overrides=[("system.compute_weights", "auto")]).system.compute_weights is None
    assert "compute_weights" not in recipe.to_toml(recipe.TrainConfig())  # unset: auto, the default job unchanged
    with pytest.raises(ConfigError, match="expected true or false"):
        recipe.build(overrides=[("system.compute_weights", "sometimes")])


def test_trainer_wiring(tmp_path):
    """The Trainer hands LocalStep a ComputeWeights when on; an fp32 run asking for it fails before
    anything is written."""
    base = [("train.steps", "1"), ("sample.max_new_tokens", "0"), ("system.device", "cpu")]
    on = Trainer(recipe.build(overrides=[*base, ("system.dtype", "bfloat16"), ("system.compute_weights", "true")]),
                 tmp_path / "on")
    on._build()
    assert isinstance(on.stepper.weights, ComputeWeights) and on.stepper.weights.dtype == torch.bfloat16
    auto = Trainer(recipe.build(overrides=[*base, ("system.dtype", "bfloat16")]), tmp_path / "auto")
    auto._build()
    assert auto.stepper.weights is None  # auto on the CPU: off
    with pytest.raises(ConfigError, match="system.compute_weights=true needs bf16"):
        Trainer(recipe.build(overrides=[*base, ("system.compute_weights", "true")]), tmp_path / "fp32")
    assert not any(tmp_path.iterdir())


def test_lora_step_is_exact():
    """What `deepseekmoe sft --lora` steps with the option on: a bf16 frozen base (left alone) and
    fp32 adapters (the LoraLinear factors get compute copies), against the reference path."""
    from deepseekmoe import ModelConfig, Transformer
    from deepseekmoe.model.lora import LoraConfig, apply_lora
    from tests.helpers import TINY
    from tests.test_train_step_fast import _compare, _run

    def lora_model():
        torch.manual_seed(0)
        m = Transformer(ModelConfig(vocab_size=64, expert_backend="grouped", **TINY)).requires_grad_(False)
        for p in m.parameters():
            p.data = p.data.bfloat16()
        apply_lora(m, LoraConfig(), seed=0)  # dropout 0.1: the same RNG draws on both paths
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return m

    ref, got = _run(lora_model(), fast=False), _run(lora_model(), fast=True)
    assert len(ref[1]) > 0 and all("lora" in k for k in ref[1])
    _compare(ref, got)
