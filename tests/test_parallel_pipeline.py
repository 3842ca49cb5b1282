"""Pipeline parallel (torch.distributed.pipelining) on 4 gloo ranks matches one process: 1F1B over
2 stages x ep2, and interleaved 1F1B over 4 virtual stages x dp2. The reference accumulates gradients over the
same micro-batches (the pipeline's objective is the mean over micro-batches of LM + balance
losses); the balance losses (batch-level and device-level, nonlinear in the counts) reach every
stage's MoE layers only through AddAuxiliaryLoss, so a stage that dropped them would fail here."""

from __future__ import annotations

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.model import presets
from deepseekmoe.model.transformer import AddAuxiliaryLoss
from deepseekmoe.parallel.pipeline import split_layers
from tests.dist_utils import run_ranks
from tests.helpers import full_tensor, rel_err

STEPS, BATCH, SEQ, MICRO = 2, 8, 12, 4


def pp_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                       moe_intermediate_size=16, first_k_dense_replace=1, aux_loss_alpha=0.01, seq_aux=False,
                       device_balance_alpha=0.05, n_device_groups=2, max_position_embeddings=64,
                       expert_backend="grouped")


def _model():
    torch.manual_seed(0)
    return Transformer(pp_cfg())


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _opt(params):
    return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _micro_batches(ids, dp_size):
    """Micro-batch i of the whole job: micro-batch i of every data-parallel rank's slice."""
    b = BATCH // dp_size
    per_rank = [ids[r * b:(r + 1) * b].chunk(MICRO) for r in range(dp_size)]
    return [torch.cat([chunks[i] for chunks in per_rank]) for i in range(MICRO)]


def _accumulate(model, ids, dp_size):
    """Gradients accumulated over the job's MICRO micro-batches; (loss, lm, balance) means, grads."""
    stats = torch.zeros(3)
    for mb in _micro_batches(ids, dp_size):
        o = model(mb, labels=mb)
        (o.loss / MICRO).backward()
        stats += torch.stack([o.loss, o.lm_loss, o.balance_loss]).detach() / MICRO
    return stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def reference(dp_size):
    """One process with its own AdamW: per-step stats and the final weights."""
    model = _model()
    opt = _opt(model.parameters())
    out = []
    for ids in _batches():
        out.append(_accumulate(model, ids, dp_size)[0])
        opt.step()
        opt.zero_grad()
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_at(weights, ids, dp_size):
    model = Transformer(pp_cfg())
    model.load_state_dict(weights)
    return _accumulate(model, ids, dp_size)


