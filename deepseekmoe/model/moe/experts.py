"""Routed-expert compute: several backends behind one signature.

Every backend computes, for each token t,

    y[t] = sum_k w[t, k] * FFN_{idx[t, k]}(x[t]),   FFN_e(x) = (silu(x W1_e^T) * (x W3_e^T)) W2_e^T

with the expert weights stacked: `w13_E2FD` holds gate (rows 0..F-1) and up (rows F..2F-1)
projections of every expert in the released (out, in) orientation, `w2_EDF` the down projection.

Backends:
  loop     the readable reference: one masked matmul chain per expert (host syncs; any shape)
  grouped  sort token slots by expert (dispatch.py), two grouped GEMMs (torch grouped_mm),
           weighted combine; dropless, no host-device sync, autograd through torch ops
  triton   fused Hopper kernels (deepseekmoe.kernels); GPU only
  gather   inference for small decode batches: each token slot reads only its expert's weights
           (bandwidth-bound: bytes of the activated experts, not of all E); no host sync. Chosen
           by generate for compiled decode; a valid config value too, and differentiable, but it
           copies one expert's weights per slot, so training or prefill with it is for tiny models
  auto     triton when usable, else grouped, else loop

LoRA (model/moe/lora.py): every backend takes `lora` (ExpertLoraFactors or None) and adds each
adapted projection's scale * (drop(x) A_e^T) B_e^T. `loop` does it per expert and projection, the
readable twin; `grouped` runs the fused gate|up factors and the down factors as grouped GEMMs on
the same dispatched slot rows; `gather` as batched products on each slot's own factors. The
Triton kernels fuse the gate/up GEMM with SwiGLU, so nothing can be added between them:
`experts_with_lora` gives them the merged weights W + scale * B A, built each forward (one extra
[E, 2F, D] + [E, D, F] per MoE layer in the compute dtype, kept for backward like the weights;
their gradient reaches A and B through the merge). Merged weights cannot apply dropout to the LoRA
input, so while LoRA dropout is active (training with p > 0) `triton` computes with `grouped`.

Shape legend: T tokens, K routed experts per token, S = T*K token slots, E experts,
D hidden size, F expert width; LoRA: r rank, R stacked gate|up rank (r or 2r).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.config import EXPERT_BACKENDS
from deepseekmoe.model.moe.dispatch import combine, dispatch
from deepseekmoe.model.moe.lora import ExpertLoraFactors

# torch >= 2.9 spells it F.grouped_mm; 2.8 only has the private torch._grouped_mm.
_gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

ExpertFn = Callable[..., torch.Tensor]  # (x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF[, lora]) -> y_TD


def _lora_term(x, A, B, e, lora: ExpertLoraFactors):
    """scale * (x A_e^T) B_e^T for one expert's rows x (x already dropped out), or 0 without A."""
    return 0.0 if A is None else (x @ A[e].T) @ B[e].T * lora.scale


def experts_loop(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora: ExpertLoraFactors | None = None):
    """Reference: for each expert, run its FFN on the tokens that chose it and add gate * out
    (with `lora`, each adapted projection's low-rank term added explicitly)."""
    E, twoF, _ = w13_E2FD.shape
    F_ = twoF // 2
    w13_E2FD = w13_E2FD.to(x_TD.dtype)
    w2_EDF = w2_EDF.to(x_TD.dtype)
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(E):
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        g, u = xe @ w13_E2FD[e, :F_].T, xe @ w13_E2FD[e, F_:].T
        if lora is not None:
            xd = lora.drop(xe)
            g = g + _lora_term(xd, lora.gate_A, lora.gate_B, e, lora)
            u = u + _lora_term(xd, lora.up_A, lora.up_B, e, lora)
        h = F.silu(g) * u
        ye = h @ w2_EDF[e].T
        if lora is not None:
            ye = ye + _lora_term(lora.drop(h), lora.down_A, lora.down_B, e, lora)
        out_TD = out_TD.index_add(0, tok, (ye * w_TK[tok, slot, None].to(ye.dtype)).float())
    return out_TD.to(x_TD.dtype)


