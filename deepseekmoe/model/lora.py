"""LoRA adapters for the Transformer: add, merge, save and load them (PEFT's semantics and files).

    apply_lora(model, LoraConfig(...))   adapters in place (B = 0: the model is unchanged), the rest
                                         frozen; `model.lora_config` records what was applied
    merge_lora(model)                    W += scale * B @ A everywhere, adapters removed
    save_adapter(model, dir) / load_adapter(model, dir)   PEFT's on-disk format
    lora_state_dict(model)               the trainable tensors under this project's names

What gets an adapter (`LoraConfig.targets` are the released module names): attention
`self_attn.{q,k,v,o}_proj`, the dense MLP `mlp.{gate,up,down}_proj`, the shared experts
`mlp.shared_experts.*` (`shared_experts`) and each routed expert `mlp.experts.E.*` (`experts`). The
router `mlp.gate` is never adapted; `train_router` trains it in full, `train_embeddings` trains
`embed_tokens` and `lm_head` in full (PEFT's `modules_to_save`, as the released finetune script).

Semantics are PEFT's, so adapters interchange: y = W x + scale * B A drop(x), scale = alpha / r,
dropout on the LoRA input only, A kaiming-uniform (a = sqrt(5)), B = 0, adapters kept in float32
over a bf16 / fp16 base (PEFT's autocast_adapter_dtype); the low-rank product runs in the
activations' dtype, like the base weights.

Where the parameters live (base names never change, every adapter name holds "lora_", so the
released-format export, which writes the base tensors by name, is unaffected):
  nn.Linear targets   swapped for `LoraLinear` (a subclass keeping `weight` / `bias`) with
                      `lora_A` [r, in] and `lora_B` [out, r]
  routed experts      `mlp.experts.lora` (model/moe/lora.py): per-projection factors stacked over
                      the experts, applied inside the expert backends

On disk (PEFT's names for the released module names, checked against peft itself in
tests/test_lora_peft.py): `adapter_config.json` (the LoraConfig keys PEFT has read since 0.10, so
old and new releases load it) and `adapter_model.safetensors` with e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in], `...mlp.experts.3.
down_proj.lora_B.weight` [D, r], and `base_model.model.model.embed_tokens.weight` /
`base_model.model.lm_head.weight` for trained embeddings. Loading checks every tensor against the
model before changing anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.errors import CheckpointError, ConfigError, suggest
from deepseekmoe.model.init import _canonical_name, param_seed
from deepseekmoe.model.moe.layer import MoE, RoutedExperts
from deepseekmoe.model.moe.lora import EXPERT_PROJECTIONS, ExpertLora

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS = ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS  # released module names (last component)
    experts: bool = True  # adapt each routed expert's gate/up/down_proj (those in targets)
    shared_experts: bool = True  # adapt the shared experts' gate/up/down_proj (those in targets)
    train_embeddings: bool = False  # train embed_tokens and lm_head in full
    train_router: bool = False  # train the routers (mlp.gate) in full

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r={self.r!r}: the rank must be a positive integer (e.g. 8)")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha={self.alpha!r}: must be a positive number (scale = alpha / r)")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            raise ConfigError(f"lora.targets is empty: name some of {', '.join(LORA_TARGETS)}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ConfigError(f"lora.targets: {t!r} is not a module LoRA can adapt; choose among "
                                  f"{', '.join(LORA_TARGETS)}" + suggest(str(t), LORA_TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        """From a recipe's `lora` section; an unknown key is a ConfigError naming the closest field."""
        names = [f.name for f in fields(cls)]
        for k in d:
            if k not in names:
                raise ConfigError(f"lora.{k}: unknown LoRA setting; known: {', '.join(names)}" + suggest(k, names))
        return cls(**d)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


