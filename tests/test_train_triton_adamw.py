"""optim.impl "triton": the one-pass AdamW kernel (deepseekmoe/kernels/adamw.py) against its torch twin
and torch.optim.AdamW(fused=True), TritonAdamW's state against torch's, its fold into ClippedStep, the
compute copies it writes for ComputeWeights (whose next cast is skipped), and a Trainer run against
optim.impl=fused, on the CPU under Triton's interpreter.

The kernel and the twin round every operation the same way (torch's fused AdamW's order, fma where
torch has one, correctly rounded division and square root), so they are compared bit for bit; torch's
own fused kernel is compared to an fp32 ulp (it splits a tensor into chunks whose tails it computes
with other instructions).
"""

import contextlib
import copy
import math
import sys

import pytest
import torch

from tests.helpers import compile_for_hopper, interpreter_suite, kernels_in_process, tiny_model, triton_interpreter

IN_PROCESS = kernels_in_process()
with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
    pytest.importorskip("triton")
    from deepseekmoe.kernels import adamw as ka

from deepseekmoe.errors import ConfigError  # noqa: E402
from deepseekmoe.train import recipe  # noqa: E402
from deepseekmoe.train.optim import ClippedStep, ComputeWeights, TritonAdamW, build_optimizer  # noqa: E402
from deepseekmoe.train.step import LocalStep  # noqa: E402

needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, IN_PROCESS)

SHAPES = [(33, 17), (17,), (3, 5, 13)]  # 561, 17, 195 elements: none a multiple of the interpreter's block
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
CLOSE = dict(rtol=1e-6, atol=1e-8)  # an fp32 ulp or two, against torch's fused kernel


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _groups(ps):
    return [{"params": ps[:1] + ps[2:], "weight_decay": 0.1}, {"params": ps[1:2], "weight_decay": 0.0}]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g) * (1 + step) for s in SHAPES]


@needs_interp
def test_kernel_equals_its_twin_bit_for_bit():
    """Several steps of one odd-sized tensor: clip off / on, a skipped step, beta1 above 0.5 (the
    other lerp formula), fp16 and bf16 copies; the skipped step writes nothing."""
    g = torch.Generator().manual_seed(1)
    n = 2 * ka.BLOCK + 7
    init = torch.randn(n, generator=g)
    ours, twin = ([init.clone(), torch.zeros(n), torch.zeros(n)] for _ in range(2))
    lows = {dt: (torch.zeros(n, dtype=dt), torch.zeros(n, dtype=dt)) for dt in (torch.bfloat16, torch.float16)}
    cases = [(None, 0.0, 0.9, torch.bfloat16), (0.37, 0.0, 0.9, torch.float16), (0.37, 1.0, 0.9, torch.bfloat16),
             (1.0, 0.0, 0.6, torch.bfloat16), (0.05, 0.0, 0.9, torch.float16)]
    step = torch.zeros(())
    for i, (coef, inf, beta1, dt) in enumerate(cases):
        grad = torch.randn(n, generator=g)
        step += 1 - inf
        kw = dict(lr=1e-2 / (i + 1), beta1=beta1, beta2=0.95, weight_decay=0.1, eps=1e-8,
                  coef=None if coef is None else torch.tensor(coef), found_inf=torch.tensor(inf))
        before = [t.clone() for t in ours] + [lows[dt][0].clone()]
        ka.adamw_step_triton(ours[0], grad, ours[1], ours[2], step, low=lows[dt][0], **kw)
        ka.adamw_step_reference(twin[0], grad, twin[1], twin[2], step, low=lows[dt][1], **kw)
        for a, b in zip(ours, twin):
            assert torch.equal(a, b)
        assert torch.equal(lows[dt][0], lows[dt][1])
        if inf:
            assert all(torch.equal(a, b) for a, b in zip([*ours, lows[dt][0]], before))
        else:
            assert torch.equal(lows[dt][0], ours[0].to(dt))
            assert not torch.equal(ours[0], before[0])


