"""Training configuration: one typed dataclass per concern, TOML recipes, dotted overrides.

A recipe is a small TOML file whose tables mirror `TrainConfig`:

    name = "deepseekmoe-2b"
    [model]                       # preset + any ModelConfig field as an override
    preset = "deepseekmoe-2b"
    expert_backend = "grouped"
    [train]
    steps = 24000
    ...

On the command line every key can be overridden as `--section.key=value` (or `--section.key
value`); values are parsed as TOML literals (`3e-4`, `true`, `[0.8, 0.9]`) and fall back to plain
strings. An unknown key raises ConfigError naming the nearest valid key. The defaults of
`TrainConfig` *are* the default job (`deepseekmoe train` with no arguments: the tiny model on the
shipped sample, a few minutes on a 2-core CPU); configs/tiny.toml spells them out.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from deepseekmoe.errors import ConfigError, suggest, utf8_text
from deepseekmoe.model import presets
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.dtypes import TRAINING_NAMES, parse_dtype
from deepseekmoe.model.lora import LORA_TARGETS
from deepseekmoe.parallel.mesh import ParallelConfig

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - 3.10: the backport, a dependency there (pyproject.toml)
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class ModelSection:
    """`preset` names a model of deepseekmoe.model.presets; every other key overrides one of its fields."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)


@dataclass
class DataSection:
    path: str = ""  # a directory written by `deepseekmoe prepare`; "" = the shipped sample
    seed: int = 0  # shuffle seed of the training stream
    val_split: str = "val"


@dataclass
class OptimSection:
    """AdamW, the paper's settings (b1 0.9, b2 0.95, weight decay 0.1, clipping 1.0).

    Weight decay applies to matrices (attention, experts, router, embeddings, head), not to norm
    gains or biases: decaying a norm gain towards 0 shrinks the signal it exists to rescale."""

    lr: float = 2e-3  # the maximum learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # auto (triton on one GPU process, fused on several, foreach on CPU: train/optim.py resolve_impl)
    # | fused | foreach | single | triton (one kernel per tensor: the update, the clip and the compute
    # copies; CUDA; train/optim.py TritonAdamW)
    impl: str = "auto"
    # fused: the clip coefficient folded into fused AdamW's step (one process, impl fused or triton;
    # else as inplace) | inplace: clip_grad_norm_ scales the grads, then step (train/optim.py ClippedStep)
    clip_impl: str = "fused"


SCHEDULES = ("step", "constant", "cosine", "wsd")


@dataclass
class ScheduleSection:
    """`step`: linear warmup, then x`decay_factor` at each fraction of `decay_at` (2B / 16B);
    `constant`: linear warmup, then flat (145B); `cosine`: warmup, then a half cosine down to
    `min_lr_ratio` x lr; `wsd`: warmup, flat, then linear down to `min_lr_ratio` x lr over the
    last `decay_fraction` of the steps (train/optim.py)."""

    kind: str = "step"
    warmup_steps: int = 20
    decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])  # step
    decay_factor: float = 0.316  # step
    min_lr_ratio: float = 0.1  # cosine, wsd: the last step's lr as a fraction of optim.lr
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying


@dataclass
class TrainSection:
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, all devices and micro-batches together
    micro_batch_size: int = 0  # sequences per forward pass; 0 = batch_size (no accumulation)
    seq_len: int = 256
    seed: int = 0  # model initialisation and every RNG
    max_nonfinite_steps: int = 5  # stop after this many consecutive NaN/inf steps (each is skipped)
    # Stop when the logged loss stays above divergence_factor x its running minimum for
    # divergence_steps logged steps (0 = off); the shipped runs stay below 1.05 x.
    divergence_factor: float = 3.0
    divergence_steps: int = 5


@dataclass
class EvalSection:
    every: int = 100  # validation every N steps (0: only at the end)
    max_batches: int = 16  # validation batches per evaluation (0: the whole split)
    batch_size: int = 0  # 0 = train.micro_batch_size