# ------------------------------------------------------------------------------------------ modules
class LoraLinear(nn.Linear):
    """nn.Linear plus a LoRA update: weight [out, in] (frozen), lora_A [r, in], lora_B [out, r]."""

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, alpha: float, dropout: float, dtype: torch.dtype,
             seed: int | None) -> LoraLinear:
        """A LoraLinear holding `linear`'s own weight and bias parameters (not copies)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m.r, m.scale = r, alpha / r
        dev = linear.weight.device
        m.lora_A = nn.Parameter(torch.empty(r, m.in_features, dtype=dtype, device=dev))
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, r, dtype=dtype, device=dev))
        m.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        m.reset_lora(seed)
        m.train(linear.training)
        return m

    @torch.no_grad()
    def reset_lora(self, seed: int | None = None) -> None:
        if self.lora_A.device.type == "meta":
            return
        g = None if seed is None else torch.Generator().manual_seed(seed)
        block = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=g)
        self.lora_A.copy_(block)
        self.lora_B.zero_()

    def forward(self, x):
        dt = x.dtype
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(dt)), self.lora_B.to(dt))
        return F.linear(x, self.weight, self.bias) + low * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32 ([out, in], what merging adds to the weight)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def unwrap(self) -> nn.Linear:
        """A plain nn.Linear holding this module's weight and bias parameters (adapter dropped)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


class _Targets(NamedTuple):
    linears: list[tuple[str, nn.Module, str]]  # (module name, parent, attribute)
    experts: list[tuple[str, RoutedExperts, tuple[str, ...]]]  # (module name, module, projections)
    full: list[str]  # parameter names trained in full (embeddings, routers)


def _find_targets(model: nn.Module, cfg: LoraConfig) -> _Targets:
    """The modules `cfg` adapts in `model` (a Transformer or a pipeline stage), by released name."""
    linears, experts, full = [], [], []
    mlp_projs = tuple(p for p in EXPERT_PROJECTIONS if p in cfg.targets)
    for key, block in model.layers.items():
        pre = f"layers.{key}."
        for p in ATTENTION_PROJECTIONS:
            if p in cfg.targets:
                linears.append((f"{pre}self_attn.{p}", block.self_attn, p))
        mlp = block.mlp
        if not isinstance(mlp, MoE):
            linears += [(f"{pre}mlp.{p}", mlp, p) for p in mlp_projs]
            continue
        if cfg.shared_experts and mlp.shared_experts is not None:
            linears += [(f"{pre}mlp.shared_experts.{p}", mlp.shared_experts, p) for p in mlp_projs]
        if cfg.experts and mlp_projs:
            experts.append((f"{pre}mlp.experts", mlp.experts, mlp_projs))
        if cfg.train_router and isinstance(getattr(mlp.gate, "weight", None), nn.Parameter):
            full.append(f"{pre}mlp.gate.weight")
    if cfg.train_embeddings:
        full += [n for n in ("embed_tokens.weight", "lm_head.weight") if _has_param(model, n)]
    return _Targets(linears, experts, full)


def _has_param(model: nn.Module, name: str) -> bool:
    mod, _, attr = name.rpartition(".")
    m = getattr(model, mod, None)
    return m is not None and isinstance(getattr(m, attr, None), nn.Parameter)


