"""The slot dispatch primitive (model/moe/dispatch.py) and the backends built on it or beside it:
sort properties (stable, counts, offsets, inverse), combine == the reference weighted sum, the
edge cases (empty experts, one token, top-k = E, no tokens); `gather` (eager, and the compiled
branch that compiled small-batch decode runs) against `loop`; `gather` as a config value trains."""

from __future__ import annotations

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.model.moe.dispatch import combine, dispatch
from deepseekmoe.model.moe.experts import experts_gather, experts_grouped, experts_loop
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _routing(T, K, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    return idx_TK, torch.rand(T, K, generator=g)


def _check_dispatch(idx_TK, E):
    """Every property the backends rely on, against a plain-Python sort."""
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1).tolist()
    for index_dtype in (torch.int64, torch.int32):
        d = dispatch(idx_TK, E, index_dtype=index_dtype)
        assert d.perm_S.dtype == index_dtype and d.counts_E.dtype == torch.int32 and d.offs_E.dtype == torch.int32
        assert d.perm_S.tolist() == sorted(range(T * K), key=lambda s: (flat[s], s))  # stable by expert
        assert d.counts_E.tolist() == [flat.count(e) for e in range(E)]
        assert d.offs_E.tolist() == [sum(flat.count(i) for i in range(e + 1)) for e in range(E)]
        assert d.tok_S.tolist() == [s // K for s in d.perm_S.tolist()]
        inv = d.inv_S
        assert inv.dtype == index_dtype
        assert d.perm_S[inv.long()].tolist() == list(range(T * K))  # inv_S undoes the sort
    return dispatch(idx_TK, E)


def test_dispatch_is_a_stable_sort_with_counts_and_offsets():
    idx_TK = torch.tensor([[2, 0], [1, 2], [2, 1], [0, 3]])
    d = _check_dispatch(idx_TK, 5)
    assert d.counts_E.tolist() == [2, 2, 3, 1, 0] and d.offs_E.tolist() == [2, 4, 7, 8, 8]
    assert d.perm_S.tolist() == [1, 6, 2, 5, 0, 3, 4, 7]  # slots t*K+k grouped by expert, in slot order
    _check_dispatch(*_routing(37, 3, 8)[:1], 8)


@pytest.mark.parametrize("T,K,E", [(1, 3, 8), (9, 4, 4), (0, 2, 4), (25, 1, 6)])
def test_dispatch_edge_cases(T, K, E):
    """One token, top-k = E (every token to every expert), no tokens, top-1."""
    _check_dispatch(_routing(T, K, E)[0], E)


def test_dispatch_with_empty_experts_and_repeats():
    idx_TK = torch.tensor([[3, 3], [3, 1], [1, 3]])  # experts 0, 2, 4 empty; a token may repeat one
    d = _check_dispatch(idx_TK, 5)
    assert d.counts_E.tolist() == [0, 2, 0, 4, 0] and d.offs_E.tolist() == [0, 2, 2, 6, 6]


@pytest.mark.parametrize("T,K,E", [(13, 3, 8), (1, 2, 4), (6, 4, 4), (0, 2, 4)])
def test_combine_is_the_gate_weighted_sum_over_k(T, K, E):
    idx_TK, w_TK = _routing(T, K, E, seed=1)
    D = 5
    y_TKD = torch.randn(T, K, D, generator=torch.Generator().manual_seed(2))  # y of slot t*K+k
    d = dispatch(idx_TK, E)
    y_SD = y_TKD.reshape(T * K, D)[d.perm_S]  # rows in sorted order, as the experts produce them
    out_TD = combine(y_SD, w_TK, d)
    ref_TD = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            ref_TD[t] += w_TK[t, k] * y_TKD[t, k]
    assert out_TD.shape == (T, D) and out_TD._base is None  # a fresh tensor, not a view (FSDP2)
    torch.testing.assert_close(out_TD, ref_TD, rtol=1e-6, atol=1e-6)


def test_combine_backward_matches_the_reference():
    idx_TK, w_TK = _routing(11, 3, 6, seed=3)
    d = dispatch(idx_TK, 6)
    y_SD = torch.randn(33, 4, requires_grad=True)
    w_TK.requires_grad_()
    dy_TD = torch.randn(11, 4)
    gy, gw = torch.autograd.grad(combine(y_SD, w_TK, d), (y_SD, w_TK), dy_TD)
    ref = (w_TK.unsqueeze(-1) * y_SD[d.inv_S].view(11, 3, 4)).sum(1)
    ry, rw = torch.autograd.grad(ref, (y_SD, w_TK), dy_TD)
    torch.testing.assert_close(gy, ry)
    torch.testing.assert_close(gw, rw)


def _expert_inputs(T, K, E, D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx_TK, w_TK = _routing(T, K, E, seed)
    x_TD = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    return x_TD, idx_TK, w_TK, w13, w2


def _fwd_bwd(fn, x_TD, idx_TK, w_TK, w13, w2, dy_TD):
    ins = [t.detach().clone().requires_grad_() for t in (x_TD, w_TK, w13, w2)]
    y_TD = fn(ins[0], idx_TK, ins[1], ins[2], ins[3])
    return [y_TD.detach(), *torch.autograd.grad(y_TD, ins, dy_TD)]


@pytest.mark.parametrize("fn", [experts_grouped, experts_gather], ids=["grouped", "gather"])
def test_backends_match_loop_forward_and_backward(fn):
    x_TD, idx_TK, w_TK, w13, w2 = _expert_inputs(19, 3, 8, 16, 12, seed=4)
    dy_TD = torch.randn(19, 16, generator=torch.Generator().manual_seed(5))
    ref = _fwd_bwd(experts_loop, x_TD, idx_TK, w_TK, w13, w2, dy_TD)
    out = _fwd_bwd(fn, x_TD, idx_TK, w_TK, w13, w2, dy_TD)
    for name, o, r in zip(("y", "dx", "dw", "dw13", "dw2"), out, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: {fn.__name__} vs loop {rel_err(o, r):.2e}"


@pytest.mark.parametrize("T", [1, 3])
def test_compiled_gather_matches_eager_and_loop(T):
    """The torch.compiler.is_compiling() branch of experts_gather (product-and-sum, the default
    for compiled small-batch decode) against its eager branch (batched GEMVs) and loop."""
    x_TD, idx_TK, w_TK, w13, w2 = _expert_inputs(T, 2, 8, 16, 12, seed=6)
    dy_TD = torch.randn(T, 16, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    compiled = torch.compile(experts_gather, fullgraph=True)
    with torch.no_grad():
        y_c = compiled(x_TD, idx_TK, w_TK, w13, w2)
    assert rel_err(y_c, experts_gather(x_TD, idx_TK, w_TK, w13, w2)) < 1e-6
    assert rel_err(y_c, experts_loop(x_TD, idx_TK, w_TK, w13, w2)) < 1e-6
    out = _fwd_bwd(compiled, x_TD, idx_TK, w_TK, w13, w2, dy_TD)
    ref = _fwd_bwd(experts_loop, x_TD, idx_TK, w_TK, w13, w2, dy_TD)
    for name, o, r in zip(("y", "dx", "dw", "dw13", "dw2"), out, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: compiled gather vs loop {rel_err(o, r):.2e}"


def test_gather_is_a_config_value_that_trains_like_loop():
    """`gather` is accepted by ModelConfig (one backend list); a training step with it gives the
    loss and gradients of `loop`."""
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
              first_k_dense_replace=1, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    results = []
    for backend in ("loop", "gather"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(expert_backend=backend, **kw))
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_l, grads_l), (loss_g, grads_g) = results
    assert abs(loss_g - loss_l) <= 1e-6 * abs(loss_l)
    for n, g in grads_l.items():
        assert rel_err(grads_g[n], g) < 1e-5, n
