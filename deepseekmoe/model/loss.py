"""The LM head's cross-entropy, plain and fused (chunked over tokens, never all logits at once).

  lm_head_loss_plain   F.cross_entropy(h @ W^T) in float32: the reference twin (what
                       `lm_loss(lm_head(x), labels)` computes, the whole [N, V] logits materialised)
  lm_head_loss_fused   the same mean loss and the same gradients of h and W, token chunk by chunk:
                       per chunk the logits are made in the compute dtype, turned into their
                       gradient in place ((softmax - one-hot) / n_targets, rows of ignored labels 0)
                       and consumed by the two gradient GEMMs right away, in the forward pass. Only
                       dh [N, D] and an fp32 dW [V, D] are kept for backward, which scales them by
                       the incoming gradient. At the 16B head (V = 102,400) and 16K tokens the plain
                       path holds ~25 GB of logits and their fp32 copies and grads; this one holds
                       one chunk's logits ([chunk, V], compute dtype).

Both take h [B, L, D] (the final norm's output), W [V, D] and labels [B, L] aligned with the inputs
(shifted here: position t predicts label t + 1; -100 ignored), and return the mean over the
predicted tokens. Under autocast both compute the GEMMs in the autocast dtype with fp32 softmax;
the fused path returns dW in W's own dtype without rounding it to the compute dtype first.

The per-chunk softmax-gradient is `ce_grad_rows` (pure PyTorch, any device); on CUDA the Triton
kernel in deepseekmoe/kernels/linear_ce.py does it in one read-modify-write pass over the bf16
logits (tests/test_linear_ce.py checks it against this twin under the interpreter).

Shape legend: N tokens (B x L), C tokens of a chunk, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
DEFAULT_CHUNK = 8192  # tokens per chunk: [8192, 102400] bf16 logits are 1.7 GB


def shifted_labels(labels_BL: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with every position, flattened [N]: position t gets label t + 1,
    the last position of each row IGNORE (so h needs no shifted copy)."""
    pad = torch.full_like(labels_BL[:, :1], IGNORE)
    return torch.cat([labels_BL[:, 1:], pad], dim=1).flatten()


def lm_head_loss_plain(h_BLD: torch.Tensor, w_VD: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """The reference: logits = h @ W^T (autocast applies), fp32 cross-entropy, mean over targets."""
    logits = F.linear(h_BLD, w_VD)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels_BL[:, 1:].flatten(), ignore_index=IGNORE)


def ce_grad_rows(z_CV: torch.Tensor, labels_C: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: z <- (softmax(z) - onehot(label)) * scale in z's dtype (softmax in fp32), rows whose
    label is IGNORE set to 0. Returns each row's loss logsumexp(z) - z[label] in fp32 (0 if ignored).
    `scale` is a 0-dim fp32 tensor (1 / the number of targets: no host sync)."""
    valid_C = labels_C != IGNORE
    safe_C = torch.where(valid_C, labels_C, 0)
    zf = z_CV.float()
    lse_C = torch.logsumexp(zf, dim=-1)
    picked_C = zf.gather(1, safe_C[:, None]).squeeze(1)
    g = torch.exp(zf - lse_C[:, None])
    g.scatter_add_(1, safe_C[:, None], torch.full_like(picked_C[:, None], -1.0))
    g.mul_((valid_C.float() * scale)[:, None])
    z_CV.copy_(g)
    return torch.where(valid_C, lse_C - picked_C, torch.zeros_like(lse_C))


def _grad_rows_fn(z_CV: torch.Tensor):
    """The Triton kernel for bf16/fp16 logits on CUDA (when triton imports), else the torch twin."""
    if z_CV.is_cuda and z_CV.dtype in (torch.bfloat16, torch.float16):
        try:
            from deepseekmoe.kernels.linear_ce import ce_grad_rows_triton
        except ImportError:
            return ce_grad_rows
        return ce_grad_rows_triton
    return ce_grad_rows


def _wgrad_add(dw_VD: torch.Tensor, g_CV: torch.Tensor, h_CD: torch.Tensor) -> torch.Tensor:
    """dW += g^T @ h with an fp32 accumulator; on CUDA one GEMM with fp32 output, added in its
    epilogue (torch's addmm out_dtype), else a GEMM and an add."""
    if g_CV.is_cuda and g_CV.dtype != dw_VD.dtype and _ADDMM_OUT_DTYPE[0] is not False:
        try:
            out = torch.addmm(dw_VD, g_CV.t(), h_CD, out_dtype=dw_VD.dtype)
            _ADDMM_OUT_DTYPE[0] = True
            return out
        except (TypeError, RuntimeError):
            _ADDMM_OUT_DTYPE[0] = False
    return dw_VD.add_(g_CV.t() @ h_CD)


_ADDMM_OUT_DTYPE = [None]  # whether this torch has addmm(..., out_dtype=) on CUDA (probed once)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over valid targets of CE(h @ W^T); gradients made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk: int, dtype: torch.dtype):
        N = h_ND.shape[0]
        hc_ND, wc_VD = h_ND.to(dtype), w_VD.to(dtype)
        n_valid = (labels_N != IGNORE).sum()
        scale = 1.0 / n_valid.float()  # inf without targets: the loss is then NaN, as the plain path's
        dh_ND = torch.empty_like(hc_ND)
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for s in range(0, N, chunk):
            h_CD, lab_C = hc_ND[s:s + chunk], labels_N[s:s + chunk]
            z_CV = h_CD @ wc_VD.t()
            loss = loss + _grad_rows_fn(z_CV)(z_CV, lab_C, scale).sum()
            torch.mm(z_CV, wc_VD, out=dh_ND[s:s + chunk])
            dw_VD = _wgrad_add(dw_VD, z_CV, h_CD)
            del z_CV
        ctx.save_for_backward(dh_ND, dw_VD)
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dh_ND, dw_VD = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = dh_ND.to(h_dtype) * grad_loss.to(h_dtype) if ctx.needs_input_grad[0] else None
        dw = (dw_VD * grad_loss.float()).to(w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def lm_head_loss_fused(h_BLD: torch.Tensor, w_VD: torch.Tensor, labels_BL: torch.Tensor,
                       chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The mean next-token cross-entropy of logits h @ W^T, `chunk` tokens at a time (see the module
    docstring); the same signature as `lm_head_loss_plain` plus the chunk size."""
    dev = h_BLD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_BLD.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h_BLD.flatten(0, 1), w_VD, shifted_labels(labels_BL), int(chunk), dtype)
