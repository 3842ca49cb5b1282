"""Model tests: shapes, causality, grouped KV heads, losses, dtype handling, meta construction."""

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.model import presets

CFG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
           first_k_dense_replace=1, aux_loss_alpha=0.01)


def test_forward_shapes_and_loss_composition():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG))
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, 97)
    assert out.balance_loss is not None and out.balance_loss.item() > 0
    assert torch.allclose(out.loss, out.lm_loss + out.balance_loss)
    # LM loss is the shifted next-token cross-entropy
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, ref)
    # near log(V) at init
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    model.eval()
    out = model(ids, labels=ids)
    assert out.balance_loss is None and torch.equal(out.loss, out.lm_loss)


def test_ignore_index_in_labels():
    model = Transformer(ModelConfig(**CFG)).eval()
    ids = torch.randint(0, 97, (1, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :4], ids[0, 1:5])
    assert torch.allclose(out.lm_loss, ref)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal(kv_heads):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG, "num_key_value_heads": kv_heads})).eval()
    ids = torch.randint(0, 97, (2, 12))
    ids2 = ids.clone()
    ids2[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = model(ids).logits, model(ids2).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_matches_repeated_kv_mha():
    torch.manual_seed(0)
    gqa = Transformer(ModelConfig(**{**CFG, "num_key_value_heads": 2})).eval()
    mha = Transformer(ModelConfig(**CFG)).eval()
    sd = gqa.state_dict()
    for i in range(3):
        for name in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.self_attn.{name}.weight"].view(2, 8, 32)
            sd[f"layers.{i}.self_attn.{name}.weight"] = w.repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 10))
    assert torch.allclose(gqa(ids).logits, mha(ids).logits, atol=1e-5)


def test_rope_positions_shift_with_position_ids():
    model = Transformer(ModelConfig(**{**CFG, "n_routed_experts": 0, "n_shared_experts": 0,
                                       "num_experts_per_tok": 0})).eval()
    ids = torch.randint(0, 97, (1, 6))
    base = model(ids).logits
    shifted = model(ids, position_ids=torch.arange(6).unsqueeze(0) + 5).logits
    # RoPE is relative: a constant offset leaves attention (and logits) unchanged
    assert torch.allclose(base, shifted, atol=1e-5)


def test_bf16_forward_backward_and_meta_init():
    cfg = presets.get("tiny")
    model = Transformer(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    assert torch.equal(meta.layers[0].input_layernorm.weight, torch.ones(cfg.hidden_size))


def test_hash_model_uses_input_ids():
    cfg = presets.get("hash-2b").replace(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                          num_hidden_layers=2, moe_intermediate_size=16)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 5))
    out = model(ids, labels=ids)
    assert out.balance_loss is None  # no learned router, no balance loss
    out.loss.backward()


def test_init_is_seeded():
    cfg = ModelConfig(**CFG)
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(torch.Generator().manual_seed(5))
    b.init_weights(torch.Generator().manual_seed(5))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    std = a.layers[1].mlp.experts.w13.std().item()
    assert abs(std - cfg.initializer_range) < 0.002
