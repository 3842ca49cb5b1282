"""Accounting: the paper's tables, and the config's counts against built (meta) modules."""

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.model import presets


@pytest.mark.parametrize("name", list(presets.PAPER))
def test_reproduces_paper_table(name):
    row = presets.paper_comparison(name)
    assert row["total_ok"], row
    assert row["flops_ok"], row
    if name == "deepseekmoe-142b-half":
        # The paper's 12.2B activated contradicts its own 374.6T FLOPs; we report 13.6B
        # (docs/accounting.md). Pin our figure so the documented arithmetic stays true.
        assert not row["active_ok"]
        assert row["active"] / 1e9 == pytest.approx(13.61, abs=0.01)
    else:
        assert row["active_ok"], row


def test_dense_flops_equal_deepseek_llm_formula():
    # DeepSeek LLM: 72 L d^2 + 12 L d seq per token (+ 6 d V output head) for 7B: 183.5T per 4K.
    cfg = presets.get("deepseek-7b")
    L, d, V, s = 30, 4096, 102400, 4096
    deepseek_llm = (72 * L * d * d + 12 * L * d * s + 6 * d * V) * s
    # our per-layer 4 d^2 + 3 d F differs from 12 d^2 only through F = 11008 vs 8/3 d
    ours = cfg.flops_per_token(s) * s
    exact = (6 * L * (4 * d * d + 3 * d * 11008) + 12 * L * d * s + 6 * d * V) * s
    assert ours == exact
    assert abs(ours - deepseek_llm) / deepseek_llm < 0.01
    assert abs(deepseek_llm - 183.5e12) / 183.5e12 < 0.001


def _built_counts(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        per_expert = (moe.experts.w13.numel() + moe.experts.w2.numel()) // cfg.n_routed_experts
        inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return total, total - inactive


@pytest.mark.parametrize("name", presets.names())
def test_config_counts_equal_built_module(name):
    cfg = presets.get(name)
    total, active = _built_counts(cfg)
    assert cfg.num_params() == total
    assert cfg.num_active_params() == active


def test_tiny_counts_on_a_real_module():
    cfg = presets.get("tiny")
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    tied = cfg.replace(tie_word_embeddings=True)
    assert Transformer(tied).num_params() == tied.num_params() == cfg.num_params() - cfg.vocab_size * 128


def test_flops_scale_with_activated_not_total_experts():
    a = presets.get("deepseekmoe-16b")
    b = a.replace(n_routed_experts=128)  # twice the experts, same activated
    assert b.num_params() > a.num_params()
    assert b.flops_per_token(4096) == a.flops_per_token(4096)
    c = a.replace(num_experts_per_tok=7)
    extra = 6 * 27 * 3 * 2048 * 1408
    assert c.flops_per_token(4096) - a.flops_per_token(4096) == pytest.approx(extra)


@pytest.mark.parametrize("name", ["deepseekmoe-16b", "deepseekmoe-145b", "dense-2b", "tiny"])
def test_layer_flops_sum_to_flops_per_token_and_balance_the_pipeline(name, monkeypatch):
    from deepseekmoe.model.config import ModelConfig
    from deepseekmoe.parallel.pipeline import split_layers

    cfg = presets.get(name)
    for seq in (1, 2048, 4096):
        layers = sum(cfg.layer_flops(i, seq) for i in range(cfg.num_hidden_layers))
        assert layers + 6.0 * cfg.hidden_size * cfg.vocab_size == cfg.flops_per_token(seq)  # exact
    # The pipeline's stage balancing reads the same per-layer costs: make the first block as
    # expensive as all the others together and it gets a stage of its own.
    assert split_layers(cfg, 2)[0] != [0]
    real = ModelConfig.layer_flops
    monkeypatch.setattr(ModelConfig, "layer_flops",
                        lambda self, i, s: real(self, i, s) * (10 * self.num_hidden_layers if i == 0 else 1))
    assert split_layers(cfg, 2)[0] == [0]
