"""Plain helpers shared by the test modules, imported like tests/dist_utils.py
(`from tests.helpers import rel_err`); what a test receives as a fixture lives in tests/conftest.py.

`tiny_model` is the seeded, eval-mode tiny MoE most tests run on (a test passes only the fields
its check depends on); `tiny_cfg` is the config of the gloo parallel tests. `rel_err` is the one
relative-error measure the tolerances are stated in. `clean_name` / `full_tensor` read a
parallelized model back as one process's model. `triton_interpreter` / `kernels_in_process` are the
one rule for running the Triton kernels under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch

from deepseekmoe import ModelConfig, Transformer

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            max_position_embeddings=96, initializer_range=0.2, bos_token_id=0, eos_token_id=1)


def tiny_model(vocab: int = 64, **overrides) -> Transformer:
    """The tiny MoE (TINY with `overrides`), initialised from torch.manual_seed(0), in eval mode."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, **{**TINY, **overrides})).eval()


def tiny_cfg(ep: int, **overrides) -> ModelConfig:
    """The gloo parallel tests' config: batch-level balance loss (seq_aux off) and, for ep > 1, the
    device-level loss over ep groups, so that a rank using only its own routing counts shows."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=16, first_k_dense_replace=1, aux_loss_alpha=0.01, seq_aux=False,
                device_balance_alpha=0.05 if ep > 1 else 0.0, n_device_groups=max(ep, 1),
                max_position_embeddings=64, expert_backend="grouped")
    return ModelConfig(**{**base, **overrides})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64 so that bf16 / fp32 inputs add no rounding of their own."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def clean_name(name: str) -> str:
    """A parameter name without the activation-checkpoint / compile wrappers' prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (collective: every rank must call it); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def triton_interpreter():
    """TRITON_INTERPRET=1 inside the block, the previous value (or none) after: the interpreter is
    chosen when triton is imported and when a kernel is first called, while other tests check the
    no-interpreter path."""
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


def kernels_in_process() -> bool:
    """Whether this process can run the Triton kernels under the interpreter: triton is not imported
    yet, or the kernels were built for it (tests/conftest.py does that first on machines without
    CUDA). Else a kernel test module re-runs itself in a fresh process."""
    built = sys.modules.get("deepseekmoe.kernels.moe_kernels")
    return ("triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
            or bool(getattr(built, "INTERPRET", False)))


def interpreter_suite(module_file: str, in_process: bool):
    """What every Triton-kernel test module shares, given kernels_in_process() at its import:
    (needs_interp, _interpreter, test_in_subprocess). `needs_interp` marks the tests that need the
    interpreter in this process; the autouse module fixture keeps TRITON_INTERPRET=1 around them;
    `test_in_subprocess` re-runs the module in a fresh process when they cannot run here. Assign
    the three at module level (pytest collects the fixture and the test from there)."""
    import pytest

    needs = pytest.mark.skipif(not in_process, reason="triton was imported without the interpreter; "
                               "test_in_subprocess runs this module in a fresh process")

    @pytest.fixture(autouse=True, scope="module")
    def _interpreter():
        with triton_interpreter():  # the interpreter rewrites each kernel at its first call
            yield

    @pytest.mark.skipif(in_process, reason="the tests of this module ran in this process")
    def test_in_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

    return needs, _interpreter, test_in_subprocess


def compile_for_hopper(snippet: str) -> None:
    """Run `snippet` (Python that compiles kernels with triton.compile for sm_90 and prints
    "compiled") in a fresh process without the interpreter: the real compiler refuses code the
    interpreter runs. Needs no GPU, only triton's bundled ptxas (skips without it)."""
    import pytest

    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton install has no bundled ptxas to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "compiled" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def decode_step_logits(model, backend=None, B=2, steps=4, mode="eager", pack=None, attention="sdpa"):
    """(logits [steps, B, V], Decoder) of `steps` greedy decode steps after a fixed 5-token prompt
    (the second row left-padded by 2), for comparing decode paths step by step."""
    import torch

    from deepseekmoe.inference.generate import Decoder

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, model.config.vocab_size, (B, 5), generator=g)
    dec = Decoder(model, B, 16, mode=mode, decode_backend=backend, pack=pack, attention=attention)
    nxt = dec.prefill(ids, torch.tensor([0, 2][:B])).argmax(-1)
    out = []
    for _ in range(steps):
        logits = dec.step(nxt).clone()
        out.append(logits)
        nxt = logits.argmax(-1)
    return torch.stack(out), dec