def _adapter_dtype(base: torch.dtype) -> torch.dtype:
    # PEFT's autocast_adapter_dtype: float32 adapters over a half-precision base (optimizer precision).
    return torch.float32 if base in (torch.bfloat16, torch.float16) else base


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int | None = None) -> nn.Module:
    """Add LoRA adapters to `model` in place (B = 0, so its outputs do not change) and freeze every
    other parameter but the embeddings (`train_embeddings`) and routers (`train_router`). `seed`:
    A drawn from per-parameter generators (the same in any layout); None: the global RNG."""
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("the model already has LoRA adapters; merge_lora(model) first, or apply them to the "
                          "base model")
    t = _find_targets(model, cfg)
    if not t.linears and not t.experts:
        raise ConfigError(f"lora.targets={list(cfg.targets)}: no such module in this model (experts="
                          f"{cfg.experts}, shared_experts={cfg.shared_experts})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parent, attr in t.linears:
        lin = getattr(parent, attr)
        s = None if seed is None else param_seed(seed, f"{name}.lora_A")
        setattr(parent, attr, LoraLinear.wrap(lin, cfg.r, cfg.alpha, cfg.dropout, _adapter_dtype(lin.weight.dtype), s))
    for name, ex, projs in t.experts:
        lora = ExpertLora(ex.n_experts, ex.dim, ex.width, cfg.r, cfg.alpha, cfg.dropout, projs,
                          dtype=_adapter_dtype(ex.w13.dtype), device=ex.w13.device)
        if ex.w13.device.type != "meta":
            lora.reset_parameters(None if seed is None else
                                  (lambda pname, e, n=name: param_seed(seed, f"{n}.lora.{pname}", e)))
        lora.train(ex.training)
        ex.lora = lora
    params = _params(model)
    for name in t.full:
        params[name].requires_grad_(True)
    model.lora_config = cfg
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B @ A, computed in float32) and remove
    the adapters; the model is then a plain model (all parameters trainable again) whose outputs
    equal the adapted model's."""
    if getattr(model, "lora_config", None) is None:
        raise ConfigError("the model has no LoRA adapters to merge (apply_lora or load_adapter first)")
    for _, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                child.weight.add_(child.delta().to(child.weight.dtype))
                setattr(module, attr, child.unwrap())
        if isinstance(module, RoutedExperts) and module.lora is not None:
            f = module.lora.factors(torch.float32)
            for w, delta in ((module.w13, f.delta13()), (module.w2, f.delta2())):
                if delta is not None:
                    w.add_(delta.to(w.dtype))
            module.lora = None
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora_config = None
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (and embeddings / routers trained in full) under the model's parameter
    names, detached: what a LoRA run needs to save besides the frozen base."""
    cfg = _require_lora(model)
    full = set(_find_targets(model, cfg).full)
    return {n: p.detach() for n, p in _params(model).items() if "lora_" in n or n in full}


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their plain Transformer names (without the activation-checkpoint / compile
    wrappers' prefixes that parallelize() may insert), tied ones under each name."""
    return {_canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}


def _require_lora(model: nn.Module) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ConfigError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return cfg


# ------------------------------------------------------------------------------------------ PEFT files
class _Slot(NamedTuple):
    param: str  # this project's parameter name
    expert: int | None  # index into a stacked expert factor
    shape: tuple[int, ...]


def _peft_name(module_name: str) -> str:
    # Released names sit under `model.` except the head; PEFT prefixes its wrapper's `base_model.model.`.
    return PEFT_PREFIX + (module_name if module_name.startswith("lm_head") else "model." + module_name)


def adapter_plan(model: nn.Module, cfg: LoraConfig) -> dict[str, _Slot]:
    """PEFT tensor name -> where it lives here and its shape, for `cfg` applied to `model` (which may
    or may not carry the adapters yet)."""
    t = _find_targets(model, cfg)
    r = cfg.r
    plan: dict[str, _Slot] = {}
    for name, parent, attr in t.linears:
        lin = getattr(parent, attr)
        plan[_peft_name(name) + ".lora_A.weight"] = _Slot(name + ".lora_A", None, (r, lin.in_features))
        plan[_peft_name(name) + ".lora_B.weight"] = _Slot(name + ".lora_B", None, (lin.out_features, r))
    for name, ex, projs in t.experts:
        for e in range(ex.n_experts):
            for p in projs:
                n_in, n_out = (ex.width, ex.dim) if p == "down_proj" else (ex.dim, ex.width)
                base = _peft_name(f"{name}.{e}.{p}")
                plan[base + ".lora_A.weight"] = _Slot(f"{name}.lora.{p}_lora_A", e, (r, n_in))
                plan[base + ".lora_B.weight"] = _Slot(f"{name}.lora.{p}_lora_B", e, (n_out, r))
    params = _params(model)
    for name in t.full:
        plan[_peft_name(name.rpartition(".")[0]) + ".weight"] = _Slot(name, None, tuple(params[name].shape))
    return plan


