"""Chat data: the Jinja form of the 16b-chat template gives the ids `deepseek chat` uses."""

from __future__ import annotations

import pytest

from deepseekmoe.data.chat import DEEPSEEK_CHAT_JINJA
from deepseekmoe.inference.generate import chat_ids

MULTI_TURN = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "\n\n".join(f"User: {m['content']}\n\nAssistant: {m['content']}" for m in MULTI_TURN)
    tk.train_from_iterator([text] * 20, trainer)
    return tk


def _render_like_transformers(template: str, messages, add_generation_prompt: bool) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("n_messages", [6, 5])
def test_jinja_template_gives_chat_ids(hf_tokenizer, add_generation_prompt, n_messages):
    msgs = MULTI_TURN[:n_messages]
    text = _render_like_transformers(DEEPSEEK_CHAT_JINJA, msgs, add_generation_prompt)
    # transformers encodes the rendered text with special tokens recognised and no extra bos.
    got = hf_tokenizer.encode(text, add_special_tokens=False).ids
    want = chat_ids(hf_tokenizer, msgs, 0, 1, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert want.count(1) == 2 and want[0] == 0
    assert text.endswith("Assistant:") == add_generation_prompt


def test_jinja_template_refuses_unknown_role():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="role tool"):
        _render_like_transformers(DEEPSEEK_CHAT_JINJA, [{"role": "tool", "content": "x"}], False)
