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

A collective that times out names the knob (`parallel.timeout_s`) and its value: a hung rank
(a deadlock, a stuck filesystem) is only noticed then. Under torchrun, the elastic agent sends
SIGTERM to every surviving worker as soon as one fails (clusters send it before preempting), often
before the survivors reach their next collective; `fail_fast` turns that signal too into one line
naming the last complete checkpoint, instead of a silent exit. (A rank blocked inside a C++
collective runs the handler only when the call returns.)

A hung rank is noticed long before the timeout: `fail_fast` runs a `Watchdog` thread that the
trainer beats (`heartbeat(step)`) once per optimizer step and around validation and checkpoints;
from the first beat on (building and loading come before it), after `warn_after` seconds without a
beat (default max(60 s, timeout_s / 5)) it prints one line per stall, re-armed by the next beat.
It adds no collective.

While the trainer loop runs, its own SIGINT / SIGTERM handler takes precedence over fail_fast's:
the ranks agree on a step, save a checkpoint and exit 130 / 143 with the resume command (see
train/recovery.py). A rank that got the signal (`signalled`) is stuck when no beat follows for
`GIVE_UP_S` (20 s, under the 30 s after which torchrun's agent SIGKILLs the workers it SIGTERMed):
the watchdog then prints fail_fast's signal line naming the last checkpoint and exits 128 + signal.

Checkpoints stay consistent because a checkpoint directory only appears once every rank has
written its shards (see checkpoint/dcp.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from deepseekmoe.errors import UserError


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


GIVE_UP_S = 20.0  # a signalled rank with no progress for this long is stuck (see the top)


class Watchdog:
    """A daemon thread that prints one line when no `beat` came for `warn_after` seconds (once per
    stall), and ends the process when no beat came for `give_up` seconds after a signal."""

    def __init__(self, what: str, warn_after: float, timeout_s: float | None,
                 last_checkpoint: Callable[[], str | None]):
        self.what, self.warn_after, self.timeout_s, self.newest = what, warn_after, timeout_s, last_checkpoint
        self.last, self.step, self.warned, self.signum = None, None, False, None  # armed by the first beat
        self.give_up, self.signal_at = min(warn_after, GIVE_UP_S), None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="deepseekmoe-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int | None = None) -> None:
        self.last, self.warned = time.monotonic(), False
        if step is not None:
            self.step = step

    def signalled(self, signum: int) -> None:
        self.signum, self.signal_at = signum, time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.warn_after / 4)):
            now = time.monotonic()
            if self.signum is not None and now - max(self.last or 0.0, self.signal_at) >= self.give_up:
                # signalled, then no progress: stuck in a collective, the stop cannot finish
                print(signal_message(self.signum, self.what, self.newest()), file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(128 + self.signum)
            if self.last is not None and now - self.last >= self.warn_after and not self.warned:
                self.warned = True
                print(stall_message(now - self.last, self.step, self.timeout_s), file=sys.stderr, flush=True)


_watchdog: Watchdog | None = None


def heartbeat(step: int | None = None) -> None:
    """The trainer made progress (at `step`): re-arm the stall notice. A no-op without fail_fast."""
    if _watchdog is not None:
        _watchdog.beat(step)


def signalled(signum: int) -> None:
    """The trainer's stop handler got `signum`: from now on a stall ends the process (see Watchdog)."""
    if _watchdog is not None:
        _watchdog.signalled(signum)


def default_warn_after(timeout_s: float | None) -> float:
    return max(60.0, (timeout_s or 0) / 5)


def stall_message(idle: float, step: int | None, timeout_s: float | None) -> str:
    at = f"at step {step}" if step is not None else "before the first step"
    limit = f"parallel.timeout_s={timeout_s:g} s" if timeout_s else "parallel.timeout_s"
    return (f"deepseekmoe: rank {rank()}/{world_size()}: no progress for {idle:.0f} s {at} (waiting in a collective? "
            f"a peer rank may be hung or slow); the job aborts after {limit}")


def _checkpoint_clause(last_checkpoint: str | None) -> str:
    return f"last complete checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"


def failure_message(exc: BaseException, what: str, last_checkpoint: str | None, timeout_s: float | None = None) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "timed out" in detail.lower() or "timeout" in type(exc).__name__.lower():
        limit = f"parallel.timeout_s={timeout_s:g} s" if timeout_s else "parallel.timeout_s"
        cause = (f"a peer rank did not reach this collective within {limit} (it is hung, or much slower: "
                 "raise --parallel.timeout_s if its steps or saves really take that long)")
    else:
        cause = "a peer rank probably died or timed out"
    return (f"deepseekmoe: rank {rank()}/{world_size()}: {what} failed in a collective ({type(exc).__name__}: "
            f"{detail[:300]}); {cause}, so this job stops now; {_checkpoint_clause(last_checkpoint)}")


def signal_message(signum: int, what: str, last_checkpoint: str | None) -> str:
    return (f"deepseekmoe: rank {rank()}/{world_size()}: {what} stopped by {signal.Signals(signum).name} (torchrun "
            "sends it to every rank when one fails; a cluster before preempting the job); "
            f"{_checkpoint_clause(last_checkpoint)}")


@contextlib.contextmanager
def fail_fast(what: str = "training", last_checkpoint: Callable[[], str | None] | None = None,
              exit_code: int = 1, timeout_s: float | None = None, warn_after: float | None = None,
              passthrough: tuple[type[BaseException], ...] = ()):
    """Run a distributed job's body; on an error from a collective (or any other non-user error
    while several ranks run), print the traceback and one summary line, and exit at once. SIGTERM
    prints the same kind of line and exits 143. `timeout_s` is the process group's timeout, named
    in the message when a collective times out. While several ranks run, a Watchdog prints a line
    after `warn_after` seconds without a `heartbeat` (default: default_warn_after(timeout_s)).

    UserError, KeyboardInterrupt and the `passthrough` exceptions pass through (the CLI reports
    them); in a single process nothing is caught."""
    global _watchdog
    newest = last_checkpoint or (lambda: None)

    def on_sigterm(signum, frame):
        print(signal_message(signum, what, newest()), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)

    handle = world_size() > 1 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if handle else None
    outer = _watchdog
    if world_size() > 1:
        _watchdog = Watchdog(what, warn_after or default_warn_after(timeout_s), timeout_s, newest)
    try:
        yield
    except (UserError, KeyboardInterrupt, *passthrough):
        raise
    except Exception as e:
        if world_size() <= 1:
            raise
        traceback.print_exc(file=sys.stderr)
        print(failure_message(e, what, newest(), timeout_s), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)
    finally:
        if _watchdog is not outer:
            _watchdog.stop()
            _watchdog = outer
        if handle:
            signal.signal(signal.SIGTERM, previous)
