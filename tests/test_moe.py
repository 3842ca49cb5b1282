"""MoE layer tests: backend agreement, balance losses on a hand-computed example, routing semantics."""

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.model.config import ConfigError
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop, resolve_backend
from deepseekmoe.model.moe.layer import MoE
from deepseekmoe.model.moe.router import device_balance_loss, expert_balance_loss
from tests.helpers import rel_err


def _expert_inputs(T, K, E, D, F, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D**0.5).requires_grad_()
    w2 = (torch.randn(E, D, F, generator=g) / F**0.5).requires_grad_()
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).requires_grad_()
    return x, idx, w, w13, w2


def _check_backends_agree(T, K, E, D, F, idx=None, seed=0):
    x, idx, w, w13, w2 = _expert_inputs(T, K, E, D, F, seed, idx)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    outs = []
    for fn in (experts_loop, experts_grouped):
        for t in (x, w, w13, w2):
            t.grad = None
        y = fn(x, idx, w, w13, w2)
        y.backward(dy)
        outs.append((y.detach(), x.grad.clone(), w.grad.clone(), w13.grad.clone(), w2.grad.clone()))
    for name, a, b in zip(("y", "dx", "dw", "dw13", "dw2"), *outs):
        assert rel_err(b, a) < 1e-5, f"{name}: grouped vs loop rel diff {rel_err(b, a)}"
    return outs[0]


@pytest.mark.parametrize("T,K,E,D,F", [(37, 2, 8, 16, 12), (64, 6, 16, 32, 24), (5, 3, 4, 20, 8)])
def test_grouped_matches_loop(T, K, E, D, F):
    _check_backends_agree(T, K, E, D, F)


def test_grouped_matches_loop_with_empty_experts():
    T, K, E = 40, 2, 16
    g = torch.Generator().manual_seed(3)
    # Only experts 2, 5 and 11 receive tokens; the rest are empty (their weight grads must be 0).
    pool = torch.tensor([2, 5, 11])
    idx = torch.stack([pool[torch.randperm(3, generator=g)[:K]] for _ in range(T)])
    _, _, _, dw13, dw2 = _check_backends_agree(T, K, E, 16, 8, idx=idx)
    empty = [e for e in range(E) if e not in pool.tolist()]
    assert dw13[empty].abs().max() == 0 and dw2[empty].abs().max() == 0
    assert all(dw13[e].abs().sum() > 0 for e in pool.tolist())


def test_grouped_matches_loop_one_token_and_topk_equals_experts():
    _check_backends_agree(1, 3, 8, 16, 8)
    idx = torch.arange(6).repeat(9, 1)  # top-k = E: every token to every expert
    _check_backends_agree(9, 6, 6, 16, 8, idx=idx)


def test_grouped_matches_loop_all_tokens_one_expert():
    idx = torch.full((33, 1), 4)
    _check_backends_agree(33, 1, 8, 16, 8, idx=idx)


def test_moe_layer_backends_agree_end_to_end():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                      moe_intermediate_size=16, first_k_dense_replace=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (3, 11))
    results = []
    for backend in ("loop", "grouped"):
        for m in model.moe_layers():
            m.experts.backend = backend
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, rtol=1e-6)
    for n in ga:
        assert rel_err(gb[n], ga[n]) < 1e-5, n


# ---------------------------------------------------------------------- balance losses
SCORES = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                       [0.10, 0.20, 0.30, 0.40],
                       [0.25, 0.25, 0.25, 0.25],
                       [0.70, 0.10, 0.10, 0.10]])
IDX = torch.tensor([[0, 1], [3, 1], [0, 1], [0, 1]])


def test_expert_balance_loss_hand_computed():
    # counts = [3, 4, 0, 1]; f_i = E/(K T) * count = 4/8 * count = [1.5, 2.0, 0.0, 0.5]
    # P = column means = [0.3625, 0.2125, 0.2125, 0.2125]
    # sum f P = 0.54375 + 0.425 + 0 + 0.10625 = 1.075; alpha 0.1 -> 0.1075
    s = SCORES.clone().requires_grad_()
    loss = expert_balance_loss(s, IDX, alpha=0.1)
    assert loss.item() == pytest.approx(0.1075, abs=1e-7)
    loss.backward()
    # Gradient only through P: dL/ds[t, i] = alpha * f_i / T for every token t.
    expected = torch.tensor([1.5, 2.0, 0.0, 0.5]) * 0.1 / 4
    assert torch.allclose(s.grad, expected.expand(4, 4), atol=1e-7)


def test_sequence_balance_loss_hand_computed():
    # Two sequences of 2 tokens. Seq 1: counts [1, 2, 0, 1] -> f = E/(S K) * c = [1, 2, 0, 1],
    # P = [0.25] * 4 -> 1.0. Seq 2: counts [2, 2, 0, 0] -> f = [2, 2, 0, 0],
    # P = [0.475, 0.175, 0.175, 0.175] -> 1.3. Mean 1.15, alpha 0.1 -> 0.115.
    loss = expert_balance_loss(SCORES, IDX, alpha=0.1, batch_size=2)
    assert loss.item() == pytest.approx(0.115, abs=1e-7)


def test_device_balance_loss_hand_computed():
    # Groups {0,1}, {2,3}: f' = mean f = [1.75, 0.25]; P' = sum P = [0.575, 0.425]
    # sum = 1.00625 + 0.10625 = 1.1125; alpha 0.1 -> 0.11125
    s = SCORES.clone().requires_grad_()
    loss = device_balance_loss(s, IDX, alpha=0.1, n_groups=2)
    assert loss.item() == pytest.approx(0.11125, abs=1e-7)
    loss.backward()
    expected = torch.tensor([1.75, 1.75, 0.25, 0.25]) * 0.1 / 4
    assert torch.allclose(s.grad, expected.expand(4, 4), atol=1e-7)


