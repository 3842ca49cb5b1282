"""Training metrics: metrics.jsonl, the terminal progress bar, TensorBoard, the loss-curve PNG.

Also the numbers that need the hardware: MFU (achieved model FLOP/s over the device's peak) and
per-layer expert load, counted on the device without a host sync per step, and `StepMeter`, the
sums of the step terms between two train records (the host reads them once per record). The expert- and
device-level balance losses are logged as the model returns them (ModelOutput), i.e. exactly the
terms that are trained.

metrics.jsonl holds one JSON object per line with a "kind":
  train     step, loss (total objective), lm_loss, balance_loss (+ expert_balance_loss and
            device_balance_loss when both exist), grad_norm, lr, tokens, tokens_per_s, mfu,
            expert_load (per MoE layer: max / mean tokens per expert over the interval)
  eval      step, val_loss, val_bpb (bits per UTF-8 byte of the source text)
  nonfinite step whose loss or gradient was NaN/inf (the update was skipped)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deepseekmoe.checkpoint.files import atomic_write_bytes, atomic_write_text, write_error

if TYPE_CHECKING:
    from deepseekmoe.train.step import StepStats

# Dense bf16 tensor-core peak FLOP/s by device name (substring match, most specific first). The
# SXM figures; PCIe/NVL parts are lower, so MFU there reads slightly optimistic.
PEAK_BF16 = [
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("H800", 989e12), ("H20", 148e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("L40S", 362e12),
    ("L4", 121e12), ("4090", 165e12), ("V100", 125e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when unknown (CPUs: MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


class ExpertLoad:
    """Tokens per routed expert, per MoE layer, accumulated on the device (no sync until read).

    Routing is read from each MoE layer's `last_routing` (Transformer.set_routing(record=True)),
    which holds detached expert ids of the last forward. With `tape=True` (pipeline parallel,
    where one schedule step runs every micro-batch) `snapshot(layers)` keeps the ids of the given
    layers after each micro-batch's forward instead, and `update(last=n)` counts the last n of
    them (dropping the schedule's shape-inference forward)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, tape: bool = False):
        self.layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.counts = [torch.zeros(m.cfg.n_routed_experts, dtype=torch.int64, device=device) for m in self.layers]
        self.tape: list[list[torch.Tensor]] | None = [[] for _ in self.layers] if tape else None

    def __bool__(self) -> bool:
        return bool(self.layers)

    def snapshot(self, layers) -> None:
        wanted = {id(m) for m in layers}
        for moe, kept in zip(self.layers, self.tape):
            if id(moe) in wanted and moe.last_routing is not None:
                kept.append(moe.last_routing.idx_TK)

    def update(self, last: int | None = None) -> None:
        for i, (moe, c) in enumerate(zip(self.layers, self.counts)):
            if self.tape is not None:
                ids, self.tape[i] = (self.tape[i][-last:] if last else self.tape[i]), []
            else:
                ids = [moe.last_routing.idx_TK] if moe.last_routing is not None else []
            for idx in ids:
                idx = idx.reshape(-1)
                c.scatter_add_(0, idx, torch.ones_like(idx))

    def read_and_reset(self) -> list[float]:
        """max / mean tokens per expert for each layer (1.0 = perfectly balanced)."""
        out = []
        for c in self.counts:
            total = c.sum().item()
            out.append(round(c.max().item() / (total / c.numel()), 3) if total else float("nan"))
            c.zero_()
        return out


class StepMeter:
    """The step terms summed on the device between two train records, and the tokens/s interval.

    `add` after each applied update, `count_tokens` after every step (skipped ones included),
    `record` builds the train record's averages and clears the sums, `restart` begins a new
    tokens/s interval (after a record, and after evaluation or a save, which it leaves out)."""

    def __init__(self, device: torch.device):
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "lm", "bal", "gnorm", "exp", "devb")}
        self.n = 0
        self.restart()

    def restart(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def count_tokens(self, n: int) -> None:
        self.tokens += n

    def add(self, stats: StepStats, grad_norm: torch.Tensor) -> None:
        self.sums["loss"] += stats.loss
        self.sums["gnorm"] += grad_norm.float()
        for k, t in (("lm", stats.lm), ("bal", stats.balance), ("exp", stats.expert), ("devb", stats.device)):
            self.sums[k] += t
        self.n += 1

    def tokens_per_s(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else float("nan")

    def record(self, step: int, lr: float, tokens: int, tps: float, balance_split: bool) -> dict:
        """The train record's leading fields (metrics.jsonl's order); the sums start again."""
        a, n = self.sums, self.n
        rec = {"kind": "train", "step": step, "loss": float(a["loss"]) / n, "lm_loss": float(a["lm"]) / n,
               "balance_loss": float(a["bal"]) / n, "grad_norm": float(a["gnorm"]) / n, "lr": lr,
               "tokens": tokens, "tokens_per_s": round(tps, 1)}
        if balance_split:
            rec["expert_balance_loss"] = float(a["exp"]) / n
            rec["device_balance_loss"] = float(a["devb"]) / n
        for t in a.values():
            t.zero_()
        self.n = 0
        return rec


def format_train_record(rec: dict, total: int) -> str:
    """One terminal line for a train record."""
    s = (f"step {rec['step']:>{len(str(total))}}/{total} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
         f"bal {rec['balance_loss']:.4f} | gnorm {rec['grad_norm']:.2f} | lr {rec['lr']:.2e} | "
         f"{rec['tokens_per_s'] / 1e3:.1f}K tok/s")
    if "mfu" in rec:
        s += f" | MFU {100 * rec['mfu']:.1f}%"
    if rec.get("expert_load"):
        s += " | load " + "/".join(f"{x:.2f}" for x in rec["expert_load"])
    return s


class MetricsLogger:
    """Writes metrics.jsonl (append, flushed per record), TensorBoard events (when tensorboard is
    installed; without it the terminal says so once and metrics.jsonl alone is written), and drives
    the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True,
                 tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # not installed: say so once; any other failure is raised
                print(f"TensorBoard logs are off: {e} (pip install tensorboard, or set --log.tensorboard=false); "
                      f"metrics go to {self.path}", file=sys.stderr, flush=True)
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        try:  # unbuffered: a record is on disk (or refused) when write returns, nothing waits in a buffer
            self.file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise write_error(e, self.path, self._fix) from e
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, leave=True)

    @property
    def _fix(self) -> str:
        return f"free space (or fix the path) and continue with --resume {self.path.parent}"

    def write(self, record: dict) -> None:
        """Append one record, whole or not at all: a failed write (a full disk) is cut back to the
        previous end of the file and raised as WriteError naming the resume command."""
        line = (json.dumps(record, allow_nan=True) + "\n").encode("utf-8")
        fd = self.file.fileno()
        end = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(line):  # an unbuffered write may take part of the line
                done += self.file.write(line[done:])
        except OSError as e:
            with contextlib.suppress(OSError):  # the error to report is the one being raised
                os.ftruncate(fd, end)
            raise write_error(e, self.path, self._fix) from e
        if self.tb is not None:
            step = record.get("step", 0)
            prefix = {"train": "train", "eval": "val", "nonfinite": "train"}.get(record.get("kind"), "misc")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
                elif k == "expert_load" and isinstance(v, list):
                    for i, x in enumerate(v):
                        if math.isfinite(x):
                            self.tb.add_scalar(f"expert_load/moe_layer_{i}", x, step)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if not self.file.closed:
            self.file.close()


class SilentLogger:
    """The metrics logger of ranks other than 0: rank 0 alone writes and prints."""

    def write(self, record: dict) -> None:
        pass

    def advance(self, n: int = 1, **postfix) -> None:
        pass

    @staticmethod
    def print(line: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep records up to `last_step` (resuming from that checkpoint re-creates the rest)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Training loss (and validation loss) against step, as a PNG (matplotlib, Agg backend)."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["lm_loss"]) for r in records if r.get("kind") == "train"
             and isinstance(r.get("lm_loss"), float) and math.isfinite(r["lm_loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train LM loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)
