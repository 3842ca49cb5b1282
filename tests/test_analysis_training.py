"""deepseekmoe.analysis.training: the probe step's LM and balance gradients, taken apart, add up to
the plain backward's gradient; the per-layer records hold real values (loads that count every token
slot, dead experts, entropies in [0, 1]); summarize() and the six-panel plot."""

from __future__ import annotations

import pytest
import torch

from deepseekmoe.analysis.plots import plot_training
from deepseekmoe.analysis.training import DiagRun, _backward, summarize, train_with_diagnostics
from deepseekmoe.data import prepare, train_tokenizer
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in tall green trees".split()
CORPUS = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(80)) + "." for i in range(30)]


def _cfg(vocab, **kw):
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=0, router="gshard", aux_loss_alpha=0.01, max_position_embeddings=64,
                expert_backend="loop")
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag")
    tok = train_tokenizer(CORPUS, 300)
    tok.save(d / "tok" / "tokenizer.json")
    (d / "train.txt").write_text("\n".join(CORPUS[:24]))
    (d / "val.txt").write_text("\n".join(CORPUS[24:]))
    path = prepare([d / "train.txt"], d / "data", tokenizer=d / "tok" / "tokenizer.json", val_inputs=[d / "val.txt"],
                   workers=1, progress=False)
    return str(path), tok.vocab_size


def test_split_gradients_add_up_to_the_full_gradient():
    torch.manual_seed(0)
    model = Transformer(_cfg(64, aux_loss_alpha=0.5)).train()
    x = torch.randint(0, 64, (2, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    model(x, labels=x).loss.backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    routers = [m.gate.weight for m in model.moe_layers()]
    got = _backward(model, model(x, labels=x), params, routers, probe=True)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert got["grad_bal_all"] > 0 and all(g > 0 for g in got["grad_bal_router"] + got["grad_lm_router"])
    # The balance loss reaches the routers; the LM loss reaches every parameter.
    assert got["grad_lm_all"] > max(got["grad_lm_router"])


def test_records_and_summary(data, tmp_path):
    path, vocab = data
    run = DiagRun(model=_cfg(vocab), data=path, steps=6, batch_size=2, seq_len=16, probe_every=3, eval_every=3,
                  eval_batches=2)
    res = train_with_diagnostics(run)
    assert [r["step"] for r in res["train"]] == list(range(1, 7)) and [e["step"] for e in res["eval"]] == [3, 6]
    assert [p["step"] for p in res["probes"]] == [3, 6]
    for p in res["probes"]:
        assert len(p["layers"]) == 2 and 0 < p["balance_share_of_loss"] < 0.05
        for L in p["layers"]:
            # 3 steps x 32 tokens x 2 slots over 8 experts: max/mean is at least 1, at most 8
            assert 1 <= L["max_over_mean"] <= 8 and 0 <= L["dead"] < 8
            assert 0 < L["router_entropy"] <= 1 and 0 < L["load_entropy"] <= 1
            assert L["grad_bal_router"] > 0 and L["grad_lm_router"] > 0
            assert L["gate_sum"] == pytest.approx(1.0)  # GShard: top-2 gates normalised
    s = summarize(res)
    assert s["final_val"] == res["eval"][-1]["val_loss"] and s["best_val"] <= s["final_val"]
    assert s["bal_over_lm_router_grad"] > 0 and s["epochs"] > 0
    dense = train_with_diagnostics(DiagRun(model=_cfg(vocab, n_routed_experts=0, num_experts_per_tok=0,
                                                      router="topk"), data=path, steps=3, batch_size=2, seq_len=16,
                                           probe_every=3, eval_every=3, eval_batches=1))
    assert dense["probes"] == [] and "dead_experts" not in summarize(dense)
    png = plot_training({"gshard_s0": res, "dense_s0": dense}, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