@needs_interp
def test_optimizer_matches_torch_fused_adamw():
    """TritonAdamW.step(coef, found_inf, copies) against torch's fused AdamW stepping on grad * coef
    (skipping the found_inf step): two weight-decay groups, a schedule's lr, clip on / off."""
    ours_p, ref_p = _params(), _params()
    ours, ref = TritonAdamW(_groups(ours_p), **HYPER), torch.optim.AdamW(_groups(ref_p), fused=True, **HYPER)
    lows = {p: torch.zeros_like(p, dtype=torch.bfloat16) for p in ours_p}
    plan = [(None, 0.0), (1.0, 0.0), (0.3, 0.0), (0.3, 1.0), (0.8, 0.0), (None, 0.0)]  # (coef, found_inf)
    for i, (coef, inf) in enumerate(plan):
        grads = _grads(i)
        for g in ours, ref:
            for group in g.param_groups:
                group["lr"] = 1e-2 * (0.8 ** i)
        for p, gr in zip(ours_p, grads):
            p.grad = gr.clone()
        before = [p.detach().clone() for p in ours_p], {p: low.clone() for p, low in lows.items()}
        ours.step(coef=None if coef is None else torch.tensor(coef), found_inf=torch.tensor(inf), copies=lows)
        assert all(torch.equal(p.grad, gr) for p, gr in zip(ours_p, grads))  # no write-back of the grads
        if inf:
            assert all(torch.equal(p, b) for p, b in zip(ours_p, before[0]))
            assert all(torch.equal(lows[p], before[1][p]) for p in ours_p)
        else:
            for p, gr in zip(ref_p, grads):
                p.grad = gr * torch.tensor(coef) if coef is not None else gr.clone()
            ref.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a.detach(), b.detach(), **CLOSE)
            sa, sb = ours.state[a], ref.state[b]
            assert list(sa) == list(sb) == ["step", "exp_avg", "exp_avg_sq"]
            assert sa["step"].dtype == torch.float32 and sa["step"].shape == () and torch.equal(sa["step"], sb["step"])
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **CLOSE)
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **CLOSE)
            assert torch.equal(lows[a], a.detach().to(torch.bfloat16))
    assert float(ours.state[ours_p[0]]["step"]) == 5.0  # 6 steps, one skipped


@needs_interp
def test_state_dicts_load_either_way():
    """A TritonAdamW state continues in torch's fused AdamW, and a foreach AdamW's state (step kept on
    the CPU, other group flags) in TritonAdamW, each stepping as the optimizer it came from would."""
    a_p, b_p = _params(), _params()
    a, b = TritonAdamW(_groups(a_p), **HYPER), torch.optim.AdamW(_groups(b_p), foreach=True, **HYPER)
    for i in range(2):
        for ps, opt in ((a_p, a), (b_p, b)):
            for p, g in zip(ps, _grads(i)):
                p.grad = g
            opt.step()
    # Swap: a torch fused AdamW takes a's state, a TritonAdamW takes b's; one more step on each side.
    c_p, d_p = [torch.nn.Parameter(p.detach().clone()) for p in a_p], [torch.nn.Parameter(p.detach().clone())
                                                                       for p in b_p]
    c, d = torch.optim.AdamW(_groups(c_p), fused=True, **HYPER), TritonAdamW(_groups(d_p), **HYPER)
    c.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a checkpoint: tensors of its own
    d.load_state_dict(copy.deepcopy(b.state_dict()))
    for ps, opt in ((a_p, a), (b_p, b), (c_p, c), (d_p, d)):
        for p, g in zip(ps, _grads(2)):
            p.grad = g
        opt.step()
    for x_p, y_p, x, y in ((a_p, c_p, a, c), (b_p, d_p, b, d)):
        for p, q in zip(x_p, y_p):
            torch.testing.assert_close(p.detach(), q.detach(), **CLOSE)
            assert float(x.state[p]["step"]) == float(y.state[q]["step"]) == 3.0
            torch.testing.assert_close(x.state[p]["exp_avg_sq"], y.state[q]["exp_avg_sq"], **CLOSE)
    assert d.state[d_p[0]]["step"].dtype == torch.float32


def _clip_grads(step: int, norm: float) -> list[torch.Tensor]:
    gs = _grads(step)
    if math.isinf(norm):
        gs[1][3] = float("inf")
        return gs
    total = math.sqrt(sum(float(x.square().sum()) for x in gs))
    return [x * (norm / total) for x in gs]


