"""The fused LM-head cross-entropy (model/loss.py) against its plain twin, and its Triton kernel
(kernels/linear_ce.py) against the PyTorch softmax-gradient, forward and backward.

fp32 on the CPU agrees to rounding (the fused path sums chunk by chunk); under CPU bf16 autocast
both round logits and gradients to bf16, so the check is a bf16 tolerance. The kernel runs under
Triton's interpreter (the rule of tests/helpers.py: a fresh process when triton was imported
without it).
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.model.loss import ce_grad_rows, lm_head_loss_fused, lm_head_loss_plain, shifted_labels
from tests.helpers import TINY, compile_for_hopper, kernels_in_process, rel_err, triton_interpreter

IN_PROCESS = kernels_in_process()


def _inputs(B=3, L=7, D=16, V=50, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    labels = torch.randint(0, V, (B, L), generator=g)
    if ignore:
        labels[0, 2:5] = -100
        labels[2, :] = -100
        labels[1, -1] = -100
    return h, w, labels


def _loss_and_grads(fn, h, w, labels, scale=1.0, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def test_shifted_labels():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    assert shifted_labels(labels).tolist() == [6, 7, -100, -100, 9, -100]


@pytest.mark.parametrize("chunk", [1, 5, 8, 21, 1000])
@pytest.mark.parametrize("ignore", [False, True])
def test_fused_matches_plain_fp32(chunk, ignore):
    h, w, labels = _inputs(ignore=ignore)
    ref = _loss_and_grads(lm_head_loss_plain, h, w, labels, scale=0.37)
    got = _loss_and_grads(lm_head_loss_fused, h, w, labels, scale=0.37, chunk=chunk)
    assert abs(got[0].item() - ref[0].item()) < 1e-5 * abs(ref[0].item())
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 1e-5
    if ignore:  # positions whose target is ignored (and each row's last) get no gradient
        assert got[1][2].abs().max() == 0 and got[1][1, -2:].abs().max() == 0


def test_fused_without_targets_is_nan_like_plain():
    h, w, labels = _inputs()
    labels[:] = -100
    ref = lm_head_loss_plain(h, w, labels)
    got = lm_head_loss_fused(h, w, labels, chunk=4)
    assert torch.isnan(ref) and torch.isnan(got)


def test_fused_matches_plain_bf16_autocast():
    h, w, labels = _inputs(B=3, L=16, D=32, V=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(lm_head_loss_plain, h, w, labels)
        got = _loss_and_grads(lm_head_loss_fused, h, w, labels, chunk=7)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert abs(got[0].item() - ref[0].item()) < 1e-2 * abs(ref[0].item())
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_fused_vs_plain(tied):
    """Transformer(labels=...) with lm_loss_chunk > 0 against 0: same loss and every parameter's gradient."""
    cfg = ModelConfig(vocab_size=64, tie_word_embeddings=tied, **TINY)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fused = Transformer(cfg.replace(lm_loss_chunk=9))
    fused.load_state_dict(plain.state_dict())
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :4] = -100
    outs = []
    for m in (plain, fused):
        out = m(x, labels=labels)
        out.loss.backward()
        outs.append(out)
    assert outs[1].logits is None and outs[0].logits is not None
    assert abs(outs[1].lm_loss.item() - outs[0].lm_loss.item()) < 1e-5 * outs[0].lm_loss.item()
    assert torch.equal(outs[1].balance_loss, outs[0].balance_loss)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-5, name
    assert fused(x).logits is not None  # without labels: logits as ever


def test_ce_grad_rows_matches_autograd():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 39, 7, -100])
    zr = z.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(zr, labels, ignore_index=-100, reduction="sum")
    ref.backward()
    zz = z.clone()
    rows = ce_grad_rows(zz, labels, torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(rows.sum().double(), ref.detach(), rtol=1e-6)
    assert torch.allclose(zz, zr.grad, atol=1e-6)
    assert rows[1] == 0 and rows[5] == 0


# ---------------------------------------------------------------------- the Triton kernel
needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without the interpreter; "
                                  "test_kernel_in_subprocess runs these in a fresh process")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests of this module ran in this process")
def test_kernel_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _kernel():
    with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
        pytest.importorskip("triton")
        from deepseekmoe.kernels.linear_ce import ce_grad_rows_triton
    return ce_grad_rows_triton


@needs_interp
@pytest.mark.parametrize("V", [32, 45, 100])
def test_kernel_matches_torch_fp32(V):
    fn = _kernel()
    g = torch.Generator().manual_seed(V)
    z = torch.randn(5, V, generator=g) * 4
    labels = torch.tensor([0, V - 1, -100, 17 % V, 3])
    scale = torch.tensor(0.25)
    za, zb = z.clone(), z.clone()
    with triton_interpreter():
        got = fn(za, labels, scale)
    ref = ce_grad_rows(zb, labels, scale)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(za, zb, atol=1e-6)
    assert za[2].abs().max() == 0


@needs_interp
def test_kernel_matches_torch_bf16():
    fn = _kernel()
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 70, generator=g) * 3).bfloat16()
    labels = torch.tensor([5, -100, 69, 0])
    scale = torch.tensor(1 / 3)
    za, zb = z.clone(), z.clone()
    with triton_interpreter():
        got = fn(za, labels, scale)
    ref = ce_grad_rows(zb, labels, scale)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)  # the loss is computed in fp32 from the same bf16 logits
    # the interpreter truncates fp32 -> bf16 (the GPU rounds): one bf16 step apart at most
    assert (za.float() - zb.float()).abs().max() <= 2 ** -7 * zb.float().abs().max()


COMPILE_SNIPPET = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepseekmoe.kernels.linear_ce import _ce_grad_rows_kernel
for zt in ("*bf16", "*fp32"):
    src = ASTSource(fn=_ce_grad_rows_kernel, constexprs={"BLOCK_V": 4096},
                    signature={"z_ptr": zt, "lab_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32", "V": "i32",
                               "stride_row": "i64", "ignore_index": "i32", "BLOCK_V": "constexpr"})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The real compiler (not the interpreter) accepts the kernel for sm_90, without a GPU: the
    interpreter runs code the compiler refuses (e.g. a non-constexpr global inside the kernel)."""
    compile_for_hopper(COMPILE_SNIPPET)
