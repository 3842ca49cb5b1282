"""Supervised fine-tuning on the pretraining trainer: `SFTTrainer` and the fine-tuned run's layout.

`deepseekmoe sft` (train/cli.py) builds a TrainConfig whose [sft] section names a base model;
train/trainer.py:train then runs an `SFTTrainer`, the pretraining `Trainer` with its input hooks
replaced, so checkpoints, exact resume, metrics, the progress bar, the NaN / divergence guards and
torchrun launch are the pretraining ones:

  _open_data    the base's tokenizer + the record files -> tokenized conversations
                (data/sft.py:build_sft_data; its one-line report is printed), held-out split,
                `sft.epochs` -> train.steps
  _materialize  the base weights (Transformer.from_pretrained: a released-format directory, a
                native model directory, or a `deepseekmoe train` run / checkpoint, resolved as
                `generate` resolves them, checkpoint/hf.py:find_checkpoint), then LoRA adapters
                (model/lora.py:apply_lora) when `lora.enabled`; AdamW sees the trainable ones only
  _make_loader  SFTLoader: packed (or padded) SFTBatches, resumable to the row
  evaluate      the mean LM loss over the held-out assistant tokens (no bits/byte), also at
                step 0: the base model's figure, the first eval record of metrics.jsonl
  _save_local / _restore   LoRA: the checkpoint holds the trainable tensors only
                (`trainable.safetensors`, + optimizer.pt, state.json, manifest.json); a resume
                reloads the frozen base from `sft.model` and these on top. Full fine-tuning
                saves the whole model, as pretraining does
  _finish       LoRA: `adapter/` in PEFT's format (model/lora.py:save_adapter) and, with
                `lora.merge`, `merged/` in the released format (Transformer.save_pretrained)

A fine-tuned run directory:

    config.toml  metrics.jsonl  loss.png  checkpoints/step_NNNNNNN/   as for pretraining
    adapter/     LoRA runs: adapter_config.json + adapter_model.safetensors (PEFT)
    merged/      LoRA runs with lora.merge=true: the merged model, released format

`checkpoint/finetuned.py:finetuned_model(path)` says what `generate` / `chat` / `eval --model RUN` load from
such a directory.
The `deepseekmoe sft` command (train/cli.py: add_sft_arguments, run_sft) is reached through this
module's `add_arguments` / `run`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deepseekmoe.checkpoint import training as ckpt_io
from deepseekmoe.checkpoint.files import atomic_directory, prune, write_failure
from deepseekmoe.checkpoint.finetuned import ADAPTER_DIR, MERGED_DIR
from deepseekmoe.checkpoint.native import cpu_for_save
from deepseekmoe.errors import CheckpointError, ConfigError, DataError
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.transformer import Transformer
from deepseekmoe.train.cli import add_sft_arguments as add_arguments  # noqa: F401 - `deepseekmoe sft`
from deepseekmoe.train.cli import run_sft as run  # noqa: F401
from deepseekmoe.train.trainer import Trainer

TRAINABLE_FILE = "trainable.safetensors"


# ---------------------------------------------------------------------- the base model
def resolve_base(spec: str | Path) -> Path:
    """The directory the base weights load from: a released-format or native model directory as
    given, or a `deepseekmoe train` run / checkpoint (its newest checkpoint's model)."""
    from deepseekmoe.checkpoint import hf

    try:
        kind, path = hf.find_checkpoint(spec)
    except CheckpointError as e:
        raise ConfigError(f"sft.model={str(spec)!r}: {e}") from None
    if kind == "dcp":
        raise ConfigError(f"sft.model={str(spec)!r} is a sharded checkpoint of a distributed run; turn it into a "
                          f"model directory first (deepseekmoe convert {path} OUT_DIR) and fine-tune that")
    return path.resolve()


def base_model_config(spec: str | Path, overrides: dict | None = None) -> ModelConfig:
    """The base model's ModelConfig from its config.json alone (no weights read), with `model.*` overrides."""
    from deepseekmoe.checkpoint import hf, native

    path = resolve_base(spec)
    if native.is_native(path):
        cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text())["model"])
    else:
        cfg = hf.config_from_hf(hf.read_hf_config(path))
    return cfg.replace(**overrides) if overrides else cfg