def _pad_last(t: torch.Tensor, mult: int) -> torch.Tensor:
    pad = (-t.shape[-1]) % mult
    return F.pad(t, (0, pad)) if pad else t


def _gmm_nt(a_SI, b_ENI, offs_E):
    """Per expert segment of rows, a @ b_e^T ([S, N]; I the inner dim); I and N zero-padded to
    grouped_mm's 16-byte alignment when needed (exact), which the LoRA ranks of small tests are not."""
    align = 16 // a_SI.element_size()
    N, I = b_ENI.shape[1:]
    pi, pn = (-I) % align, (-N) % align
    if pi:
        a_SI, b_ENI = F.pad(a_SI, (0, pi)), F.pad(b_ENI, (0, pi))
    if pn:
        b_ENI = F.pad(b_ENI, (0, 0, 0, pn))
    out_SN = _gmm(a_SI.contiguous(), b_ENI.transpose(-2, -1), offs=offs_E)
    return out_SN[:, :N] if pn else out_SN


def _grouped_lora13(x_SD, offs_E, lora: ExpertLoraFactors, ab13, F_: int, Fp: int):
    """The gate|up low-rank term of every sorted slot row, [S, 2Fp] in h_S2F's padded layout
    (ab13 = lora.stacked13())."""
    a13_ERD, b13_E2FR = ab13
    l_S2F = _gmm_nt(_gmm_nt(lora.drop(x_SD), a13_ERD, offs_E), b13_E2FR, offs_E) * lora.scale
    if Fp != F_:
        l_S2F = torch.cat([F.pad(l_S2F[:, :F_], (0, Fp - F_)), F.pad(l_S2F[:, F_:], (0, Fp - F_))], 1)
    return l_S2F


def experts_grouped(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora: ExpertLoraFactors | None = None):
    """Sort slots by expert, gather rows, two grouped GEMMs, unpermute and weight-sum over K (with
    `lora`, its low-rank terms as two more grouped GEMMs per projection group on the same rows)."""
    E, twoF, D = w13_E2FD.shape
    F0 = F_ = twoF // 2
    dtype = x_TD.dtype
    d = dispatch(idx_TK, E)
    offs_E = d.offs_E
    x_SD = x0_SD = x_TD[d.tok_S]
    w13 = w13_E2FD.to(dtype)
    w2 = w2_EDF.to(dtype)
    # grouped_mm wants 16-byte aligned strides; tiny test shapes get zero padding (exact).
    align = 16 // x_TD.element_size()
    if D % align or F_ % align:
        x_SD = _pad_last(x_SD, align)
        Dp = x_SD.shape[-1]
        Fp = F_ + (-F_) % align
        w1 = _pad_last(F.pad(w13[:, :F_], (0, 0, 0, Fp - F_)), align)
        w3 = _pad_last(F.pad(w13[:, F_:], (0, 0, 0, Fp - F_)), align)
        w13 = torch.cat([w1, w3], 1)  # [E, 2Fp, Dp]
        w2 = _pad_last(F.pad(w2, (0, 0, 0, Dp - D)), align)  # [E, Dp, Fp]
        F_ = Fp
    h_S2F = _gmm(x_SD, w13.transpose(-2, -1), offs=offs_E)
    ab13 = lora.stacked13() if lora is not None else None
    if ab13 is not None:
        h_S2F = h_S2F + _grouped_lora13(x0_SD, offs_E, lora, ab13, F0, F_)
    a_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:]
    y_SD = _gmm(a_SF, w2.transpose(-2, -1), offs=offs_E)[:, :D]
    if lora is not None and lora.down_A is not None:
        z_Sr = _gmm_nt(lora.drop(a_SF[:, :F0]), lora.down_A, offs_E)
        y_SD = y_SD + _gmm_nt(z_Sr, lora.down_B, offs_E) * lora.scale
    return combine(y_SD, w_TK, d)


