"""Process-level helpers for distributed jobs: rank-0-only output, and failing fast (no hang) when a
peer rank dies.

A rank that dies (OOM kill, hardware fault, SIGKILL) leaves the others blocked in their next
collective. They get out of it one of two ways: the backend notices the closed connection (gloo:
at once; NCCL: its watchdog) or the process group's timeout (`ParallelConfig.timeout_s`) expires.
Either way an exception surfaces in the training loop; `fail_fast` turns it into one clear line
on stderr and a hard exit (status 1). The exit is `os._exit`, not `sys.exit`: a normal interpreter
exit runs atexit handlers that destroy the process group, which can block on the dead peer for
the very timeout we are trying not to wait for. Under torchrun the elastic agent also tears the
job down as soon as one worker exits non-zero.

Checkpoints stay consistent because a checkpoint directory only appears once every rank has
written its shards (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable

import torch.distributed as dist

from deepseekmoe.errors import UserError


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def failure_message(exc: BaseException, what: str, last_checkpoint: str | None) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    ckpt = f"last complete checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return (f"deepseekmoe: rank {rank()}/{world_size()}: {what} failed in a collective ({type(exc).__name__}: "
            f"{detail[:300]}); a peer rank probably died or timed out, so this job stops now; {ckpt}")


@contextlib.contextmanager
def fail_fast(what: str = "training", last_checkpoint: Callable[[], str | None] | None = None,
              exit_code: int = 1):
    """Run a distributed job's body; on an error from a collective (or any other non-user error
    while several ranks run), print the traceback and one summary line, and exit at once.

    UserError and KeyboardInterrupt pass through (the CLI reports them); in a single process
    nothing is caught."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        if world_size() <= 1:
            raise
        traceback.print_exc(file=sys.stderr)
        path = last_checkpoint() if last_checkpoint is not None else None
        print(failure_message(e, what, path), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)