@needs_interp
def test_clipped_step_folds_the_clip_into_the_kernel():
    """ClippedStep with a TritonAdamW (mode "triton") against clip_grad_norm_ in place + torch's fused
    AdamW: the same norms and updates; the grads of a folded step are left as they were."""
    ours_p, ref_p = _params(), _params()
    ours, ref = TritonAdamW(_groups(ours_p), **HYPER), torch.optim.AdamW(_groups(ref_p), fused=True, **HYPER)
    cs, cr = ClippedStep(ours, ours_p, 1.0), ClippedStep(ref, ref_p, 1.0, impl="inplace")
    assert cs.mode == "triton" and cs.folded and cr.mode == "inplace"
    assert ClippedStep(ours, ours_p, 1.0, impl="inplace").mode == "inplace"
    assert ClippedStep(ours, ours_p, math.inf).mode == "inplace"  # clipping off: nothing to fold
    for i, norm in enumerate([0.3, 0.2, 5.0, math.inf, 3.0, 0.1]):
        grads = _clip_grads(i, norm)
        results = []
        for ps, c in ((ours_p, cs), (ref_p, cr)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            loss = torch.tensor(1.0)
            gnorm = c.clip(loss)
            finite = bool(torch.isfinite(loss + gnorm))
            if finite:
                c.update()
            results.append((gnorm, finite))
        (na, fa), (nb, fb) = results
        assert fa == fb == math.isfinite(norm) and (torch.equal(na, nb) or not fa)
        assert cs.stepped == (i > 0)  # the first step (no state yet) takes the inplace path
        if i > 0:
            assert all(torch.equal(p.grad, g) for p, g in zip(ours_p, grads))
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a.detach(), b.detach(), **CLOSE)
        for o in ours, ref:
            o.zero_grad(set_to_none=True)
    assert {float(s["step"]) for o in (ours, ref) for s in o.state.values()} == {5.0}


@needs_interp
def test_compute_weights_skip_the_cast_the_kernel_made():
    """ComputeWeights attached to a TritonAdamW: after each step the copies equal the masters cast
    and the next begin() casts nothing; a skipped step keeps that; a checkpoint restore (the masters
    written by load_state_dict) and a parameter without a gradient are cast again."""
    model = tiny_model(num_hidden_layers=2).train()
    opt = build_optimizer(model, recipe.OptimSection(lr=1e-2, impl="triton"), torch.device("cpu"))
    cw = ComputeWeights(model, optimizer=opt)
    assert isinstance(opt, TritonAdamW) and opt.compute_weights is cw
    params = [p for p in model.parameters() if p.requires_grad]
    clipped = ClippedStep(opt, params, 0.5)
    stepper = LocalStep(model, 2, lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, torch.device("cpu"),
                        weights=cw)
    g = torch.Generator().manual_seed(3)
    n = len(cw.params)

    def step(nan=False):
        stats = stepper.run(torch.randint(0, 64, (2, 12), generator=g) for _ in range(2))
        loss = stats.loss * float("nan") if nan else stats.loss
        gnorm = clipped.clip(loss)
        if bool(torch.isfinite(loss + gnorm)):
            clipped.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
        assert cw.casts == n  # only the first begin() cast
        assert all(torch.equal(low, p.detach().to(torch.bfloat16)) for p, low in cw.copies().items())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    step(nan=True)  # skipped on device: weights and copies as they were
    assert cw.casts == n and all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    step()
    model.load_state_dict(saved)  # a restore writes the masters: their copies are stale
    step()
    assert cw.casts == 2 * n
    assert all(torch.equal(low, p.detach().to(torch.bfloat16)) for p, low in cw.copies().items())
    cw.params[0].requires_grad_(False)  # no gradient, no update: the kernel writes no copy for it,
    step()  # its copy is still fresh from the last update at this begin(), stale at the next
    step()
    assert cw.casts == 2 * n + 1


def _deferred_run(defer: bool, accum: int, clip_impl: str = "fused", steps: int = 3):
    """`steps` steps of the tiny model (TritonAdamW, ComputeWeights, ClippedStep at 0.5): the model,
    the grad norms and, per step, the deferred gradients as the optimizer saw them (fp32 copies)."""
    cpu = torch.device("cpu")
    model = tiny_model(num_hidden_layers=2).train()
    opt = build_optimizer(model, recipe.OptimSection(lr=1e-2, impl="triton"), cpu)
    cw = ComputeWeights(model, optimizer=opt, defer_grads=defer)
    params = [p for p in model.parameters() if p.requires_grad]
    clipped = ClippedStep(opt, params, 0.5, impl=clip_impl)
    stepper = LocalStep(model, accum, lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, cpu, weights=cw)
    g = torch.Generator().manual_seed(3)
    norms, seen = [], []
    for _ in range(steps):
        stats = stepper.run([torch.randint(0, 64, (2, 12), generator=g) for _ in range(accum)])
        seen.append({id(p): (p.grad is None, gr.dtype, gr.float()) for p, gr in cw.deferred().items()})
        norms.append(clipped.clip(stats.loss))
        clipped.update()
        opt.zero_grad(set_to_none=True)
        assert cw.deferred() == {} and all(p.grad is None for p in params)
    return model, torch.stack(norms), seen, cw


