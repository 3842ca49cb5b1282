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
