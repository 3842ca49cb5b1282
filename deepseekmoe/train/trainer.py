"""The training loop: one device, gradient accumulation, the paper's optimizer and schedules.

`train(cfg, run_dir, resume=None)` does, in order:
  1. resolve everything that can be wrong with the input (config, dataset, vocabulary) before a
     single file is written, so a bad input leaves no run directory behind;
  2. build the model on `meta`, lay it out (parallel runs), allocate what this rank keeps on its
     device and initialise it from `train.seed` (`Transformer.init_weights(seed=...)`: identical
     weights on any device and in any layout), AdamW and the schedule; restore a checkpoint when
     resuming;
  3. loop over optimizer steps: `grad_accum` micro-batches under bf16 autocast (GPU; one process:
     with bf16 copies of the weights cast once per step, `system.compute_weights`), clipping
     (folded into fused AdamW's step on one process: train/optim.py ClippedStep), a finiteness check
     (a NaN/inf step is skipped and logged; too many in a row stop the run with the last good
     checkpoint intact), AdamW; metrics every `log.every`, validation every `eval.every`, an atomic
     checkpoint every `checkpoint.every`;
  4. final validation, checkpoint, loss-curve PNG, a generated sample and the expert-load summary.

Under torchrun the same loop runs distributed through `deepseekmoe.parallel.runtime.Runtime`
(expert parallel + FSDP2; with `parallel.pp > 1` a pipeline whose schedule step runs the
`grad_accum` micro-batches, forward and backward, in place of the micro-batch loop). One step's
forward and backward is a `LocalStep` or a `PipelineStep` (train/step.py); all around it is the
same code for both. `parallelize()` applies activation checkpointing and compile in every case,
one process included (`parallel.activation_checkpointing` / `parallel.compile`, or `system.*`).

Exact resume: the schedule is a function of the step, the data loader's position, the RNG states
and AdamW's state are all in the checkpoint, and on CPU the trainer turns on deterministic
kernels, so a run killed at any point and resumed with the same thread count reproduces the
uninterrupted run's losses and final weights bit for bit (tests/test_train_resume.py, test_train_recovery.py;
a resume with another thread count says it is not bit-exact). On GPU, MoE backward atomics vary the last bits.

Fine-tuning (`cfg.sft.model` set) is this loop too: train() runs train/sft.py's SFTTrainer, which
replaces the input hooks (_open_data, _materialize, _make_loader, evaluate, _save_local, _restore).

Every way a run stops leaves a way forward (train/recovery.py): a NaN/inf streak or a diverging
loss stops with the last good checkpoint named; SIGINT / SIGTERM save a checkpoint at the end of
the step and print the resume command; a run directory with a config but no checkpoint yet (a run
that stopped before its first save) restarts from step 0 with `--resume` (`restart=True`).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.checkpoint.files import atomic_write_text, check_output
from deepseekmoe.errors import ConfigError, DataError
from deepseekmoe.model.dtypes import TRAINING_NAMES, parse_dtype
from deepseekmoe.model.moe.router import device_loss_groups
from deepseekmoe.model.transformer import Transformer
from deepseekmoe.parallel.launch import heartbeat
from deepseekmoe.parallel.runtime import Runtime
from deepseekmoe.train.metrics import (
    ExpertLoad,
    MetricsLogger,
    SilentLogger,
    StepMeter,
    format_train_record,
    peak_flops,
    plot_losses,
    read_metrics,
    truncate_metrics,
)
from deepseekmoe.train.optim import ClippedStep, ComputeWeights, OptimizerList, Schedule, build_optimizer
from deepseekmoe.train.pretrain import PretrainData, open_pretrain_data
from deepseekmoe.train.recipe import TrainConfig, compute_weights_on, to_toml
from deepseekmoe.train.recovery import DivergedError, Divergence, Interrupted, StopSignals, check_new_run_dir
from deepseekmoe.train.step import LocalStep, PipelineStep, StepStats


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


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (metrics record, validation, checkpoint) runs after optimizer step
    `step` (1-based) of `total`: every `every` steps (0: never) and always after the last."""
    return step == total or (every > 0 and step % every == 0)


