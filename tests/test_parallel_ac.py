"""Activation checkpointing (parallel/fsdp.py) recomputes a block in backward: with LoRA dropout
the recomputation must draw the forward's dropout masks, or the gradients belong to another mask."""

from __future__ import annotations

import copy

import pytest
import torch

from deepseekmoe.model.lora import LoraConfig, apply_lora
from deepseekmoe.parallel.fsdp import _draws_random, apply_activation_checkpointing
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model, ids):
    torch.manual_seed(123)
    model(ids, labels=ids).loss.backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_blocks_with_lora_dropout_give_the_uncheckpointed_gradients(dropout):
    base = tiny_model(first_k_dense_replace=1, expert_backend="grouped").train()
    apply_lora(base, LoraConfig(r=4, alpha=8.0, dropout=dropout), seed=0)
    with torch.no_grad():  # non-zero B, so the dropout on the LoRA input reaches every gradient
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.2)
    wrapped = copy.deepcopy(base)
    apply_activation_checkpointing(wrapped)
    assert all(_draws_random(b) == (dropout > 0) for b in wrapped.layers)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = _grads(base, ids), _grads(wrapped, ids)
    assert want.keys() == got.keys() and any("lora_A" in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
