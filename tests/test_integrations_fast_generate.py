"""DeepseekForCausalLM.generate on the project's decoder (integrations/transformers/fast_generate.py)
against transformers' own generate loop on the same class: token for token, with rows that end on
an eos early (kept, then padded), several eos ids and left padding; and the calls it must leave to
transformers (beams, processors, streamers, minimum lengths) do go there."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TextStreamer

from deepseekmoe.integrations.transformers import fast_generate
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    where = tmp_path_factory.mktemp("fastgen")
    tiny_model(64, max_position_embeddings=128).save_pretrained(where)
    return AutoModelForCausalLM.from_pretrained(where).eval()


def _inputs():
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[1] * (L - len(p)) + p for p in PROMPTS])
    return ids, (ids != 1).long()


def _both(model, **kw):
    ids, mask = _inputs()
    model.fast_generate = False
    want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=1, **kw)
    model.fast_generate = True
    try:
        assert fast_generate.plan(model, None, {"input_ids": ids, "attention_mask": mask, "do_sample": False,
                                                "pad_token_id": 1, **kw}) is not None
        got = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=1, **kw)
    finally:
        model.fast_generate = "auto"
    return want, got


def test_greedy_without_eos_equals_transformers_loop(model):
    want, got = _both(model, max_new_tokens=12, eos_token_id=None)
    assert got.shape == (3, 7 + 12) and torch.equal(got, want)


def test_rows_ending_on_eos_keep_it_and_are_padded_like_transformers(model):
    free, _ = _both(model, max_new_tokens=12, eos_token_id=None)
    new = free[:, 7:]
    # eos ids that end rows at different steps: the 3rd token of row 0 and the 6th of row 2.
    eos = [int(new[0, 2]), int(new[2, 5])]
    want, got = _both(model, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, want)
    assert got.shape[1] < 7 + 12 or (got[:, 7:] == 1).any()  # something ended early


def test_calls_with_other_features_go_to_transformers(model):
    ids, mask = _inputs()
    model.fast_generate = True
    try:
        base = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4}
        assert fast_generate.plan(model, None, base) is not None
        for extra in ({"num_beams": 2}, {"repetition_penalty": 1.3}, {"streamer": TextStreamer(tokenizer=None)},
                      {"min_new_tokens": 3, "eos_token_id": 2},
                      {"output_scores": True, "return_dict_in_generate": True},
                      {"logits_processor": [lambda i, s: s]}):
            assert fast_generate.plan(model, None, {**base, **extra}) is None, extra
        model.fast_generate = False
        assert fast_generate.plan(model, None, base) is None
    finally:
        model.fast_generate = "auto"
    model.fast_generate = "auto"  # CPU weights: transformers' loop by default
    assert fast_generate.plan(model, None, {"input_ids": ids, "max_new_tokens": 4}) is None


def test_class_layers_offer_the_decode_fast_path_only_when_plain(model):
    """The decode kernels read `experts.w13` / `w2` (the class's packed stacked tensors) and take a
    layer only while its experts are bare Linears; PEFT LoRA on them keeps the layer's own forward."""
    import peft

    from deepseekmoe.inference.fast_path import layer_takes_fused

    moes = [layer.mlp for layer in model.model.layers if layer.is_moe]
    assert moes and all(layer_takes_fused(m) for m in moes)
    with torch.no_grad():  # decode: no autograd wrapper around the stacked storage
        w13, w2 = moes[0].experts.stacked()
        assert moes[0].experts.w13 is w13 and moes[0].experts.w2 is w2
    F = moes[0].experts.width
    assert torch.equal(w13[1, F:], moes[0].experts[1].up_proj.weight)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["up_proj"]))
    try:
        assert not any(layer_takes_fused(m) for m in moes)
    finally:
        lora.unload()
    assert all(layer_takes_fused(m) for m in moes)
