"""Expert parallel + FSDP2 on gloo ranks match one process on the same weights and global batch:
loss and every gradient to 1e-5 relative (fp32), over a few AdamW steps, including a step where
one ep rank's experts receive no tokens; each sharded AdamW step equals one process's AdamW step
on the same weights and gradients. The balance losses are the nonlinear batch-level kind
(seq_aux off) plus the device-level loss over the real EP placement, so a rank that used only its
own routing counts would fail here."""

from __future__ import annotations

import torch

from deepseekmoe import ModelConfig, Transformer
from tests.dist_utils import run_ranks
from tests.helpers import clean_name, full_tensor, rel_err, tiny_cfg

STEPS = 3
GLOBAL_BATCH, SEQ = 8, 12


def build_model(cfg: ModelConfig, starve_last_of: int) -> Transformer:
    """Same weights on every rank. With starve_last_of=P > 1, the first MoE layer's router sends no
    token to the experts of ep rank P-1: those rows are zero (logit 0) while the other experts come
    in pairs (w, -w), so each pair has a logit >= 0 and the top-2 always lie outside the last rank."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    if starve_last_of > 1:
        E, El = cfg.n_routed_experts, cfg.n_routed_experts // starve_last_of
        with torch.no_grad():
            w = model.layers[1].mlp.gate.weight
            w[E - El:] = 0
            for e in range(0, E - El, 2):
                w[e + 1] = -w[e]
    return model


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _step(model, ids):
    o = model(ids, labels=ids)
    o.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return o.loss.item(), o.balance_loss.item(), norm.item(), grads


def reference_run(cfg: ModelConfig, starve: int) -> list[float]:
    """One process, global batch, its own AdamW: the loss trajectory."""
    model = build_model(cfg, starve)
    opt = _optimizer(model)
    losses = []
    for ids in batches():
        losses.append(_step(model, ids)[0])
        opt.step()
        opt.zero_grad()
    return losses


def reference_at(cfg: ModelConfig, weights: dict, ids: torch.Tensor):
    """One process on the global batch at exactly the given weights: (loss, balance, norm, grads)."""
    model = Transformer(cfg)
    model.load_state_dict(weights)
    return _step(model, ids)


def replay_optimizer(cfg: ModelConfig, steps: list, final: dict):
    """One process's AdamW replays the distributed run's optimizer: each step starts from that run's
    weights before the step and takes that run's clipped gradients (the moments carry over, built
    from the same gradients). Yields (step, name, relative difference of the two updates)."""
    model = Transformer(cfg)
    opt = _optimizer(model)
    params = dict(model.named_parameters())
    after = [s[3] for s in steps[1:]] + [final]
    for step, ((*_, weights, _grads, _received, clipped), nxt) in enumerate(zip(steps, after)):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
                p.grad = clipped[n].clone()
        opt.step()
        for n, p in params.items():
            yield step, n, rel_err(nxt[n] - weights[n], p.detach() - weights[n])


def meta_init_check(ep):
    """Build on the meta device, parallelize, materialise with to_empty() + init_weights(): the path
    for models too large to build whole on one rank. Returns the loss of one step (finite)."""
    from deepseekmoe.parallel import ParallelConfig, build_mesh, parallelize

    pcfg = ParallelConfig(ep=ep)
    mesh = build_mesh(pcfg, "cpu")
    with torch.device("meta"):
        model = Transformer(tiny_cfg(ep))
    model = parallelize(model, mesh, pcfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ids = batches()[0][mesh.data_parallel_rank::mesh.data_parallel_size]
    loss = model(ids, labels=ids).loss
    loss.backward()
    w13 = model.layers[1].mlp.experts.w13
    return loss.item(), tuple(w13.to_local().shape), tuple(w13.shape), w13.grad is not None


def dist_worker(rank, world, scenarios, meta_check=False):
    """Each scenario (cfg, dp, ep, activation_checkpointing) on its own mesh, one after another:
    one spawn serves several layouts (process start-up dominates these tests on 2 cores).
    Per step: global loss / balance loss / grad norm, the weights before it, full gradients, the
    slots each EP layer of this rank received, and the full gradients after clipping."""
    import torch.distributed as dist

    from deepseekmoe.parallel import ParallelConfig, build_mesh, clip_grad_norm_, parallelize

    results = []
    for cfg, dp, ep, ac in scenarios:
        pcfg = ParallelConfig(dp=dp, ep=ep, activation_checkpointing=ac)
        mesh = build_mesh(pcfg, "cpu")
        model = parallelize(build_model(cfg, ep), mesh, pcfg)
        opt = _optimizer(model)
        W, r = mesh.data_parallel_size, mesh.data_parallel_rank
        b = GLOBAL_BATCH // W
        out = []
        for ids in batches():
            weights = {clean_name(n): full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
            local = ids[r * b:(r + 1) * b]
            o = model(local, labels=local)
            o.loss.backward()
            stats = torch.stack([o.loss.detach(), o.balance_loss.detach()])
            dist.all_reduce(stats)
            stats /= W
            received = [m.dispatcher.last_received for m in model.modules() if getattr(m, "dispatcher", None)]
            grads = {clean_name(n): full_tensor(p.grad).clone() for n, p in model.named_parameters()}
            norm = clip_grad_norm_(model.parameters(), 1.0)
            clipped = {clean_name(n): full_tensor(p.grad).clone() for n, p in model.named_parameters()}
            if rank != 0:  # identical on every rank
                weights = grads = clipped = None
            out.append((stats[0].item(), stats[1].item(), norm.item(), weights, grads, received, clipped))
            opt.step()
            opt.zero_grad()
        final = {clean_name(n): full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
        results.append((out, mesh.ep_rank, final if rank == 0 else None))
    if meta_check:
        results.append(meta_init_check(world))
    return results


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * abs(b)


def _check(scenarios, results):
    """Every step: loss, balance loss, grad norm and every gradient to 1e-5 relative against one
    process at the same weights; the clipped gradients to 1e-6 against gradient x clip scale; each
    sharded AdamW update to 1e-5 against one process's AdamW on the same weights and clipped
    gradients (elementwise arithmetic on identical inputs: equal up to an ulp of the weights,
    bit-identical where measured). Trajectory: losses to 1e-5 against an independent run.
    Final weights are not compared with that run: Adam's division by sqrt(v) turns the ~1e-7
    rounding of near-zero gradient elements into visibly different updates, so how far the
    weights drift depends on the machine's rounding, not on the parallel code."""
    for i, (cfg, dp, ep, ac) in enumerate(scenarios):
        name = f"dp{dp}xep{ep}{'+ac' if ac else ''}"
        ref_losses = reference_run(cfg, starve=ep)
        got = results[0][i][0]
        for step, ((loss, bal, norm, weights, grads, _, clipped), ids) in enumerate(zip(got, batches())):
            rloss, rbal, rnorm, rgrads = reference_at(cfg, weights, ids)
            assert _close(loss, rloss), f"{name} step {step}: loss {loss} vs {rloss}"
            assert _close(bal, rbal), f"{name} step {step}: balance loss {bal} vs {rbal}"
            assert _close(norm, rnorm), f"{name} step {step}: grad norm {norm} vs {rnorm}"
            assert _close(loss, ref_losses[step]), f"{name} step {step}: trajectory {loss} vs {ref_losses[step]}"
            assert grads.keys() == rgrads.keys()
            for n, g in rgrads.items():
                assert grads[n].shape == g.shape, n
                if g.abs().max() == 0:
                    assert grads[n].abs().max() == 0, f"{name} step {step}: {n} should have a zero gradient"
                else:
                    assert rel_err(grads[n], g) < 1e-5, f"{name} step {step}: grad {n} rel diff {rel_err(grads[n], g)}"
            coef = min(1.0, 1.0 / (norm + 1e-6))  # clip_grad_norm_'s scale for max_norm=1
            for n, g in grads.items():
                assert rel_err(clipped[n], g * coef) < 1e-6, f"{name} step {step}: clipped grad {n}"
        for step, n, rel in replay_optimizer(cfg, got, results[0][i][2]):
            assert rel < 1e-5, f"{name} step {step}: AdamW update of {n} rel diff {rel}"
        if ep > 1:
            El = cfg.n_routed_experts // ep
            for rank_results in results:
                out, ep_rank, _ = rank_results[i]
                n = out[0][5][0]  # step 0, first MoE layer: only the last ep rank gets nothing
                assert (n == 0) == (ep_rank == ep - 1), f"{name}: ep rank {ep_rank} received {n} slots"
            w13 = got[0][4]["layers.1.mlp.experts.w13"]  # the starved experts' gradient is exactly 0
            assert w13[-El:].abs().max() == 0 and w13[:-El].abs().max() > 0


def test_ep2_with_activation_checkpointing_and_dp2_match_single_process():
    """2 ranks: ep=2 (with activation checkpointing: the recomputation re-runs the all-to-alls),
    then dp=2, ep=1 (plain FSDP2; the batch-level balance loss still needs the global counts)."""
    scenarios = [(tiny_cfg(2), 1, 2, True), (tiny_cfg(1), 2, 1, False)]
    results = run_ranks(dist_worker, 2, scenarios, True, timeout=150)
    _check(scenarios, results)
    for rank_results in results:  # and a model built on `meta`, materialised after parallelize
        loss, local_shape, global_shape, has_grad = rank_results[-1]
        assert torch.isfinite(torch.tensor(loss)) and has_grad
        assert local_shape == (4, 32, 32) and global_shape == (8, 32, 32)  # E/ep of [E, 2F, D]


def test_dp2xep2_and_ep4_match_single_process():
    """4 ranks: dp=2 x ep=2 (experts sharded over dp, the rest over dp x ep), then ep=4."""
    scenarios = [(tiny_cfg(2), 2, 2, False), (tiny_cfg(4), 1, 4, False)]
    _check(scenarios, run_ranks(dist_worker, 4, scenarios, timeout=180))