def _target_modules(model: nn.Module, cfg: LoraConfig) -> list[str] | str:
    """PEFT's target_modules: the released names' suffixes when they select exactly what `cfg`
    adapts (as the released script writes it), else a regex PEFT full-matches against module names."""
    has = {"shared": False, "experts": False}
    for block in model.layers.values():
        if isinstance(block.mlp, MoE):
            has["experts"] = True
            has["shared"] |= block.mlp.shared_experts is not None
    mlp = [p for p in EXPERT_PROJECTIONS if p in cfg.targets]
    if not mlp or ((cfg.experts or not has["experts"]) and (cfg.shared_experts or not has["shared"])):
        return list(cfg.targets)
    alt = lambda names: "(?:" + "|".join(names) + ")"  # noqa: E731
    parts = [r"self_attn\." + alt(p for p in ATTENTION_PROJECTIONS if p in cfg.targets)] \
        if any(p in cfg.targets for p in ATTENTION_PROJECTIONS) else []
    parts.append(r"mlp\." + alt(mlp))
    if cfg.shared_experts:
        parts.append(r"mlp\.shared_experts\." + alt(mlp))
    if cfg.experts:
        parts.append(r"mlp\.experts\.\d+\." + alt(mlp))
    return r"model\.layers\.\d+\." + alt(parts)


def peft_config(model: nn.Module, cfg: LoraConfig) -> dict:
    """adapter_config.json for `cfg` on `model`: keys every PEFT release since 0.10 reads (newer
    ones default the rest), task CAUSAL_LM as the released finetune script."""
    save = ["embed_tokens", "lm_head"] if cfg.train_embeddings else []
    if cfg.train_router:
        save.append("gate")
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": getattr(model, "source_dir", None),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": save or None, "peft_type": "LORA", "r": cfg.r, "rank_pattern": {},
            "revision": None, "target_modules": _target_modules(model, cfg), "task_type": "CAUSAL_LM",
            "use_dora": False, "use_rslora": False}


def save_adapter(model: nn.Module, path) -> None:
    """Write the model's adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)
    to directory `path`, atomically: a finished directory or nothing."""
    from safetensors.torch import save_file

    from deepseekmoe.checkpoint.files import atomic_directory

    cfg = _require_lora(model)
    params = _params(model)
    tensors = {}
    for name, slot in adapter_plan(model, cfg).items():
        t = params[slot.param].detach()
        t = t if slot.expert is None else t[slot.expert]
        tensors[name] = t.to("cpu", copy=True).contiguous()  # copies: tied embeddings share storage
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(model, cfg), indent=2) + "\n")


# Options of a PEFT LoraConfig that change the computation and are not implemented here: each must
# be absent or falsy.
_UNSUPPORTED = ("use_dora", "use_rslora", "use_qalora", "lora_bias", "fan_in_fan_out", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")
# A LoRA tensor of a released module: group 1 the expert index (routed experts), group 2 the projection.
_MODULE_RE = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp(?:\.shared_experts|\.experts\.(\d+))?)\."
                        r"(\w+)\.lora_[AB]\.weight")


def _read_peft_config(path: Path) -> dict:
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        extra = " (adapter_model.bin: re-save it with safetensors)" if (path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path}: not a LoRA adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
                              + extra)
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type={raw.get('peft_type')!r}; only LoRA adapters load here")
    for key in _UNSUPPORTED:
        if raw.get(key):
            raise CheckpointError(f"{cfg_path}: {key}={raw[key]!r} is not supported (plain LoRA only); "
                                  "re-train or convert the adapter without it")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={raw['bias']!r} is not supported (LoRA without bias terms only)")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise CheckpointError(f"{cfg_path}: no {key!r} (not a PEFT LoRA config)")
    return raw


