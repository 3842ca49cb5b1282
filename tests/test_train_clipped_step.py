"""train/optim.py ClippedStep: the clip folded into fused AdamW's step (`grad_scale` / `found_inf`)
against its reference twin (clip_grad_norm_ in place, then step), on CPU with torch's fused AdamW,
directly and through the Trainer. The twins agree to fp32 rounding: the fused kernel divides each
grad by grad_scale = (norm + 1e-6) / max_norm where clip_grad_norm_ multiplies by the rounded
coefficient max_norm / (norm + 1e-6), an ulp apart when the clip is active; bit-identical when not."""

from __future__ import annotations

import math

import pytest
import torch

from deepseekmoe.train import recipe
from deepseekmoe.train.cli import split_overrides
from deepseekmoe.train.optim import ClippedStep
from deepseekmoe.train.trainer import Trainer

SHAPES = [(33, 17), (17,)]


def _setup(impl: str):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]
    opt = torch.optim.AdamW([{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), fused=True)
    return ps, opt, ClippedStep(opt, ps, 1.0, impl=impl)


def _grads(step: int, norm: float) -> list[torch.Tensor]:
    """Gradients of global norm `norm` (inf: one entry is inf), the same for both twins."""
    g = torch.Generator().manual_seed(100 + step)
    gs = [torch.randn(*s, generator=g) for s in SHAPES]
    if math.isinf(norm):
        gs[1][3] = float("inf")
        return gs
    total = math.sqrt(sum(float(x.square().sum()) for x in gs))
    return [x * (norm / total) for x in gs]


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


def _step(ps, opt, cs, grads, loss=1.0):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    loss = torch.tensor(loss)
    gnorm = cs.clip(loss)
    finite = bool(torch.isfinite(loss + gnorm))
    if finite:
        cs.update()
    return gnorm, finite


def test_folded_clip_matches_clip_in_place_then_step():
    fused, ref = _setup("fused"), _setup("inplace")
    assert fused[2].folded and not ref[2].folded
    # step 1: no state yet (the fused twin takes the inplace path); 2: no clip; 3: clip; 4: inf; 5, 6: clip, no clip
    norms = [0.3, 0.2, 5.0, math.inf, 3.0, 0.1]
    for i, norm in enumerate(norms):
        grads = _grads(i, norm)
        before = _snapshot(*fused[:2]) if i else None
        (nf, ff), (nr, fr) = _step(*fused, grads), _step(*ref, grads)
        assert ff == fr == math.isfinite(norm)
        assert torch.equal(nf, nr) or (math.isinf(norm) and not torch.isfinite(nf))  # the same norm
        assert fused[2].stepped == (i > 0)
        assert not hasattr(fused[1], "grad_scale") and not hasattr(fused[1], "found_inf")
        if i == 1:  # grad_scale 1: the twins are still bit-identical
            for a, b in zip(fused[0], ref[0]):
                assert torch.equal(a, b)
        if i == 2:  # clipped: the fused kernel stored grad / grad_scale back into .grad
            coef = 1.0 / (float(nf) + 1e-6)
            for p, g in zip(fused[0], grads):
                torch.testing.assert_close(p.grad, g * coef, rtol=2e-7, atol=0)
        if math.isinf(norm):  # skipped on device: weights, moments, step count as they were; grads untouched
            after = _snapshot(*fused[:2])
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)
            assert all(torch.equal(p.grad, g) for p, g in zip(fused[0], grads))
        fused[1].zero_grad(set_to_none=True)
        ref[1].zero_grad(set_to_none=True)
    (pf, sf), (pr, sr) = _snapshot(*fused[:2]), _snapshot(*ref[:2])
    for a, b in zip(sf, sr):
        assert float(a["step"]) == float(b["step"]) == 5.0  # 6 steps, one skipped
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    for a, b in zip(pf, pr):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_nonfinite_first_step_creates_no_state_and_fallbacks_keep_the_reference_path():
    ps, opt, cs = _setup("fused")
    gnorm, finite = _step(ps, opt, cs, _grads(0, math.inf))
    assert not finite and not cs.stepped and not opt.state  # as before: nothing stepped, no state made
    # Not folded: max_norm inf (clipping off), a non-fused optimizer, a distributed run (fold=False).
    assert not ClippedStep(opt, ps, math.inf).folded
    assert not ClippedStep(torch.optim.AdamW(ps, foreach=True), ps, 1.0).folded
    assert not ClippedStep(opt, ps, 1.0, fold=False).folded
    with pytest.raises(ValueError, match="impl"):
        ClippedStep(opt, ps, 1.0, impl="fold")


def _run(tmp_path, clip_impl: str, monkeypatch, nan_call: int):
    """A tiny run with fused AdamW on CPU; the loss of forward call `nan_call` made NaN."""
    from deepseekmoe.model.transformer import Transformer
    from deepseekmoe.train.metrics import read_metrics

    real, calls = Transformer.forward, {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] == nan_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)
    argv = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
            "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
            "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", "--train.steps=6",
            "--log.every=1", "--eval.every=0", "--checkpoint.every=0", "--log.progress=false",
            "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0", "--optim.impl=fused",
            "--optim.lr=3e-3", "--optim.grad_clip=0.78", f"--optim.clip_impl={clip_impl}"]
    trainer = Trainer(recipe.build(None, split_overrides(argv)[1]), run_dir=tmp_path / clip_impl, echo=lambda s: None)
    trainer.run()
    monkeypatch.undo()
    return trainer, read_metrics(tmp_path / clip_impl / "metrics.jsonl")


def test_trainer_loss_curve_equals_the_clip_in_place_path(tmp_path, monkeypatch):
    (tf, rf), (tr, rr) = (_run(tmp_path, c, monkeypatch, nan_call=3) for c in ("fused", "inplace"))
    assert tf.clipped.folded and not tr.clipped.folded
    bad = [[r["step"] for r in recs if r["kind"] == "nonfinite"] for recs in (rf, rr)]
    assert bad == [[3], [3]]
    lf, lr_ = ([(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["kind"] == "train"] for recs in (rf, rr))
    assert [s for s, _, _ in lf] == [s for s, _, _ in lr_] == [1, 2, 4, 5, 6]
    assert any(g > 0.78 for _, _, g in lr_) and any(g < 0.78 for _, _, g in lr_)  # clipped steps and not
    for (_, a, ga), (_, b, gb) in zip(lf, lr_):
        assert a == pytest.approx(b, rel=1e-6) and ga == pytest.approx(gb, rel=1e-5)
    for a, b in zip(tf.model.parameters(), tr.model.parameters()):  # ulps of the clipped steps, through AdamW
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-6)
    steps = {float(s["step"]) for t in (tf, tr) for s in t.optimizer.state.values()}
    assert steps == {5.0}  # 6 steps, the NaN one skipped by both
