"""The released deepseek-moe Hugging Face format: config.json <-> ModelConfig, tensor names,
streaming safetensors read and write.

The released checkpoints (deepseek-moe-16b-base / -chat) are a `config.json` with
`model_type: "deepseek"`, one `model.safetensors` or shards listed in
`model.safetensors.index.json`, and one tensor per expert projection:

    model.embed_tokens.weight                                   [V, D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight             (+ .bias with attention_bias)
    model.layers.N.{input,post_attention}_layernorm.weight      [D]
    model.layers.N.mlp.{gate,up,down}_proj.weight               dense FFN layers
    model.layers.N.mlp.gate.weight                              router [E, D]
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight     [F, D], [F, D], [D, F]
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight  one MLP of width n_shared * F
    model.norm.weight, lm_head.weight

This module is the only place that knows that format. Everything is a pure function of a
ModelConfig (`tensor_plan`) plus streaming I/O, and no model code is imported at module level:
`Transformer.from_pretrained` / `save_pretrained` call `load_model` / `save_model` with the class,
so the dependency arrow points from the model down to this file. The routed experts are packed
into / unpacked from the model's stacked `w13 [E, 2F, D]` (gate rows, then up rows) and
`w2 [E, D, F]` one expert slice at a time, so loading never holds more than one copy of the
weights plus one tensor.

An export is complete for transformers: the files beside the weights (remote code, generation and
tokenizer configs) are written by checkpoint/hf_files.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from deepseekmoe.checkpoint.hf_files import AUTO_MAP, COMPANION_FILES, write_transformers_files
from deepseekmoe.errors import CheckpointError, ConfigError
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.dtypes import DTYPES, dtype_name

MODEL_TYPE = "deepseek"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# config.json key holding the fields this project adds (routing family of the paper's baselines,
# device-level balance loss); the released code ignores unknown keys.
EXTRAS_KEY = "deepseekmoe"
_EXTRA_FIELDS = ("router", "device_balance_alpha", "n_device_groups", "hash_seed", "name")

# Defaults of the released DeepseekConfig for fields a config.json may leave out.
HF_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": None,
    "n_shared_experts": None, "n_routed_experts": None, "num_experts_per_tok": None,
    "moe_layer_freq": 1, "first_k_dense_replace": 0, "norm_topk_prob": False, "scoring_func": "softmax",
    "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
}
_SAME_NAME = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "moe_layer_freq", "first_k_dense_replace",
              "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux", "max_position_embeddings",
              "initializer_range", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "attention_bias",
              "bos_token_id", "eos_token_id")
# ---------------------------------------------------------------------- config.json
def config_from_hf(raw: dict) -> ModelConfig:
    """A released-format config.json dict -> ModelConfig (the release's defaults fill gaps)."""
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"model_type={model_type!r} is not supported: this reads the released "
                          f"deepseek-moe format (model_type {MODEL_TYPE!r})")
    d = {**HF_DEFAULTS, **{k: v for k, v in raw.items() if k in HF_DEFAULTS}}
    if d["hidden_act"] != "silu":
        raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported; deepseek-moe uses 'silu'")
    if d["rope_scaling"] is not None:
        raise ConfigError(f"rope_scaling={d['rope_scaling']!r} is not supported; only plain RoPE "
                          "(rope_scaling: null) as in the released models")
    fields = {k: d[k] for k in _SAME_NAME}
    for k in ("bos_token_id", "eos_token_id"):  # generation configs sometimes hold lists
        if isinstance(fields[k], list):
            fields[k] = fields[k][0] if fields[k] else None
    routed = d["n_routed_experts"]
    fields["n_routed_experts"] = routed or 0
    fields["n_shared_experts"] = d["n_shared_experts"] or 0
    k = d["num_experts_per_tok"]
    if routed and k is None:
        raise ConfigError("num_experts_per_tok is missing: a config with n_routed_experts must say "
                          "how many experts each token uses")
    fields["num_experts_per_tok"] = k if k is not None else 0
    extras = raw.get(EXTRAS_KEY) or {}
    fields.update({k: v for k, v in extras.items() if k in _EXTRA_FIELDS})
    if "name" not in fields:
        fields["name"] = Path(str(raw.get("_name_or_path") or MODEL_TYPE)).name or MODEL_TYPE
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """ModelConfig -> a config.json dict the released code (and config_from_hf) reads."""
    if cfg.router == "hash":
        raise ConfigError("router='hash' cannot be written in the released format (its router is a "
                          "fixed token-id table, not a gate weight); keep it as a native checkpoint")
    out = {
        "architectures": ["DeepseekForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "attention_dropout": 0.0, "hidden_act": "silu", "pretraining_tp": 1, "rope_scaling": None,
        "use_cache": True, "transformers_version": "4.36.0",
    }
    out.update({k: getattr(cfg, k) for k in _SAME_NAME})
    moe = cfg.n_routed_experts > 0
    out["n_routed_experts"] = cfg.n_routed_experts if moe else None
    # The release builds a shared MLP whenever the field is not null, so 0 must be written as null.
    out["n_shared_experts"] = cfg.n_shared_experts if moe and cfg.n_shared_experts else None
    out["num_experts_per_tok"] = cfg.num_experts_per_tok if moe else None
    if cfg.router == "gshard":  # top-2 with renormalised gates is norm_topk_prob in the release
        out["norm_topk_prob"] = True
    out["torch_dtype"] = dtype_name(dtype or torch.float32)
    out[EXTRAS_KEY] = {k: getattr(cfg, k) for k in _EXTRA_FIELDS}
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------- tensor names
class Target(NamedTuple):
    """Where a released tensor lives in the model: parameter name, expert index, row range."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


def tensor_plan(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], Target]]:
    """Released tensor name -> (shape, target) for every tensor of a checkpoint of `cfg`."""
    D, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    nq, nkv, F = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.moe_intermediate_size
    plan: dict[str, tuple[tuple[int, ...], Target]] = {}

    def add(hf_name, shape, param, expert=None, rows=None):
        plan[hf_name] = (tuple(shape), Target(param, expert, rows))

    add("model.embed_tokens.weight", (V, D), "embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        for proj, out_dim, in_dim in (("q", nq, D), ("k", nkv, D), ("v", nkv, D), ("o", D, nq)):
            add(f"{p}self_attn.{proj}_proj.weight", (out_dim, in_dim), f"{ours}self_attn.{proj}_proj.weight")
            if cfg.attention_bias:
                add(f"{p}self_attn.{proj}_proj.bias", (out_dim,), f"{ours}self_attn.{proj}_proj.bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"{p}{norm}.weight", (D,), f"{ours}{norm}.weight")
        if not cfg.is_moe_layer(i):
            _mlp(add, f"{p}mlp.", f"{ours}mlp.", D, cfg.intermediate_size)
            continue
        if cfg.router != "hash":
            add(f"{p}mlp.gate.weight", (cfg.n_routed_experts, D), f"{ours}mlp.gate.weight")
        for e in range(cfg.n_routed_experts):
            q = f"{p}mlp.experts.{e}."
            add(q + "gate_proj.weight", (F, D), f"{ours}mlp.experts.w13", e, (0, F))
            add(q + "up_proj.weight", (F, D), f"{ours}mlp.experts.w13", e, (F, 2 * F))
            add(q + "down_proj.weight", (D, F), f"{ours}mlp.experts.w2", e)
        if cfg.n_shared_experts:
            _mlp(add, f"{p}mlp.shared_experts.", f"{ours}mlp.shared_experts.", D, cfg.n_shared_experts * F)
    add("model.norm.weight", (D,), "norm.weight")
    if not cfg.tie_word_embeddings:  # tied heads are stored once, as the release does
        add("lm_head.weight", (V, D), "lm_head.weight")
    return plan


def _mlp(add, p, ours, D, width):
    add(p + "gate_proj.weight", (width, D), ours + "gate_proj.weight")
    add(p + "up_proj.weight", (width, D), ours + "up_proj.weight")
    add(p + "down_proj.weight", (D, width), ours + "down_proj.weight")


def _ignored(name: str) -> bool:
    # Older exports saved the rotary inverse frequencies; they are recomputed, never loaded.
    return name.endswith("rotary_emb.inv_freq")


def _view(params: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    t = params[target.param]
    if target.expert is not None:
        t = t[target.expert]
    if target.rows is not None:
        t = t[target.rows[0]:target.rows[1]]
    return t


def iter_export(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(released name, tensor view) for every tensor a checkpoint of `model` holds.

    Views, not copies: on a meta-device model this yields the name/shape plan without data."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (shape, target) in tensor_plan(model.config).items():
        t = _view(params, target)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: the model holds shape {tuple(t.shape)}, the format needs {shape}")
        yield name, t


def export_plan(model) -> dict[str, tuple[int, ...]]:
    """Released tensor name -> shape that `save_model(model)` writes (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in iter_export(model)}


# ---------------------------------------------------------------------- reading
def find_checkpoint(path) -> tuple[str, Path]:
    """('hf' | 'native' | 'dcp', directory) for a released-format dir, a native model dir, a
    training checkpoint folder holding a native `model/` dir, a distributed (DCP) training
    checkpoint, or a run directory (runs/<name>-<time>/: its newest checkpoint)."""
    from deepseekmoe.checkpoint import native

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if path.is_file():
        path = path.parent
    if (path / "checkpoints").is_dir() and not (path / "config.json").exists():
        # Finished checkpoints are named step_NNNNNNN (zero-padded); temporaries start with '.'.
        steps = sorted(p for p in (path / "checkpoints").glob("step_*") if p.is_dir())
        if not steps:
            raise CheckpointError(f"{path}: a run directory without a finished checkpoint in checkpoints/")
        path = steps[-1]
    if native.is_native(path):
        return "native", path
    if native.is_native(path / "model"):
        return "native", path / "model"
    if (path / ".metadata").is_file():
        return "dcp", path
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a released deepseek-moe checkpoint, a "
                              "native model directory, a training checkpoint or a run directory)")
    return "hf", path


