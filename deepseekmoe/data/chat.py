"""Chat records, chat templates, and conversations as token ids with a loss mask (for SFT).

    conv = normalize_record({"messages": [...]}, where="data.jsonl:line 3")   # or instruction/output
    template = get_template("deepseek-chat")                                   # or "instruction", jinja
    enc = encode_conversation(conv, template, tokenizer)                       # ids + mask (numpy)

Records: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (multi-turn,
at least one assistant turn), or the released finetune script's `{"instruction": str, "output":
str}` (an optional non-empty `input` is appended to the instruction after a blank line). Both
normalise to a list of {"role", "content"} dicts.

Templates turn a conversation into `Piece`s: text or a special token (bos/eos), each marked
trained or not. Loss is on every assistant reply and the token that ends it, in every turn:
- "deepseek-chat": the 16b-chat template, bos, system content + "\\n\\n", "User: {msg}\\n\\n",
  "Assistant: {reply}" + eos; "Assistant:" prompts a reply. `DEEPSEEK_CHAT_JINJA` is the same
  template in Hugging Face `chat_template` syntax (for tokenizer_config.json); rendered by
  transformers it gives the same ids (tests/test_data_chat.py).
- "instruction": the released finetune script's prompt (`INSTRUCTION_SYSTEM`, "### Instruction:",
  "### Response:") and target "{output}\\n<|EOT|>", single-turn. "<|EOT|>" is DeepSeek-Coder's
  end-of-turn special token (the script comes from DeepSeek-Coder's); the deepseek-moe checkpoints'
  bos/eos are "<｜begin▁of▁sentence｜>" / "<｜end▁of▁sentence｜>" (full-width bars). In a vocabulary
  without a "<|EOT|>" token the string is several ordinary tokens that the model learns to write
  and nothing stops on. So `eot="auto"` (default) ends the target with the "<|EOT|>" token when the
  vocabulary has it, else with the tokenizer's eos (what `deepseekmoe chat`
  and `generate` stop on); `eot="text"` keeps the script's literal text.
- a Jinja `chat_template` (a checkpoint's tokenizer_config.json, or a file): rendered as
  transformers does (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`); assistant spans are
  found by rendering growing prefixes of the conversation (the text a reply adds after the
  generation prompt), and special-token strings in the rendered text become their ids.

Pieces are encoded one by one: a prompt ends where generation starts at inference, so the reply's
first token is the one the model has to produce after "Assistant:". Special-token strings inside
messages are encoded as plain text by the built-in templates (a user cannot inject eos).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepseekmoe.errors import ConfigError, DataError, suggest

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
BOS, EOS, EOT = "<bos>", "<eos>", "<eot>"  # Piece.special values; resolved to ids by the tokenizer
TEMPLATES = ("deepseek-chat", "instruction")

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

INSTRUCTION_SYSTEM = ("You are an AI assistant, developed by DeepSeek Company. For politically sensitive "
                      "questions, security and privacy issues, you will refuse to answer.")
EOT_TEXT = "<|EOT|>"


@dataclass(frozen=True)
class Piece:
    """Text (`special` None) or one special token (BOS / EOS / EOT); `train`: it carries loss.
    `parse_special`: special-token strings inside `text` become their ids (Jinja output)."""
    text: str = ""
    special: str | None = None
    train: bool = False
    parse_special: bool = False


# ---------------------------------------------------------------------- records
def normalize_record(record, where: str) -> list[dict]:
    """A record (messages, or instruction/output) as [{"role", "content"}, ...]; DataError if bad."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}; write "
                        '{"messages": [...]} or {"instruction": ..., "output": ...}')
    # Columnar files (parquet, a saved dataset) give every row every column, null where unused.
    record = {k: v for k, v in record.items() if v is not None}
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, (list, tuple)):
            raise DataError(f"{where}: 'messages' is {type(msgs).__name__}, expected a list of "
                            '{"role": ..., "content": ...} objects')
        out = [_message(m, where, i) for i, m in enumerate(msgs)]
    elif "instruction" in record or "output" in record:
        inst, output = record.get("instruction"), record.get("output")
        for key, v in (("instruction", inst), ("output", output)):
            if not isinstance(v, str):
                got = "missing" if v is None else f"a {type(v).__name__}"
                raise DataError(f"{where}: {key!r} is {got}; an instruction record needs string "
                                "'instruction' and 'output' fields")
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            inst = f"{inst}\n\n{extra}"
        out = [{"role": "user", "content": inst}, {"role": "assistant", "content": output}]
    else:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where}: neither 'messages' nor 'instruction'/'output' (keys: {keys}); write "
                        '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} or '
                        '{"instruction": ..., "output": ...}')
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, so nothing to learn from; add the assistant's reply "
                        "or remove the record")
    return out


