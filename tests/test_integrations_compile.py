"""The transformers class under torch.compile(fullgraph=True) with a StaticCache, on CPU: the decode
step (one token per row, the fixed-size 4-D mask transformers' generate builds for static caches,
left padding) compiles without a graph break and gives the eager step's logits; and transformers'
own static-cache generate, compiled, equals this project's generate_ids token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import deepseekmoe.integrations.transformers as dt
from tests.helpers import tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _static_cache(config, max_len: int):
    try:
        return StaticCache(config=config, max_cache_len=max_len)
    except TypeError:  # transformers before 5 also wants the batch size
        return StaticCache(config=config, max_batch_size=2, max_cache_len=max_len)


def _decode(model, fn, steps: int = 3, max_len: int = 16) -> torch.Tensor:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [1, 1, 1, 1, 12, 13, 14]])
    mask = (ids != 1).long()
    cache = _static_cache(model.config, max_len)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)  # eager prefill
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        slots = torch.cat([mask, torch.zeros(2, max_len - ids.shape[1], dtype=torch.long)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        logits = []
        for i in range(steps):
            slots = slots.clone()
            slots[:, ids.shape[1] + i] = 1
            pos = pos + 1
            o = fn(tok, attention_mask=slots.bool()[:, None, None, :], position_ids=pos, cache=cache, use_cache=True)
            logits.append(o.logits[:, -1])
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits)


def test_compiled_static_cache_decode_equals_eager():
    model = dt.DeepseekForCausalLM.from_transformer(tiny_model(64, max_position_embeddings=128))
    eager = _decode(model, model.forward)
    compiled = _decode(model, torch.compile(model.forward, fullgraph=True, dynamic=False))
    assert (compiled - eager).abs().max().item() <= 1e-5
    assert len({tuple(r) for r in eager.argmax(-1).tolist()}) > 1


def test_generate_with_a_static_cache_compiles_and_equals_generate_ids():
    # transformers compiles the forward itself for static caches (on GPUs; on CPU when asked).
    from transformers import CompileConfig

    from deepseekmoe.inference.generate import generate_ids

    cc = CompileConfig(fullgraph=True, dynamic=False)
    if not hasattr(cc, "_compile_all_devices"):
        pytest.skip("this transformers compiles generate on accelerators only")
    cc._compile_all_devices = True
    ours = tiny_model(64, max_position_embeddings=128)
    model = dt.DeepseekForCausalLM.from_transformer(ours)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [1, 1, 1, 1, 12, 13, 14]])
    out = model.generate(input_ids=ids, attention_mask=(ids != 1).long(), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=1, cache_implementation="static", compile_config=cc)
    assert getattr(model, "_compiled_call", None) is not None  # the decode steps ran compiled
    assert out[:, 7:].tolist() == generate_ids(ours, [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], max_new_tokens=8,
                                                eos_token_id=None)
