"""Triton kernel of the fused LM-head loss: one chunk's logits turned into their gradient in place.

`ce_grad_rows_triton(z_CV, labels_C, scale)` has the signature and result of the PyTorch twin
`deepseekmoe.model.loss.ce_grad_rows`: z <- (softmax(z) - onehot(label)) * scale in z's dtype, rows
with label -100 zeroed, and each row's loss logsumexp(z) - z[label] (fp32, 0 if ignored) returned.
One program per row, two passes over V: an online max / sum of exponentials (per lane, reduced at
the end), then the gradient written over the logits. In bf16 that is 6 bytes per logit of memory
traffic; the eager twin's fp32 temporaries take several times that (and their memory).

Shape legend: C rows (tokens of a chunk), V vocabulary.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IGNORE = -100
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp(_NEG - _NEG) is 1, not NaN


@triton.jit
def _ce_grad_rows_kernel(z_ptr, lab_ptr, scale_ptr, loss_ptr, V, stride_row, ignore_index,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_row
    label = tl.load(lab_ptr + row)
    valid = label != ignore_index
    safe = tl.where(valid, label, 0)
    m_B = tl.full([BLOCK_V], _NEG, tl.float32)
    s_B = tl.zeros([BLOCK_V], tl.float32)
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=_NEG).to(tl.float32)
        m_new = tl.maximum(m_B, z)
        s_B = s_B * tl.exp(m_B - m_new) + tl.exp(z - m_new)
        m_B = m_new
    m = tl.max(m_B, 0)
    lse = m + tl.log(tl.sum(s_B * tl.exp(m_B - m), 0))
    z_label = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))
    coef = tl.where(valid, tl.load(scale_ptr), 0.0)
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        p = tl.where(cols == safe, p - 1.0, p)
        tl.store(base + cols, (p * coef).to(z_ptr.dtype.element_ty), mask=mask)


def ce_grad_rows_triton(z_CV: torch.Tensor, labels_C: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Triton twin of deepseekmoe.model.loss.ce_grad_rows (same arguments, same result)."""
    C, V = z_CV.shape
    if z_CV.stride(1) != 1:
        raise ValueError("ce_grad_rows_triton needs logits contiguous along the vocabulary")
    loss_C = torch.empty(C, dtype=torch.float32, device=z_CV.device)
    if C == 0:
        return loss_C
    scale = scale.reshape(1).to(torch.float32)
    block = 32 if INTERPRET else min(4096, triton.next_power_of_2(V))
    _ce_grad_rows_kernel[(C,)](z_CV, labels_C.contiguous(), scale, loss_C, V, z_CV.stride(0), IGNORE,
                               BLOCK_V=block, num_warps=1 if INTERPRET else 8)
    return loss_C
