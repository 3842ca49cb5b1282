"""The training loop: one device, gradient accumulation, the paper's optimizer and schedules.

`train(cfg, run_dir, resume=None)` does, in order:
  1. resolve everything that can be wrong with the input (config, dataset, vocabulary) before a
     single file is written, so a bad input leaves no run directory behind;
  2. build the model on `meta`, lay it out (parallel runs), allocate what this rank keeps on its
     device and initialise it from `train.seed` (`Transformer.init_weights(seed=...)`: identical
     weights on any device and in any layout), AdamW and the schedule; restore a checkpoint when
     resuming;
  3. loop over optimizer steps: `grad_accum` micro-batches under bf16 autocast (GPU), gradient
     clipping, a finiteness check (a NaN/inf step is skipped and logged; too many in a row stop
     the run with the last good checkpoint intact), AdamW step; metrics every `log.every`,
     validation every `eval.every`, an atomic checkpoint every `checkpoint.every`;
  4. final validation, checkpoint, loss-curve PNG, a generated sample and the expert-load summary.

Under torchrun the same loop runs distributed through `deepseekmoe.parallel.runtime.Runtime`
(expert parallel + FSDP2; with `parallel.pp > 1` a pipeline whose schedule step runs the
`grad_accum` micro-batches, forward and backward, in place of the micro-batch loop).

Exact resume: the schedule is a function of the step, the data loader's position, the RNG states
and AdamW's state are all in the checkpoint, and on CPU the trainer turns on deterministic
kernels, so a run killed at any point and resumed reproduces the uninterrupted run's losses and
final weights bit for bit (tests/test_train_resume.py). On GPU, atomics in the MoE backward make
the last bits vary.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.checkpoint.files import atomic_write_text
from deepseekmoe.errors import ConfigError, DataError, UserError
from deepseekmoe.model.moe.router import device_loss_groups
from deepseekmoe.model.transformer import Transformer
from deepseekmoe.parallel.runtime import Runtime
from deepseekmoe.train.metrics import ExpertLoad, MetricsLogger, peak_flops, plot_losses, truncate_metrics
from deepseekmoe.train.optim import OptimizerList, Schedule, build_optimizer
from deepseekmoe.train.recipe import TrainConfig, to_toml


class DivergedError(UserError):
    """The loss (or gradient) stayed NaN/inf for `train.max_nonfinite_steps` steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None = None
    val_bpb: float | None = None
    checkpoint: Path | None = None
    sample: str | None = None
    expert_load: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0


def _data():
    from deepseekmoe import data  # the data helper's package (tokenizer, prepare, loader)

    return data


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"system.device={spec!r} but no CUDA GPU is visible; use --system.device=cpu")
    return dev


def _enable_activation_checkpointing(model: Transformer) -> None:
    # Instance-level forward wrapper: parameter names (and so checkpoints) stay unchanged.
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


# ---------------------------------------------------------------------------- setup
@dataclass
class _Data:
    path: Path
    meta: dict
    val_split: str