def experts_gather(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora: ExpertLoraFactors | None = None):
    """Per token slot, pick the chosen expert's weights by index and apply them (no sort, no sync).

    Meant for decode steps where T*K is much smaller than E: only the selected experts' weights
    are touched. Eagerly this gathers them and runs batched GEMVs; under torch.compile the
    product-and-sum form lets the gather fuse into the reduction, so each activated weight is read
    once from memory and never copied. Cost grows with T*K (repeated experts are re-read), so
    prefill and large batches should use `grouped`. With `lora`, each slot also applies its
    expert's low-rank factors (batched products on gathered factors: r rows per slot, cheap).
    """
    T, K = idx_TK.shape
    D = x_TD.shape[-1]
    F_ = w13_E2FD.shape[1] // 2
    dtype = x_TD.dtype
    flat_S = idx_TK.reshape(-1)
    x_SD = x_TD.repeat_interleave(K, dim=0)
    compiling = torch.compiler.is_compiling()
    h_S2F = _gather_mv(w13_E2FD, flat_S, x_SD, dtype, compiling)
    ab13 = lora.stacked13() if lora is not None else None
    if ab13 is not None:
        z_SR = torch.bmm(ab13[0][flat_S], lora.drop(x_SD)[:, :, None])
        h_S2F = h_S2F + torch.bmm(ab13[1][flat_S], z_SR).squeeze(-1) * lora.scale
    a_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:]
    y_SD = _gather_mv(w2_EDF, flat_S, a_SF, dtype, compiling)
    if lora is not None and lora.down_A is not None:
        z_Sr = torch.bmm(lora.down_A[flat_S], lora.drop(a_SF)[:, :, None])
        y_SD = y_SD + torch.bmm(lora.down_B[flat_S], z_Sr).squeeze(-1) * lora.scale
    y_TKD = y_SD.view(T, K, D)
    return torch.bmm(w_TK.to(dtype).unsqueeze(1), y_TKD).squeeze(1)


def _gather_mv(w_ENM, flat_S, v_SM, dtype, compiling: bool):
    """Row s: w_ENM[flat_S[s]] @ v_SM[s] ([S, N]); the product-and-sum form under compile."""
    if compiling:
        return (w_ENM[flat_S].to(dtype) * v_SM[:, None, :]).sum(-1)
    return torch.bmm(w_ENM[flat_S].to(dtype), v_SM[:, :, None]).squeeze(-1)


def experts_with_lora(fn: ExpertFn, x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora: ExpertLoraFactors):
    """Run backend `fn` (from resolve_backend) with LoRA factors: the torch backends take them as
    they are; the Triton kernels get the merged weights, or hand over to `grouped` while LoRA
    dropout is active (see the module docstring)."""
    from deepseekmoe import kernels

    if fn is not kernels.experts_triton:
        return fn(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora=lora)
    if lora.dropout_active:
        fallback = experts_grouped if _grouped_supported() else experts_loop
        return fallback(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF, lora=lora)
    d13, d2 = lora.delta13(), lora.delta2()
    w13 = w13_E2FD.to(x_TD.dtype) if d13 is None else w13_E2FD.to(x_TD.dtype) + d13
    w2 = w2_EDF.to(x_TD.dtype) if d2 is None else w2_EDF.to(x_TD.dtype) + d2
    return fn(x_TD, idx_TK, w_TK, w13, w2)


def _grouped_supported() -> bool:
    return _gmm is not None


def resolve_backend(name: str, device: torch.device) -> ExpertFn:
    """Map a backend name to its function for tensors on `device`; raise a clear error if unusable."""
    from deepseekmoe import kernels

    if name == "loop":
        return experts_loop
    if name == "gather":
        return experts_gather
    if name == "grouped":
        if not _grouped_supported():
            raise ConfigError(f"expert_backend='grouped' needs torch >= 2.8 with grouped_mm (found "
                              f"torch {torch.__version__}); use expert_backend='loop'")
        return experts_grouped
    if name == "triton":
        reason = kernels.triton_unavailable_reason(device)
        if reason:
            raise ConfigError(f"expert_backend='triton' is not usable here: {reason}; "
                              "use expert_backend='grouped' or 'auto'")
        return kernels.experts_triton
    if name == "auto":
        if device.type == "cuda" and kernels.triton_unavailable_reason(device) is None:
            return kernels.experts_triton
        return experts_grouped if _grouped_supported() else experts_loop
    raise ConfigError(f"unknown expert_backend {name!r}; choose one of {', '.join(EXPERT_BACKENDS)}")
