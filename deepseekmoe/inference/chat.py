"""`deepseekmoe chat`: a terminal conversation with a chat checkpoint (16b-chat template).

Each turn is rendered with the released template (bos, "User: ...\\n\\n", "Assistant: ...<eos>")
and the reply is streamed as it is generated. `/reset` starts over, `/exit` (or end of input)
quits. When the conversation outgrows the context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys

from deepseekmoe.errors import ConfigError, DataError, utf8_text
from deepseekmoe.inference.cli import (
    add_common_arguments,
    decode_utf8,
    load_for_inference,
    sampling_kwargs,
    stdin_bytes,
)


def add_arguments(p) -> None:
    add_common_arguments(p, max_new_tokens=512)
    p.add_argument("--system", default=None, help="system message placed before the first turn")


def run(args) -> int:
    from deepseekmoe.inference.generate import _special_ids, chat_ids, generate

    if args.system is not None:
        utf8_text(args.system, "--system")
    model, tok, mode = load_for_inference(args)
    bos, eos = _special_ids(model, tok)
    kw = sampling_kwargs(args, mode)
    limit = model.config.max_position_embeddings - args.max_new_tokens
    if limit < 2:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the "
                          f"model's context of {model.config.max_position_embeddings} tokens; pass a smaller "
                          "--max-new-tokens")
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    lineno = 0
    if interactive:
        print("deepseekmoe chat: /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print("User: ", end="", flush=True)
        raw = stdin_bytes(line=True)
        if not raw:
            break
        lineno += 1
        try:
            line = decode_utf8(raw, f"stdin line {lineno}")
        except DataError as e:
            if not interactive:  # a piped conversation cannot be typed again
                raise
            print(f"({e}; type the message again)", file=sys.stderr)
            continue
        msg = line.rstrip("\n")
        if msg.strip() in ("/exit", "/quit"):
            break
        if msg.strip() == "/reset":
            history.clear()
            continue
        if not msg.strip():
            continue
        history.append({"role": "user", "content": msg})
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = chat_ids(tok, system + history, bos, eos)
        while len(ids) > limit and len(history) > 1:  # forget the oldest exchange
            history = history[2:] if len(history) > 2 else history[-1:]
            ids = chat_ids(tok, system + history, bos, eos)
        if len(ids) > limit:
            print(f"(message too long: {len(ids)} tokens, the context allows {limit} before the reply)",
                  file=sys.stderr)
            history.pop()
            continue
        print("Assistant: ", end="", flush=True)
        reply = generate(model, tok, "", prompt_ids=[ids], stream=_Display(), **kw)
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


class _Display:
    """Streams a reply to stdout. The template's generation prompt ends in "Assistant:", so the
    model writes the space after it; the terminal already shows one, so leading spaces are dropped."""

    def __init__(self):
        self.started = False

    def __call__(self, _row: int, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        sys.stdout.write(text)
        sys.stdout.flush()