@dataclass
class CheckpointSection:
    every: int = 100  # steps between checkpoints (0: only at the end)
    keep: int = 2  # keep the last N checkpoints


@dataclass
class LogSection:
    every: int = 10  # steps between metric records
    progress: bool = True  # progress bar on the terminal
    tensorboard: bool = True  # write TensorBoard events when tensorboard is installed
    plot: bool = True  # loss-curve PNG at the end


@dataclass
class SystemSection:
    """The device and numerics. torch.compile and activation checkpointing are `parallel.compile`
    and `parallel.activation_checkpointing` (what parallelize() applies, one process included);
    `system.compile` / `system.activation_checkpointing` are accepted as their old names (KEY_ALIASES)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    threads: int = 0  # CPU threads for torch (0: torch's default)
    # Compute copies of the weights in the autocast dtype, cast once per optimizer step, gradients
    # summed in fp32 (train/optim.py ComputeWeights); see compute_weights_on. Unset = "auto".
    compute_weights: bool | None = None


def compute_weights_on(want: bool | None, device_type: str, amp: bool, distributed: bool) -> bool:
    """Whether a run keeps compute copies of its weights (`system.compute_weights`).

    Unset ("auto"): on for one-process CUDA runs under bf16 / fp16 autocast, where it is exact
    (losses, gradients and updates bit-identical to autocast casting the fp32 weights at every use:
    tests/test_train_step_fast.py) and saves those casts per micro-batch; off on CPU (fp32 there by
    default; a CPU bf16 run may set it) and under torchrun (FSDP2 casts with its own
    MixedPrecisionPolicy). With `model.lm_loss_chunk` > 0 the head's weight keeps no copy (the fused
    loss forms its gradient in fp32). true where it cannot apply (no autocast, several processes)
    is a ConfigError; false: off."""
    if want is None:
        return device_type == "cuda" and amp and not distributed
    if want and not amp:
        raise ConfigError("system.compute_weights=true needs bf16 / fp16 autocast (--system.dtype=bfloat16); an fp32 "
                          "run computes with its fp32 weights themselves: drop the option")
    if want and distributed:
        raise ConfigError("system.compute_weights=true runs in one process only; under torchrun FSDP2 keeps the "
                          "compute copies (its MixedPrecisionPolicy): drop the option or set it false")
    return want


@dataclass
class SampleSection:
    prompt: str = "The"
    max_new_tokens: int = 40  # 0 disables the sample printed at the end
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40


@dataclass
class SFTSection:
    """Supervised fine-tuning (`deepseekmoe sft`, train/sft.py): a run is SFT when `model` is set.
    The model's architecture then comes from the base checkpoint (`model.preset` is ignored;
    `model.<field>` still overrides run-time fields such as expert_backend), the batches from
    chat / instruction records, and the loss counts assistant tokens only."""

    model: str = ""  # base: released-format dir, native model dir, or a `deepseekmoe train` run / checkpoint
    data: list[str] = field(default_factory=list)  # record files: jsonl(.gz/.xz), parquet, HF dataset on disk
    val_data: list[str] = field(default_factory=list)  # held-out records; [] = val_fraction of `data`
    val_fraction: float = 0.05  # share of the records held out when val_data is empty
    # auto (the base's tokenizer_config.json chat_template, else deepseek-chat) | deepseek-chat (the 16b-chat
    # template `chat` uses) | instruction (the released finetune script's) | checkpoint | jinja:FILE
    template: str = "auto"
    pack: bool = True  # several conversations per sequence (per-document attention); false = one per row, padded
    overlong: str = "truncate"  # a conversation longer than train.seq_len: truncate | drop (counted either way)
    epochs: int = 0  # > 0: train.steps = epochs over the packed training rows (batch_size rows per step)


@dataclass
class LoraSection:
    """Low-rank adapters instead of full fine-tuning (deepseekmoe/model/lora.py); the released
    finetune script's settings are the defaults (r 8, alpha 32, dropout 0.1, every projection)."""

    enabled: bool = False
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    experts: bool = True  # adapters on the routed experts (stacked per-expert factors)
    shared_experts: bool = True
    train_embeddings: bool = False  # train embed_tokens and lm_head fully (the released script does)
    train_router: bool = False  # the router stays frozen by default
    merge: bool = False  # also write the merged model (released format) at the end