def _moe_cfg(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=8, first_k_dense_replace=0, expert_backend="loop")
    base.update(kw)
    return ModelConfig(**base)


def test_layer_balance_loss_composition_and_eval():
    cfg = _moe_cfg(aux_loss_alpha=0.01, seq_aux=False, device_balance_alpha=0.05, n_device_groups=4)
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(2, 5, 16)
    moe.train()
    _, aux = moe(x)
    r = moe.gate(x.reshape(10, 16))
    expert = expert_balance_loss(r.scores_TE, r.idx_TK, 0.01)
    device = device_balance_loss(r.scores_TE, r.idx_TK, 0.05, 4)
    assert torch.allclose(aux.total, expert + device)
    assert torch.allclose(aux.expert, expert) and torch.allclose(aux.device, device)  # the terms apart
    moe.eval()
    assert moe(x)[1] is None


# ---------------------------------------------------------------------- routing semantics
def test_shared_experts_always_on_with_weight_one():
    cfg = _moe_cfg()
    torch.manual_seed(1)
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 7, 16)
    full, _ = moe(x)
    moe.shared_enabled = False
    routed_only, _ = moe(x)
    shared = moe.shared_experts(x)
    assert torch.allclose(full, routed_only + shared, atol=1e-6)
    assert shared.abs().sum() > 0


def test_gate_values_raw_vs_renormalised():
    x = torch.randn(20, 16)
    torch.manual_seed(2)
    for router, k, norm, expect_sum_one in [("topk", 3, False, False), ("topk", 3, True, True),
                                            ("gshard", 2, False, True), ("switch", 1, False, False)]:
        cfg = _moe_cfg(router=router, num_experts_per_tok=k, norm_topk_prob=norm,
                       n_shared_experts=0 if router != "topk" else 1)
        moe = MoE(cfg)
        torch.nn.init.normal_(moe.gate.weight, std=0.5)
        r = moe.gate(x)
        assert r.idx_TK.shape == (20, k)
        assert len(set(r.idx_TK[0].tolist())) == k
        sums = r.w_TK.sum(-1)
        if expect_sum_one:
            assert torch.allclose(sums, torch.ones(20), atol=1e-6), router
        else:
            # raw softmax probabilities of the chosen experts, the top ones of each row
            assert (sums < 1).all(), router
            assert torch.allclose(r.w_TK, r.scores_TE.gather(-1, r.idx_TK))
            assert torch.allclose(r.w_TK.max(-1).values, r.scores_TE.max(-1).values)


def test_hash_routing_is_a_fixed_function_of_token_id():
    cfg = _moe_cfg(router="hash", n_shared_experts=0, num_experts_per_tok=1, vocab_size=64, aux_loss_alpha=0.0)
    moe = MoE(cfg)
    ids = torch.tensor([[3, 9, 3, 17, 9, 3]])
    r1 = moe.gate(torch.randn(6, 16), ids)
    r2 = moe.gate(torch.randn(6, 16), ids)
    assert torch.equal(r1.idx_TK, r2.idx_TK)  # independent of the hidden state
    assert r1.idx_TK[0] == r1.idx_TK[2] == r1.idx_TK[5] and r1.idx_TK[1] == r1.idx_TK[4]
    assert torch.equal(r1.w_TK, torch.ones(6, 1))
    # balanced table, rebuilt identically from the seed
    counts = torch.bincount(moe.gate.table, minlength=8)
    assert counts.tolist() == [8] * 8
    assert torch.equal(MoE(cfg).gate.table, moe.gate.table)
    other = MoE(cfg.replace(hash_seed=1)).gate.table
    assert not torch.equal(other, moe.gate.table)
    assert "gate.table" not in moe.state_dict()


def test_analysis_knobs_topk_and_masking():
    cfg = _moe_cfg(n_routed_experts=10, num_experts_per_tok=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(30, 16)
    base = moe.gate(x)
    moe.gate.top_k = 4
    assert moe.gate(x).idx_TK.shape == (30, 4)
    moe.gate.top_k = 2
    moe.gate.mask_top_fraction = 0.2  # disable each token's top 2 experts
    masked = moe.gate(x)
    ranked = base.scores_TE.argsort(-1, descending=True)
    assert torch.equal(masked.idx_TK.sort(-1).values, ranked[:, 2:4].sort(-1).values)
    # gates stay the affinities of the chosen experts
    assert torch.allclose(masked.w_TK, base.scores_TE.gather(-1, masked.idx_TK))


def test_set_routing_and_record_on_model():
    cfg = _moe_cfg(num_hidden_layers=3, first_k_dense_replace=1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    model.set_routing(top_k=3, shared_experts=False, record=True)
    model(ids)
    for m in model.moe_layers():
        assert m.last_routing.idx_TK.shape == (12, 3)
        assert not m.shared_enabled
    model.set_routing()
    model(ids)
    assert all(m.gate.top_k == 2 and m.shared_enabled and not m.record for m in model.moe_layers())


def test_backend_selection_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) is experts_grouped
    with pytest.raises(ConfigError, match="expert_backend='triton'.*CUDA"):
        resolve_backend("triton", cpu)
    model = Transformer(_moe_cfg(expert_backend="triton"))
    with pytest.raises(ConfigError, match="triton"):
        model(torch.randint(0, 50, (1, 4)))