def require_loadable(kind: str, path: Path) -> None:
    """Model loaders read released and native directories; a distributed checkpoint needs a convert."""
    if kind == "dcp":
        raise CheckpointError(f"{path} is a sharded checkpoint of a distributed run; turn it into a model "
                              f"directory first: deepseekmoe convert {path} OUT_DIR")


def read_hf_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not JSON
        raise CheckpointError(f"{path / 'config.json'}: unreadable JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path / 'config.json'}: holds a JSON {type(cfg).__name__}, not the object of a "
                              "model config")
    return cfg


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (index when sharded, else the one file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} (for tensor {name}) is missing")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _header(single)}
    if list(path.glob("*.bin")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are read (found .bin files); "
                              "re-save them as safetensors")
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _header(file: Path, name_hint: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype string) from a safetensors header, without reading data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        what = f" (holding {name_hint})" if name_hint else ""
        raise CheckpointError(f"{file}{what}: truncated or corrupted safetensors file ({e})") from e


def check_checkpoint(cfg: ModelConfig, path: Path) -> dict[str, Path]:
    """Check names and shapes against the plan before any data is read; return name -> file."""
    files = weight_files(path)
    plan = tensor_plan(cfg)
    headers: dict[Path, dict] = {}
    for name, f in files.items():
        if f not in headers:
            headers[f] = _header(f, name)
        if name not in headers[f]:
            raise CheckpointError(f"{name}: listed in {INDEX_FILE} but not found in {f.name}")
    for name in files:
        if name not in plan and not _ignored(name):
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            raise CheckpointError(f"unexpected tensor {name} in {files[name].name}: the config "
                                  f"({_describe(cfg)}) has no such parameter")
    missing = [n for n in plan if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more} in {path}: the config ({_describe(cfg)}) "
                              "needs it")
    for name, (shape, _) in plan.items():
        got = headers[files[name]][name][0]
        if got != shape:
            raise CheckpointError(f"{name}: shape {list(got)} in {files[name].name} does not match "
                                  f"{list(shape)} from config.json")
    return {n: files[n] for n in plan}


