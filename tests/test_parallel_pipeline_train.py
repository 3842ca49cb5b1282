"""Pipeline parallel in the trainer: real `torchrun -m deepseekmoe train --parallel.pp=2` jobs (gloo,
CPU) against the single-process trainer on the same data, and the layout checks.

The tiny config runs with batch-level expert balance (seq_aux off) and a device-level loss, so the
balance losses of every stage must reach the objective through AddAuxiliaryLoss and per global
micro-batch; 2 micro-batches per step (gradient accumulation = the schedule's micro-batches).

- 1F1B over 2 stages: per-step loss, LM loss, balance loss (and its expert / device split), expert
  load and validation loss to 1e-5, grad norm to 5e-5 (the single process uses torch's foreach
  norm, 1e-5 less accurate than the sum of squares; every stage's gradients count); only rank 0
  reports; the DCP checkpoint of step 2 resumes bit-exactly at pp=2 and in one process.
- Interleaved 1F1B (2 ranks x 2 virtual stages, one AdamW per stage module): same trajectory;
  its checkpoint resumes under plain 1F1B (another layout) on the same trajectory.
- pp=2 x ep=2 on 4 ranks: same trajectory.
- In-process ranks: bad layouts stop with a ConfigError naming the value and leave nothing
  behind; a NaN loss on the last stage only is skipped on every rank.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseekmoe import cli
from deepseekmoe.errors import ConfigError
from deepseekmoe.model import presets
from deepseekmoe.parallel import ParallelConfig
from deepseekmoe.parallel.pipeline import check_layout, split_layers
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--train.steps=4", "--train.batch_size=4", "--train.micro_batch_size=2", "--train.seq_len=32",
         "--eval.every=0", "--eval.max_batches=2", "--checkpoint.every=2", "--checkpoint.keep=3", "--log.every=1",
         "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0",
         "--system.device=cpu", "--model.seq_aux=false", "--model.device_balance_alpha=0.05",
         "--model.n_device_groups=2"]
MODEL = dict(seq_aux=False, device_balance_alpha=0.05, n_device_groups=2)
KEYS = ("loss", "lm_loss", "balance_loss", "expert_balance_loss", "device_balance_loss")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run) if r["kind"] == "train"}


def _val(run: Path) -> float:
    return [r["val_loss"] for r in _records(run) if r["kind"] == "eval"][-1]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "deepseekmoe", "train", *args, "--parallel.timeout_s=60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def assert_matches(got: dict[int, dict], ref: dict[int, dict], steps, keys=KEYS, load: bool = True, what: str = ""):
    assert sorted(got) == list(steps), what
    for s in steps:
        for k in keys:
            assert _close(got[s][k], ref[s][k], 1e-5), f"{what} step {s} {k}: {got[s][k]} vs one process {ref[s][k]}"
        assert _close(got[s]["grad_norm"], ref[s]["grad_norm"], 5e-5), f"{what} step {s} grad norm"
        if load:  # per MoE layer of the whole model, gathered from both stages
            assert got[s]["expert_load"] == pytest.approx(ref[s]["expert_load"], rel=1e-6), f"{what} step {s}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The single-process trainer on the same flags (2 micro-batches of 2 per step)."""
    from deepseekmoe.data import default_dataset

    default_dataset()  # prepare the shipped sample once, before several ranks look for it
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["train", "--out", str(out), *FLAGS]) == 0
    recs = _train(out)
    assert recs[1]["expert_balance_loss"] > 0 and recs[1]["device_balance_loss"] > 0  # both in the objective
    return out


