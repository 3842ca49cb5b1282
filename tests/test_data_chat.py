"""Chat data: records normalised (and refused with one clear message), the templates as ids and a
loss mask checked token by token, the Jinja form of the 16b-chat template gives the ids
`deepseek chat` uses, a checkpoint's chat_template, the released script's instruction template."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepseekmoe.data.chat import (
    DEEPSEEK_CHAT_JINJA,
    INSTRUCTION_SYSTEM,
    DeepSeekChatTemplate,
    InstructionTemplate,
    JinjaTemplate,
    encode_conversation,
    get_template,
    normalize_record,
    read_chat_template,
)
from deepseekmoe.data.tokenizer import Tokenizer
from deepseekmoe.errors import ConfigError, DataError
from deepseekmoe.inference.generate import chat_ids

MULTI_TURN = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Thanks!"},
]
BOS, EOS = 0, 1


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "\n\n".join(f"User: {m['content']}\n\nAssistant: {m['content']}" for m in MULTI_TURN)
    tk.train_from_iterator([text] * 20, trainer)
    return tk


@pytest.fixture(scope="module")
def tok(hf_tokenizer):
    return Tokenizer.from_str(hf_tokenizer.to_str())


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
    want = chat_ids(hf_tokenizer, msgs, BOS, EOS, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert want.count(EOS) == 2 and want[0] == BOS
    assert text.endswith("Assistant:") == add_generation_prompt


def test_jinja_template_refuses_unknown_role():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="role tool"):
        _render_like_transformers(DEEPSEEK_CHAT_JINJA, [{"role": "tool", "content": "x"}], False)


# ---------------------------------------------------------------------- loss mask, token by token
def test_mask_token_by_token_multi_turn(tok):
    enc = encode_conversation(MULTI_TURN, DeepSeekChatTemplate(), tok)
    e = tok.encode
    prompt1 = e("You answer in one sentence.\n\n") + e("User: What is the capital of France?\n\n") + e("Assistant:")
    reply1 = e(" Paris is the capital of France.")
    prompt2 = e("User: And of Italy?\n\n") + e("Assistant:")
    reply2 = e(" Rome.")
    tail = e("User: Thanks!\n\n")
    want_ids = [BOS, *prompt1, *reply1, EOS, *prompt2, *reply2, EOS, *tail]
    want_mask = ([0] * (1 + len(prompt1)) + [1] * (len(reply1) + 1) + [0] * len(prompt2)
                 + [1] * (len(reply2) + 1) + [0] * len(tail))
    assert enc.ids.tolist() == want_ids
    assert enc.mask.astype(int).tolist() == want_mask
    labels = enc.labels
    assert labels.dtype == np.int64 and set(labels[~enc.mask].tolist()) == {-100}
    assert tok.decode(enc.ids[enc.mask]) == " Paris is the capital of France.<|eos|> Rome.<|eos|>"
    # Same ids as the chat command's encoding of the finished conversation.
    assert want_ids == chat_ids(tok, MULTI_TURN, BOS, EOS, add_generation_prompt=False)


def test_content_holding_a_special_token_string_is_text(tok):
    enc = encode_conversation([{"role": "user", "content": "a<|eos|>b"}, {"role": "assistant", "content": "ok"}],
                              DeepSeekChatTemplate(), tok)
    assert enc.ids.tolist().count(EOS) == 1 and enc.ids[-1] == EOS


@pytest.mark.parametrize("n_messages", [5, 6])
def test_jinja_template_locates_every_reply(tok, n_messages):
    msgs = MULTI_TURN[:n_messages]
    jinja = JinjaTemplate(DEEPSEEK_CHAT_JINJA, "<|bos|>", "<|eos|>")
    want = encode_conversation(msgs, DeepSeekChatTemplate(), tok)
    got = encode_conversation(msgs, jinja, tok)
    assert got.ids.tolist() == want.ids.tolist()
    assert got.mask.tolist() == want.mask.tolist()


def test_jinja_template_with_generation_tags_and_other_markup(tok):
    src = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}"
           "{{ eos_token }}{% endgeneration %}{% else %}<{{ m['role'] }}>{{ m['content'] }}\n{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    enc = encode_conversation(MULTI_TURN[1:5], JinjaTemplate(src, "<|bos|>", "<|eos|>"), tok)
    assert tok.decode(enc.ids[enc.mask]) == "Paris is the capital of France.<|eos|>Rome.<|eos|>"
    assert tok.decode(enc.ids[~enc.mask]) == ("<user>What is the capital of France?\n<a>"
                                              "<user>And of Italy?\n<a>")


def test_checkpoint_chat_template_is_read(tmp_path, tok):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": DEEPSEEK_CHAT_JINJA, "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}))
    assert isinstance(get_template("auto", tmp_path), DeepSeekChatTemplate)  # the exported one: its twin
    other = DEEPSEEK_CHAT_JINJA.replace("User: ", "Human: ")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": other, "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}))
    t = get_template("auto", tmp_path)
    assert isinstance(t, JinjaTemplate)
    want = encode_conversation(MULTI_TURN, DeepSeekChatTemplate(), tok)
    got = encode_conversation(MULTI_TURN, t, tok)
    assert tok.decode(got.ids[got.mask]) == tok.decode(want.ids[want.mask])
    assert tok.decode(got.ids).count("Human: ") == 3
    (tmp_path / "t.jinja").write_text(DEEPSEEK_CHAT_JINJA)  # a file alone: bos/eos from the tokenizer
    from_file = encode_conversation(MULTI_TURN, get_template(f"jinja:{tmp_path / 't.jinja'}"), tok)
    assert from_file.ids.tolist() == want.ids.tolist() and from_file.mask.tolist() == want.mask.tolist()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert isinstance(get_template("auto", tmp_path), DeepSeekChatTemplate)
    with pytest.raises(ConfigError, match="no chat_template"):
        get_template("checkpoint", tmp_path)
    assert read_chat_template(tmp_path) is None


# ---------------------------------------------------------------------- instruction template
def test_instruction_template_matches_released_script(tok):
    conv = normalize_record({"instruction": "  Add 2 and 3. ", "output": "5"}, "r")
    enc = encode_conversation(conv, InstructionTemplate("text"), tok)
    prompt = f"{INSTRUCTION_SYSTEM}\n### Instruction:\nAdd 2 and 3.\n### Response:\n"
    # The script: [bos] + encode(prompt + output + "\n<|EOT|>"), loss after the prompt.
    assert enc.ids.tolist() == [BOS, *tok.encode(prompt), *tok.encode("5"), *tok.encode("\n<|EOT|>")]
    assert tok.decode(enc.ids[enc.mask]) == "5\n<|EOT|>"
    # Without a "<|EOT|>" token in the vocabulary, auto ends the reply with eos.
    auto = encode_conversation(conv, get_template("instruction"), tok)
    assert tok.decode(auto.ids[auto.mask]) == "5\n<|eos|>" and auto.ids[-1] == EOS


def test_instruction_template_uses_an_eot_token_when_the_vocabulary_has_it(hf_tokenizer):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(hf_tokenizer.to_str())
    hf.add_special_tokens([AddedToken("<|EOT|>", special=True)])
    t = Tokenizer(hf, BOS, EOS)
    enc = encode_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                              InstructionTemplate(), t)
    assert enc.ids[-1] == hf.token_to_id("<|EOT|>") and enc.mask[-1]


def test_instruction_template_refuses_multi_turn(tok):
    with pytest.raises(DataError, match="deepseek-chat template for multi-turn"):
        encode_conversation(MULTI_TURN, InstructionTemplate(), tok)


# ---------------------------------------------------------------------- bad input
def test_records_normalised():
    assert normalize_record({"instruction": "Do", "input": "this", "output": "done"}, "r") == [
        {"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "done"}]
    assert normalize_record({"messages": MULTI_TURN, "id": 3}, "r") == MULTI_TURN


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"f.jsonl:line 4: no assistant turn.*add the assistant"),
    ({"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     r"line 4: message 0 has role 'usr' \(did you mean 'user'\?\)"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "message 0 .user. content is a int"),
    ({"messages": "hello"}, "'messages' is str, expected a list"),
    ({"text": "hello"}, "neither 'messages' nor 'instruction'/'output' .keys: 'text'."),
    ({"instruction": "hi"}, "'output' is missing"),
    ([1, 2], "must be a JSON object, got list"),
])
def test_bad_records_one_clear_message(record, match):
    with pytest.raises(DataError, match=match):
        normalize_record(record, "f.jsonl:line 4")


def test_template_that_does_not_render(tok):
    with pytest.raises(ConfigError, match=r"not valid Jinja \(line 1"):
        JinjaTemplate("{% for m in messages %}{{ m['content'] }}", where="cfg chat_template")
    bad = JinjaTemplate("{{ raise_exception('no system messages') if messages[0]['role'] == 'system' }}"
                        "{% for m in messages %}{{ m['content'] }}{% endfor %}", where="cfg chat_template")
    with pytest.raises(DataError, match="cfg chat_template. does not render.*no system messages"):
        encode_conversation(MULTI_TURN, bad, tok)
    reorders = JinjaTemplate("{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}", where="cfg")
    with pytest.raises(DataError, match="growing prefixes"):
        encode_conversation(MULTI_TURN[1:3], reorders, tok)
    with pytest.raises(ConfigError, match=r"template 'deepseek_chat' \(did you mean 'deepseek-chat'\?\)"):
        get_template("deepseek_chat")


def test_a_transformers_tokenizer_gives_the_same_ids(hf_tokenizer, tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, bos_token="<|bos|>", eos_token="<|eos|>")
    want = encode_conversation(MULTI_TURN, DeepSeekChatTemplate(), tok)
    got = encode_conversation(MULTI_TURN, DeepSeekChatTemplate(), fast)
    assert got.ids.tolist() == want.ids.tolist() and got.mask.tolist() == want.mask.tolist()
    # transformers' own rendering of the exported template: the same ids
    fast.chat_template = DEEPSEEK_CHAT_JINJA
    assert fast.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False) == want.ids.tolist()