@dataclass
class TrainConfig:
    name: str = "tiny"
    out: str = ""  # run directory; "" = runs/<name>-<YYYYmmdd-HHMMSS>
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    system: SystemSection = field(default_factory=SystemSection)
    sample: SampleSection = field(default_factory=SampleSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # torchrun layout (docs/parallel.md)
    sft: SFTSection = field(default_factory=SFTSection)  # fine-tuning (docs/finetuning.md)
    lora: LoraSection = field(default_factory=LoraSection)

    # ------------------------------------------------------------------ derived
    @property
    def is_sft(self) -> bool:
        return bool(self.sft.model)

    def model_config(self) -> ModelConfig:
        if self.is_sft:  # the base checkpoint's architecture (read from its config.json, no weights)
            from deepseekmoe.train.sft import base_model_config

            return base_model_config(self.sft.model, self.model.overrides)
        return presets.get(self.model.preset, **self.model.overrides)

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size

    def grad_accum(self, world_size: int = 1) -> int:
        per_step = self.micro_batch_size * world_size
        return self.train.batch_size // per_step

    def to_dict(self) -> dict:
        """Nested plain dict (the form recipes and checkpoints hold); model overrides inline."""
        d = dataclasses.asdict(self)
        m = d["model"]
        d["model"] = {"preset": m["preset"], **m["overrides"]}
        for name, default in (("sft", SFTSection()), ("lora", LoraSection())):
            if getattr(self, name) == default:  # pretraining configs read as before fine-tuning existed
                del d[name]
        return d

    def validate(self, world_size: int = 1) -> None:
        t = self.train
        for key, v, lo in [("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
                           ("train.seq_len", t.seq_len, 2), ("train.micro_batch_size", t.micro_batch_size, 0),
                           ("schedule.warmup_steps", self.schedule.warmup_steps, 0),
                           ("eval.every", self.eval.every, 0), ("eval.max_batches", self.eval.max_batches, 0),
                           ("checkpoint.every", self.checkpoint.every, 0), ("checkpoint.keep", self.checkpoint.keep, 1),
                           ("log.every", self.log.every, 1), ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1),
                           ("train.divergence_steps", t.divergence_steps, 1),
                           ("sample.max_new_tokens", self.sample.max_new_tokens, 0),
                           ("system.threads", self.system.threads, 0)]:
            if v < lo:
                raise ConfigError(f"{key}={v}: must be >= {lo}")
        per_step = self.micro_batch_size * world_size
        if t.batch_size % per_step:
            raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size="
                              f"{self.micro_batch_size} x {world_size} device(s); choose a micro-batch size "
                              "that divides the batch")
        if t.divergence_factor != 0 and not t.divergence_factor > 1:
            raise ConfigError(f"train.divergence_factor={t.divergence_factor}: must be > 1 (a multiple of the "
                              "running minimum loss), or 0 to turn the divergence check off")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr={self.optim.lr}: the learning rate must be positive")
        if self.optim.grad_clip < 0 or self.optim.weight_decay < 0:
            raise ConfigError("optim.grad_clip and optim.weight_decay cannot be negative")
        _choice("optim.impl", self.optim.impl, ("auto", "fused", "foreach", "single", "triton"))
        _choice("optim.clip_impl", self.optim.clip_impl, ("fused", "inplace"))
        _choice("schedule.kind", self.schedule.kind, SCHEDULES)
        parse_dtype(self.system.dtype, "system.dtype", ("auto", *TRAINING_NAMES))
        dev = self.system.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"system.device={dev!r}: use auto, cpu, cuda or cuda:N")
        for f in self.schedule.decay_at:
            if not 0 < f < 1:
                raise ConfigError(f"schedule.decay_at={self.schedule.decay_at}: each entry is a fraction of "
                                  "the steps, strictly between 0 and 1")
        if not 0 < self.schedule.decay_factor <= 1:
            raise ConfigError(f"schedule.decay_factor={self.schedule.decay_factor}: must be in (0, 1]")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio={self.schedule.min_lr_ratio}: must be in [0, 1] (the final "
                              "learning rate as a fraction of optim.lr)")
        if not 0 < self.schedule.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction={self.schedule.decay_fraction}: must be in (0, 1] (the share "
                              "of the steps the wsd schedule spends decaying)")
        mc = self.model_config()  # validates the preset name and its overrides
        if t.seq_len > mc.max_position_embeddings:
            raise ConfigError(f"train.seq_len={t.seq_len} exceeds the model's max_position_embeddings="
                              f"{mc.max_position_embeddings}; shorten it or set --model.max_position_embeddings")
        if self.sample.temperature < 0:
            raise ConfigError(f"sample.temperature={self.sample.temperature}: must be >= 0 (0 = greedy)")
        self.parallel.validate()  # names and ranges; the layout against the world size at launch
        if self.is_sft:
            self._validate_sft()

    def _validate_sft(self) -> None:
        s, lo = self.sft, self.lora
        if not s.data:
            raise ConfigError("sft.data is empty: give the record files to fine-tune on (--data FILE ...)")
        if not s.val_data and not 0 < s.val_fraction < 1:
            raise ConfigError(f"sft.val_fraction={s.val_fraction}: must be strictly between 0 and 1 (or give "
                              "held-out records with --sft.val_data)")
        _choice("sft.overlong", s.overlong, ("truncate", "drop"))
        if s.epochs < 0:
            raise ConfigError(f"sft.epochs={s.epochs}: must be >= 0 (0: train.steps counts the run)")
        if self.parallel.pp > 1:
            raise ConfigError(f"parallel.pp={self.parallel.pp}: fine-tuning does not run pipeline parallel (the "
                              "packed per-document attention masks do not cross stages); use parallel.pp=1 "
                              "with FSDP (parallel.dp) and expert parallel (parallel.ep)")
        if lo.enabled:
            from deepseekmoe.train.sft import lora_config

            lora_config(self)  # model/lora.py's LoraConfig checks r, alpha, dropout and the targets
            if self.parallel.ep > 1:
                raise ConfigError(f"lora.enabled with parallel.ep={self.parallel.ep}: the routed experts' LoRA factors "
                                  "are not split over expert-parallel ranks; use data parallel (parallel.dp), or one "
                                  "GPU (a LoRA run of the released 16B fits one)")
        elif lo.merge:
            raise ConfigError("lora.merge=true without lora.enabled=true: there is no adapter to merge; enable "
                              "LoRA (--lora) or drop --lora.merge")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}" + suggest(str(value), choices))


