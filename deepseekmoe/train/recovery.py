"""How a training run stops when it has to, leaving a way forward.

  Divergence    a finite loss that keeps growing: a logged training loss above
                `train.divergence_factor` x its running minimum for `train.divergence_steps`
                consecutive logged steps stops the run (DivergedError) naming the last checkpoint
                whose weights still gave a loss below that, which is kept out of pruning meanwhile
  StopSignals   SIGINT / SIGTERM: the trainer finishes the current step, saves a checkpoint and
                raises Interrupted, whose message is the exact resume command; the command exits
                128 + the signal number (130 / 143), as a shell reports the signal. Under torchrun
                each rank's "signal received" flag rides on the step's stats all-reduce, so every
                rank stops after the same step and the DCP save is collective as usual.
                A second signal acts as it would without the trainer (kill at once: the atomic
                checkpoint writes never leave a torn checkpoint behind); not under torchrun, where
                a cluster may signal each rank twice (directly and through the agent): there the
                watchdog ends a rank that stays stuck, and the agent SIGKILLs 30 s after its SIGTERM.
  restartable   a run directory with a config.toml but no checkpoint (stopped before its first
                save): `train --resume DIR` restarts it from step 0 with that config
  check_new_run_dir  a new run goes into a new or empty folder, never over a run or among
                unrelated files

Both are state the checkpoint carries (Divergence.state_dict) or nothing at all (signals), so a
resumed run detects exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.errors import ConfigError, UserError
from deepseekmoe.parallel.launch import signalled

# What a run directory holds (a new run refuses a folder holding anything else).
RUN_FILES = {"config.toml", "metrics.jsonl", "checkpoints", "loss.png", "tensorboard"}


class DivergedError(UserError):
    """The loss was NaN/inf for `train.max_nonfinite_steps` steps in a row, or stayed above
    `train.divergence_factor` x its running minimum for `train.divergence_steps` logged steps."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint has been saved and the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @classmethod
    def stopped(cls, signum: int | None, step: int, steps: int, ckpt: Path | None, run_dir: Path) -> Interrupted:
        """The stop after `step` (checkpoint `ckpt`; None: nothing trained). `signum` None: this rank
        got no signal, its peers did (SIGTERM, as torchrun or a cluster sends it to all ranks)."""
        signum = signum or signal.SIGTERM
        name = signal.Signals(signum).name
        if ckpt is None:
            return cls(signum, f"{name} received before step 1, nothing to save; restart with: deepseekmoe train "
                               f"--resume {run_dir}")
        return cls(signum, f"{name} received: stopped after step {step} of {steps}, checkpoint {ckpt} saved; "
                           f"continue with: deepseekmoe train --resume {run_dir}")


@dataclass
class Divergence:
    """The running minimum of the logged training loss, the current streak above factor x it, and
    which checkpoint is known good.

    The loss logged at step s is that of the weights saved at step s - 1, so a checkpoint is
    `pending` until the next logged loss judges it: below the threshold it becomes the `good` one,
    above it (the start of a streak) it is not. The good checkpoint is kept out of pruning until a
    newer one is confirmed (so up to one checkpoint more than checkpoint.keep during a run),
    except at the final save."""

    factor: float  # 0: off
    steps: int
    best: float = float("inf")
    streak: int = 0
    since: int = 0  # first step of the current streak
    good: str | None = None  # checkpoint names (step_NNNNNNN)
    pending: str | None = None

    def update(self, step: int, loss: float) -> bool:
        """Account one logged loss; True when the run has diverged."""
        if self.factor <= 0:
            return False
        if loss > self.factor * self.best:
            if self.streak == 0:
                self.since = step
            self.streak += 1
            self.pending = None
        else:
            self.streak = 0
            if self.pending:
                self.good, self.pending = self.pending, None
        self.best = min(self.best, loss)
        return self.streak >= self.steps

    def saved(self, ckpt: Path) -> None:
        """A checkpoint was written: judged by the next logged loss (none while the loss is up)."""
        if self.factor > 0 and self.streak == 0:
            self.pending = Path(ckpt).name

    def protected(self, final: bool) -> str | None:
        """The checkpoint the save about to happen must not prune: the good one (not at the
        final save of a run whose loss is not up: nothing is left to judge)."""
        return self.good if self.good and (self.streak or not final) else None

    def message(self, step: int, loss: float, lr: float, run_dir: Path, fresh: bool) -> str:
        """The stop message; `fresh`: the run directory holds no checkpoint at all."""
        fix = f"lower --optim.lr (now {lr:g}) or raise --train.divergence_factor (0 = off)"
        good = Path(run_dir) / "checkpoints" / self.good if self.good else None
        if good:
            where = f"the last good checkpoint (before the loss rose) is {good}; {fix}, then --resume {good}"
        elif fresh:
            where = f"no checkpoint was saved; {fix}, then --resume {run_dir} (restarts from step 0)"
        else:
            where = (f"no checkpoint was saved before the loss rose; {fix} and start again with another --out "
                     f"(or delete {run_dir})")
        return (f"the training loss diverged: {loss:.4g} at step {step}, above {self.factor:g} x its running "
                f"minimum {self.best:.4g} for {self.streak} consecutive logged steps (since step {self.since}); "
                f"stopped. {where}")

    def state_dict(self) -> dict:
        return {"best": self.best, "streak": self.streak, "since": self.since, "good": self.good,
                "pending": self.pending}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.streak, self.since = float(d["best"]), int(d["streak"]), int(d["since"])
        self.good, self.pending = d["good"], d["pending"]


class StopSignals:
    """`with StopSignals(on) as stop:` ... `stop.received` is the first SIGINT/SIGTERM's number (or
    None). Installed in the main thread only (and when `on`). The handler only records the signal
    (and tells the distributed watchdog, which ends a rank that then stays stuck: parallel/launch.py);
    the trainer decides when to stop. `second_kills`: a second signal restores the previous handlers
    at once (kill at once); otherwise every signal is only recorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on: bool = True, second_kills: bool = True):
        self.on = on and threading.current_thread() is threading.main_thread()
        self.second_kills = second_kills
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            signalled(signum)
        if not self.second_kills:
            return
        for s, h in self._previous.items():  # a second signal: the default behaviour, at once
            signal.signal(s, h)

    def __enter__(self) -> StopSignals:
        if self.on:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def restartable(run_dir: Path) -> bool:
    """A run directory that holds a run's config but no checkpoint (it stopped before its first
    save): `--resume` restarts it from step 0 with that config."""
    run_dir = Path(run_dir)
    return (run_dir / "config.toml").is_file() and not ckpt_io.list_checkpoints(run_dir)


def check_new_run_dir(run_dir: Path) -> None:
    """A new run goes into a new or empty directory, never over a run or among unrelated files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory; choose another --out")
    if restartable(run_dir):
        raise ConfigError(f"{run_dir} already holds a run that has no checkpoint yet; restart it from step 0 "
                          f"with --resume {run_dir}, or choose another --out")
    if ckpt_io.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose "
                          "another --out")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES) if run_dir.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"--out {run_dir} holds files that are not a training run ({shown}); choose a new or "
                          "empty directory")