def pp_worker(rank, world, scenarios):
    import torch.distributed as dist

    from deepseekmoe.parallel import ParallelConfig, build_mesh
    from deepseekmoe.parallel.pipeline import build_pipeline

    results = []
    for schedule, per_rank, dp, ep in scenarios:
        pcfg = ParallelConfig(pp=2, dp=dp, ep=ep, pp_schedule=schedule, pp_stages_per_rank=per_rank,
                              pp_microbatches=MICRO)
        mesh = build_mesh(pcfg, "cpu")
        pipe = build_pipeline(_model(), mesh, pcfg)
        opt = _opt(list(pipe.parameters()))
        W, r = mesh.data_parallel_size, mesh.data_parallel_rank
        out = []
        for ids in _batches():
            weights = {n: full_tensor(p.detach()).clone() for m in pipe.modules for n, p in m.named_parameters()}
            local = ids[r * BATCH // W:(r + 1) * BATCH // W]
            stats = pipe.step(local, local)
            stats = torch.stack([stats["loss"], stats["lm_loss"], stats["balance_loss"]])
            dist.all_reduce(stats, group=mesh.group("dp_ep"))
            grads = {n: full_tensor(p.grad).clone() for m in pipe.modules for n, p in m.named_parameters()}
            out.append((stats / W, grads, weights))
            opt.step()
            opt.zero_grad()
        weights = {n: full_tensor(p.detach()).clone() for m in pipe.modules for n, p in m.named_parameters()}
        results.append((out, weights, [sorted(m.layers.keys(), key=int) for m in pipe.modules]))
    return results


def test_pipeline_matches_single_process():
    """4 ranks: pp2 x ep2 with 1F1B (all-to-all and FSDP inside each stage), then pp2 x dp2 with
    interleaved 1F1B over 4 virtual stages (one block each). Every step: loss, LM loss, balance
    loss and every gradient to 1e-5 against one process at the same weights; the trajectory's
    losses to 1e-5 and final weights to 1e-4 against an independent single-process run (Adam
    amplifies rounding in near-zero gradient elements; see test_parallel_ep)."""
    ref, ref_w = reference(dp_size=2)
    scenarios = [("1f1b", 1, 1, 2), ("interleaved1f1b", 2, 2, 1)]
    results = run_ranks(pp_worker, 4, scenarios, timeout=180)
    for i, (schedule, *_) in enumerate(scenarios):
        ranks = [r[i] for r in results]
        held = [k for _, _, layers in ranks for stage in layers for k in stage]
        assert sorted(held, key=int) == sorted(["0", "1", "2", "3"] * 2, key=int), f"{schedule}: {held}"
        for step, ids in enumerate(_batches()):
            grads, weights = {}, {}
            for out, _, _ in ranks:
                grads.update(out[step][1])
                weights.update(out[step][2])
            rstats, rgrads = reference_at(weights, ids, dp_size=2)
            for r, (out, _, _) in enumerate(ranks):
                got = out[step][0]
                assert torch.allclose(got, rstats, rtol=1e-5, atol=0), f"{schedule} rank {r} step {step}: {got}"
                assert torch.allclose(got, ref[step], rtol=1e-5, atol=0), f"{schedule} trajectory step {step}"
            assert grads.keys() == rgrads.keys(), schedule
            for n, g in rgrads.items():
                assert rel_err(grads[n], g) < 1e-5, f"{schedule} step {step}: grad {n} rel {rel_err(grads[n], g)}"
        final = {}
        for _, w, _ in ranks:
            final.update(w)
        for n, w in ref_w.items():
            assert rel_err(final[n], w) < 1e-4, f"{schedule}: weight {n} after {STEPS} steps: {rel_err(final[n], w)}"
    assert ref[0][2] > 0  # the balance losses are really in the objective


def test_add_auxiliary_loss_injects_unit_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    aux = (w * 2).sum()
    y = AddAuxiliaryLoss.apply(x, aux)
    assert torch.equal(y, x)
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3, 4), 3.0))
    assert torch.equal(w.grad, torch.full((4,), 2.0))  # d(aux)/dw with coefficient 1


@pytest.mark.parametrize("preset,stages", [("deepseekmoe-145b", 4), ("deepseekmoe-145b", 8),
                                           ("deepseekmoe-16b", 4), ("tiny", 4)])
def test_split_layers_is_contiguous_and_balanced(preset, stages):
    cfg = presets.get(preset)
    split = split_layers(cfg, stages)
    assert len(split) == stages and all(split)
    assert [i for s in split for i in s] == list(range(cfg.num_hidden_layers))
    costs = [cfg.layer_flops(i, 4096) for i in range(cfg.num_hidden_layers)]
    costs[-1] += 6.0 * cfg.hidden_size * cfg.vocab_size
    loads = [sum(costs[i] for i in s) for s in split]
    # The bottleneck is within one block of the ideal even split ...
    assert max(loads) <= sum(costs) / stages + max(costs) + 1e-6 * sum(costs)
    if stages == 4:  # ... and no contiguous 4-way split has a cheaper bottleneck (brute force)
        prefix = [0.0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        L = len(costs)
        best = min(max(prefix[a], prefix[b] - prefix[a], prefix[c] - prefix[b], prefix[L] - prefix[c])
                   for a in range(1, L - 2) for b in range(a + 1, L - 1) for c in range(b + 1, L))
        assert max(loads) <= best * (1 + 1e-9)
