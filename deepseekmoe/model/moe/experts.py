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

Shape legend: T tokens, K routed experts per token, S = T*K token slots, E experts,
D hidden size, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepseekmoe.errors import ConfigError
from deepseekmoe.model.config import EXPERT_BACKENDS
from deepseekmoe.model.moe.dispatch import combine, dispatch

# torch >= 2.9 spells it F.grouped_mm; 2.8 only has the private torch._grouped_mm.
_gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def experts_loop(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """Reference: for each expert, run its FFN on the tokens that chose it and add gate * out."""
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
        h = F.silu(xe @ w13_E2FD[e, :F_].T) * (xe @ w13_E2FD[e, F_:].T)
        ye = h @ w2_EDF[e].T
        out_TD = out_TD.index_add(0, tok, (ye * w_TK[tok, slot, None].to(ye.dtype)).float())
    return out_TD.to(x_TD.dtype)


def _pad_last(t: torch.Tensor, mult: int) -> torch.Tensor:
    pad = (-t.shape[-1]) % mult
    return F.pad(t, (0, pad)) if pad else t


def experts_grouped(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """Sort slots by expert, gather rows, two grouped GEMMs, unpermute and weight-sum over K."""
    E, twoF, D = w13_E2FD.shape
    F_ = twoF // 2
    dtype = x_TD.dtype
    d = dispatch(idx_TK, E)
    offs_E = d.offs_E
    x_SD = x_TD[d.tok_S]
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
    a_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:]
    y_SD = _gmm(a_SF, w2.transpose(-2, -1), offs=offs_E)[:, :D]
    return combine(y_SD, w_TK, d)


def experts_gather(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """Per token slot, pick the chosen expert's weights by index and apply them (no sort, no sync).

    Meant for decode steps where T*K is much smaller than E: only the selected experts' weights
    are touched. Eagerly this gathers them and runs batched GEMVs; under torch.compile the
    product-and-sum form lets the gather fuse into the reduction, so each activated weight is read
    once from memory and never copied. Cost grows with T*K (repeated experts are re-read), so
    prefill and large batches should use `grouped`.
    """
    T, K = idx_TK.shape
    D = x_TD.shape[-1]
    F_ = w13_E2FD.shape[1] // 2
    dtype = x_TD.dtype
    flat_S = idx_TK.reshape(-1)
    x_SD = x_TD.repeat_interleave(K, dim=0)
    if torch.compiler.is_compiling():
        h_S2F = (w13_E2FD[flat_S].to(dtype) * x_SD[:, None, :]).sum(-1)
        a_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:]
        y_SD = (w2_EDF[flat_S].to(dtype) * a_SF[:, None, :]).sum(-1)
    else:
        h_S2F = torch.bmm(w13_E2FD[flat_S].to(dtype), x_SD[:, :, None]).squeeze(-1)
        a_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:]
        y_SD = torch.bmm(w2_EDF[flat_S].to(dtype), a_SF[:, :, None]).squeeze(-1)
    y_TKD = y_SD.view(T, K, D)
    return torch.bmm(w_TK.to(dtype).unsqueeze(1), y_TKD).squeeze(1)


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
