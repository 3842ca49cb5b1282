"""Triton kernel of one AdamW update of a parameter tensor, clip and compute copy included, in one pass.

    adamw_step_triton(p, g, m, v, step, lr=, beta1=, beta2=, weight_decay=, eps=,
                      coef=None, found_inf=None, low=None)

Over the flat fp32 tensors p (the master weight), g (its gradient), m, v (exp_avg, exp_avg_sq),
each program of BLOCK elements reads p, g, m, v once and writes p, m, v and, when `low` is given,
the bf16 / fp16 copy of the new p (the compute copy train/optim.py ComputeWeights would otherwise
cast from the master at the next step). Per element, in fp32, the math and order of operations of
torch's fused AdamW (torch 2.13, aten/src/ATen/native/cpu/FusedAdamKernel.cpp, fp32 path):

    g  = g * coef                          (coef: a device scalar, the clip coefficient; .grad is not written)
    p  = p * (1 - lr * weight_decay)       (decoupled weight decay; the factor rounded to fp32)
    m  = lerp(m, g, 1 - beta1)             (torch.lerp's two formulas, by the weight, each one fma)
    v  = fma((1 - beta2) * g, g, v * beta2)
    p  = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)

with the bias corrections from `step` (a float32 device scalar, the step count after this step's
increment: torch's state['step']) in fp64 as torch does them: bc1 = 1 - beta1**t,
step_size = fl32(lr / bc1), bc2_sqrt = fl32(sqrt(1 - beta2**t)), beta**t as exp(t * log(beta)).
When `found_inf` (a device scalar) is 1 every program returns before loading or writing
anything: a non-finite step leaves the tensors as they were without a host sync. Division and
square root are the correctly rounded ones (div_rn / sqrt_rn), as torch's are, and the compiler
fuses no multiply-add (enable_fp_fusion=False): the fmas are the ones written, where torch has them.

Traffic per fp32 parameter: 16 bytes read, 12 written, + 2 for a bf16 copy: 30 B, against torch's
fused AdamW 28 B + the clip's grad store 4 B (folded clip) + the cast pass 6 B. g may also be the
bf16 / fp16 gradient itself (upcast exactly on load): 28 B, and no fp32 gradient is ever formed.

Reference twin: `adamw_step_reference`, the same signature in torch ops (fp64 bias corrections
from the step tensor, the fp32 math above, torch.where for the skip), tested against this kernel
and against torch.optim.AdamW(fused=True) in tests/test_train_triton_adamw.py.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program: a bandwidth-bound pass, 16 per thread at 4 warps (vector loads when n is a
# multiple of 16, as the model's tensors are). The interpreter spends ~ms per program whatever its size.
BLOCK = 1024 if INTERPRET else 2048
NUM_WARPS = 1 if INTERPRET else 4
# A gradient may be fp32 or, as ComputeWeights(defer_grads=True) leaves a one-micro-batch step's, the
# compute copy's bf16 / fp16 one: the kernel upcasts it exactly in registers (2 bytes read, not 4).
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _to_low(x, dtype: tl.constexpr):
    """fp32 -> dtype rounded to nearest even, as torch's .to(): bf16 from the bits (the interpreter's
    own bf16 conversion does not round to nearest even), NaN kept a NaN."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, step_ptr, coef_ptr, inf_ptr, n,
                  lr: tl.float64, log_beta1: tl.float64, log_beta2: tl.float64, decay, w1, beta2, w2, eps,
                  HAS_COEF: tl.constexpr, HAS_INF: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_INF:
        if tl.load(inf_ptr) == 1.0:
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # fp64 scalars as full(): the interpreter would round a bare Python float to fp32 first
    lr = tl.full((), lr, tl.float64)
    log_beta1 = tl.full((), log_beta1, tl.float64)
    log_beta2 = tl.full((), log_beta2, tl.float64)
    t = tl.load(step_ptr).to(tl.float64)
    step_size = (lr / (1.0 - tl.exp(t * log_beta1))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * log_beta2)).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp32, or a bf16 / fp16 gradient upcast
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_COEF:
        g = g * tl.load(coef_ptr)
    p = p * decay
    # torch.lerp(m, g, w1) as torch computes it (one fma): from m for a small weight, from g for a large one
    m = tl.where(w1 < 0.5, tl.fma(w1, g - m, m), tl.fma(w1 - 1.0, g - m, g))
    v = tl.fma(w2 * g, g, v * beta2)  # as torch's kernel rounds it (one fma after the two products)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_LOW:
        tl.store(low_ptr + offs, _to_low(p, low_ptr.dtype.element_ty), mask=mask)


