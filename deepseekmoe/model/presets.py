"""Named model presets: the tiny CPU model and every model of the paper's tables.

`presets.get(name)` returns a fresh validated ModelConfig; `presets.names()` lists them.
Dimensions the paper states are taken as stated; the ones it leaves out are derived from its
parameter totals, with the arithmetic in a comment and in docs/accounting.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from deepseekmoe.errors import ConfigError, suggest
from deepseekmoe.model.config import ModelConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


class PaperFigures(NamedTuple):
    """What the paper's tables report for a model (FLOPs: training, per `seq_len` tokens)."""

    total: float
    active: float
    flops: float | None
    seq_len: int
    counts: str = "model"  # "model": whole-model parameters; "ffn": expert (FFN) parameters only


# What the paper reports. Tables 1, 3, 6 count whole models; Table 2 counts only expert (FFN)
# parameters for GShard x1.5 and Dense x16, so those two rows compare `num_ffn_params`.
PAPER: dict[str, PaperFigures] = {
    "dense-2b": PaperFigures(0.2e9, 0.2e9, 2.9e12, 2048),
    "hash-2b": PaperFigures(2.0e9, 0.2e9, 2.9e12, 2048),
    "switch-2b": PaperFigures(2.0e9, 0.2e9, 2.9e12, 2048),
    "gshard-2b": PaperFigures(2.0e9, 0.3e9, 4.3e12, 2048),
    "deepseekmoe-2b": PaperFigures(2.0e9, 0.3e9, 4.3e12, 2048),
    "gshard-2.9b": PaperFigures(2.83e9, 0.35e9, 5.8e12, 2048, counts="ffn"),
    "dense-2b-x16": PaperFigures(1.89e9, 1.89e9, 24.6e12, 2048, counts="ffn"),
    "deepseek-7b": PaperFigures(6.9e9, 6.9e9, 183.5e12, 4096),
    "deepseekmoe-16b": PaperFigures(16.4e9, 2.8e9, 74.4e12, 4096),
    "deepseek-67b": PaperFigures(67.4e9, 67.4e9, 2057.5e12, 4096),
    "gshard-137b": PaperFigures(136.5e9, 21.6e9, 572.7e12, 4096),
    "deepseekmoe-145b": PaperFigures(144.6e9, 22.2e9, 585.6e12, 4096),
    # 12.2B activated contradicts the row's own 374.6T FLOPs (which imply 13.6B): see docs/accounting.md.
    "deepseekmoe-142b-half": PaperFigures(142.3e9, 12.2e9, 374.6e12, 4096),
}


def _preset(fn: Callable[[], dict]) -> Callable[[], dict]:
    """Register `fn` as a preset; `_gshard_2_p_9b` is registered as 'gshard-2.9b'."""
    name = fn.__name__.removeprefix("_").replace("_", "-").replace("-p-", ".")
    _PRESETS[name] = lambda: ModelConfig(name=name, **fn())
    return fn