def _config_from_peft(raw: dict, names, cfg_path: Path, w_path: Path) -> LoraConfig:
    """The LoraConfig an adapter file describes: hyper-parameters from its config, adapted modules
    from its tensor names."""
    projs, experts, shared = set(), False, False
    for n in names:
        m = _MODULE_RE.fullmatch(n[len(PEFT_PREFIX):]) if n.startswith(PEFT_PREFIX) else None
        if m is None:
            if ".lora_" in n:
                raise CheckpointError(f"{w_path}: tensor {n}: LoRA on a module this model does not adapt (only the "
                                      f"layers' {', '.join(LORA_TARGETS)})")
            continue
        projs.add(m.group(2))
        experts |= m.group(1) is not None
        shared |= ".shared_experts." in n
    bad = sorted(p for p in projs if p not in LORA_TARGETS)
    if bad:
        raise CheckpointError(f"{w_path}: LoRA on {bad[0]!r} modules; this model adapts only {', '.join(LORA_TARGETS)}")
    if not projs:
        raise CheckpointError(f"{w_path}: holds no LoRA tensors of the released module names "
                              "(base_model.model.model.layers.N....lora_A.weight)")
    save = raw.get("modules_to_save") or []
    unknown = [m for m in save if m not in ("embed_tokens", "lm_head", "gate")]
    if unknown:
        raise CheckpointError(f"{cfg_path}: modules_to_save {unknown} not supported (embed_tokens, lm_head, gate)")
    if ("embed_tokens" in save) != ("lm_head" in save):
        raise CheckpointError(f"{cfg_path}: modules_to_save {save}: embed_tokens and lm_head are trained together here")
    try:
        return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          targets=tuple(p for p in LORA_TARGETS if p in projs), experts=experts,
                          shared_experts=shared, train_embeddings="embed_tokens" in save, train_router="gate" in save)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def _check_tensors(plan: dict[str, _Slot], shapes: dict[str, tuple], cfg: LoraConfig, model, w_path: Path,
                   cfg_path: Path) -> None:
    """Every planned tensor present with its shape and nothing else: else one CheckpointError."""
    mc = model.config
    about = (f"this model has hidden_size={mc.hidden_size}, {mc.num_hidden_layers} layers, "
             f"{mc.n_routed_experts} routed experts of width {mc.moe_intermediate_size}")
    extra = [n for n in shapes if n not in plan]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{w_path}: tensor {extra[0]}{more} has no place in this model ({about}); "
                              "the adapter was made for another base model")
    missing = [n for n in plan if n not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{w_path}: tensor {missing[0]}{more} is missing: the adapter must cover every "
                              f"module it adapts in every layer ({about})")
    for n, slot in plan.items():
        got = tuple(shapes[n])
        if got == slot.shape:
            continue
        rank = got[0] if n.endswith("lora_A.weight") else got[-1] if n.endswith("lora_B.weight") else None
        if rank is not None and len(got) == 2 and rank != cfg.r:
            raise CheckpointError(f"{w_path}: tensor {n} has rank {rank} but {cfg_path.name} says r={cfg.r}")
        raise CheckpointError(f"{w_path}: tensor {n} has shape {list(got)}, this model needs {list(slot.shape)} "
                              f"({about}); the adapter was made for another base model")


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Apply the LoRA adapter in PEFT's format at directory `path` to the base `model` (in place) and
    return it. Every tensor is checked against the model first: an adapter of another base shape,
    a rank that disagrees with its config or a missing tensor raise one CheckpointError and leave
    the model untouched."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    raw = _read_peft_config(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError(f"cannot load {path}: the model already has LoRA adapters (load onto the base model)")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
            cfg = _config_from_peft(raw, shapes, cfg_path, w_path)
            plan = adapter_plan(model, cfg)
            _check_tensors(plan, shapes, cfg, model, w_path, cfg_path)
            tensors = {n: f.get_tensor(n) for n in plan}
    except SafetensorError as e:
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({e})") from None
    apply_lora(model, cfg)
    params = _params(model)
    with torch.no_grad():
        for n, slot in plan.items():
            dst = params[slot.param] if slot.expert is None else params[slot.param][slot.expert]
            dst.copy_(tensors[n])
    return model
