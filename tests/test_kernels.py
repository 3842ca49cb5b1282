"""The Triton expert backend on the CPU, through Triton's interpreter, against the `loop` reference.

The interpreter must be selected (TRITON_INTERPRET=1) before triton itself is imported: triton's
own library functions (tl.cdiv, tl.sigmoid, ...) are jitted at its import. So this module sets it
before importing triton when it can; if an earlier test already imported triton without it, the
module re-runs itself in a fresh interpreter process instead (test_in_subprocess). The variable
is restored after the import and set again only while this module's tests run, since other tests
check the no-interpreter path.

Shapes are tiny (the interpreter runs every program in numpy); fp32 is compared tightly. The
interpreter converts fp32 -> bf16 by truncation (the GPU rounds), so the bf16 case is loose; the
bf16 accuracy bound (~1e-2, no worse than grouped) is checked on the GPU by
scripts/gpu_kernels_check.py.
"""

import contextlib

import pytest
import torch

from tests.helpers import interpreter_suite, kernels_in_process, triton_interpreter

IN_PROCESS = kernels_in_process()
with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
    pytest.importorskip("triton")
    from deepseekmoe.kernels import moe_kernels as mk
    from deepseekmoe.kernels import moe_triton as mt

from deepseekmoe import kernels  # noqa: E402
from deepseekmoe.errors import ConfigError  # noqa: E402
from deepseekmoe.kernels import KernelOptions, kernel_options  # noqa: E402
from deepseekmoe.model.moe.dispatch import dispatch  # noqa: E402
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop, resolve_backend  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

NAMES = ("y", "dx", "dw", "dw13", "dw2")
needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, IN_PROCESS)


def _inputs(T, K, E, D, F, seed=0, idx=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    dy = torch.randn(T, D, generator=g)
    return [t.to(dtype) for t in (x, w, w13, w2, dy)], idx


def _fwd_bwd(fn, x, w, w13, w2, dy, idx):
    ins = [t.detach().clone().requires_grad_() for t in (x, w, w13, w2)]
    y = fn(ins[0], idx, ins[1], ins[2], ins[3])
    return [y.detach(), *torch.autograd.grad(y, ins, dy)]


def _check(T, K, E, D, F, idx=None, seed=0, tol=1e-5, dtype=torch.float32):
    (x, w, w13, w2, dy), idx = _inputs(T, K, E, D, F, seed, idx, dtype)
    assert mk.INTERPRET, "the kernels were jitted without TRITON_INTERPRET=1 (imported before this module?)"
    ref = _fwd_bwd(experts_loop, *(t.float() for t in (x, w, w13, w2, dy)), idx)
    out = _fwd_bwd(mt.experts_triton, x, w, w13, w2, dy, idx)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert rel_err(o, r) < tol, f"{name}: triton vs loop rel diff {rel_err(o, r):.2e}"
    return out


@needs_interp
@pytest.mark.parametrize("T,K,E,D,F", [(19, 3, 8, 32, 48), (24, 2, 5, 48, 32)])
def test_triton_matches_loop(T, K, E, D, F):
    _check(T, K, E, D, F)


@needs_interp
def test_empty_experts_get_zero_weight_grads():
    E = 8
    idx = torch.stack([torch.randperm(3)[:2] for _ in range(20)])  # experts 3..7 never chosen
    y, dx, dw, dw13, dw2 = _check(20, 2, E, 32, 32, idx=idx)
    assert dw13[3:].abs().max() == 0 and dw2[3:].abs().max() == 0
    assert dw13[:3].abs().max() > 0


@needs_interp
def test_one_expert_takes_every_token():
    _check(33, 1, 4, 32, 32, idx=torch.full((33, 1), 2))
    # expert 0 in every token's first slot, the rest spread: one long segment, several short ones
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(5, generator=g)[:2] + 1])
                       for _ in range(40)])
    _check(40, 3, 6, 32, 32, idx=idx)


@needs_interp
def test_topk_equals_experts_and_one_token():
    _check(9, 4, 4, 32, 16)  # every token routes to every expert
    _check(1, 3, 6, 32, 32)