def _open_data(cfg: TrainConfig, vocab_size: int) -> _Data:
    data = _data()
    if cfg.data.path:
        path = Path(cfg.data.path)
    else:
        path = Path(data.default_dataset(progress=cfg.log.progress))
    meta = data.load_meta(path)  # DataError on a missing, unprepared or damaged directory
    splits = meta.get("splits", {})
    if not splits.get("train", {}).get("tokens"):
        raise DataError(f"{path}: the training split is empty; prepare the dataset from a non-empty corpus")
    if cfg.data.val_split not in splits:
        raise DataError(f"{path}: no split {cfg.data.val_split!r} for validation (has: {', '.join(splits)}); "
                        "set --data.val_split")
    data.check_vocab(meta, vocab_size)  # token ids beyond the model's vocabulary
    return _Data(path, meta, cfg.data.val_split)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, resume: Path | None = None,
                 echo=print):
        self.cfg = cfg
        self.echo = echo
        self.state: dict = {}
        if resume is not None:
            self.resume_from = ckpt_io.resolve(resume)
            self.state = ckpt_io.verify(self.resume_from)
            self.run_dir = Path(run_dir) if run_dir else self.resume_from.parent.parent
        else:
            self.resume_from = None
            self.run_dir = Path(run_dir) if run_dir else (Path(cfg.out) if cfg.out else default_run_dir(cfg))
            if ckpt_io.list_checkpoints(self.run_dir) or (self.run_dir / "metrics.jsonl").exists():
                raise ConfigError(f"{self.run_dir} already holds a run; continue it with --resume "
                                  f"{self.run_dir}, or choose another --out")
        cfg.validate()
        # Under torchrun: process group, mesh, this rank's device (else a no-op single process).
        self.rt = Runtime.from_env(cfg.parallel, "cpu" if cfg.system.device == "cpu" else None)
        self.run_dir = self.rt.broadcast(self.run_dir)  # rank 0's timestamped default name
        self.device = self.rt.device or resolve_device(cfg.system.device)
        if cfg.system.threads > 0:
            torch.set_num_threads(cfg.system.threads)
        dt = cfg.system.dtype
        self.amp_dtype = (torch.bfloat16 if (dt == "bfloat16" or (dt == "auto" and self.device.type == "cuda"))
                          else None)
        self.mcfg = cfg.model_config()
        if (cfg.system.compile and self.device.type == "cpu" and self.amp_dtype is None
                and self.mcfg.n_routed_experts and self.mcfg.expert_backend in ("auto", "grouped")):
            # torch.compile traces grouped_mm with a bf16-only meta function: fp32 CPU runs fail deep
            # inside the compiler at the first step.
            raise ConfigError("system.compile=true on CPU in float32 cannot trace the grouped expert GEMM "
                              "(torch's grouped_mm compiles in bf16 only); compile is meant for GPU runs: drop "
                              "it, or set --model.expert_backend=loop")
        self.data = _open_data(cfg, self.mcfg.vocab_size)
        W = self.rt.loader_world  # data-parallel ranks; each reads micro sequences per micro-step
        self.micro = cfg.train.micro_batch_size or cfg.train.batch_size // W
        if self.rt.pp > 1:
            from deepseekmoe.parallel.pipeline import check_layout

            check_layout(self.mcfg, cfg.parallel)  # stages vs. blocks, options pp cannot split
            if not cfg.train.micro_batch_size:
                self.micro = self._pipeline_micro(W)
        if self.micro < 1 or cfg.train.batch_size % (self.micro * W):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not a multiple of {W} data-parallel "
                              f"ranks x train.micro_batch_size={self.micro}; choose sizes that divide the batch")
        self.accum = cfg.train.batch_size // (self.micro * W)
        if self.rt.pp > 1:
            self._check_pipeline(W)

    def _pipeline_micro(self, W: int) -> int:
        """Sequences per micro-batch when pipelining without train.micro_batch_size: the batch of
        each data-parallel rank cut into parallel.pp_microbatches (default 2 x stages) pieces."""
        pc, bs = self.cfg.parallel, self.cfg.train.batch_size
        n_mb = pc.pp_microbatches or 2 * self.rt.pp * pc.pp_stages_per_rank
        if bs % (W * n_mb):
            raise ConfigError(f"train.batch_size={bs} does not split into {n_mb} pipeline micro-batches on each of "
                              f"{W} data-parallel rank(s): use a multiple of {W * n_mb}, or set "
                              "train.micro_batch_size (micro-batches = batch / (micro x data-parallel ranks))")
        return bs // (W * n_mb)

    def _check_pipeline(self, W: int) -> None:
        """Pipeline parallel: the micro-batches of one schedule step are the gradient-accumulation
        micro-batches, so parallel.pp_microbatches (if set) must agree; the layout must be one
        the model and torch's schedules can run (ConfigError before anything is built)."""
        from deepseekmoe.parallel.pipeline import check_layout

        pc = self.cfg.parallel
        if pc.pp_microbatches and pc.pp_microbatches != self.accum:
            raise ConfigError(f"parallel.pp_microbatches={pc.pp_microbatches}, but train.batch_size="
                              f"{self.cfg.train.batch_size} / (train.micro_batch_size={self.micro} x {W} data-"
                              f"parallel rank(s)) gives {self.accum} micro-batches per step; the pipeline runs the "
                              "gradient-accumulation micro-batches: set only one of the two, or make them agree")
        check_layout(self.mcfg, pc, self.accum)

    # ------------------------------------------------------------------ build
    def _build(self):
        cfg = self.cfg
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # also seeds every CUDA device
        # Built on `meta` (no memory), laid out, then only what this rank keeps is allocated on its
        # device and initialised from train.seed, one parameter at a time, each from its own
        # (seed, name) stream: one process and every parallel layout start from the same weights.
        with torch.device("meta"):
            model = Transformer(self.mcfg)
        model.set_routing(record=True)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.pipe = None
        if self.rt.pp > 1:
            # This rank's stages only (allocated on its device there), each EP -> act. ckpt ->
            # compile -> FSDP2 over its dp x ep ranks; one AdamW per stage module (DCP pairs them).
            self.pipe = self.rt.build_pipeline(model, self.accum, cfg.train.seq_len,
                                               cfg.system.activation_checkpointing, cfg.system.compile)
            del model
            for stage in self.pipe.modules:
                stage.init_weights(seed=cfg.train.seed)
            self.model = self.pipe
            self.optimizer = OptimizerList([build_optimizer(m, cfg.optim, self.device) for m in self.pipe.modules])
            self.ckpt_model, self.ckpt_optim = self.pipe.modules, self.optimizer.optimizers
        else:
            if self.rt.distributed:  # EP -> activation checkpointing -> compile -> FSDP2
                model = self.rt.parallelize(model, cfg.system.activation_checkpointing, cfg.system.compile)
            model.to_empty(device=self.device)  # this rank's shards only, uninitialised
            model.init_weights(seed=cfg.train.seed)
            if not self.rt.distributed:
                if cfg.system.activation_checkpointing:
                    _enable_activation_checkpointing(model)
                if cfg.system.compile:
                    for block in model.layers:
                        block.compile()
            self.model = model
            self.optimizer = build_optimizer(model, cfg.optim, self.device)
            self.ckpt_model, self.ckpt_optim = model, self.optimizer
        self.schedule = Schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
        self.loader = _data().PackedLoader(self.data.path, split="train", seq_len=cfg.train.seq_len,
                                           batch_size=self.micro, seed=cfg.data.seed,
                                           vocab_size=self.mcfg.vocab_size, rank=self.rt.loader_rank,
                                           world_size=self.rt.loader_world)
        self.load = ExpertLoad(self.model, self.device, tape=self.pipe is not None)
        # Whether the run logs expert load / the balance split at all: a property of the model, not
        # of this rank's stages (collectives over the stages must match on every rank).
        m = self.mcfg
        self.load_on = (m.n_routed_experts > 0 and any(m.is_moe_layer(i) for i in range(m.num_hidden_layers))
                        if self.pipe is not None else bool(self.load))
        self.split_on = self.load_on and device_loss_groups(m, self.rt.mesh.ep if self.rt.distributed else 1) > 0
        if self.pipe is not None:
            self.load_ids = [i for i, _ in self.pipe.moe_layers_by_index()]
            for stage in self.pipe.modules:
                stage.after_forward.append(lambda st: self.load.snapshot(st.moe_layers()))
        self.flops_per_token = self.mcfg.flops_per_token(cfg.train.seq_len)
        self.peak = peak_flops(self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _next_batch(self, step: int) -> torch.Tensor:
        x = next(self.loader)  # the loader raises DataError on an id beyond the vocabulary
        return x.to(self.device, non_blocking=True)

    def _expert_load(self) -> list[float]:
        """Per MoE layer of the whole model, in order (pipeline: gathered from every stage)."""
        mine = self.load.read_and_reset() if self.load else []
        if self.pipe is None:
            return mine
        pairs = [p for got in self.rt.pp_gather(list(zip(self.load_ids, mine))) for p in got]
        return [v for _, v in sorted(pairs)]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        cfg = self.cfg
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        bs = cfg.eval.batch_size or self.micro
        batches = self.rt.eval_share(_data().iter_eval_batches(  # each rank: bs rows of each batch
            self.data.path, split=cfg.data.val_split, seq_len=cfg.train.seq_len,
            batch_size=bs * self.rt.loader_world, max_batches=cfg.eval.max_batches or None))
        if self.pipe is not None:
            for xs in _groups(batches, self.accum):  # the batches of one forward-only schedule step
                x = torch.cat(xs).to(self.device)
                with self._autocast():
                    loss = self.pipe.eval_loss(x, x, len(xs))
                if loss is not None:  # the last stage's ranks hold the loss; the others add 0
                    n = x.shape[0] * (x.shape[1] - 1)
                    total += loss.double() * n
                    count += n
        else:
            for x in batches:
                x = x.to(self.device)
                with self._autocast():
                    out = self.model(x, labels=x)
                n = x.shape[0] * (x.shape[1] - 1)
                total += out.lm_loss.double() * n
                count += n
        self.model.train()
        total = self.rt.sum(total)
        count = int(self.rt.sum(torch.tensor(float(count), dtype=torch.float64, device=self.device)))
        if count == 0:
            raise DataError(f"{self.data.path}: the {cfg.data.val_split!r} split has no batch of "
                            f"{cfg.train.seq_len} tokens; use a shorter train.seq_len or a larger split")
        loss = float(total) / count
        info = self.data.meta["splits"][cfg.data.val_split]
        bpb = _data().bits_per_byte(loss, self.data.meta, cfg.data.val_split) if info.get("bytes") else None
        return loss, bpb

    # ------------------------------------------------------------------ sample
    @torch.no_grad()
    def sample(self) -> str | None:
        s = self.cfg.sample
        if s.max_new_tokens == 0 or self.rt.distributed:  # sharded weights: generate from a checkpoint
            return None
        tok = _data().load_tokenizer(self.data.path)
        self.model.eval()
        try:
            return generate_text(self.model, tok, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                                 self.device, seed=self.cfg.train.seed)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ checkpoint
    def _save(self, step: int, extra: dict) -> Path:
        state = {"config": self.cfg.to_dict(), "data": self.loader.state_dict(), "rng": ckpt_io.rng_state(),
                 "data_path": str(self.data.path), "model": self.mcfg.to_dict(), **extra}
        tokenizer = self.data.path / self.data.meta.get("tokenizer", "tokenizer.json")
        if self.rt.distributed:  # sharded (DCP), same directory names, loadable at any world size
            full = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": step, **state}
            return self.rt.save(ckpt_io.step_dir(self.run_dir, step), self.ckpt_model, self.ckpt_optim, full,
                                self.cfg.checkpoint.keep, lambda: ckpt_io.list_checkpoints(self.run_dir),
                                files={"tokenizer.json": tokenizer})
        return ckpt_io.save(self.run_dir, step, self.model, self.optimizer, state,
                            tokenizer=tokenizer, keep=self.cfg.checkpoint.keep)

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        # CPU: deterministic kernels make runs (and so resumed runs) bit-identical at any thread
        # count; without them the multi-threaded index_put backward of the expert permutation
        # accumulates in a varying order. No measurable cost on CPU; GPUs keep the fast kernels.
        previous = torch.are_deterministic_algorithms_enabled()
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(previous)

    def _run(self) -> TrainResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        self._build()
        # Fail on a bad first batch before the run directory exists (nothing half-written).
        step = 0
        if self.resume_from is not None:
            ckpt_io.load_weights(self.resume_from, self.ckpt_model, self.ckpt_optim, self.device)
            self.loader.load_state_dict(self.state["data"])
            step = int(self.state["step"])
        first = self._next_batch(step)
        self.rt.barrier()  # every rank has checked its input before rank 0 writes anything
        if self.rt.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temporaries(self.run_dir)
            if self.resume_from is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", step)
        if self.resume_from is not None:
            ckpt_io.set_rng_state(self.state["rng"])
        if self.rt.is_rank0:
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
        tokens = int(self.state.get("tokens", 0))
        streak = int(self.state.get("nonfinite_streak", 0))
        last_ckpt = self.resume_from
        log = (MetricsLogger(self.run_dir, cfg.train.steps, step, progress=cfg.log.progress,
                             tensorboard=cfg.log.tensorboard) if self.rt.is_rank0 else _Silent())
        if not self.rt.is_rank0:
            self.echo = _Silent.print
        self.echo(f"training {self.mcfg.name} ({self.mcfg.num_params() / 1e6:.2f}M params, "
                  f"{self.mcfg.num_active_params() / 1e6:.2f}M active) on {self.device}"
                  f"{' bf16' if self.amp_dtype else ' fp32'}: {cfg.train.steps} steps x {cfg.train.batch_size} x "
                  f"{cfg.train.seq_len} tokens (accum {self.accum}), data {self.data.path}, run dir {self.run_dir}"
                  + (f", resumed at step {step}" if self.resume_from else "")
                  + (f", {self.rt.describe()}" if self.rt.distributed else "")
                  + (f", pipeline {cfg.parallel.pp_schedule} over {self.pipe.n_stages} stages (blocks "
                     + " | ".join(f"{s[0]}-{s[-1]}" for s in self.pipe.split) + f"), {self.accum} micro-batches "
                     f"of {self.micro}" if self.pipe is not None else ""))
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        dev = self.device
        acc = {k: torch.zeros((), device=dev) for k in ("loss", "lm", "bal", "gnorm", "exp", "devb")}
        n_acc, t_int, tok_int = 0, time.perf_counter(), 0
        last_eval = (None, None)
        try:
            while step < cfg.train.steps:
                lr = self.schedule.set(self.optimizer, step)
                step_loss = torch.zeros((), device=dev)
                parts = {k: torch.zeros((), device=dev) for k in ("lm", "bal", "exp", "devb")}
                if self.pipe is not None:
                    # One schedule step runs the accum micro-batches (micro rows each) through
                    # the stages, forward and backward; gradients are their mean, as below.
                    xs = [first if first is not None else self._next_batch(step)]
                    xs += [self._next_batch(step) for _ in range(self.accum - 1)]
                    first = None
                    x = torch.cat(xs)
                    with self._autocast():
                        st = self.pipe.step(x, x)  # the same on every rank of the pipeline
                    step_loss, parts["lm"], parts["bal"] = st["loss"], st["lm_loss"], st["balance_loss"]
                    parts["exp"], parts["devb"] = st["expert_balance_loss"], st["device_balance_loss"]
                    if self.load:
                        self.load.update(last=self.accum)
                for _ in range(self.accum if self.pipe is None else 0):
                    x = first if first is not None else self._next_batch(step)
                    first = None
                    with self._autocast():
                        out = self.model(x, labels=x)
                    (out.loss / self.accum).backward()
                    step_loss += out.loss.detach().float() / self.accum
                    parts["lm"] += out.lm_loss.detach().float() / self.accum
                    if out.balance_loss is not None:
                        parts["bal"] += out.balance_loss.detach().float() / self.accum
                    if out.expert_balance_loss is not None:
                        parts["exp"] += out.expert_balance_loss.detach().float() / self.accum
                    if out.device_balance_loss is not None:
                        parts["devb"] += out.device_balance_loss.detach().float() / self.accum
                    if self.load:
                        self.load.update()
                gnorm = self.rt.clip_grad_norm_(params, clip)
                if self.rt.distributed:  # global means, so every rank takes the same finiteness decision
                    red = self.rt.mean(torch.stack([step_loss, *parts.values()]))
                    step_loss, parts = red[0], dict(zip(parts, red[1:]))
                finite = bool(torch.isfinite(step_loss + gnorm))  # the one host sync per step
                step += 1
                ntok = self.micro * self.accum * cfg.train.seq_len * self.rt.loader_world
                tokens += ntok
                tok_int += ntok
                if not finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    streak += 1
                    log.write({"kind": "nonfinite", "step": step, "loss": float(step_loss), "grad_norm": float(gnorm)})
                    log.print(f"step {step}: non-finite loss/gradient ({float(step_loss)}, grad norm "
                              f"{float(gnorm)}); update skipped ({streak} in a row)")
                    if streak >= cfg.train.max_nonfinite_steps:
                        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
                        raise DivergedError(
                            f"the loss was NaN/inf for {streak} consecutive steps (up to step {step}); stopped. "
                            f"{where}; lower --optim.lr or raise --train.max_nonfinite_steps, then --resume")
                    log.advance(1)
                    continue
                streak = 0
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                acc["loss"] += step_loss
                acc["gnorm"] += gnorm.float()
                for k in parts:
                    acc[k] += parts[k]
                n_acc += 1
                if step % cfg.log.every == 0 or step == cfg.train.steps:
                    dt = time.perf_counter() - t_int
                    tps = tok_int / dt if dt > 0 else float("nan")
                    rec = {"kind": "train", "step": step, "loss": float(acc["loss"]) / n_acc,
                           "lm_loss": float(acc["lm"]) / n_acc, "balance_loss": float(acc["bal"]) / n_acc,
                           "grad_norm": float(acc["gnorm"]) / n_acc, "lr": lr, "tokens": tokens,
                           "tokens_per_s": round(tps, 1)}
                    if self.split_on:
                        rec["expert_balance_loss"] = float(acc["exp"]) / n_acc
                        rec["device_balance_loss"] = float(acc["devb"]) / n_acc
                    if self.peak:
                        rec["mfu"] = round(self.flops_per_token * tps / (self.peak * self.rt.world_size), 4)
                    if self.load_on:
                        rec["expert_load"] = self._expert_load()
                    log.write(rec)
                    log.print(_format(rec, cfg.train.steps))
                    for k in acc:
                        acc[k].zero_()
                    n_acc, tok_int, t_int = 0, 0, time.perf_counter()
                log.advance(1, loss=f"{float(step_loss):.3f}", lr=f"{lr:.1e}")
                final = step == cfg.train.steps
                if final or (cfg.eval.every and step % cfg.eval.every == 0):
                    last_eval = self.evaluate()
                    rec = {"kind": "eval", "step": step, "val_loss": last_eval[0], "val_bpb": last_eval[1]}
                    log.write(rec)
                    bpb = f", {last_eval[1]:.3f} bits/byte" if last_eval[1] is not None else ""
                    log.print(f"step {step}: validation loss {last_eval[0]:.4f}{bpb}")
                if final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    last_ckpt = self._save(step, {"tokens": tokens, "nonfinite_streak": streak,
                                                  "elapsed_s": time.perf_counter() - t_start})
                if final or (cfg.eval.every and step % cfg.eval.every == 0) or \
                        (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    t_int, tok_int = time.perf_counter(), 0  # keep evaluation and saving out of tokens/s
        finally:
            log.close()
        load = self.load.read_and_reset() if self.load else []
        recent = [r.get("expert_load") for r in _train_records(self.run_dir) if r.get("expert_load")]
        result = TrainResult(self.run_dir, step, last_eval[0], last_eval[1], last_ckpt,
                             expert_load=recent[-1] if recent else load, tokens=tokens,
                             wall_s=time.perf_counter() - t_start)
        if cfg.log.plot and self.rt.is_rank0:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                        title=f"{cfg.name}: {self.mcfg.name} on {self.data.path.name}")
        result.sample = self.sample()
        return result


def _groups(batches, n: int):
    """Consecutive batches in lists of up to n of one shape (a short last batch goes alone)."""
    group: list[torch.Tensor] = []
    for x in batches:
        if group and (len(group) == n or x.shape != group[0].shape):
            yield group
            group = []
        group.append(x)
    if group:
        yield group


class _Silent:
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


def _train_records(run_dir: Path) -> list[dict]:
    from deepseekmoe.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def _format(rec: dict, total: int) -> str:
    s = (f"step {rec['step']:>{len(str(total))}}/{total} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
         f"bal {rec['balance_loss']:.4f} | gnorm {rec['grad_norm']:.2f} | lr {rec['lr']:.2e} | "
         f"{rec['tokens_per_s'] / 1e3:.1f}K tok/s")
    if "mfu" in rec:
        s += f" | MFU {100 * rec['mfu']:.1f}%"
    if rec.get("expert_load"):
        s += " | load " + "/".join(f"{x:.2f}" for x in rec["expert_load"])
    return s


@torch.no_grad()
def generate_text(model: Transformer, tok, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int, device: torch.device, seed: int = 0) -> str:
    """The prompt and its sampled continuation (documents follow an eos in the packed stream, so
    the prompt starts with one). Uses deepseekmoe.inference.generate's KV-cache decoder when present."""
    ids = [tok.eos_id] + tok.encode(prompt)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    if max_new_tokens < 1:
        return prompt
    try:
        from deepseekmoe.inference.generate import generate_ids
    except ImportError:
        return _generate_by_reforward(model, tok, ids, max_new_tokens, temperature, top_k, device, seed)
    new = generate_ids(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_token_id=tok.eos_id, seed=seed)[0]
    return tok.decode(ids[1:] + new)


def _generate_by_reforward(model, tok, ids, max_new_tokens, temperature, top_k, device, seed) -> str:
    """Simple twin of the KV-cache decoder: re-run the model on the growing context."""
    start = 1
    g = torch.Generator().manual_seed(seed)
    ctx = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-ctx:]], device=device)
        logits = model(x, logits_to_keep=1).logits[0, -1].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
    return tok.decode(ids[start:])


def train(cfg: TrainConfig, run_dir: Path | None = None, resume: Path | None = None, echo=print) -> TrainResult:
    trainer = Trainer(cfg, run_dir, resume, echo)
    # Distributed: a peer that dies ends this rank at once with one message (no hang).
    with trainer.rt.guard(lambda: next(iter(reversed(ckpt_io.list_checkpoints(trainer.run_dir))), None)):
        result = trainer.run()
        trainer.rt.close()
    return result