# ---------------------------------------------------------------------- keys and types
_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Old key -> the key it now sets (recipes, command lines and checkpoints written before the
# compile / checkpointing knobs moved to [parallel] keep working).
KEY_ALIASES = {"system.compile": "parallel.compile",
               "system.activation_checkpointing": "parallel.activation_checkpointing"}


def _section_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _model_types() -> dict[str, object]:
    return typing.get_type_hints(ModelConfig)


def all_keys() -> list[str]:
    """Every valid dotted key (model fields included), for suggestions and --help."""
    keys = []
    for name, f in _SECTIONS.items():
        if name == "model":
            keys.append("model.preset")
            keys += [f"model.{k}" for k in _model_types() if k != "name"]
        elif f.default_factory is not dataclasses.MISSING:
            keys += [f"{name}.{k}" for k in _section_types(f.default_factory)]
        else:
            keys.append(name)
    return keys


def _unknown(key: str, where: str) -> ConfigError:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a typo in the section part: match the leaf among all sections
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[hit[0]]] if hit else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; `deepseekmoe train --help` lists every key")


def _coerce(key: str, value, typ):
    """Check/convert `value` to the annotated type `typ`, naming the key on failure."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() == "auto" and type(None) in args:  # unset, spelled out
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:  # the shell ate the quotes: [a,b] or a,b
            value = [w.strip() for w in value.strip().removeprefix("[").removesuffix("]").split(",") if w.strip()]
        if not isinstance(value, list):
            example = '["q_proj", "v_proj"]' if args and args[0] is str else "[0.8, 0.9]"
            raise ConfigError(f"{key}={value!r}: expected a list such as {example}")
        return [_coerce(key, v, args[0]) for v in value] if args else value
    if typ is dict or origin is dict:
        return value
    return value


def parse_value(text: str):
    """A command-line value as a TOML literal (`3e-4`, `true`, `[1, 2]`, `"x"`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:  # not a literal: a bare word (`tiny`, `cuda:0`) means itself
        return text


def apply(cfg: TrainConfig, key: str, value, where: str = "the command line") -> None:
    """Set dotted `key` on `cfg` (in place) after checking the key and the value's type."""
    key = KEY_ALIASES.get(key, key)
    parts = key.split(".")
    if len(parts) == 1:
        if parts[0] not in ("name", "out"):
            raise _unknown(key, where)
        setattr(cfg, parts[0], _coerce(key, value, str))
        return
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise _unknown(key, where)
    section, leaf = parts
    if section == "model":
        if leaf == "preset":
            cfg.model.preset = _coerce(key, value, str)
            return
        types = _model_types()
        if leaf not in types or leaf == "name":
            raise _unknown(key, where)
        cfg.model.overrides[leaf] = _coerce(key, value, types[leaf])
        return
    obj = getattr(cfg, section)
    types = _section_types(type(obj))
    if leaf not in types:
        raise _unknown(key, where)
    setattr(obj, leaf, _coerce(key, value, types[leaf]))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def from_dict(d: dict, where: str = "a recipe") -> TrainConfig:
    cfg = TrainConfig()
    items = _flatten(d)
    # The preset first: overrides of its fields are checked against the model config afterwards.
    items.sort(key=lambda kv: kv[0] != "model.preset")
    for key, value in items:
        apply(cfg, key, value, where)
    return cfg


def recipes_dir() -> Path:
    """configs/ of a source checkout (recipes are not part of the installed package)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(spec: str) -> Path:
    """A path to a .toml, or the name of a recipe in configs/ ("deepseekmoe-2b")."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.toml"))
        what = f"pass one of its recipes ({', '.join(inside[:5])})" if inside else "pass the path of a .toml recipe"
        raise ConfigError(f"recipe {spec!r} is a directory, not a recipe file; {what}, or continue a run "
                          f"there with `deepseekmoe train --resume {spec}`")
    if path.suffix == "" and (recipes_dir() / f"{spec}.toml").is_file():
        return recipes_dir() / f"{spec}.toml"
    shipped = sorted(p.stem for p in recipes_dir().glob("*.toml")) if recipes_dir().is_dir() else []
    hint = suggest(path.stem, shipped) if shipped else ""
    listing = f"; recipes in configs/: {', '.join(shipped)}" if shipped else ""
    raise ConfigError(f"recipe {spec!r} not found{hint}{listing}")


def load_recipe(spec: str) -> dict:
    path = resolve_recipe(spec)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e


def build(recipe: str | None = None, overrides: list[tuple[str, str]] | None = None,
          base: dict | None = None) -> TrainConfig:
    """Recipe (or `base`, a saved config dict) + command-line overrides -> validated TrainConfig."""
    if base is not None:
        cfg = from_dict(base, "the checkpoint's config")
    elif recipe:
        cfg = from_dict(load_recipe(recipe), str(resolve_recipe(recipe)))
    else:
        cfg = TrainConfig()
    # A changed preset must be applied before field overrides, as in a recipe.
    for key, text in sorted(overrides or [], key=lambda kv: kv[0] != "model.preset"):
        apply(cfg, key, parse_value(utf8_text(text, f"--{key}")))
    cfg.validate()
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as a recipe (written to each run directory)."""
    d = cfg.to_dict()
    lines = [f"{k} = {_toml(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'
