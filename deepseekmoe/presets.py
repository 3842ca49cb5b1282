"""Named model presets: the tiny CPU model and every model of the paper's tables.

`presets.get(name)` returns a fresh validated ModelConfig; `presets.names()` lists them.
Dimensions the paper states are taken as stated; the ones it leaves out are derived from its
parameter totals, with the arithmetic in a comment and in docs/accounting.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .config import ModelConfig
from .errors import ConfigError, suggest

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


class PaperFigures(NamedTuple):
    """What the paper's tables report for a model (FLOPs: training, per `seq_len` tokens)."""

    total: float
    active: float
    flops: float | None
    seq_len: int


# The paper's Tables 1, 3 and 6 (and section 4.3 for the GShard x1.5 / Dense x16 references).
PAPER: dict[str, PaperFigures] = {
    "deepseekmoe-16b": PaperFigures(16.4e9, 2.8e9, 74.4e12, 4096),
}


def _preset(fn: Callable[[], dict]) -> Callable[[], dict]:
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
