"""Slot dispatch: the one place that orders token slots by expert and combines them back.

A router gives each of T tokens K experts (`idx_TK`) and gates (`w_TK`); slot s = t*K + k is
token t's k-th choice. Every sorting expert backend and expert parallel do the same two things:

    d = dispatch(idx_TK, E)        slots sorted by expert (stable), per-expert counts; no host sync
    ... rows x_TD[d.tok_S] are processed expert by expert, giving y_SD in sorted order ...
    y_TD = combine(y_SD, w_TK, d)  back to slot order, then the gate-weighted sum over K

Used by `experts_grouped` (offsets for grouped_mm), the Triton backend (int32 perm and counts,
read by its kernels) and expert parallel (counts -> all-to-all split sizes; the sorted slots
are already grouped by destination rank because experts are placed contiguously). `experts_loop`
is the readable twin that needs none of this; `experts_gather` does not sort at all.

Dtypes are chosen so that no caller converts anything afterwards: counts and offsets are int32
(what grouped_mm's `offs` and the kernels read), perm is argsort's int64 unless the caller asks
for int32 (the kernels), in which case the one conversion happens here.

Shape legend: T tokens, K experts per token, S = T*K slots, E experts, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotDispatch:
    """The T*K slots ordered by expert. Derived tensors are computed on each access: read once."""

    perm_S: torch.Tensor  # slot ids sorted by expert; slots of one expert stay in slot order
    counts_E: torch.Tensor  # int32: slots per expert (zero for an expert nobody chose)
    top_k: int  # K, so that slot s belongs to token s // K

    @property
    def tok_S(self) -> torch.Tensor:
        """The token of each sorted slot: rows x_TD[tok_S] are the experts' inputs in sorted order."""
        return self.perm_S // self.top_k

    @property
    def offs_E(self) -> torch.Tensor:
        """int32 end offset of each expert's segment of the sorted slots (grouped_mm's `offs`)."""
        return torch.cumsum(self.counts_E, 0, dtype=torch.int32)

    @property
    def inv_S(self) -> torch.Tensor:
        """Position of each slot in sorted order: y_SD[inv_S] is back in slot order."""
        inv_S = torch.empty_like(self.perm_S)
        inv_S[self.perm_S] = torch.arange(self.perm_S.numel(), device=self.perm_S.device, dtype=self.perm_S.dtype)
        return inv_S


def dispatch(idx_TK: torch.Tensor, n_experts: int, index_dtype: torch.dtype = torch.int64) -> SlotDispatch:
    """Sort the T*K slots of `idx_TK` by expert (stable) and count them per expert, on the device.

    `index_dtype` is the dtype of perm_S: int64 for torch indexing, int32 for the Triton kernels."""
    flat_S = idx_TK.reshape(-1)
    perm_S = torch.argsort(flat_S, stable=True)
    if index_dtype != perm_S.dtype:
        perm_S = perm_S.to(index_dtype)
    counts_E = torch.zeros(n_experts, dtype=torch.int32, device=idx_TK.device)
    counts_E.scatter_add_(0, flat_S.to(torch.int64), torch.ones_like(flat_S, dtype=torch.int32))
    return SlotDispatch(perm_S, counts_E, idx_TK.shape[1])


def combine(y_SD: torch.Tensor, w_TK: torch.Tensor, d: SlotDispatch) -> torch.Tensor:
    """y_TD[t] = sum_k w_TK[t, k] * y[slot t*K + k], from rows y_SD in sorted order.

    The unpermute is a gather (deterministic, no atomics), the sum over K one batched product in
    the rows' dtype."""
    T, K = w_TK.shape
    y_TKD = y_SD[d.inv_S].view(T, K, y_SD.shape[-1])
    y_TD = torch.bmm(w_TK.to(y_SD.dtype).unsqueeze(1), y_TKD)
    # Squeezed in place: the result is a fresh tensor, not a view (FSDP2 warns when a module it
    # wraps, e.g. expert-parallel experts, returns a view), and no copy is made.
    return y_TD.squeeze_(1)