def _message(m, where: str, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m:
        raise DataError(f"{where}: message {i} is not a {{\"role\": ..., \"content\": ...}} object "
                        f"(got {str(m)[:60]!r})")
    role, content = m["role"], m.get("content")
    if role not in ROLES:
        raise DataError(f"{where}: message {i} has role {role!r}{suggest(str(role), ROLES)}; roles are "
                        f"{', '.join(ROLES)} (rename it, or drop the message)")
    if not isinstance(content, str):
        got = "missing" if content is None else f"a {type(content).__name__}"
        raise DataError(f"{where}: message {i} ({role}) content is {got}; expected a string")
    return {"role": role, "content": content}


# ---------------------------------------------------------------------- templates
class Template:
    """Turns a conversation into Pieces. `name` is what reports and configs call it."""
    name = "template"

    def pieces(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
        raise NotImplementedError


class DeepSeekChatTemplate(Template):
    """The 16b-chat template (see the module docstring)."""
    name = "deepseek-chat"

    def pieces(self, messages, add_generation_prompt=False):
        out = [Piece(special=BOS)]
        for m in messages:
            role, content = m.get("role"), m.get("content", "")
            if role == "system":
                out.append(Piece(content + "\n\n"))
            elif role == "user":
                out.append(Piece(f"User: {content}\n\n"))
            elif role == "assistant":
                out += [Piece("Assistant:"), Piece(f" {content}", train=True), Piece(special=EOS, train=True)]
            else:
                raise ConfigError(f"chat message role {role!r}: expected system, user or assistant")
        if add_generation_prompt:
            out.append(Piece("Assistant:"))
        return out


def chat_text_segments(messages: Sequence[dict], add_generation_prompt: bool = True) -> list[str | None]:
    """The 16b-chat template as text pieces after bos; None marks where an eos token goes."""
    out: list[str | None] = []
    text = ""
    for p in DeepSeekChatTemplate().pieces(messages, add_generation_prompt)[1:]:
        if p.special is None:
            text += p.text
        else:
            out += [text, None] if text else [None]
            text = ""
    if text:
        out.append(text)
    return out


class InstructionTemplate(Template):
    """The released finetune script's single-turn prompt and "{output}\\n<|EOT|>" target."""
    name = "instruction"

    def __init__(self, eot: str = "auto"):
        if eot not in ("auto", "eos", "text"):
            raise ConfigError(f"instruction template eot={eot!r}: choose auto, eos or text")
        self.eot = eot

    def pieces(self, messages, add_generation_prompt=False):
        roles = [m["role"] for m in messages]
        system = INSTRUCTION_SYSTEM
        if roles and roles[0] == "system":
            system, messages, roles = messages[0]["content"], messages[1:], roles[1:]
        ok = roles in (["user", "assistant"], ["user"] if add_generation_prompt else None)
        if not ok:
            raise DataError(f"the instruction template takes one user message and one assistant reply "
                            f"(an optional system message first), got roles {roles}; use the "
                            "deepseek-chat template for multi-turn conversations")
        prompt = f"{system}\n### Instruction:\n{messages[0]['content'].strip()}\n### Response:\n"
        out = [Piece(special=BOS), Piece(prompt)]
        if len(messages) == 2:
            end = (Piece(f"\n{EOT_TEXT}", train=True) if self.eot == "text"
                   else Piece(special=EOT if self.eot == "auto" else EOS, train=True))
            out += [Piece(messages[1]["content"] + ("" if self.eot == "text" else "\n"), train=True), end]
        return out


class _GenerationTag:
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) as a no-op."""

    @staticmethod
    def extension():
        from jinja2 import nodes
        from jinja2.ext import Extension

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        return Generation


class JinjaTemplate(Template):
    """A Hugging Face `chat_template`; `bos_token` / `eos_token` are the strings it renders."""
    name = "jinja"

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "chat_template"):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag.extension(), loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{where}: the chat template is empty or not a string; give a Jinja template")
        try:
            self._tpl = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ConfigError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                              "fix it, or choose --sft.template=deepseek-chat") from None
        self.source, self.where = source, where
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self._errors = (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        try:
            return self._tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        except self._errors as e:
            raise DataError(f"the chat template ({self.where}) does not render this conversation: "
                            f"{type(e).__name__}: {e}; fix the template or the record, or choose "
                            "--sft.template=deepseek-chat") from None

    def pieces(self, messages, add_generation_prompt=False):
        full = self.render(messages, add_generation_prompt)
        out, done = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, upto = self.render(messages[:i], True), self.render(messages[:i + 1], False)
            start, stop = len(prefix), len(upto)
            if not (done <= start and full.startswith(upto) and upto.startswith(prefix)):
                raise DataError(f"the chat template ({self.where}) does not render a conversation as its "
                                f"growing prefixes (assistant message {i} is not the text after the generation "
                                "prompt), so the reply cannot be located for the loss mask; use a template "
                                "that appends each message, or --sft.template=deepseek-chat")
            out += [Piece(full[done:start], parse_special=True),
                    Piece(full[start:stop], train=True, parse_special=True)]
            done = stop
        out.append(Piece(full[done:], parse_special=True))
        return [p for p in out if p.text]


def read_chat_template(model_dir: str | Path) -> JinjaTemplate | None:
    """The `chat_template` in a checkpoint's tokenizer_config.json (or chat_template.jinja), if any."""
    d = Path(model_dir)
    cfg: dict = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{cfg_path}: not valid JSON ({e}); fix or remove the file") from None
        if not isinstance(cfg, dict):
            raise DataError(f"{cfg_path}: expected a JSON object; fix or remove the file")
    source, where = cfg.get("chat_template"), f"{cfg_path} chat_template"
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = d / "chat_template.jinja"
    if source is None and jinja_file.is_file():
        source, where = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    if source is None:
        return None
    if source == DEEPSEEK_CHAT_JINJA:  # what this project exports: the built-in twin is exact and faster
        return DeepSeekChatTemplate()
    return JinjaTemplate(source, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")), where)


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def get_template(spec: str | Template = "auto", model_dir: str | Path | None = None) -> Template:
    """A Template from a name: "deepseek-chat", "instruction" (also "instruction:eos|text|auto"),
    "jinja:FILE" (a Jinja file), "checkpoint" (the model's chat_template, an error if it has none), or
    "auto" (the model's chat_template when present, else deepseek-chat)."""
    if isinstance(spec, Template):
        return spec
    spec = str(spec)
    if spec == "deepseek-chat":
        return DeepSeekChatTemplate()
    if spec == "instruction" or spec.startswith("instruction:"):
        return InstructionTemplate(spec.partition(":")[2] or "auto")
    if spec.startswith("jinja:"):
        path = Path(spec[len("jinja:"):])
        if not path.is_file():
            raise ConfigError(f"template {spec!r}: no such file {path}; give jinja:PATH to a chat template")
        return JinjaTemplate(path.read_text(encoding="utf-8"), where=str(path))
    if spec in ("auto", "checkpoint"):
        found = read_chat_template(model_dir) if model_dir is not None else None
        if found is None and spec == "checkpoint":
            raise ConfigError(f"template 'checkpoint': {model_dir} has no chat_template in tokenizer_config.json;"
                              " choose deepseek-chat or instruction")
        return found or DeepSeekChatTemplate()
    choices = (*TEMPLATES, "auto", "checkpoint", "jinja:FILE")
    raise ConfigError(f"template {spec!r}{suggest(spec, choices)}: choose one of {', '.join(choices)}")


# ---------------------------------------------------------------------- ids and loss mask
@dataclass
class Encoded:
    """One conversation: `ids` int32 [n], `mask` bool [n] (True: the token carries loss)."""
    ids: np.ndarray
    mask: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """int64 labels aligned with ids (the model shifts them), IGNORE_INDEX where not trained."""
        return np.where(self.mask, self.ids.astype(np.int64), IGNORE_INDEX)


def _encoder(tokenizer) -> Callable[[str, bool], list[int]]:
    """text, parse_special -> ids, for this project's Tokenizer, a bare `tokenizers.Tokenizer` or a
    transformers tokenizer (never adding bos/eos of its own)."""
    from deepseekmoe.data.tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return lambda text, special: tokenizer.encode(text, allow_special=special)
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        HFTokenizer = ()
    if isinstance(tokenizer, HFTokenizer):
        return lambda text, special: tokenizer.encode(text, add_special_tokens=False).ids
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers' fast tokenizers
        return lambda text, special: list(tokenizer.encode(text, add_special_tokens=False))
    return lambda text, special: list(tokenizer.encode(text))


def _special_id(tokenizer, special: str, bos_id, eos_id) -> int:
    def attr(*names):
        return next((getattr(tokenizer, n) for n in names if getattr(tokenizer, n, None) is not None), None)

    if special == BOS:
        tid = bos_id if bos_id is not None else attr("bos_id", "bos_token_id")
    else:
        tid = eos_id if eos_id is not None else attr("eos_id", "eos_token_id")
        if special == EOT:
            vocab = attr("backend", "backend_tokenizer") or tokenizer
            eot = vocab.token_to_id(EOT_TEXT) if hasattr(vocab, "token_to_id") else None
            tid = eot if eot is not None else tid
    if tid is None:
        raise ConfigError(f"the tokenizer has no {special[1:-1]} token id; pass bos_id/eos_id")
    return int(tid)


def encode_conversation(messages: Sequence[dict], template: Template, tokenizer, bos_id: int | None = None,
                        eos_id: int | None = None, add_generation_prompt: bool = False) -> Encoded:
    """Token ids and loss mask of one conversation under `template` (pieces encoded one by one)."""
    encode = _encoder(tokenizer)
    if isinstance(template, JinjaTemplate):  # a template file alone names no bos/eos strings
        template.bos_token = template.bos_token or getattr(tokenizer, "bos_token", None) or ""
        template.eos_token = template.eos_token or getattr(tokenizer, "eos_token", None) or ""
    ids: list[int] = []
    mask: list[bool] = []
    for p in template.pieces(messages, add_generation_prompt):
        got = [_special_id(tokenizer, p.special, bos_id, eos_id)] if p.special else encode(p.text, p.parse_special)
        ids += got
        mask += [p.train] * len(got)
    if mask:
        mask[0] = False  # packed, a first token's label would be predicted from the previous conversation
    return Encoded(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))
