"""parallel/launch.py on gloo ranks: whichever rank dies, is hung or gets torchrun's SIGTERM, every
other rank ends with one line naming the last complete checkpoint (and, on a timeout, the knob); a
hung peer is announced by the watchdog before the timeout."""

from __future__ import annotations

import re
import time

from tests.dist_utils import run_ranks

CKPT = "runs/x/checkpoints/step_0000005"


def _job(rank, world, plan, warn_after=None):
    """One all-reduce, then `plan[rank]`: "die" (SIGKILL itself, after sending torchrun's SIGTERM to
    the ranks marked "term"), "hang" (sleep past the peer's timeout), "term" (sleep until the SIGTERM)
    "wait" (the next all-reduce) or "stuck" (SIGTERM while the trainer's StopSignals handler is
    installed, then the next all-reduce). `warn_after`: the watchdog's stall notice."""
    import os
    import signal

    import torch
    import torch.distributed as dist

    from deepseekmoe.parallel.launch import fail_fast, heartbeat
    from deepseekmoe.train.recovery import StopSignals

    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    with fail_fast("training", last_checkpoint=lambda: CKPT, timeout_s=3, warn_after=warn_after):
        t = torch.ones(4)
        dist.all_reduce(t)
        heartbeat(7)
        if plan[rank] == "die":
            for r, p in enumerate(plan):
                if p == "term":
                    os.kill(pids[r], signal.SIGTERM)
            time.sleep(0.5)  # as torchrun does, the SIGTERM lands while the others are not in a collective
            os.kill(os.getpid(), signal.SIGKILL)
        if plan[rank] == "term":
            time.sleep(60)  # ended by the SIGTERM
        if plan[rank] == "hang":
            time.sleep(6)  # past the 3 s timeout of its peer's all-reduce
        with StopSignals(second_kills=False) as stop:
            if plan[rank] == "stuck":
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop.received == signal.SIGTERM  # recorded, not ended: the trainer would save now
            dist.all_reduce(t)
        time.sleep(60)  # not reached
    return "finished"


def test_rank0_dying_leaves_every_survivor_naming_the_last_checkpoint():
    t0 = time.monotonic()
    dead, failed, termed = run_ranks(_job, 3, ["die", "wait", "term"], timeout=60, pg_timeout=15, check=False)
    assert dead.exitcode == -9, dead
    assert failed.exitcode == 1, failed
    # gloo notices the closed socket at once, or (under load) only at the process group's timeout:
    # either way the survivor says why, in one line naming the checkpoint
    assert ("a peer rank probably died or timed out" in failed.stderr
            or "a peer rank did not reach this collective within parallel.timeout_s" in failed.stderr), failed.stderr
    assert "rank 1/3: training failed in a collective" in failed.stderr
    assert f"last complete checkpoint: {CKPT}" in failed.stderr
    assert termed.exitcode == 143, termed
    line = termed.stderr.strip().splitlines()[-1]
    assert line.startswith("deepseekmoe: rank 2/3: training stopped by SIGTERM (torchrun sends it"), line
    assert line.endswith(f"last complete checkpoint: {CKPT}"), line
    assert time.monotonic() - t0 < 45


def test_a_hung_rank_is_announced_early_then_reported_at_the_timeout_with_its_knob():
    # the peer hangs for 6 s; the process group's timeout is 3 s and the watchdog's notice comes
    # after 1 s without a heartbeat: both well inside the hang, however loaded the machine
    waiting, hung = run_ranks(_job, 2, ["wait", "hang"], 1.0, timeout=40, pg_timeout=3, check=False)
    assert waiting.exitcode == 1, waiting
    assert waiting.elapsed < hung.elapsed and hung.exitcode == 1  # woken up into a dead collective
    lines = waiting.stderr.strip().splitlines()
    notices = [i for i, s in enumerate(lines) if "no progress for" in s]
    assert len(notices) == 1, lines  # once per stall
    notice = lines[notices[0]]
    assert re.match(r"deepseekmoe: rank 0/2: no progress for \d+ s at step 7 \(waiting in a collective\? "
                    r"a peer rank may be hung or slow\)", notice), notice
    assert notice.endswith("the job aborts after parallel.timeout_s=3 s"), notice
    assert notices[0] < len(lines) - 1
    line = lines[-1]
    assert "a peer rank did not reach this collective within parallel.timeout_s=3 s" in line, line
    assert "raise --parallel.timeout_s" in line and line.endswith(f"last complete checkpoint: {CKPT}"), line


def test_a_signalled_rank_stuck_in_a_collective_is_ended_by_the_watchdog_naming_the_last_checkpoint():
    stuck, hung = run_ranks(_job, 2, ["stuck", "hang"], 1.0, timeout=40, pg_timeout=3, check=False)
    assert stuck.exitcode == 143, stuck
    assert "failed in a collective" not in stuck.stderr  # ended before the collective's 3 s timeout (exit 1)
    assert stuck.elapsed < hung.elapsed
    line = stuck.stderr.strip().splitlines()[-1]
    assert line.startswith("deepseekmoe: rank 0/2: training stopped by SIGTERM (torchrun sends it"), line
    assert line.endswith(f"last complete checkpoint: {CKPT}"), line