def load_base_tokenizer(path: Path, mcfg: ModelConfig):
    """The base's tokenizer.json, with the model's bos / eos ids when they fit its vocabulary."""
    from deepseekmoe.inference.generate import load_tokenizer

    V = mcfg.vocab_size
    if all(isinstance(i, int) and 0 <= i < V for i in (mcfg.bos_token_id, mcfg.eos_token_id)):
        return load_tokenizer(path, mcfg.bos_token_id, mcfg.eos_token_id)
    return load_tokenizer(path)


def lora_config(cfg):
    """The model/lora.py LoraConfig of a TrainConfig's [lora] section."""
    from deepseekmoe.model.lora import LoraConfig

    lo = cfg.lora
    return LoraConfig(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets), experts=lo.experts,
                      shared_experts=lo.shared_experts, train_embeddings=lo.train_embeddings,
                      train_router=lo.train_router)


# ---------------------------------------------------------------------- the trainer
@dataclass
class SFTInputs:
    """What the trainer reads for fine-tuning. `path` / `meta` are where the tokenizer lives (the
    base directory), as a pretraining dataset's are, so checkpoints carry the tokenizer along."""

    path: Path
    meta: dict
    val_split: str
    data: object  # data/sft.py SFTData
    tokenizer: object


class SFTTrainer(Trainer):
    """The pretraining Trainer on chat records, from a base model, full or LoRA (module docstring)."""

    def _open_data(self) -> SFTInputs:
        from deepseekmoe.data.sft import SFTDataConfig, build_sft_data

        cfg, s = self.cfg, self.cfg.sft
        base = resolve_base(s.model)
        tok = load_base_tokenizer(base, self.mcfg)
        dcfg = SFTDataConfig(seq_len=cfg.train.seq_len, pack=s.pack, overlong=s.overlong, template=s.template,
                             val_fraction=0.0 if s.val_data else s.val_fraction, seed=cfg.data.seed)
        bos, eos = (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None))
        data = build_sft_data(s.data, tok, dcfg, val_files=s.val_data or None, model_dir=base, bos_id=bos,
                              eos_id=eos)
        if self.rt.is_rank0:
            self.echo(data.report)
        if data.val is None or len(data.val) == 0:
            raise DataError(f"no held-out conversation left to validate on ({data.report}); give held-out records "
                            "with --sft.val_data FILE, or records that fit train.seq_len")
        for split in (data.train, data.val):
            top = int(split.ids.max()) if split is not None and len(split.ids) else -1
            if top >= self.mcfg.vocab_size:
                raise DataError(f"the {split.name} records encode to token id {top}, beyond the model's vocabulary "
                                f"of {self.mcfg.vocab_size}: the tokenizer in {base} does not belong to this model")
        if s.epochs:  # whole epochs of the first epoch's packed rows, the batch counted in rows
            from deepseekmoe.data.sft import SFTLoader

            rows = SFTLoader(data.train, 1, seed=cfg.data.seed, pack=s.pack).rows_in_epoch(0)
            cfg.train.steps = max(1, math.ceil(s.epochs * rows / cfg.train.batch_size))
        return SFTInputs(base, {"tokenizer": "tokenizer.json"}, "val", data, tok)

    def _materialize(self, model: Transformer) -> Transformer:
        """The base weights, trainable adapters on top for LoRA, then the parallel layout (the meta
        model only fixed the config). Trained weights are fp32 master copies (bf16 compute comes
        from autocast); a LoRA run's frozen base is kept in the autocast dtype, half the memory of
        fp32 (what computes with it is cast to that dtype anyway), its trained tensors in fp32."""
        cfg = self.cfg
        frozen = self.amp_dtype if cfg.lora.enabled and self.amp_dtype is not None else torch.float32
        model = Transformer.from_pretrained(self.data.path, dtype=frozen, device=self.device, **cfg.model.overrides)
        model.set_routing(record=True)
        model.train()  # from_pretrained returns eval mode (dropout off)
        if cfg.lora.enabled:
            from deepseekmoe.model.lora import apply_lora

            apply_lora(model, lora_config(cfg), seed=cfg.train.seed)
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:  # embeddings / routers trained in full
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
        return self.rt.parallelize(model, self.device)

    def _build_local(self, model: Transformer) -> None:
        super()._build_local(model)
        if self.rt.loader_world > 1:  # the step's mean over every rank's assistant tokens
            self.stepper.target_mean = self.rt.mean

    def _make_loader(self):
        from deepseekmoe.data.sft import SFTLoader

        return SFTLoader(self.data.data.train, self.micro, seed=self.cfg.data.seed, rank=self.rt.loader_rank,
                         world_size=self.rt.loader_world, pack=self.cfg.sft.pack)

    def _open_log(self, step: int):
        """The pretraining log, and at step 0 the base model's held-out loss (step 0 of the eval
        records), the figure the fine-tuned one is measured against."""
        log = super()._open_log(step)
        if step == 0:
            loss, _ = self.evaluate()
            log.write({"kind": "eval", "step": 0, "val_loss": loss, "val_bpb": None})
            log.print(f"step 0 (the base model): validation loss {loss:.4f} on the held-out assistant tokens")
        return log

    @torch.no_grad()
    def evaluate(self) -> tuple[float, None]:
        """Mean LM loss over the held-out assistant tokens, every row of the split once (the first
        `eval.max_batches` global batches): each rank its share of the rows. Every rank runs the
        same number of forwards (FSDP's are collective): one whose rows ran out runs a batch
        without labels, which counts for nothing."""
        from deepseekmoe.data.sft import SFTLoader

        cfg = self.cfg
        bs = cfg.eval.batch_size or self.micro
        W, r = self.rt.loader_world, self.rt.loader_rank
        loader = SFTLoader(self.data.data.val, bs, rank=r, world_size=W, pack=cfg.sft.pack, endless=False)
        n = -(-loader.rows_in_epoch(0) // (bs * W))  # global batches; rank 0 has a row of each
        if cfg.eval.max_batches:
            n = min(n, cfg.eval.max_batches)
        self.model.eval()
        total, count = self.stepper.eval_sums(_padded(loader, n, lambda: next(SFTLoader(
            self.data.data.val, 1, endless=False, pack=cfg.sft.pack))))
        self.model.train()
        total = self.rt.sum(total)
        count = int(self.rt.sum(torch.tensor(float(count), dtype=torch.float64, device=self.device)))
        if count == 0:
            raise DataError("the held-out records have no assistant token to score; give more validation records "
                            "(--sft.val_data FILE or a larger --sft.val_fraction)")
        return float(total) / count, None

    @torch.no_grad()
    def sample(self) -> str | None:
        """The reply to `sample.prompt` as a user turn of the 16b-chat template (what `chat` sends)."""
        from deepseekmoe.inference.generate import chat_ids, generate_ids

        s = self.cfg.sample
        if s.max_new_tokens == 0 or self.rt.distributed:
            return None
        tok = self.data.tokenizer
        ids = chat_ids(tok, [{"role": "user", "content": s.prompt}], tok.bos_id, tok.eos_id)
        n = min(s.max_new_tokens, self.mcfg.max_position_embeddings - len(ids))
        if n < 1:
            return None
        self.model.eval()
        try:
            with self._autocast():  # a LoRA run's frozen base may be in the autocast dtype
                new = generate_ids(self.model, [ids], n, temperature=s.temperature, top_k=s.top_k,
                                   eos_token_id=tok.eos_id, seed=self.cfg.train.seed)[0]
        finally:
            self.model.train()
        return tok.decode(new).strip()

    # ------------------------------------------------------------------ checkpoints
    def _save_local(self, step: int, state: dict, tokenizer: Path, keep: int, protect: str | None) -> Path:
        if not self.cfg.lora.enabled:
            return super()._save_local(step, state, tokenizer, keep, protect)
        return save_trainable(self.run_dir, step, self.model, self.optimizer, {**state, "base": str(self.data.path)},
                              keep, protect)

    def _restore(self) -> None:
        if not self.cfg.lora.enabled or (self.resume_from / ".metadata").exists():
            return super()._restore()
        load_trainable(self.resume_from, self.model, self.optimizer, self.device)

    def _finish(self, loop):
        result = super()._finish(loop)
        if self.cfg.lora.enabled:
            self._export_lora()
        return result

    def _export_lora(self) -> None:
        """adapter/ (PEFT format, naming the base) and, with lora.merge, merged/ (released format).
        Under torchrun the trained tensors are gathered (collective) and rank 0 puts them on a CPU
        copy of the base (sharded parameters have no whole tensor to save)."""
        from deepseekmoe.model.lora import apply_lora, merge_lora, save_adapter

        model = self.model
        if self.rt.distributed:
            whole = {_canonical(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                     for n, p in self.model.named_parameters() if p.requires_grad}
            if not self.rt.is_rank0:
                return
            model = apply_lora(Transformer.from_pretrained(self.data.path), lora_config(self.cfg))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in whole.items():
                    params[n].copy_(t)
        adapter = self.run_dir / ADAPTER_DIR
        save_adapter(model, adapter)
        _name_base(adapter, self.data.path)
        self.echo(f"adapter written to {adapter} (PEFT format; base {self.data.path})")
        if self.cfg.lora.merge:
            merge_lora(model)
            if len({p.dtype for p in model.parameters()}) > 1:  # a bf16 base with fp32 embeddings trained
                model.to(self.amp_dtype)  # one dtype in the released format: the base's compute dtype
            model.save_pretrained(self.run_dir / MERGED_DIR, tokenizer_dir=self.data.path)
            self.echo(f"merged model written to {self.run_dir / MERGED_DIR} (released format)")


def _canonical(name: str) -> str:
    """A parameter name without the activation-checkpoint / compile wrappers' prefixes."""
    from deepseekmoe.model.init import _canonical_name

    return _canonical_name(name)


def _padded(batches, n: int, first):
    """The first `n` of `batches` (read as used: 4K-token masks are large), then, if they run out,
    copies of the last one (or of `first()`) without labels, so that every rank runs `n` forwards."""
    last, k = None, 0
    for last in itertools.islice(batches, n):
        k += 1
        yield last
    if k < n:
        like = last if last is not None else first()
        blank = dataclasses.replace(like, labels=torch.full_like(like.labels, -100))
        yield from itertools.repeat(blank, n - k)


def _name_base(adapter: Path, base: Path) -> None:
    """Record the base directory in adapter_config.json (PEFT's base_model_name_or_path), so the run
    directory alone says what to load; written to a temporary name and renamed."""
    from deepseekmoe.checkpoint.files import atomic_write_text

    p = adapter / "adapter_config.json"
    meta = json.loads(p.read_text())
    if meta.get("base_model_name_or_path") != str(base):
        meta["base_model_name_or_path"] = str(base)
        atomic_write_text(p, json.dumps(meta, indent=2, sort_keys=True))


# ---------------------------------------------------------------------- LoRA training checkpoints
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, and embeddings / router when they train), by their plain
    names (without activation-checkpoint / compile wrappers, so a resume may toggle those)."""
    return {_canonical(n): cpu_for_save(p) for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(run_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict, keep: int,
                   protect: str | None) -> Path:
    """checkpoints/step_N/ with trainable.safetensors in place of model/ (the frozen base is not
    copied: `state["base"]` names it), atomically and pruned as checkpoint/training.py:save does."""
    from safetensors.torch import save_file

    target = ckpt_io.step_dir(run_dir, step)
    try:
        with atomic_directory(target) as tmp:
            save_file(trainable_state(model), str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            full = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": step, **state}
            (tmp / "state.json").write_text(json.dumps(full, indent=1, sort_keys=True))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": ckpt_io._sha256(p)}
                        for p in files}
            (tmp / "manifest.json").write_text(json.dumps({"format": ckpt_io.FORMAT, "files": manifest}, indent=1))
    except Exception as e:  # OSError, and what safetensors / torch.save wrap write failures in
        earlier = [p.name for p in ckpt_io.list_checkpoints(run_dir)]
        kept = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        raise CheckpointError(f"could not save checkpoint {target} ({write_failure(e, run_dir)}); {kept}. Free "
                              f"space (or choose another --out) and continue with --resume {run_dir}") from e
    prune(ckpt_io.prunable_order(ckpt_io.list_checkpoints(run_dir), keep, protect)[:-keep])
    return target


def load_trainable(ckpt: Path, model: torch.nn.Module, optimizer, device: torch.device) -> None:
    """The trainable tensors and AdamW state of a verified LoRA checkpoint, onto the rebuilt base + adapters."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if not (ckpt / TRAINABLE_FILE).is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {TRAINABLE_FILE}: it is not a LoRA checkpoint; resume it "
                              "with its own config (--lora.enabled=false)")
    saved = load_file(str(ckpt / TRAINABLE_FILE))
    params = {_canonical(n): p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys() or any(saved[n].shape != p.shape for n, p in params.items()):
        diff = sorted(set(saved) ^ set(params))[:3] or [n for n in params if saved[n].shape != params[n].shape][:3]
        raise CheckpointError(f"checkpoint {ckpt}: its trainable tensors do not match this run's adapters (first "
                              f"differences: {', '.join(diff)}); resume with the run's own [lora] settings")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer state unreadable or mismatched ({e})") from e
