"""DCP checkpoints across world sizes, and failing fast when a rank dies.

- A checkpoint saved by 4 ranks (dp2 x ep2) resumes on 2 ranks (ep2) and in one plain process
  with the same loss trajectory as the uninterrupted 4-rank run.
- A rank killed (SIGKILL) in the middle of writing a checkpoint makes the survivor exit non-zero
  within seconds with a clear message; the previous checkpoint stays complete and loadable and
  the torn one is never mistaken for a checkpoint.
"""

from __future__ import annotations

import time

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.checkpoint import dcp as ckpt
from deepseekmoe.checkpoint.files import temp_name
from deepseekmoe.errors import CheckpointError
from tests.dist_utils import run_ranks
from tests.helpers import tiny_cfg

STEPS, SAVE_AT, GLOBAL_BATCH, SEQ = 4, 2, 8, 12


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _train(model, opt, steps, dp_rank=0, dp_size=1):
    """Train on the given steps of the fixed stream; return the global loss of each step."""
    import torch.distributed as dist

    from deepseekmoe.parallel import clip_grad_norm_

    losses = []
    b = GLOBAL_BATCH // dp_size
    for step in steps:
        ids = _batches()[step][dp_rank * b:(dp_rank + 1) * b]
        loss = model(ids, labels=ids).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dp_size
        losses.append(loss.item())
    return losses


def _setup(dp, ep, seed):
    from deepseekmoe.parallel import ParallelConfig, build_mesh, parallelize

    torch.manual_seed(seed)
    pcfg = ParallelConfig(dp=dp, ep=ep)
    mesh = build_mesh(pcfg, "cpu")
    model = parallelize(Transformer(tiny_cfg(2)), mesh, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt, mesh


def save_then_continue(rank, world, path):
    model, opt, mesh = _setup(dp=2, ep=2, seed=0)
    args = (mesh.data_parallel_rank, mesh.data_parallel_size)
    losses = _train(model, opt, range(SAVE_AT), *args)
    ckpt.save(path, model, opt, {"step": SAVE_AT})
    return losses + _train(model, opt, range(SAVE_AT, STEPS), *args)


def resume(rank, world, path):
    model, opt, mesh = _setup(dp=1, ep=2, seed=123)  # other init: the load must overwrite it
    extra = ckpt.load(path, model, opt)
    return _train(model, opt, range(extra["step"], STEPS), mesh.data_parallel_rank, mesh.data_parallel_size)


def test_checkpoint_from_4_ranks_resumes_on_2_ranks_and_1_process(tmp_path):
    path = str(tmp_path / "step2")
    full = run_ranks(save_then_continue, 4, path, timeout=150)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2"]  # no .partial left behind
    assert ckpt.verify(path) == {"step": SAVE_AT}
    on_two = run_ranks(resume, 2, path, timeout=120)[0]
    torch.manual_seed(99)
    model = Transformer(tiny_cfg(2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    extra = ckpt.load(path, model, opt)
    assert extra == {"step": SAVE_AT}
    # The same weights as a native model directory (what convert / generate read).
    from deepseekmoe.checkpoint.native import load_native

    _, native = load_native(ckpt.export_native(path, tiny_cfg(2), tmp_path / "native"))
    for n, p in model.state_dict().items():
        assert torch.equal(native[n], p), n
    on_one = _train(model, opt, range(SAVE_AT, STEPS))
    expected = full[SAVE_AT:]
    assert len(on_two) == len(on_one) == len(expected) == STEPS - SAVE_AT
    for got in (on_two, on_one):
        for a, b in zip(got, expected):
            assert abs(a - b) <= 1e-5 * abs(b), f"resumed losses {got} vs uninterrupted {expected}"
    # The trajectory really moves (a resume that ignored the optimizer state would not match).
    assert abs(full[-1] - full[SAVE_AT - 1]) > 1e-3


def die_while_saving(rank, world, root):
    """Both ranks train; checkpoint 1 completes; rank 1 is SIGKILLed after writing its shards of
    checkpoint 2, while rank 0 waits for it. Returns nothing: fail_fast must end rank 0."""
    import os
    import signal

    from deepseekmoe.parallel.launch import fail_fast

    model, opt, mesh = _setup(dp=1, ep=2, seed=0)
    last = []
    with fail_fast("training", last_checkpoint=lambda: last[-1] if last else None):
        for step in range(1, 3):
            _train(model, opt, [step - 1], mesh.data_parallel_rank, mesh.data_parallel_size)
            if step == 2 and rank == 1:
                real_save = ckpt.dcp.save

                def save_and_die(*a, real_save=real_save, **k):
                    real_save(*a, **k)
                    os.kill(os.getpid(), signal.SIGKILL)

                ckpt.dcp.save = save_and_die
            path = f"{root}/step{step}"
            ckpt.save(path, model, opt, {"step": step})
            last.append(path)
            if step == 2:
                time.sleep(60)  # not reached: the peer is dead
    return "finished"


def test_dead_rank_fails_fast_and_last_checkpoint_loads(tmp_path):
    t0 = time.monotonic()
    results = run_ranks(die_while_saving, 2, str(tmp_path), timeout=90, pg_timeout=30, check=False)
    killed, survivor = results[1], results[0]
    assert killed.exitcode == -9, killed
    assert survivor.exitcode == 1, survivor
    # The survivor ended within a few seconds of its peer, long before the 30 s collective timeout.
    assert survivor.elapsed - killed.elapsed < 20, (survivor.elapsed, killed.elapsed, time.monotonic() - t0)
    assert "a peer rank probably died or timed out" in survivor.stderr
    assert f"last complete checkpoint: {tmp_path}/step1" in survivor.stderr
    # step2 never became a checkpoint; step1 is complete and loads in one process.
    partial = temp_name(tmp_path / "step2", ckpt.PARTIAL_TAG)  # .step2.partial.tmp: a temporary by name
    assert not (tmp_path / "step2").exists() and partial.exists()
    with pytest.raises(CheckpointError, match="unfinished save"):
        ckpt.load(partial, Transformer(tiny_cfg(2)))
    # A truncated shard of a complete checkpoint is named, not loaded.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "step1", broken)
    shard = sorted(broken.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"truncated: shard {shard.name}"):
        ckpt.load(broken, Transformer(tiny_cfg(2)))
    model = Transformer(tiny_cfg(2))
    before = model.embed_tokens.weight.clone()
    assert ckpt.load(tmp_path / "step1", model) == {"step": 1}
    assert not torch.equal(before, model.embed_tokens.weight)
