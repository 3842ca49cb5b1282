"""Spawn gloo ranks from pytest and collect what each returns (OLMo-core style distributed tests).

`run_ranks(fn, world_size, *args)` starts `world_size` fresh processes (spawn, not fork: the
parent may hold threads), joins them over a FileStore (no port races between parallel test
runs), calls `fn(rank, world_size, *args)` in each, and returns the list of their return values.
A rank that raises makes the call fail with that rank's traceback; a job that outlives
`timeout` is killed and reported. Unlike torch.multiprocessing.spawn, nothing is torn down when
one rank exits, so a test can kill a rank and watch how the others end (`check=False` returns
`RankResult`s with exit codes and elapsed times instead of raising).

`fn` must be importable by name (a module-level function of a test module or of this file).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: still running when the timeout hit (then killed)
    elapsed: float  # seconds from start until this process ended
    value: object = None
    error: str = ""  # traceback of an exception raised by fn
    stderr: str = ""  # everything the rank wrote to stderr


def _entry(fn, rank: int, world: int, store_path: str, out_dir: str, timeout_s: float, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out_dir)
    # The rank's stderr goes to a file the parent reads back (messages of ranks that exit early).
    log = os.open(out / f"{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world, *args)
        (out / f"{rank}.pkl").write_bytes(pickle.dumps(value))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent, then fail
        (out / f"{rank}.err").write_text("".join(traceback.format_exception(e)))
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the value is written; a failed teardown goes to the rank's log
        print(f"rank {rank}: destroy_process_group failed: {e!r}", file=sys.stderr)
    os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0,
              check: bool = True):
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return their values in rank order
    (or, with check=False, a RankResult per rank)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store_path, tmp, pg_timeout, args))
                 for r in range(world_size)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        ended: dict[int, float] = {}
        while len(ended) < world_size and time.monotonic() - t0 < timeout:
            for r, p in enumerate(procs):
                if r not in ended and not p.is_alive():
                    ended[r] = time.monotonic() - t0
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        results = []
        for r, p in enumerate(procs):
            pkl, err, log = Path(tmp, f"{r}.pkl"), Path(tmp, f"{r}.err"), Path(tmp, f"{r}.log")
            value = pickle.loads(pkl.read_bytes()) if pkl.exists() else None
            results.append(RankResult(r, p.exitcode if r in ended else None, ended.get(r, float("inf")),
                                      value, err.read_text() if err.exists() else "",
                                      log.read_text(errors="replace") if log.exists() else ""))
    if not check:
        return results
    bad = [res for res in results if res.exitcode != 0]
    if bad:
        msg = "\n".join(f"--- rank {res.rank}: exit {res.exitcode} after {res.elapsed:.1f}s\n"
                        f"{res.error or res.stderr[-3000:]}" for res in bad)
        raise AssertionError(f"distributed run failed (timeout {timeout}s):\n{msg}")
    return [res.value for res in results]
