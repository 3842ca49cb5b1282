"""The trainer step's fast path (bf16 compute weights cast once per step, fp32 gradient sums:
train/optim.py ComputeWeights through train/step.py LocalStep) against the reference path
(autocast casting at every use), over a few accumulated optimizer steps on the CPU.

Under CPU bf16 autocast both paths compute the same bf16 products and sum the same bf16
gradients in fp32 in the same order, so losses, gradients and updated weights are compared
exactly; cases where the math differs by rounding (the fused head's fp32 weight gradient) use a
bf16 tolerance.
"""

import contextlib

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.parallel.fsdp import apply_activation_checkpointing
from deepseekmoe.train.optim import ComputeWeights, build_optimizer, compute_weight_params
from deepseekmoe.train.recipe import OptimSection
from deepseekmoe.train.step import LocalStep
from tests.helpers import TINY, clean_name, rel_err

DEV = torch.device("cpu")


def _model(ac=False, backend="loop", **overrides):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, expert_backend=backend, **{**TINY, **overrides}))
    if ac:
        apply_activation_checkpointing(m)
    return m


def _autocast(enabled=True):
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _run(model, fast, steps=2, accum=3, amp=True):
    """Loss per step, the first step's grads (by name), the final weights."""
    weights = ComputeWeights(model) if fast else None
    stepper = LocalStep(model, accum, _autocast(amp), None, DEV, weights=weights)
    opt = build_optimizer(model, OptimSection(lr=1e-2), DEV)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(7)
    losses, first_grads = [], None
    for s in range(steps):
        batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(accum)]
        stats = stepper.run(iter(batches))
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in params)
        if s == 0:
            first_grads = {clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(stats.loss.item())
    return losses, first_grads, {clean_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _compare(ref, got, tol=0.0):
    assert len(got[0]) == len(ref[0])
    for a, b in zip(got[0], ref[0]):
        assert abs(a - b) <= tol * abs(b), (a, b)
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        assert rel_err(got[1][k], ref[1][k]) <= tol, k
    for k in ref[2]:
        assert rel_err(got[2][k], ref[2][k]) <= tol, k


@pytest.mark.parametrize("ac,backend", [(False, "loop"), (False, "grouped"), (True, "loop")])
def test_fast_weights_equal_reference_bf16(ac, backend):
    ref = _run(_model(ac, backend), fast=False)
    got = _run(_model(ac, backend), fast=True)
    _compare(ref, got)


def test_fast_weights_tied_embeddings():
    ref = _run(_model(tie_word_embeddings=True), fast=False)
    got = _run(_model(tie_word_embeddings=True), fast=True)
    _compare(ref, got)


def test_fast_weights_need_a_low_precision_dtype():
    with pytest.raises(ValueError, match="weights=None"):
        ComputeWeights(_model(), dtype=torch.float32)


def test_fast_weights_with_fused_loss():
    """The benchmark's fast configuration (both on) against the plain head on the reference path."""
    ref = _run(_model(), fast=False)
    got = _run(_model(lm_loss_chunk=10), fast=True)
    _compare(ref, got, tol=2e-2)


def test_fused_head_keeps_its_fp32_weight_and_is_exact():
    """With the fused head the head's weight keeps no bf16 copy (its gradient is formed in fp32), so
    compute weights change nothing against the fused head on the reference path."""
    m = _model(lm_loss_chunk=10, tie_word_embeddings=False)
    assert all(p is not m.lm_head.weight for p in compute_weight_params(m))
    plain = _model(tie_word_embeddings=False)
    assert any(p is plain.lm_head.weight for p in compute_weight_params(plain))
    ref = _run(_model(lm_loss_chunk=10, tie_word_embeddings=False), fast=False)
    got = _run(_model(lm_loss_chunk=10, tie_word_embeddings=False), fast=True)
    _compare(ref, got)


def test_chosen_weights_and_restore():
    m = _model(tie_word_embeddings=False)
    names = {id(p): clean_name(n) for n, p in m.named_parameters()}
    chosen = {names[id(p)] for p in compute_weight_params(m)}
    assert "lm_head.weight" in chosen and "layers.1.mlp.experts.w13" in chosen
    assert "layers.0.self_attn.q_proj.weight" in chosen
    assert not any(n.startswith("embed_tokens") or "norm" in n or n.endswith("mlp.gate.weight") for n in chosen)
    w = ComputeWeights(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w.begin()
    assert m.lm_head.weight.dtype == torch.bfloat16 and m.embed_tokens.weight.dtype == torch.float32
    w.end()
    w.remove()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)


def test_existing_grad_is_accumulated_onto():
    """A .grad left from before the step (zero_grad not called) is added to, as autograd would."""
    ref_m, fast_m = _model(), _model()
    for m in (ref_m, fast_m):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    LocalStep(ref_m, 1, _autocast(), None, DEV).run([x])
    LocalStep(fast_m, 1, _autocast(), None, DEV, weights=ComputeWeights(fast_m)).run([x])
    for (n, a), b in zip(fast_m.named_parameters(), ref_m.parameters()):
        assert torch.equal(a.grad, b.grad), n