def test_pp2_1f1b_matches_single_process_and_resumes(single, tmp_path):
    ref = _train(single)
    run = tmp_path / "pp2"
    proc = torchrun(2, "--out", str(run), *FLAGS, "--parallel.pp=2")
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 reports for the job
    assert "pipeline 1f1b over 2 stages (blocks 0-2 | 3-3), 2 micro-batches of 2" in proc.stderr
    got = _train(run)
    assert_matches(got, ref, [1, 2, 3, 4], what="pp2")
    assert _close(_val(run), _val(single), 1e-5)
    ckpt = run / "checkpoints" / "step_0000002"
    assert (ckpt / ".metadata").is_file() and sorted(p.name for p in ckpt.glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # each stage's rank wrote its own shard

    # Same layout: bit-exact continuation.
    again = tmp_path / "resumed"
    torchrun(2, "--resume", str(ckpt), "--out", str(again))
    cont = _train(again)
    assert sorted(cont) == [3, 4]
    for s in (3, 4):
        assert all(cont[s][k] == got[s][k] for k in (*KEYS, "grad_norm")), f"step {s}: {cont[s]} vs {got[s]}"
    assert _val(again) == _val(run)

    # One process (DCP load into the whole model): the single-process trajectory.
    one = tmp_path / "one"
    assert cli.main(["train", "--resume", str(ckpt), "--out", str(one), "--parallel.pp=1"]) == 0
    assert_matches(_train(one), ref, [3, 4], what="pp2 -> 1 process")

    # Both stages exported as one native model: the single-process run's final weights (1e-4:
    # Adam amplifies rounding in near-zero gradient elements, see test_parallel_ep).
    from deepseekmoe.checkpoint.dcp import export_native
    from deepseekmoe.checkpoint.native import load_native

    _, mine = load_native(export_native(run / "checkpoints" / "step_0000004", presets.get("tiny", **MODEL),
                                        tmp_path / "exported"))
    _, theirs = load_native(single / "checkpoints" / "step_0000004" / "model")
    assert mine.keys() == theirs.keys()
    for k, w in theirs.items():
        assert ((mine[k] - w).norm() / w.norm()).item() < 1e-4, k


def test_interleaved_matches_and_resumes_under_1f1b(single, tmp_path):
    ref = _train(single)
    run = tmp_path / "interleaved"
    proc = torchrun(2, "--out", str(run), *FLAGS, "--parallel.pp=2", "--parallel.pp_schedule=interleaved",
                    "--parallel.pp_stages_per_rank=2", "--train.steps=3")
    assert "pipeline interleaved1f1b over 4 stages (blocks 0-0 | 1-1 | 2-2 | 3-3)" in proc.stderr
    assert_matches(_train(run), ref, [1, 2, 3], what="interleaved")
    # Two stage modules (and AdamWs) per rank -> one per rank: DCP reshards by parameter name.
    other = tmp_path / "1f1b"
    torchrun(2, "--resume", str(run / "checkpoints" / "step_0000002"), "--out", str(other),
             "--parallel.pp_schedule=1f1b", "--parallel.pp_stages_per_rank=1", "--train.steps=4")
    assert_matches(_train(other), ref, [3, 4], what="interleaved -> 1f1b")


def test_pp2_ep2_on_4_ranks_matches(single, tmp_path):
    """Each pipeline stage is 2 expert-parallel ranks (all-to-all, FSDP over both, balance counts
    summed over them); each reads 1 of the 2 rows of every global micro-batch."""
    ref = _train(single)
    run = tmp_path / "pp2ep2"
    torchrun(4, "--out", str(run), *FLAGS, "--parallel.pp=2", "--parallel.ep=2", "--train.micro_batch_size=1",
             "--train.steps=3", "--checkpoint.every=0")
    # The expert / device split and the expert load are computed from rank 0's own tokens under EP.
    assert_matches(_train(run), ref, [1, 2, 3], keys=("loss", "lm_loss", "balance_loss"), load=False,
                   what="pp2 x ep2")


# ---------------------------------------------------------------------------- in-process ranks
BASE = ["--train.steps=3", "--train.batch_size=4", "--train.micro_batch_size=2", "--train.seq_len=32",
        "--eval.every=0", "--eval.max_batches=1", "--checkpoint.every=0", "--log.every=1", "--log.progress=false",
        "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0", "--system.device=cpu",
        "--parallel.pp=2"]
BAD = {  # override -> words the message must contain
    "--parallel.pp_stages_per_rank=3 --parallel.pp_schedule=interleaved": ["6 pipeline stages", "4 blocks"],
    "--train.micro_batch_size=0 --train.batch_size=6": ["batch_size=6", "4 pipeline micro-batches"],
    "--parallel.pp_microbatches=3": ["pp_microbatches=3", "gives 2 micro-batches"],
    "--train.micro_batch_size=4": ["'1f1b' needs at least one micro-batch per stage", "got 1"],
    "--model.tie_word_embeddings=true": ["tie_word_embeddings"],
}


def layout_worker(rank, world, out_root):
    import deepseekmoe.parallel.pipeline as pl
    import deepseekmoe.train.trainer as tr
    from deepseekmoe.train import recipe

    os.environ["WORLD_SIZE"] = str(world)  # what torchrun sets; the process group exists already
    errors = {}
    for i, extra in enumerate(BAD):
        cfg = recipe.build(None, [tuple(f[2:].split("=", 1)) for f in BASE + extra.split()])
        try:
            tr.Trainer(cfg, run_dir=Path(out_root) / f"bad{i}")
        except ConfigError as e:
            errors[extra] = str(e)
    # A NaN LM loss on the last stage in the third optimizer step (0-based step 2) only.
    step = {"now": -1}
    set_lr, loss_fn = tr.Schedule.set, pl.lm_loss

    def set_and_note(self, opt, s):
        step["now"] = s
        return set_lr(self, opt, s)

    tr.Schedule.set = set_and_note
    pl.lm_loss = lambda logits, labels: loss_fn(logits, labels) * (float("nan") if step["now"] == 2 else 1.0)
    cfg = recipe.build(None, [tuple(f[2:].split("=", 1)) for f in BASE + ["--train.steps=4"]])
    trainer = tr.Trainer(cfg, run_dir=Path(out_root) / "nan", echo=lambda s: None)
    trainer.run()
    finite = all(bool(p.detach().isfinite().all()) for m in trainer.pipe.modules for p in m.parameters())
    return errors, finite, trainer.pipe.has_last


def test_bad_layouts_and_nonfinite_skip_on_every_stage(tmp_path):
    from deepseekmoe.data import default_dataset

    default_dataset()
    results = run_ranks(layout_worker, 2, str(tmp_path), timeout=150)
    for errors, finite, _ in results:
        assert sorted(errors) == sorted(BAD), errors
        for extra, words in BAD.items():
            assert all(w in errors[extra] for w in words), f"{extra}: {errors[extra]}"
        assert finite  # no rank applied the NaN gradients
    assert [last for *_, last in results] == [False, True]  # rank 0 never saw the NaN loss itself
    assert not any((tmp_path / f"bad{i}").exists() for i in range(len(BAD)))  # nothing half-written
    recs = _records(tmp_path / "nan")
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [3]
    train = _train(tmp_path / "nan")
    assert sorted(train) == [1, 2, 4] and all(math.isfinite(r["loss"]) for r in train.values())


# ---------------------------------------------------------------------------- layouts, no ranks
def test_check_layout_refuses_what_pp_cannot_split():
    tiny = presets.get("tiny")
    with pytest.raises(ConfigError, match="router='hash'"):
        check_layout(presets.get("hash-2b"), ParallelConfig(pp=2), 4)
    with pytest.raises(ConfigError, match="multiple of 2 micro-batches"):
        check_layout(tiny, ParallelConfig(pp=2, pp_schedule="interleaved", pp_stages_per_rank=2), 5)
    check_layout(tiny, ParallelConfig(pp=2, pp_schedule="interleaved", pp_stages_per_rank=2), 3)  # 1 round
    check_layout(tiny, ParallelConfig(pp=4, pp_schedule="gpipe"), 1)  # GPipe takes any count
    with pytest.raises(ConfigError, match="pp_microbatches=-1"):
        ParallelConfig(pp_microbatches=-1).validate()


def test_145b_recipe_layout():
    """The recipe's pp 4 x ep 4 x dp 4 on 64 GPUs: a valid layout, 144 micro-batches of 2 per
    step for each of the 16 data-parallel ranks, stages balanced by training FLOPs."""
    from deepseekmoe.train import recipe

    cfg = recipe.build("deepseekmoe-145b")
    pc, mc = cfg.parallel, cfg.model_config()
    assert (pc.pp, pc.ep, pc.pp_schedule) == (4, 4, "1f1b") and pc.resolve(64) == (4, 4, 4)
    assert mc.n_device_groups == pc.ep  # the device-level loss's D is the real expert placement
    W = pc.resolve(64)[1] * pc.ep
    accum = cfg.train.batch_size // (cfg.train.micro_batch_size * W)
    assert accum * cfg.train.micro_batch_size * W == cfg.train.batch_size == 4608 and accum == 144
    check_layout(mc, pc, accum)
    assert [len(s) for s in split_layers(mc, pc.pp, cfg.train.seq_len)] == [16, 16, 16, 14]
