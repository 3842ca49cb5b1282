"""Chat records and templates for supervised fine-tuning.

`DEEPSEEK_CHAT_JINJA` is the 16b-chat template in Hugging Face `chat_template` (Jinja) syntax: bos,
a system message as its content + "\\n\\n", "User: {msg}\\n\\n" per user turn, "Assistant: {reply}"
+ eos per assistant turn, and "Assistant:" as the generation prompt. Rendered by transformers and
encoded with bos/eos as special tokens it gives the same ids as `chat_ids` (tests/test_data_chat.py).
"""

from __future__ import annotations

# One line of Jinja: with trim_blocks/lstrip_blocks (what transformers uses) only newlines after a
# block tag are dropped, so the pieces are concatenated without any newline between them.
DEEPSEEK_CHAT_JINJA = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('chat message role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
