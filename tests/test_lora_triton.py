"""Per-expert LoRA through the `triton` backend (merged weights per forward, see model/moe/experts.py)
against the `loop` reference, forward and backward, on the CPU under Triton's interpreter.

The interpreter must be chosen before triton is imported; as in tests/test_kernels.py this module
sets TRITON_INTERPRET=1 first when it can, else re-runs itself in a fresh process.
"""

import contextlib

import pytest
import torch

from tests.helpers import interpreter_suite, kernels_in_process, triton_interpreter

IN_PROCESS = kernels_in_process()
with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
    pytest.importorskip("triton")
    from deepseekmoe.kernels import moe_kernels as mk

from deepseekmoe import kernels  # noqa: E402
from deepseekmoe.model.lora import LoraConfig, apply_lora  # noqa: E402
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop, experts_with_lora  # noqa: E402
from tests.helpers import rel_err, tiny_model  # noqa: E402
from tests.test_lora import _expert_case, expert_fwd_bwd  # noqa: E402

needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, IN_PROCESS)


def _triton(x, idx, w, w13, w2, lora):
    return experts_with_lora(kernels.experts_triton, x, idx, w, w13, w2, lora)


@needs_interp
@pytest.mark.parametrize("T,K,E,D,F_,r,targets", [
    (19, 2, 5, 32, 32, 4, ("gate_proj", "up_proj", "down_proj")),
    (13, 2, 4, 32, 16, 2, ("up_proj", "down_proj")),
    (11, 3, 4, 37, 21, 3, ("gate_proj",)),  # unaligned D, F: the kernels' padding path
])
def test_triton_lora_matches_loop(T, K, E, D, F_, r, targets):
    assert mk.INTERPRET
    case = _expert_case(T, K, E, D, F_, r, targets)
    ref = expert_fwd_bwd(experts_loop, *case)
    out = expert_fwd_bwd(_triton, *case)
    names = ["y", "dx", "dw", "dw13", "dw2", *(n for n, _ in case[5].named_parameters())]
    for name, o, rr in zip(names, out, ref):
        assert rel_err(o, rr) < 1e-5, f"{name}: triton vs loop {rel_err(o, rr):.2e}"


@needs_interp
def test_triton_with_active_dropout_computes_with_grouped():
    x, idx, w, w13, w2, lora, _ = _expert_case(9, 2, 4, 32, 16, 4, ("gate_proj", "up_proj", "down_proj"))
    lora.train()
    torch.manual_seed(3)
    got = _triton(x, idx, w, w13, w2, lora.factors(x.dtype))
    torch.manual_seed(3)
    want = experts_grouped(x, idx, w, w13, w2, lora=lora.factors(x.dtype))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_interp
def test_triton_model_matches_loop_forward_and_backward():
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    outs = []
    for be in ("loop", "triton"):
        m = tiny_model(first_k_dense_replace=1, expert_backend=be, hidden_size=32, moe_intermediate_size=32)
        apply_lora(m, LoraConfig(r=4, alpha=8.0, dropout=0.0), seed=0)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out = m(ids, labels=ids)
        out.lm_loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = outs
    assert rel_err(lb, la) < 1e-5
    for n in ga:
        assert rel_err(gb[n], ga[n]) < 1e-5, n