def names() -> list[str]:
    return list(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name`, with optional field overrides (validated)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}" + suggest(name, _PRESETS)
                          + f"; valid presets: {', '.join(_PRESETS)}")
    cfg = _PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


@_preset
def _tiny():
    # Trains in minutes on a 2-core CPU: 1 dense + 3 MoE layers, 1 shared + 16 routed (top-3).
    return dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                num_attention_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=3,
                moe_intermediate_size=88, first_k_dense_replace=1, aux_loss_alpha=0.01,
                max_position_embeddings=512, bos_token_id=0, eos_token_id=1)


@_preset
def _deepseekmoe_16b():
    # The released deepseek-moe-16b config.json.
    return dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=28,
                num_attention_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                moe_intermediate_size=1408, first_k_dense_replace=1, aux_loss_alpha=0.001, seq_aux=True,
                max_position_embeddings=4096, bos_token_id=100000, eos_token_id=100001)


# ---------------------------------------------------------------------------------------------
# 2B validation models (paper section 4.1): 9 layers, hidden 1280, 10 heads of 128, an 8K
# vocabulary, every FFN replaced by an MoE layer (no dense first layer at this scale).
# The standard FFN width is not stated: Table 2's 1.89B of Dense x16 expert parameters
# (9 layers x 16 FFNs x 3 x 1280 x F) pins F to 3409-3427; we take 3416 (~8/3 x 1280, a multiple
# of 8 that splits exactly into four 854-wide fine-grained experts).
_2B = dict(vocab_size=8192, hidden_size=1280, num_hidden_layers=9, num_attention_heads=10,
           intermediate_size=3416, first_k_dense_replace=0, max_position_embeddings=2048,
           initializer_range=0.006, aux_loss_alpha=0.01, seq_aux=False, bos_token_id=0, eos_token_id=1)


@_preset
def _dense_2b():
    return dict(_2B, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0)


@_preset
def _hash_2b():
    # Hash Layer: 16 full-size experts, each token sent to the one its id hashes to.
    return dict(_2B, router="hash", n_routed_experts=16, n_shared_experts=0, num_experts_per_tok=1,
                moe_intermediate_size=3416, aux_loss_alpha=0.0)


@_preset
def _switch_2b():
    return dict(_2B, router="switch", n_routed_experts=16, n_shared_experts=0, num_experts_per_tok=1,
                moe_intermediate_size=3416)


@_preset
def _gshard_2b():
    return dict(_2B, router="gshard", n_routed_experts=16, n_shared_experts=0, num_experts_per_tok=2,
                moe_intermediate_size=3416)


@_preset
def _deepseekmoe_2b():
    # m = 4: 64 quarter-size experts, 1 shared + 63 routed, 1 + 7 active (= 2 standard FFNs).
    return dict(_2B, router="topk", n_routed_experts=63, n_shared_experts=1, num_experts_per_tok=7,
                moe_intermediate_size=854)


@_preset
def _gshard_2_p_9b():
    # GShard x1.5: relative expert size 1.5 (Table 2), i.e. 16 experts of 1.5 x 3416, top-2.
    return dict(_2B, router="gshard", n_routed_experts=16, n_shared_experts=0, num_experts_per_tok=2,
                moe_intermediate_size=5124)


@_preset
def _dense_2b_x16():
    # Dense x16: the MoE upper bound, all 16 experts always on = one FFN 16 x 3416 wide.
    return dict(_2B, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0,
                intermediate_size=16 * 3416)


# ---------------------------------------------------------------------------------------------
# Dense references from DeepSeek LLM (same 100K-vocabulary tokenizer as the MoE models).
_DS = dict(vocab_size=102400, max_position_embeddings=4096, n_routed_experts=0, n_shared_experts=0,
           num_experts_per_tok=0, first_k_dense_replace=0, bos_token_id=100000, eos_token_id=100001)


@_preset
def _deepseek_7b():
    return dict(_DS, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32)


@_preset
def _deepseek_67b():
    return dict(_DS, hidden_size=8192, intermediate_size=22016, num_hidden_layers=95, num_attention_heads=64,
                num_key_value_heads=8)


# ---------------------------------------------------------------------------------------------
# 145B-scale (paper section 7): 62 layers, hidden 4096, 32 heads, the first layer dense.
# Unstated: the dense first layer's width. We give it the activated FFN width of the MoE layers
# it replaces (GShard 137B: 2 x 10944; 145B: 16 x 1408; 142B: 8 x 1408), which reproduces all
# three totals and FLOPs. 10944 = 8/3 x 4096 rounded up to a multiple of 64 is GShard's expert;
# the fine-grained expert 1408 = 0.125 x 10944 = 1368 aligned up to a multiple of 64 (the paper's
# "aligned to a multiple of 64", which makes 145B 6% larger than GShard 137B: 144.6 / 136.5).
_145 = dict(vocab_size=102400, hidden_size=4096, num_hidden_layers=62, num_attention_heads=32,
            first_k_dense_replace=1, max_position_embeddings=4096, initializer_range=0.006,
            seq_aux=False, bos_token_id=100000, eos_token_id=100001)


@_preset
def _gshard_137b():
    return dict(_145, router="gshard", intermediate_size=2 * 10944, n_routed_experts=16, n_shared_experts=0,
                num_experts_per_tok=2, moe_intermediate_size=10944, aux_loss_alpha=0.003)


@_preset
def _deepseekmoe_145b():
    # 4 shared + 128 routed (top-12); expert-level alpha 0.003, device-level alpha 0.05 over the
    # 4 devices each layer's routed experts are spread on.
    return dict(_145, intermediate_size=16 * 1408, n_routed_experts=128, n_shared_experts=4,
                num_experts_per_tok=12, moe_intermediate_size=1408, aux_loss_alpha=0.003,
                device_balance_alpha=0.05, n_device_groups=4)


@_preset
def _deepseekmoe_142b_half():
    return dict(_145, intermediate_size=8 * 1408, n_routed_experts=128, n_shared_experts=2,
                num_experts_per_tok=6, moe_intermediate_size=1408, aux_loss_alpha=0.003,
                device_balance_alpha=0.05, n_device_groups=4)


# ---------------------------------------------------------------------------------------------
PARAM_TOLERANCE = 0.015  # relative, or within the rounding of the printed figure
FLOPS_TOLERANCE = 0.025


def _printed_decimals(value_b: float) -> int:
    for n in range(4):
        if abs(round(value_b, n) - value_b) < 1e-9:
            return n
    return 4


def _matches(ours: float, paper: float, tol: float) -> bool:
    """Within `tol` relative, or equal to the paper's figure at the precision it is printed."""
    if abs(ours - paper) <= tol * paper:
        return True
    n = _printed_decimals(paper / 1e9)
    return round(ours / 1e9, n) == round(paper / 1e9, n)


def paper_comparison(name: str) -> dict:
    """Our accounting for preset `name` beside the paper's figures, with pass/fail per column."""
    ref = PAPER[name]
    cfg = get(name)
    if ref.counts == "ffn":
        total, active = cfg.num_ffn_params(), cfg.num_ffn_params(active=True)
    else:
        total, active = cfg.num_params(), cfg.num_active_params()
    flops = cfg.flops_per_token(ref.seq_len) * ref.seq_len
    return {
        "preset": name, "counts": ref.counts, "seq_len": ref.seq_len,
        "total": total, "paper_total": ref.total, "total_ok": _matches(total, ref.total, PARAM_TOLERANCE),
        "active": active, "paper_active": ref.active,
        "active_ok": _matches(active, ref.active, PARAM_TOLERANCE),
        "flops": flops, "paper_flops": ref.flops,
        "flops_ok": ref.flops is None or abs(flops - ref.flops) <= FLOPS_TOLERANCE * ref.flops,
    }