@needs_interp
def test_deferred_bf16_grads_give_the_fp32_paths_update():
    """defer_grads, one micro-batch per step: no fp32 .grad is formed (the bf16 ones are read by the
    norm and the kernel) and the run equals the fp32-gradient run; two micro-batches sum in fp32 as
    before (nothing deferred, the same run bit for bit); clip inplace materialises them first."""
    ref, ref_norms, ref_seen, _ = _deferred_run(False, 1)
    ours, norms, seen, cw = _deferred_run(True, 1)
    assert all(s == {} for s in ref_seen) and len(seen[0]) == len(cw.params) == len(seen[-1])
    assert all(none and dt == torch.bfloat16 for step in seen for none, dt, _ in step.values())
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)  # fp32 accumulation either way
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    two, two_norms, two_seen, _ = _deferred_run(True, 2)
    two_ref, two_ref_norms, _, _ = _deferred_run(False, 2)
    assert all(s == {} for s in two_seen) and torch.equal(two_norms, two_ref_norms)
    assert all(torch.equal(a, b) for a, b in zip(two.parameters(), two_ref.parameters()))
    inplace, in_norms, in_seen, _ = _deferred_run(True, 1, clip_impl="inplace")
    assert len(in_seen[0]) == len(cw.params)  # deferred, then made fp32 .grad for clip_grad_norm_
    torch.testing.assert_close(in_norms, ref_norms, rtol=1e-6, atol=0)
    for a, b in zip(inplace.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)


@needs_interp
def test_materialize_and_the_kernel_on_a_bf16_grad():
    """materialize() gives the exact fp32 .grad; the next begin() accumulates onto a gradient left
    deferred; the kernel on a bf16 gradient equals it on that gradient upcast, bit for bit."""
    model = tiny_model(num_hidden_layers=2).train()
    opt = build_optimizer(model, recipe.OptimSection(lr=1e-2, impl="triton"), torch.device("cpu"))
    cw = ComputeWeights(model, optimizer=opt, defer_grads=True)
    stepper = LocalStep(model, 1, lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, torch.device("cpu"),
                        weights=cw)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    stepper.run([x])
    low = {p: g.clone() for p, g in cw.deferred().items()}
    cw.materialize()
    assert cw.deferred() == {} and all(torch.equal(p.grad, g.float()) for p, g in low.items())
    opt.zero_grad(set_to_none=True)
    stepper.run([x])
    stepper.run([x])  # no zero_grad between: the second step's sum starts from the deferred first
    assert cw.deferred() == {} and all(torch.equal(p.grad, g.float() * 2) for p, g in low.items())
    n = 2 * ka.BLOCK + 7
    g = torch.Generator().manual_seed(9)
    grad = torch.randn(n, generator=g).to(torch.bfloat16)
    a, b = ([torch.randn(n, generator=torch.Generator().manual_seed(1)), torch.zeros(n), torch.zeros(n)]
            for _ in range(2))
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8, coef=torch.tensor(0.3))
    ka.adamw_step_triton(a[0], grad, a[1], a[2], torch.ones(()), **kw)
    ka.adamw_step_triton(b[0], grad.float(), b[1], b[2], torch.ones(()), **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    ref = [torch.randn(n, generator=torch.Generator().manual_seed(1)), torch.zeros(n), torch.zeros(n)]
    ka.adamw_step_reference(ref[0], grad, ref[1], ref[2], torch.ones(()), **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, ref))


def _train(tmp_path, impl: str, micro: int = 2):
    from deepseekmoe.model.transformer import Transformer
    from deepseekmoe.train.cli import split_overrides
    from deepseekmoe.train.metrics import read_metrics
    from deepseekmoe.train.trainer import Trainer

    argv = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.intermediate_size=64",
            "--model.moe_intermediate_size=16", "--model.n_routed_experts=8", "--model.num_experts_per_tok=2",
            "--model.num_attention_heads=2", "--train.seq_len=32", "--train.batch_size=4", "--train.steps=5",
            f"--train.micro_batch_size={micro}", "--log.every=1", "--eval.every=0", "--checkpoint.every=0",
            "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--sample.max_new_tokens=0",
            "--system.dtype=bfloat16", "--system.compute_weights=true", "--optim.lr=3e-3", "--optim.grad_clip=0.78",
            f"--optim.impl={impl}"]
    nan_call = 6 if micro == 2 else 3  # step 3's last micro-batch
    real, calls = Transformer.forward, {"n": 0}

    def forward(self, *a, **k):  # step 3's last micro-batch: a NaN loss, the step skipped
        out = real(self, *a, **k)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] == nan_call:
                out.loss = out.loss * float("nan")
        return out

    Transformer.forward = forward
    try:
        run_dir = tmp_path / f"{impl}-{micro}"
        trainer = Trainer(recipe.build(None, split_overrides(argv)[1]), run_dir=run_dir, echo=lambda s: None)
        trainer.run()
    finally:
        Transformer.forward = real
    return trainer, read_metrics(run_dir / "metrics.jsonl")