def _describe(cfg: ModelConfig) -> str:
    return (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed / "
            f"{cfg.n_shared_experts} shared experts, layer plan "
            + "".join("M" if k == "moe" else "D" for k in cfg.layer_plan()))


def checkpoint_dtype(raw: dict, files: dict[str, Path]) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.json's torch_dtype, else its first tensor's."""
    if raw.get("torch_dtype") in DTYPES:
        return DTYPES[raw["torch_dtype"]]
    if files:
        f = next(iter(files.values()))
        dt = next(iter(_header(f).values()))[1]
        found = _ST_DTYPES.get(dt)
        return found if found in DTYPES.values() else torch.float32
    return torch.float32


def _meta_model(cls, cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls(cfg)  # init_weights skips meta tensors: nothing is allocated or initialised
    return model.to(dtype=dtype)


def _finish(model, device) -> torch.nn.Module:
    # Materialising parameters one by one unties a shared head; non-persistent buffers (the Hash
    # Layer table) are not in checkpoints and are rebuilt here.
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    from deepseekmoe.model.init import init_buffers

    init_buffers(model)
    return model


def empty_model(cls, cfg: ModelConfig, dtype: torch.dtype, device) -> torch.nn.Module:
    """Build on the meta device (no init, no memory), then allocate uninitialised storage."""
    return _finish(_meta_model(cls, cfg, dtype).to_empty(device=device), device)


def load_model(cls, path, dtype: torch.dtype | None = None, device="cpu", **overrides):
    """Load a released-format (or native) checkpoint into `cls` (Transformer), streamed.

    dtype None keeps the checkpoint's dtype. `overrides` replace config fields (e.g.
    expert_backend="loop"). Returns the model in eval mode."""
    kind, path = find_checkpoint(path)
    require_loadable(kind, path)
    if kind == "native":
        return _load_native(cls, path, dtype, device, overrides)
    raw = read_hf_config(path)
    cfg = config_from_hf(raw)
    if overrides:
        cfg = cfg.replace(**overrides)
    files = check_checkpoint(cfg, path)
    dtype = dtype or checkpoint_dtype(raw, files)
    model = empty_model(cls, cfg, dtype, device)
    stream_into(model, files)
    model.source_dir = str(path)  # lets save_pretrained carry the tokenizer files along
    return model.eval()


# safetensors dtype codes of the tensors a checkpoint may hold.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _raw_header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data section, header dict) of a safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _readinto(fh, buf_u8: torch.Tensor, name: str, file: Path) -> None:
    view = memoryview(buf_u8.numpy())
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{file}: ends inside tensor {name} (truncated file)")
        got += n


def stream_into(model, files: dict[str, Path]) -> None:
    """Read each released tensor from its file straight into its (slice of a) parameter.

    Plain reads at the header's offsets, in file order: a tensor whose destination is a
    contiguous CPU slice of the same dtype is read into it directly (no intermediate copy);
    others (another dtype, or a GPU destination) pass through one reused host buffer and a
    synchronous copy. Host memory beyond a CPU model is at most one tensor."""
    plan = tensor_plan(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    headers = {f: _raw_header(f) for f in by_file}
    sizes = [h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for f, (_, h) in headers.items() for n in by_file[f]]
    staging = None
    bar = _progress(sum(sizes), "loading")
    with torch.no_grad():
        for f, names in by_file.items():
            start, header = headers[f]
            with open(f, "rb", buffering=0) as fh:
                for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
                    info = header[name]
                    begin, end = info["data_offsets"]
                    src_dtype = _ST_DTYPES.get(info["dtype"])
                    if src_dtype is None:
                        raise CheckpointError(f"{name}: unsupported dtype {info['dtype']} in {f.name}")
                    dst = _view(params, plan[name][1])
                    fh.seek(start + begin)
                    if end == begin:
                        continue
                    if dst.device.type == "cpu" and dst.dtype == src_dtype and dst.is_contiguous():
                        _readinto(fh, dst.view(torch.uint8).reshape(-1), name, f)
                    else:
                        if staging is None:
                            staging = torch.empty(max(sizes), dtype=torch.uint8)
                        buf = staging[: end - begin]
                        _readinto(fh, buf, name, f)
                        dst.copy_(buf.view(src_dtype).view(dst.shape))
                    if bar is not None:
                        bar.update(end - begin)
    if bar is not None:
        bar.close()


def _load_native(cls, path: Path, dtype, device, overrides):
    from deepseekmoe.checkpoint import native

    cfg, sd = native.load_native(path)
    if overrides:
        cfg = cfg.replace(**overrides)
    dtype = dtype or next(iter(sd.values())).dtype
    model = _meta_model(cls, cfg, dtype)
    where = path / "model.safetensors"
    expected = dict(model.named_parameters(remove_duplicate=False))
    for name in sd:
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name} in {where}: its config has no such parameter")
    for name, p in expected.items():
        if name not in sd:
            raise CheckpointError(f"missing tensor {name} in {where}")
        if sd[name].shape != p.shape:
            raise CheckpointError(f"{name}: shape {list(sd[name].shape)} in {where} does not match "
                                  f"{list(p.shape)} from its config")
    # assign=True adopts the loaded tensors (no second copy when dtype and device already match).
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model = _finish(model, device)
    model.source_dir = str(path)  # the trainer keeps tokenizer.json beside the weights
    return model.eval()


def _progress(total_bytes: int, what: str):
    if total_bytes < 1 << 30:  # only long work gets a bar
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, disable=None)


# ---------------------------------------------------------------------- writing
def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20; ints pass through."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ConfigError(f"max_shard_size={size!r}: expected bytes or a size like '5GB' / '500MiB'") from None


def shard_plan(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy, in order: start a new shard when the next tensor would pass the limit."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def save_model(model, path, max_shard_size: str | int = "5GB", tokenizer_dir=None) -> None:
    """Write `model` in the released format, atomically (a finished directory or nothing)."""
    from safetensors.torch import save_file

    from deepseekmoe.checkpoint.files import atomic_directory

    cfg = model.config
    exports = dict(iter_export(model))
    if any(t.device.type == "meta" for t in exports.values()):
        raise CheckpointError("the model is on the meta device (no data to save); use export_plan() "
                              "for the name/shape plan")
    dtype = exports["model.embed_tokens.weight"].dtype
    hf_cfg = config_to_hf(cfg, dtype)
    shards = shard_plan({n: t.numel() * t.element_size() for n, t in exports.items()}, parse_size(max_shard_size))
    n = len(shards)
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in exports.values())
    bar = _progress(total, "saving")
    src = tokenizer_dir or getattr(model, "source_dir", None)
    with atomic_directory(path) as tmp:
        for i, names in enumerate(shards):
            fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {name: exports[name].detach().to("cpu", copy=True).contiguous() for name in names}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
            if bar is not None:
                bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
            del tensors
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if src is not None:
            for fname in COMPANION_FILES:
                if (Path(src) / fname).is_file():
                    shutil.copyfile(Path(src) / fname, tmp / fname)
        write_transformers_files(tmp, cfg)
    if bar is not None:
        bar.close()
