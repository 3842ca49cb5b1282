"""`deepseekmoe info`: parameter / FLOP accounting and the layer plan of a model.

Counts come from the config alone (no weights are built), so every paper-scale preset prints
instantly. `--paper` prints every preset beside the figures the paper reports for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepseekmoe.errors import ConfigError
from deepseekmoe.model import presets
from deepseekmoe.model.config import ModelConfig


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="tiny",
                   help="preset name (see --list), a config JSON, or a model, checkpoint or run directory")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for FLOPs (default: the paper's, 2048 or 4096, else 4096)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--paper", action="store_true",
                   help="table of every preset against the paper's reported totals and FLOPs")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def load_config(spec: str) -> ModelConfig:
    """A preset name, a config JSON (ours, a native model's or a released-format one), or any model
    directory other commands take: released or native, a training checkpoint, a run directory."""
    path = Path(spec)
    if not path.exists():
        return presets.get(spec)
    if path.is_dir():
        from deepseekmoe.checkpoint import hf

        kind, found = hf.find_checkpoint(path)
        if kind == "dcp":
            from deepseekmoe.checkpoint.convert import dcp_model_config
            from deepseekmoe.checkpoint.dcp import verify

            return dcp_model_config(found, verify(found))
        path = found / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a model config (a JSON object is expected)")
    if raw.get("model_type") is not None:
        from deepseekmoe.checkpoint import hf

        return hf.config_from_hf(raw)
    if isinstance(raw.get("model"), dict) and "format" in raw:  # a native model directory's config.json
        return ModelConfig.from_dict(raw["model"])
    return ModelConfig.from_dict(raw)


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def summary(cfg: ModelConfig, seq_len: int) -> dict:
    plan = cfg.layer_plan()
    return {
        "name": cfg.name, "params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "seq_len": seq_len, "flops_per_token": cfg.flops_per_token(seq_len),
        "flops_per_seq": cfg.flops_per_token(seq_len) * seq_len,
        "layers": plan, "router": cfg.router if cfg.n_routed_experts else "dense",
    }


def run(args) -> int:
    if args.list:
        for n in presets.names():
            print(n)
        return 0
    if args.paper:
        return _paper_table(args.json)
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len {args.seq_len}: must be a positive number of tokens (e.g. --seq-len 4096)")
    cfg = load_config(args.model)
    ref = presets.PAPER.get(cfg.name)
    seq = args.seq_len if args.seq_len is not None else (ref.seq_len if ref else 4096)
    s = summary(cfg, seq)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    n_moe = s["layers"].count("moe")
    print(f"model            {cfg.name}")
    print(f"parameters       {s['params']:,} ({_b(s['params'])})")
    print(f"activated        {s['active_params']:,} ({_b(s['active_params'])})")
    print(f"training FLOPs   {s['flops_per_token'] / 1e9:.3f} GFLOP/token; "
          f"{s['flops_per_seq'] / 1e12:.2f} TFLOP per {seq} tokens (fwd+bwd)")
    print(f"shape            {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), vocab {cfg.vocab_size}")
    if cfg.n_routed_experts:
        print(f"MoE              {n_moe} MoE layers, router={cfg.router}: {cfg.n_shared_experts} shared + "
              f"{cfg.n_routed_experts} routed experts of width {cfg.moe_intermediate_size}, "
              f"top-{cfg.num_experts_per_tok}")
    plan = "".join("M" if k == "moe" else "D" for k in s["layers"])
    print(f"layer plan       {plan}  (D dense FFN {cfg.intermediate_size}, M MoE)")
    if ref:
        print(f"paper            {ref.total / 1e9:.1f}B total, {ref.active / 1e9:.2f}B activated"
              + (f", {ref.flops / 1e12:.1f}T FLOPs per {ref.seq_len} tokens" if ref.flops else ""))
    return 0


def _paper_table(as_json: bool) -> int:
    rows = [presets.paper_comparison(name) for name in presets.PAPER]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0

    def cell(ours, paper, ok, scale=1e9, unit="B"):
        mark = "ok" if ok else "MISMATCH"
        return (f"{ours / scale:8.2f}{unit} {paper / scale:7.2f}{unit} {100 * (ours - paper) / paper:+6.2f}% "
                f"{mark:8}")

    print(f"{'preset':22} {'counts':6} | {'total':>9} {'paper':>8} {'diff':>7} {'':8}| {'activated':>9} "
          f"{'paper':>8} {'diff':>7} {'':8}| {'FLOPs':>9} {'paper':>8} {'diff':>7}")
    for r in rows:
        print(f"{r['preset']:22} {r['counts']:6} | {cell(r['total'], r['paper_total'], r['total_ok'])}| "
              f"{cell(r['active'], r['paper_active'], r['active_ok'])}| "
              f"{cell(r['flops'], r['paper_flops'], r['flops_ok'], 1e12, 'T')}")
    print("FLOPs: training (forward + backward) per seq_len tokens; params within 1.5% or the paper's "
          "rounding, FLOPs within 2.5%.\nOne mismatch is expected: deepseekmoe-142b-half's 12.2B activated "
          "contradicts its own FLOPs (see docs/accounting.md).")
    return 0