@needs_interp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("micro", [2, 4])  # 2 micro-batches a step (fp32 sums), 1 (bf16 grads deferred)
def test_trainer_triton_equals_fused(tmp_path, micro):
    (tt, rt), (tf, rf) = _train(tmp_path, "triton", micro), _train(tmp_path, "fused", micro)
    assert tt.stepper.weights.defer and not tf.stepper.weights.defer
    assert isinstance(tt.optimizer, TritonAdamW) and tt.clipped.mode == "triton" and tf.clipped.mode == "fused"
    weights = tt.stepper.weights
    assert weights.casts == len(weights.params)  # the first step cast; the kernel wrote every later copy
    assert tf.stepper.weights.casts == 5 * len(weights.params)
    assert [r["step"] for r in rt if r["kind"] == "nonfinite"] == [r["step"] for r in rf if r["kind"] == "nonfinite"]
    lt, lf = ([(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["kind"] == "train"] for recs in (rt, rf))
    assert [s for s, _, _ in lt] == [s for s, _, _ in lf] == [1, 2, 4, 5]
    assert any(g > 0.78 for _, _, g in lf) and any(g < 0.78 for _, _, g in lf)  # clipped steps and not
    for (_, a, ga), (_, b, gb) in zip(lt, lf):
        assert a == pytest.approx(b, rel=1e-5) and ga == pytest.approx(gb, rel=1e-4)
    for a, b in zip(tt.model.parameters(), tf.model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-6)


def test_selection_and_its_errors(monkeypatch):
    assert recipe.build(overrides=[("optim.impl", "triton")]).optim.impl == "triton"
    with pytest.raises(ConfigError, match="optim.impl"):
        recipe.build(overrides=[("optim.impl", "apex")])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="optim.impl=triton runs its kernel on CUDA"):
        build_optimizer(tiny_model(), recipe.OptimSection(impl="triton"), torch.device("cpu"))


def test_auto_resolves_to_the_kernel_on_one_gpu_process_only(monkeypatch):
    """optim.impl auto: triton for one CUDA process's plain parameters, torch's AdamW otherwise."""
    from deepseekmoe.train.optim import resolve_impl, torch_adamw_impl

    model, cuda = tiny_model(), torch.device("cuda")
    assert resolve_impl("auto", model, cuda) == "triton"  # triton imports here (the interpreter's CI)
    assert resolve_impl("auto", model, torch.device("cpu")) == torch_adamw_impl(torch.device("cpu")) == "foreach"
    assert resolve_impl("fused", model, cuda) == "fused" and torch_adamw_impl(cuda) == "fused"
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    assert resolve_impl("auto", model, cuda) == "fused"  # several ranks: the norm is a collective
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    assert resolve_impl("auto", model, cuda) == "triton"
    monkeypatch.setitem(sys.modules, "deepseekmoe.kernels.adamw", None)  # triton missing: import fails
    assert resolve_impl("auto", model, cuda) == "fused"


COMPILE_SNIPPET = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepseekmoe.kernels.adamw import _adamw_kernel
sig = {"p_ptr": "*fp32", "g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "low_ptr": "*bf16", "step_ptr": "*fp32",
       "coef_ptr": "*fp32", "inf_ptr": "*fp32", "n": "i64", "lr": "fp64", "log_beta1": "fp64", "log_beta2": "fp64",
       "decay": "fp32", "w1": "fp32", "beta2": "fp32", "w2": "fp32", "eps": "fp32"}
for flag, grad in ((True, "*fp32"), (False, "*fp32"), (True, "*bf16")):  # bf16: a deferred gradient
    consts = {"HAS_COEF": flag, "HAS_INF": flag, "HAS_LOW": flag, "BLOCK": 2048}
    src = ASTSource(fn=_adamw_kernel, signature={**sig, "g_ptr": grad, **{k: "constexpr" for k in consts}},
                    constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(9)})  # n too
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    assert "cubin" in k.asm and "ld.global.v4" in k.asm["ptx"] and "div.rn.f32" in k.asm["ptx"]
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The real compiler takes the kernel for sm_90 (fp64 scalars, the early return, vector loads)."""
    compile_for_hopper(COMPILE_SNIPPET)