@dataclass
class _Loop:
    """What the training loop carries from step to step (and into checkpoints)."""

    t_start: float
    step: int = 0
    tokens: int = 0
    streak: int = 0  # consecutive non-finite steps
    last_ckpt: Path | None = None
    last_eval: tuple = (None, None)  # (val_loss, val_bpb)
    div: Divergence | None = None
    stop: bool = False  # distributed: some rank got SIGINT / SIGTERM by this step (all ranks agree)


class Trainer:
    """One training run: `Trainer(cfg, run_dir, resume).run()` (what `train()` does)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, resume: Path | None = None,
                 echo=print, restart: bool = False):
        self.cfg = cfg
        self.echo = echo
        self.state: dict = {}
        self.restart = restart and resume is None
        if resume is not None:
            self.resume_from = ckpt_io.resolve(resume)
            self.state = ckpt_io.verify(self.resume_from)
            self.run_dir = Path(run_dir) if run_dir else self.resume_from.parent.parent
        else:
            self.resume_from = None
            self.run_dir = Path(run_dir) if run_dir else (Path(cfg.out) if cfg.out else default_run_dir(cfg))
            if not self.restart:
                check_new_run_dir(self.run_dir)
        cfg.validate()
        # Under torchrun: process group, mesh, this rank's device (else a no-op single process).
        self.rt = Runtime.from_env(cfg.parallel, "cpu" if cfg.system.device == "cpu" else None)
        self.run_dir = self.rt.broadcast(self.run_dir)  # rank 0's timestamped default name
        if self.rt.is_rank0:  # a file in the way of --out, a folder it cannot write: said now
            check_output(self.run_dir, directory=True)
        self.device = self.rt.device or resolve_device(cfg.system.device)
        if cfg.system.threads > 0:
            torch.set_num_threads(cfg.system.threads)
        dt = parse_dtype(cfg.system.dtype, "system.dtype", ("auto", *TRAINING_NAMES))
        if dt is None:  # auto: bf16 autocast on GPUs, fp32 elsewhere
            dt = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.amp_dtype = None if dt == torch.float32 else dt
        self.mcfg = cfg.model_config()
        self.compute_weights = compute_weights_on(cfg.system.compute_weights, self.device.type, self.amp_dtype
                                                  is not None, self.rt.distributed)
        if (cfg.parallel.compile and self.device.type == "cpu" and self.amp_dtype is None
                and self.mcfg.n_routed_experts and self.mcfg.expert_backend in ("auto", "grouped")):
            # torch.compile traces grouped_mm with a bf16-only meta function: fp32 CPU runs fail deep
            # inside the compiler at the first step.
            raise ConfigError("parallel.compile=true (or system.compile) on CPU in float32 cannot trace the grouped "
                              "expert GEMM (torch's grouped_mm compiles in bf16 only); compile is meant for GPU "
                              "runs: drop it, or set --model.expert_backend=loop")
        self.data = self._open_data()  # SFT (train/sft.py): the records, tokenized and packed
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

    # ------------------------------------------------------------------ build (SFTTrainer overrides the hooks)
    def _open_data(self) -> PretrainData:
        return open_pretrain_data(self.cfg, self.mcfg.vocab_size)

    def _materialize(self, model: Transformer) -> Transformer:
        """The laid-out model on this rank's device with its initial weights (pretraining: drawn)."""
        model = self.rt.parallelize(model, self.device)
        model.to_empty(device=self.device)  # this rank's shards only, uninitialised
        model.init_weights(seed=self.cfg.train.seed)
        return model

    def _make_loader(self):
        cfg = self.cfg
        return _data().PackedLoader(self.data.path, split="train", seq_len=cfg.train.seq_len, batch_size=self.micro,
                                    seed=cfg.data.seed, vocab_size=self.mcfg.vocab_size, rank=self.rt.loader_rank,
                                    world_size=self.rt.loader_world)

    def _build(self) -> None:
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
        if self.rt.pp > 1:
            self._build_pipeline(model)
        else:
            self._build_local(model)
        self.schedule = Schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
        self.loader = self._make_loader()
        # Whether the run logs the expert/device split of the balance loss: a property of the
        # model, not of this rank's stages (collectives over the stages must match on every rank).
        self.split_on = self.load_on and device_loss_groups(self.mcfg, self.rt.mesh.ep if self.rt.distributed
                                                            else 1) > 0
        self.flops_per_token = self.mcfg.flops_per_token(cfg.train.seq_len)
        self.peak = peak_flops(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.clipped = ClippedStep(self.optimizer, self.params, self.clip, impl=cfg.optim.clip_impl,
                                   fold=not self.rt.distributed, clip_fn=self.rt.clip_grad_norm_)

    def _build_local(self, model: Transformer) -> None:
        """One model on this rank: EP -> activation checkpointing -> compile -> FSDP2 (one process:
        checkpointing and compile only), then this rank's part allocated and initialised."""
        model = self._materialize(model)
        self.pipe, self.model = None, model
        self.optimizer = build_optimizer(model, self.cfg.optim, self.device)
        self.ckpt_model, self.ckpt_optim = model, self.optimizer
        self.load = ExpertLoad(model, self.device)
        self.load_on, weights = bool(self.load), None
        if self.compute_weights:  # defer_grads: a TritonAdamW reads a one-micro-batch step's bf16 grads
            weights = ComputeWeights(model, self.amp_dtype, self.optimizer, defer_grads=True)
        self.stepper = LocalStep(model, self.accum, self._autocast, self.load, self.device, weights=weights)

    def _build_pipeline(self, model: Transformer) -> None:
        """This rank's stages only (allocated on its device there), each EP -> act. ckpt ->
        compile -> FSDP2 over its dp x ep ranks; one AdamW per stage module (DCP pairs them)."""
        cfg, m = self.cfg, self.mcfg
        self.pipe = self.rt.build_pipeline(model, self.accum, cfg.train.seq_len)
        for stage in self.pipe.modules:
            stage.init_weights(seed=cfg.train.seed)
        self.model = self.pipe
        self.optimizer = OptimizerList([build_optimizer(s, cfg.optim, self.device) for s in self.pipe.modules])
        self.ckpt_model, self.ckpt_optim = self.pipe.modules, self.optimizer.optimizers
        self.load = ExpertLoad(self.pipe, self.device, tape=True)
        # Expert load is logged when the model has MoE layers, whether or not this rank's stages do.
        self.load_on = m.n_routed_experts > 0 and any(m.is_moe_layer(i) for i in range(m.num_hidden_layers))
        self.load_ids = [i for i, _ in self.pipe.moe_layers_by_index()]
        self.pipe.after_forward.append(lambda stage: self.load.snapshot(stage.moe_layers()))
        self.stepper = PipelineStep(self.pipe, self.accum, self._autocast, self.load, self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _next_batch(self) -> torch.Tensor:
        x = next(self.loader)  # the loader raises DataError on an id beyond the vocabulary
        return x.to(self.device, non_blocking=True)

    def _step_batches(self):
        """The micro-batches of one optimizer step, read as they are used (the first step's first
        is the batch checked before the run directory was made)."""
        for _ in range(self.accum):
            if self._first is not None:
                x, self._first = self._first, None
            else:
                x = self._next_batch()
            yield x

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
        bs = cfg.eval.batch_size or self.micro
        batches = self.rt.eval_share(_data().iter_eval_batches(  # each rank: bs rows of each batch
            self.data.path, split=cfg.data.val_split, seq_len=cfg.train.seq_len,
            batch_size=bs * self.rt.loader_world, max_batches=cfg.eval.max_batches or None))
        total, count = self.stepper.eval_sums(batches)
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
    def _save(self, loop: _Loop) -> Path:
        """Checkpoint the state after `loop.step`; while the loss is diverging, the last checkpoint
        saved before it rose is kept out of pruning."""
        step, keep = loop.step, self.cfg.checkpoint.keep
        protect = loop.div.protected(final=step == self.cfg.train.steps)
        state = {"config": self.cfg.to_dict(), "data": self.loader.state_dict(), "rng": ckpt_io.rng_state(),
                 "data_path": str(self.data.path), "model": self.mcfg.to_dict(), "tokens": loop.tokens,
                 "nonfinite_streak": loop.streak, "divergence": loop.div.state_dict(),
                 "threads": torch.get_num_threads(), "elapsed_s": time.perf_counter() - loop.t_start}
        tokenizer = self.data.path / self.data.meta.get("tokenizer", "tokenizer.json")
        if self.rt.distributed:  # sharded (DCP), same directory names, loadable at any world size
            full = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": step, **state}
            listing = lambda: ckpt_io.prunable_order(ckpt_io.list_checkpoints(self.run_dir), keep, protect)  # noqa: E731
            path = self.rt.save(ckpt_io.step_dir(self.run_dir, step), self.ckpt_model, self.ckpt_optim, full,
                                keep, listing, files={"tokenizer.json": tokenizer})
        else:
            path = self._save_local(step, state, tokenizer, keep, protect)
        loop.last_ckpt = path
        loop.div.saved(path)
        return path

    def _save_local(self, step: int, state: dict, tokenizer: Path, keep: int, protect: str | None) -> Path:
        return ckpt_io.save(self.run_dir, step, self.model, self.optimizer, state, tokenizer=tokenizer, keep=keep,
                            protect=protect)

    def _restore(self) -> None:
        ckpt_io.load_weights(self.resume_from, self.ckpt_model, self.ckpt_optim, self.device)

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        # CPU: deterministic kernels make two runs with the same thread count bit-identical (and so
        # a resumed run identical to an uninterrupted one); without them the multi-threaded
        # index_put backward of the expert permutation accumulates in a varying order. Different
        # thread counts still differ in the last bits (other kernels split their sums by thread),
        # hence the warning at a resume with another count. No measurable cost on CPU; GPUs keep
        # the fast kernels. SIGINT / SIGTERM stop the run at the end of a step.
        previous = torch.are_deterministic_algorithms_enabled()
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        try:
            with StopSignals(second_kills=not self.rt.distributed) as self.stop:
                return self._run()
        finally:
            torch.use_deterministic_algorithms(previous)

    def _run(self) -> TrainResult:
        t = self.cfg.train
        loop = _Loop(t_start=time.perf_counter(), div=Divergence(t.divergence_factor, t.divergence_steps))
        self._build()
        self._start(loop)
        log = self._open_log(loop.step)
        meter = StepMeter(self.device)
        try:
            self._stop_if_signalled(loop)
            while loop.step < t.steps:
                self._train_step(loop, meter, log)
                self._stop_if_signalled(loop)
        finally:
            log.close()
        return self._finish(loop)

    def _stop_if_signalled(self, loop: _Loop) -> None:
        """After SIGINT / SIGTERM: a checkpoint of this step (unless just saved), then Interrupted with the
        resume command. Distributed: once any rank got one (`loop.stop`), so all save the same step."""
        if not (loop.stop if self.rt.distributed else self.stop.received):
            return
        saved = loop.last_ckpt is not None and loop.last_ckpt.name == ckpt_io.step_dir(self.run_dir, loop.step).name
        if loop.step > 0 and not saved:  # at step 0 nothing was trained: --resume restarts the run
            self._save(loop)
        raise Interrupted.stopped(self.stop.received, loop.step, self.cfg.train.steps, loop.last_ckpt, self.run_dir)

    def _start(self, loop: _Loop) -> None:
        """Restore the checkpoint when resuming; read the first batch, so that a bad one fails
        before the run directory exists (nothing half-written); then make the directory."""
        if self.resume_from is not None:
            self._restore()
            self.loader.load_state_dict(self.state["data"])
            loop.step = int(self.state["step"])
        self._first = self._next_batch()
        self.rt.barrier()  # every rank has checked its input before rank 0 writes anything
        if self.rt.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temporaries(self.run_dir)
            if self.resume_from is not None or self.restart:  # the log reads as one run
                truncate_metrics(self.run_dir / "metrics.jsonl", loop.step)
        if self.resume_from is not None:
            ckpt_io.set_rng_state(self.state["rng"])
            self._warn_thread_change()
        if self.rt.is_rank0:
            atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        loop.tokens = int(self.state.get("tokens", 0))
        loop.streak = int(self.state.get("nonfinite_streak", 0))
        if "divergence" in self.state:
            loop.div.load_state_dict(self.state["divergence"])
        loop.last_ckpt = self.resume_from
        if self.resume_from is not None:  # as the run that saved it recorded it, once saved
            loop.div.saved(self.resume_from)

    def _warn_thread_change(self) -> None:
        """CPU kernels split their sums by thread: another thread count is not bit-exact."""
        saved, now = self.state.get("threads"), torch.get_num_threads()
        if self.device.type == "cpu" and saved is not None and saved != now:
            self.echo(f"warning: {self.resume_from} was written by a run with {saved} CPU thread(s), this one has "
                      f"{now}: it continues correctly but not bit-identically to an uninterrupted run (set "
                      f"--system.threads={saved} for that)")

    def _open_log(self, step: int):
        """Rank 0's metrics logger (metrics.jsonl, progress bar, TensorBoard), after the opening line."""
        cfg = self.cfg
        log = (MetricsLogger(self.run_dir, cfg.train.steps, step, progress=cfg.log.progress,
                             tensorboard=cfg.log.tensorboard) if self.rt.is_rank0 else SilentLogger())
        if not self.rt.is_rank0:
            self.echo = SilentLogger.print
        m = self.mcfg
        self.echo(f"training {m.name} ({m.num_params() / 1e6:.2f}M params, {m.num_active_params() / 1e6:.2f}M "
                  f"active) on {self.device}{' bf16' if self.amp_dtype else ' fp32'}"
                  f"{' (compute weights)' if self.compute_weights else ''}: {cfg.train.steps} steps x "
                  f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens (accum {self.accum}), data "
                  f"{self.data.path}, run dir {self.run_dir}"
                  + (f", resumed at step {step}" if self.resume_from else "")
                  + (", restarted from step 0 (it had no checkpoint)" if self.restart else "")
                  + (f", {self.rt.describe()}" if self.rt.distributed else "")
                  + (f", pipeline {cfg.parallel.pp_schedule} over {self.pipe.n_stages} stages (blocks "
                     + " | ".join(f"{s[0]}-{s[-1]}" for s in self.pipe.split) + f"), {self.accum} micro-batches "
                     f"of {self.micro}" if self.pipe is not None else ""))
        return log

    def _train_step(self, loop: _Loop, meter: StepMeter, log) -> None:
        """One optimizer step: forward + backward over its micro-batches, clipping, the finiteness
        check, the update (or its skip), then the metrics record, validation and checkpoint due."""
        cfg = self.cfg
        heartbeat(loop.step)  # progress, for the distributed watchdog (a stall notice otherwise)
        lr = self.schedule.set(self.optimizer, loop.step)
        stats = self.stepper.run(self._step_batches())
        gnorm = self.clipped.clip(stats.loss)  # folded: the update is taken too, skipped on device if non-finite
        if self.rt.distributed:  # global means, so every rank takes the same finiteness (and stop) decision
            stacked, stop = self.rt.mean_and_any(stats.stacked(), self.stop.received is not None)
            stats, loop.stop = StepStats.from_stacked(stacked), bool(stop)  # the one wait for the all-reduce
        finite = bool(torch.isfinite(stats.loss + gnorm))  # the one host sync per step
        loop.step += 1
        ntok = self.micro * self.accum * cfg.train.seq_len * self.rt.loader_world
        loop.tokens += ntok
        meter.count_tokens(ntok)
        if finite:
            loop.streak = 0
            self.clipped.update()
            self.optimizer.zero_grad(set_to_none=True)
            meter.add(stats, gnorm)
            if due(loop.step, cfg.log.every, cfg.train.steps):
                self._log_train(loop, meter, lr, log)
            log.advance(1, loss=f"{float(stats.loss):.3f}", lr=f"{lr:.1e}")
        else:  # the weights are unchanged, so the validation and checkpoint due are still made
            self._skip_nonfinite(loop, stats.loss, gnorm, log)
            log.advance(1)
        evaluate = due(loop.step, cfg.eval.every, cfg.train.steps)
        save = due(loop.step, cfg.checkpoint.every, cfg.train.steps)
        if evaluate:
            heartbeat(loop.step)
            loop.last_eval = self.evaluate()
            log.write({"kind": "eval", "step": loop.step, "val_loss": loop.last_eval[0], "val_bpb": loop.last_eval[1]})
            bpb = f", {loop.last_eval[1]:.3f} bits/byte" if loop.last_eval[1] is not None else ""
            log.print(f"step {loop.step}: validation loss {loop.last_eval[0]:.4f}{bpb}")
        if save:
            heartbeat(loop.step)
            self._save(loop)
        if evaluate or save:
            meter.restart()  # keep evaluation and saving out of tokens/s

    def _log_train(self, loop: _Loop, meter: StepMeter, lr: float, log) -> None:
        tps = meter.tokens_per_s()
        rec = meter.record(loop.step, lr, loop.tokens, tps, self.split_on)
        if self.peak:
            rec["mfu"] = round(self.flops_per_token * tps / (self.peak * self.rt.world_size), 4)
        if self.load_on:
            rec["expert_load"] = self._expert_load()
        log.write(rec)
        log.print(format_train_record(rec, self.cfg.train.steps))
        meter.restart()
        if loop.div.update(loop.step, rec["loss"]):
            raise DivergedError(loop.div.message(loop.step, rec["loss"], self.cfg.optim.lr, self.run_dir,
                                                 fresh=not ckpt_io.list_checkpoints(self.run_dir)))

    def _skip_nonfinite(self, loop: _Loop, loss: torch.Tensor, gnorm: torch.Tensor, log) -> None:
        """A NaN/inf loss or gradient: drop the gradients, log the step; DivergedError after
        train.max_nonfinite_steps of them in a row (the last good checkpoint stays)."""
        self.optimizer.zero_grad(set_to_none=True)
        loop.streak += 1
        log.write({"kind": "nonfinite", "step": loop.step, "loss": float(loss), "grad_norm": float(gnorm)})
        log.print(f"step {loop.step}: non-finite loss/gradient ({float(loss)}, grad norm {float(gnorm)}); "
                  f"update skipped ({loop.streak} in a row)")
        if loop.streak >= self.cfg.train.max_nonfinite_steps:
            # Skipped steps leave the weights as they were: the newest checkpoint is a good one.
            where = (f"the last good checkpoint is {loop.last_ckpt}; lower --optim.lr or raise "
                     f"--train.max_nonfinite_steps, then --resume {self.run_dir}" if loop.last_ckpt else
                     "no checkpoint was saved yet; lower --optim.lr or raise --train.max_nonfinite_steps, then "
                     f"--resume {self.run_dir} (restarts from step 0)")
            raise DivergedError(
                f"the loss was NaN/inf for {loop.streak} consecutive steps (up to step {loop.step}); stopped. {where}")

    def _finish(self, loop: _Loop) -> TrainResult:
        """The result, the loss-curve PNG and the generated sample."""
        cfg = self.cfg
        load = self.load.read_and_reset() if self.load else []
        recent = [r.get("expert_load") for r in _train_records(self.run_dir) if r.get("expert_load")]
        result = TrainResult(self.run_dir, loop.step, loop.last_eval[0], loop.last_eval[1], loop.last_ckpt,
                             expert_load=recent[-1] if recent else load, tokens=loop.tokens,
                             wall_s=time.perf_counter() - loop.t_start)
        if cfg.log.plot and self.rt.is_rank0:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                        title=f"{cfg.name}: {self.mcfg.name} on {self.data.path.name}")
        heartbeat(loop.step)
        result.sample = self.sample()
        return result


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


@torch.no_grad()
def generate_text(model: Transformer, tok, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int, device: torch.device, seed: int = 0) -> str:
    """The prompt and its sampled continuation (documents follow an eos in the packed stream, so
    the prompt starts with one), from deepseekmoe.inference.generate's KV-cache decoder."""
    from deepseekmoe.inference.generate import generate_ids

    ids = [tok.eos_id] + tok.encode(prompt)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    if max_new_tokens < 1:
        return prompt
    new = generate_ids(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_token_id=tok.eos_id, seed=seed)[0]
    return tok.decode(ids[1:] + new)


def train(cfg: TrainConfig, run_dir: Path | None = None, resume: Path | None = None, echo=print,
          restart: bool = False) -> TrainResult:
    """Pretraining, or fine-tuning when the config has an [sft] base model (train/sft.py)."""
    if cfg.is_sft:
        from deepseekmoe.train.sft import SFTTrainer as cls
    else:
        cls = Trainer
    trainer = cls(cfg, run_dir, resume, echo, restart)
    # Distributed: a peer that dies ends this rank at once with one message (no hang); Interrupted passes.
    with trainer.rt.guard(lambda: next(iter(reversed(ckpt_io.list_checkpoints(trainer.run_dir))), None),
                          passthrough=(Interrupted,)):
        result = trainer.run()
        trainer.rt.close()
    return result