@needs_interp
def test_no_tokens():
    """Zero tokens (an expert-parallel rank can receive none): empty output, zero weight grads."""
    x = torch.randn(0, 32, requires_grad=True)
    w13 = torch.randn(4, 32, 32, requires_grad=True)
    w2 = torch.randn(4, 32, 16, requires_grad=True)
    y = mt.experts_triton(x, torch.zeros(0, 2, dtype=torch.long), torch.rand(0, 2), w13, w2)
    assert y.shape == (0, 32)
    (y.sum() + (w13 * 0).sum() + (w2 * 0).sum()).backward()
    assert w13.grad.abs().max() == 0 and w2.grad.abs().max() == 0


@needs_interp
def test_wgrad_operand_modes_agree():
    """dW from a gathered operand equals dW from a sorted copy (the backward uses the copy for
    dW13), including experts whose row count is not a multiple of the row block (masked tail)."""
    T, K, E, D, N = 37, 2, 5, 32, 48
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    d = dispatch(idx, E, index_dtype=torch.int32)
    perm, counts = d.perm_S, d.counts_E
    assert (counts % 16 != 0).any()
    A_SN = torch.randn(T * K, N, generator=g)
    x_TD = torch.randn(T, D, generator=g)
    out_g, out_s = torch.full((E, N, D), float("nan")), torch.full((E, N, D), float("nan"))
    mk.wgrad(A_SN, x_TD, out_g, perm, counts, K, 16, a_gather=False)
    mk.wgrad(A_SN, x_TD[perm.long() // K], out_s, perm, counts, K, 16, a_gather=False, b_gather=False)
    ref = torch.zeros(E, N, D)
    for r, s in enumerate(perm.tolist()):
        e = idx.reshape(-1)[s]
        ref[e] += A_SN[r, :, None] * x_TD[s // K][None, :]
    torch.testing.assert_close(out_g, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s, ref, rtol=1e-5, atol=1e-5)


@needs_interp
def test_unaligned_dims_take_the_padding_path():
    _check(13, 2, 4, 37, 21)  # D, F not multiples of 16: zero-padded inside the backend


@needs_interp
def test_bf16_runs_and_is_close():
    # Loose: the interpreter truncates fp32 -> bf16 (twice the GPU's rounding error).
    _check(19, 3, 8, 32, 48, tol=4e-2, dtype=torch.bfloat16)


@needs_interp
def test_save_modes_and_down_bwd_paths_agree():
    """What the forward saves (g|u or a + s|t) and how the down projection's backward runs (split:
    GEMM + elementwise pass, dy gathered in the loops or copied to sorted order once; fused: one
    kernel) change nothing beyond rounding, and all match loop."""
    (x, w, w13, w2, dy), idx = _inputs(17, 3, 6, 32, 32, seed=5)
    ref = _fwd_bwd(experts_loop, x, w, w13, w2, dy, idx)
    outs = []
    for save in ("gu", "ast"):
        for path, dy_copy in (("split", True), ("split", False), ("fused", False)):
            with kernel_options(KernelOptions(save=save, down_bwd=path, dy_copy=dy_copy)):
                outs.append(_fwd_bwd(mt.experts_triton, x, w, w13, w2, dy, idx))
    for out in outs[1:]:
        for name, a, b in zip(NAMES, out, outs[0]):
            assert rel_err(a, b) < 1e-6, name
    for name, a, b in zip(NAMES, outs[0], ref):
        assert rel_err(a, b) < 1e-5, name


@needs_interp
def test_backward_runs_with_the_options_its_forward_was_given(monkeypatch):
    """The options reach the kernels explicitly (argument or context manager), and a backward run
    after the context manager has exited still takes the path its forward was given."""
    calls = []
    fused = mk.down_bwd
    monkeypatch.setattr(mk, "down_bwd", lambda *a, **k: calls.append(1) or fused(*a, **k))
    (x, w, w13, w2, dy), idx = _inputs(9, 2, 4, 32, 32, seed=6)
    ins = [t.detach().clone().requires_grad_() for t in (x, w, w13, w2)]
    with kernel_options(KernelOptions(down_bwd="fused")):
        y = mt.experts_triton(ins[0], idx, ins[1], ins[2], ins[3])
    y.backward(dy)
    assert calls == [1]
    y = mt.experts_triton(ins[0], idx, ins[1], ins[2], ins[3])  # default options: the split path
    y.backward(dy)
    assert calls == [1]
    mt.experts_triton(ins[0], idx, ins[1], ins[2], ins[3], options=KernelOptions(down_bwd="fused")).backward(dy)
    assert calls == [1, 1]


def test_kernel_options_are_validated():
    for bad, field in ((dict(save="all"), "save"), (dict(down_bwd="merged"), "down_bwd"), (dict(dy_copy=1), "dy_copy")):
        with pytest.raises(ConfigError, match=f"KernelOptions\\({field}="):
            KernelOptions(**bad)
    with pytest.raises(ConfigError, match="expects a KernelOptions"):
        with kernel_options({"save": "ast"}):
            pass
    assert KernelOptions().save_mode == 1 and KernelOptions(save="ast").save_mode == 2


@needs_interp
def test_inference_forward_saves_nothing():
    (x, w, w13, w2, _), idx = _inputs(11, 2, 4, 32, 32, seed=2)
    with torch.no_grad():
        y = mt.experts_triton(x, idx, w, w13, w2)
    assert rel_err(y, experts_loop(x, idx, w, w13, w2)) < 1e-5
    d = dispatch(idx, 4, index_dtype=torch.int32)
    _, a_saved, st_saved = mt.moe_experts_fwd(x, w.reshape(-1), d.perm_S, d.counts_E, w13, w2, 2, 0, "split", True)
    assert a_saved.numel() == 0 and st_saved.numel() == 0


@needs_interp
def test_dwp_columns_do_not_depend_on_tile_width():
    # down_bwd writes every partial-dw column it owns (sum first, zeros after), whatever BLOCK_N:
    # no zero-init and nothing stale between autotune configs. Compare two tile widths on one
    # buffer that starts as NaN.
    (x, w, w13, w2, dy), idx = _inputs(21, 2, 4, 32, 64, seed=7)
    d = dispatch(idx, 4, index_dtype=torch.int32)
    perm, counts = d.perm_S, d.counts_E
    S, F = perm.numel(), 64
    a, st = torch.empty(S, F), torch.empty(S, 2 * F)
    mk.gateup_fwd(x, w13, perm, counts, 2, 16, a, st, save=1)
    sums = []
    for bn, nsplit in ((32, 2), (64, 4)):
        cfg = mk.triton.Config(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=16, NSPLIT=nsplit))
        dwp = torch.full((S, mk.dwp_cols(F)), float("nan"))
        mk.down_bwd(dy, w2, a, st, perm, counts, w.reshape(-1), 2, 16, torch.empty_like(st), torch.empty_like(a),
                    dwp, 1, config=cfg)
        assert torch.isfinite(dwp).all()
        sums.append(dwp.sum(1))
    assert rel_err(sums[1], sums[0]) < 1e-6


@needs_interp
def test_compiles_without_graph_breaks():
    (x, w, w13, w2, dy), idx = _inputs(12, 2, 4, 32, 32, seed=4)
    fn = torch.compile(mt.experts_triton, fullgraph=True, backend="aot_eager")
    out = _fwd_bwd(fn, x, w, w13, w2, dy, idx)
    ref = _fwd_bwd(mt.experts_triton, x, w, w13, w2, dy, idx)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) < 1e-6, name


def test_backend_resolution_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", cpu) is experts_grouped
    with pytest.raises(ConfigError) as err:
        resolve_backend("triton", cpu)
    assert "needs a CUDA GPU" in str(err.value) and "expert_backend='grouped'" in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter makes triton usable on CPU tensors
    assert resolve_backend("triton", cpu) is kernels.experts_triton
    assert resolve_backend("auto", cpu) is experts_grouped  # auto never picks the interpreter