def _check(p, g, m, v, step, low, coef, found_inf) -> None:
    if g.shape != p.shape or g.dtype not in GRAD_DTYPES or not g.is_contiguous():
        raise ValueError("adamw_step_triton: grad must be a contiguous fp32 / bf16 / fp16 tensor of the "
                         "parameter's shape")
    for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if t.shape != p.shape or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"adamw_step_triton: {name} must be a contiguous fp32 tensor of the parameter's shape")
    if p.dtype != torch.float32 or not p.is_contiguous():
        raise ValueError("adamw_step_triton updates contiguous fp32 parameters")
    for name, t in (("step", step), ("coef", coef), ("found_inf", found_inf)):
        if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != p.device):
            raise ValueError(f"adamw_step_triton: {name} must be a float32 scalar on the parameter's device (step: "
                             "torch's state['step'] of a fused AdamW)")
    if low is not None and (low.shape != p.shape or low.dtype not in (torch.bfloat16, torch.float16)
                            or not low.is_contiguous()):
        raise ValueError("adamw_step_triton: the compute copy must be a contiguous bf16 / fp16 tensor of p's shape")


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta 0: beta**t = exp(-inf) = 0, no bias correction


def adamw_step_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor, *,
                      lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                      coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                      low: torch.Tensor | None = None) -> None:
    """One AdamW update of p, m, v in place (and low = p.to(low.dtype)), in one launch; see the module docstring."""
    _check(p, g, m, v, step, low, coef, found_inf)
    n = p.numel()
    if n == 0:
        return
    dummy = step  # any valid pointer for the arguments a flag turns off
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, low if low is not None else dummy, step, coef if coef is not None else dummy,
        found_inf if found_inf is not None else dummy, n, float(lr), _log(beta1), _log(beta2),
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        HAS_COEF=coef is not None, HAS_INF=found_inf is not None, HAS_LOW=low is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)  # the roundings written, no contraction


def adamw_step_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor, *,
                         lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                         coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                         low: torch.Tensor | None = None) -> None:
    """The twin of adamw_step_triton in torch ops (same arguments, same in-place result)."""
    t = step.to(torch.float64)
    g = g.float()  # a bf16 / fp16 gradient upcast (exact), as the kernel does
    step_size = (lr / (1 - torch.pow(beta1, t))).float()
    bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, t)).float()
    g = g * coef if coef is not None else g
    p_new = p * (1.0 - lr * weight_decay)  # python scalars: rounded to fp32 for fp32 tensors, as torch's kernel does
    m_new = torch.lerp(m, g, 1.0 - beta1)
    v_new = torch.addcmul(v * beta2, g * (1.0 - beta2), g)  # rounded as torch's fused kernel rounds it
    # Correctly rounded as the kernel's: torch's CPU sqrt is within an ulp (fp64 then fp32 rounds once
    # in effect), and a division by a 0-d CPU tensor is a multiplication by its reciprocal (expanded, it divides).
    root = v_new.double().sqrt().float()
    p_new = p_new - (step_size * m_new) / (root / bc2_sqrt.expand_as(v_new) + eps)
    low_new = p_new.to(low.dtype) if low is not None else None
    if found_inf is not None:  # the skip without a host sync: keep the old values where found_inf is 1
        skip = found_inf == 1
        p_new, m_new, v_new = (torch.where(skip, old, new) for old, new in ((p, p_new), (m, m_new), (v, v_new)))
        low_new = torch.where(skip, low, low_new) if low is not None else None
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)
    if low is not None:
        low.copy_(low_new)
