"""The `triton` expert backend: torch.library custom ops and their autograd.

experts_triton(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF) -> y_TD has the signature and result of
deepseekmoe.model.moe.experts.experts_loop (its reference twin). Data flow:

  forward   perm_S, counts_E = dispatch(): the T*K slots sorted by expert (int32, no host sync)
            gateup_fwd: a_SF (and g|u saved for backward)   down_fwd: y_slot = w * (a @ W2^T)
            y_TD = sum over the K slots of each token (one reduction, fp32 accumulate)
  backward  down_bwd: dg|du = dA' w t | dA' w s, aw = w*a, dw (via dw_s = <dy_tok, W2_e a_s> =
            <dA'_s, a_s>, so y is never stored)   wgrad: dW2 = dy_tok^T aw, dW13 = dgu^T x_sorted (a
            sorted copy of x made here)   gateup_dx: dx slots, summed over K

Saved for backward: a = silu(g) u [S, F] and s|t = silu(g) | u silu'(g) [S, 2F] in the compute
dtype (the forward epilogue has g and u in registers; the backward then needs only products),
plus the routing metadata; grouped keeps the permuted x, g|u, silu(g), a and permuted outputs.
Both ops are torch.library custom ops with a fake (meta) implementation, so torch.compile keeps
them in one graph. What is saved and how the backward runs are KernelOptions (options.py); the
forward op takes them as plain arguments, so its backward runs with the options it was given.

Shape legend: T tokens, K experts per token, S = T*K slots, E experts, D hidden, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
import triton

from deepseekmoe.kernels import moe_kernels as mk
from deepseekmoe.kernels.options import KernelOptions, current_options
from deepseekmoe.model.moe.dispatch import dispatch


def tpe_bucket(n_slots: int, n_experts: int) -> int:
    """Tokens-per-expert bucket for the autotune keys (a power of two, >= 16)."""
    return max(16, min(1 << 16, triton.next_power_of_2(max(1, n_slots // max(1, n_experts)))))


# ---------------------------------------------------------------------------------------------
# Raw computations (also used by scripts/gpu_kernels_check.py to time each stage).

def forward_impl(x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, K: int, save: int, configs=None):
    configs = configs or {}
    T, D = x_TD.shape
    E, twoF, _ = w13_E2FD.shape
    F_ = twoF // 2
    S = perm_S.shape[0]
    tpe = tpe_bucket(S, E)
    a_SF = x_TD.new_empty(S, F_)
    st_S2F = x_TD.new_empty(S, twoF) if save else None
    mk.gateup_fwd(x_TD, w13_E2FD, perm_S, counts_E, K, tpe, a_SF, st_S2F, save, config=configs.get("gateup_fwd"))
    y_SD = x_TD.new_empty(S, D)  # slot order (t*K + k)
    mk.rowtile(a_SF, w2_EDF, y_SD, perm_S, counts_E, w_S, K, tpe, n=D, kd=F_, a_gather=False, b_kmajor=True,
               config=configs.get("down_fwd"))
    y_TD = mk.sum_slots(y_SD, T, K)
    # (two distinct empties: outputs of a custom op may not alias each other)
    return y_TD, (a_SF if save == 2 else x_TD.new_empty(0)), (st_S2F if save else x_TD.new_empty(0))


def backward_impl(dy_TD, x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, a_SF, st_S2F, K: int,
                  down_bwd: str = "split", dy_copy: bool = True, configs=None):
    configs = configs or {}
    T, D = x_TD.shape
    E, twoF, _ = w13_E2FD.shape
    F_ = twoF // 2
    S = perm_S.shape[0]
    tpe = tpe_bucket(S, E)
    save = 2 if a_SF.numel() else 1
    dgu_S2F = torch.empty_like(st_S2F)
    aw_SF = x_TD.new_empty(S, F_)
    tok_S = perm_S.long() // K
    # dy in sorted order (one [S, D] gather) feeds dA' and dW2 with both operands through TMA; it is
    # freed before dW13's buffers appear, so the backward's peak does not grow (KernelOptions.dy_copy).
    dy_SD = dy_TD.index_select(0, tok_S) if dy_copy and down_bwd == "split" else None
    if down_bwd == "split":
        # dA' = dy_tok @ W2_e as a plain row-tiled GEMM, then one elementwise pass for the SwiGLU
        # backward: faster than the fused kernel, whose epilogue traffic never overlaps its GEMM.
        dap_SF = x_TD.new_empty(S, F_)
        mk.rowtile(dy_TD if dy_SD is None else dy_SD, w2_EDF, dap_SF, perm_S, counts_E, None, K, tpe, n=F_, kd=D,
                   a_gather=dy_SD is None, b_kmajor=False, out_sorted=True, config=configs.get("down_bwd_gemm"))
        dw_S = torch.empty(S, dtype=torch.float32, device=x_TD.device)
        mk.swiglu_bwd_rows(dap_SF, a_SF, st_S2F, perm_S, w_S, dgu_S2F, aw_SF, dw_S, save)
        del dap_SF
    else:
        dwp_SC = torch.empty(S, mk.dwp_cols(F_), dtype=torch.float32, device=x_TD.device)
        mk.down_bwd(dy_TD, w2_EDF, a_SF, st_S2F, perm_S, counts_E, w_S, K, tpe, dgu_S2F, aw_SF, dwp_SC, save,
                    config=configs.get("down_bwd"))
        dw_S = torch.empty(S, dtype=torch.float32, device=x_TD.device)
        dw_S.scatter_(0, perm_S.to(torch.int64), dwp_SC.sum(1))
        del dwp_SC
    # Order chosen for peak memory: each temporary is freed before the next large one appears.
    dw2 = torch.empty_like(w2_EDF)
    if dy_SD is None:
        mk.wgrad(dy_TD, aw_SF, dw2, perm_S, counts_E, K, tpe, a_gather=True, config=configs.get("wgrad_w2"))
    else:
        mk.wgrad(dy_SD, aw_SF, dw2, perm_S, counts_E, K, tpe, a_gather=False, b_gather=False,
                 config=configs.get("wgrad_w2"))
    del aw_SF, dy_SD
    dx_SD = x_TD.new_empty(S, D)  # slot order
    mk.rowtile(dgu_S2F, w13_E2FD, dx_SD, perm_S, counts_E, None, K, tpe, n=D, kd=twoF, a_gather=False,
               b_kmajor=False, config=configs.get("gateup_dx"))
    dx_TD = mk.sum_slots(dx_SD, T, K)
    del dx_SD
    # dW13 from a sorted copy of x: with both operands through TMA this product runs ~1.4x faster
    # than gathering x rows inside its loop. The copy is made in column halves (half the [S, D]
    # temporary each) so the backward's peak memory stays below the grouped backend's.
    dw13 = torch.empty_like(w13_E2FD)
    half = D // 2 if D % 32 == 0 else D
    for c0 in range(0, D, half):
        x_SH = x_TD[:, c0:c0 + half].index_select(0, tok_S)
        mk.wgrad(dgu_S2F, x_SH, dw13[:, :, c0:c0 + half], perm_S, counts_E, K, tpe, a_gather=False,
                 b_gather=False, config=configs.get("wgrad_w13"))
        del x_SH
    return dx_TD, dw_S.to(w_S.dtype), dw13, dw2


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the fakes give output shapes without running kernels).

@torch.library.custom_op("deepseekmoe::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(x_TD: torch.Tensor, w_S: torch.Tensor, perm_S: torch.Tensor, counts_E: torch.Tensor,
                    w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, K: int, save: int, down_bwd: str,
                    dy_copy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """save: 0 (nothing, inference), 1 or 2 (KernelOptions.save_mode); down_bwd and dy_copy are
    only read by the backward (KernelOptions)."""
    return forward_impl(x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, K, save)


@moe_experts_fwd.register_fake
def _(x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, K, save, down_bwd, dy_copy):
    S, twoF = perm_S.shape[0], w13_E2FD.shape[1]
    return (x_TD.new_empty(x_TD.shape), x_TD.new_empty((S, twoF // 2) if save == 2 else (0,)),
            x_TD.new_empty((S, twoF) if save else (0,)))


@torch.library.custom_op("deepseekmoe::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(dy_TD: torch.Tensor, x_TD: torch.Tensor, w_S: torch.Tensor, perm_S: torch.Tensor,
                    counts_E: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, a_SF: torch.Tensor,
                    st_S2F: torch.Tensor, K: int, down_bwd: str,
                    dy_copy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(dy_TD, x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, a_SF, st_S2F, K, down_bwd, dy_copy)


@moe_experts_bwd.register_fake
def _(dy_TD, x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, a_SF, st_S2F, K, down_bwd, dy_copy):
    return (x_TD.new_empty(x_TD.shape), w_S.new_empty(w_S.shape), w13_E2FD.new_empty(w13_E2FD.shape),
            w2_EDF.new_empty(w2_EDF.shape))


def _setup_context(ctx, inputs, output):
    x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, K, save, down_bwd, dy_copy = inputs
    ctx.K, ctx.down_bwd, ctx.dy_copy = K, down_bwd, dy_copy
    # a and s|t are saved tensors, not results: no zero-filled grads for them (830 MB at 16B/16K).
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, output[1], output[2])


def _backward(ctx, dy_TD, _da, _dst):
    x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF, a_SF, st_S2F = ctx.saved_tensors
    if dy_TD is None:
        return (None,) * 10
    if st_S2F.numel() == 0 and perm_S.numel() > 0:
        raise RuntimeError("moe_experts_fwd ran with save=0 (no grad was needed) but backward was called")
    dx, dw, dw13, dw2 = moe_experts_bwd(dy_TD.contiguous(), x_TD, w_S, perm_S, counts_E, w13_E2FD, w2_EDF,
                                        a_SF, st_S2F, ctx.K, ctx.down_bwd, ctx.dy_copy)
    return dx, dw, None, None, dw13, dw2, None, None, None, None


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def _pad_aligned(x_TD, w13, w2):
    """Zero-pad D and F to multiples of 16 elements (e.g. the 2B preset's F = 854 -> 864).

    Triton specialises integer arguments on divisibility by 16; only then can it prove row starts
    aligned and use 16-byte vector loads (measured: F = 856 ran the 2B forward 30% slower than
    grouped). Exact (padded gate/up rows give g = u = 0, so a = 0); autograd slices the gradients
    back; a no-op for aligned shapes."""
    align = 16
    E, twoF, D = w13.shape
    F_ = twoF // 2
    pd, pf = (-D) % align, (-F_) % align
    if not (pd or pf):
        return x_TD, w13, w2
    w13 = torch.cat([Fn.pad(w13[:, :F_], (0, pd, 0, pf)), Fn.pad(w13[:, F_:], (0, pd, 0, pf))], 1)
    return Fn.pad(x_TD, (0, pd)), w13, Fn.pad(w2, (0, pf, 0, pd))


def experts_triton(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, options: KernelOptions | None = None):
    """Fused Triton routed experts; same signature and result as experts_loop. `options`: see
    KernelOptions (default: current_options(), i.e. the defaults or those of kernel_options())."""
    opts = options or current_options()
    T, K = idx_TK.shape
    E, _, D = w13_E2FD.shape
    dtype = x_TD.dtype
    x_TD, w13, w2 = _pad_aligned(x_TD.contiguous(), w13_E2FD.to(dtype), w2_EDF.to(dtype))
    w13, w2 = w13.contiguous(), w2.contiguous()
    w_S = w_TK.reshape(-1).contiguous()
    d = dispatch(idx_TK, E, index_dtype=torch.int32)
    need = torch.is_grad_enabled() and (x_TD.requires_grad or w_S.requires_grad or w13.requires_grad
                                        or w2.requires_grad)
    y_TD, _, _ = moe_experts_fwd(x_TD, w_S, d.perm_S, d.counts_E, w13, w2, K, opts.save_mode if need else 0,
                                 opts.down_bwd, opts.dy_copy)
    return y_TD[:, :D] if y_TD.shape[1] != D else y_TD
