"""Malformed input to every command: one line `deepseekmoe CMD: error: ...` naming the value and the
fix, exit status 2, no traceback, nothing half-written.

CASES is the one list of the cases: `test_bad_input` runs each through `deepseekmoe.cli.main` in
this process on tiny fixtures, and docs/reliability.md holds the table rendered from it (checked by
`test_doc_table_is_the_case_list`; `python tests/test_reliability_inputs.py` rewrites it).
In a command line, an upper-case word in braces is a fixture (described in FIXTURES) and
{OUT} a fresh path the command must not create.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from deepseekmoe.cli import COMMANDS, HelpFormatter, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- cases: begin (generated from tests/test_reliability_inputs.py) -->", "<!-- cases: end -->"
TEXT = [f"Document number {i}.\nSome text here, and more text there.\n" for i in range(8)]

FIXTURES = {
    "MODEL": "a tiny saved model (released format, vocab 300, with its tokenizer.json)",
    "SMALL": "a tiny saved model of vocab 64, without a tokenizer",
    "TOK": "a directory holding the tokenizer.json of MODEL (vocab 300)",
    "DATA": "a prepared dataset (prepare CORPUS CORPUS2 --tokenizer TOK --val-fraction 0.3)",
    "CORPUS": "corpus.txt, a few lines of UTF-8 text",
    "CORPUS2": "another UTF-8 text file (DATA's second input)",
    "LATIN1": "latin1.txt, text that is not UTF-8",
    "EMPTY": "an empty .txt file",
    "EMPTYDIR": "an empty directory",
    "BINARY": "binary.json / binary.toml: the bytes 0x00..0xff, where the command expects text",
    "TRUNC": "a copy of MODEL whose model.safetensors is cut in half",
    "GARBAGE": "a copy of MODEL whose config.json is random bytes",
    "BADTYPE": "a copy of MODEL whose config.json says hidden_size \"big\"",
    "LLAMA": "a directory whose config.json says model_type \"llama\"",
    "STUFF": "a directory holding an unrelated user file",
    "RECIPES": "a directory holding a.toml (a recipe)",
    "BADTOML": "a .toml recipe that is not valid TOML",
    "FILE": "an existing plain file",
    "CHAT": "chat.jsonl, eight one-turn chat records",
    "NOASSIST": "a .jsonl record with a user turn and no assistant turn",
    "BADROLE": "a .jsonl record whose first message has the role \"usr\"",
    "LONGCHAT": "a .jsonl record of about 300 tokens (MODEL's context is 96)",
    "SYSCHAT": "a .jsonl record with a system message",
    "BADJINJA": "a chat template file that is not valid Jinja",
    "RAISEJINJA": "a chat template that raises on system messages (raise_exception)",
    "ADAPTER": "a LoRA adapter (PEFT format) made for a model of hidden size 48",
}


class Case(NamedTuple):
    argv: str                 # the command line after `deepseekmoe`, shell-quoted, fixtures in braces
    message: str              # what the one error line must contain
    stdin: bytes | None = None


# {XFF} is the byte 0xff on the command line (Python hands it over as the surrogate escape \udcff).
CASES = [
    # info
    Case("info deepseekmoe-16 --seq-len 128", "unknown preset 'deepseekmoe-16' (did you mean 'deepseekmoe-16b'?)"),
    Case("info {BADTYPE}", "hidden_size='big': must be a positive integer"),
    Case("info {LLAMA}", "model_type='llama' is not supported"),
    Case("info --seq-len -5", "--seq-len -5: must be a positive number of tokens"),
    Case("info {EMPTYDIR}", "emptydir: no config.json (expected a released deepseek-moe checkpoint"),
    # prepare
    Case("prepare {CORPUS}/missing.txt --out {OUT}", "missing.txt: no such file or directory"),
    Case("prepare {EMPTYDIR} --out {OUT}", "no supported files in this directory (it is empty)"),
    Case("prepare {EMPTY} --out {OUT} --val-fraction 0", "empty corpus: no non-empty document"),
    Case("prepare {LATIN1} --out {OUT}", "not valid UTF-8 at byte offset 3"),
    Case("prepare {BINARY}.json --out {OUT}", "unsupported file type"),
    Case("prepare {CORPUS} --out {OUT} --vocab-size 10000000000", "vocab size 10000000000 is too large"),
    Case("prepare {CORPUS} --out {OUT} --vocab-size 10", "vocab size 10 is too small"),
    Case("prepare {CORPUS} --val {CORPUS} --out {OUT}", "is also a training input"),
    Case("prepare {CORPUS} --out {OUT} --val-fraction 1.5", "validation fraction 1.5 must be in [0, 1)"),
    Case("prepare {CORPUS} --out {OUT} --workers 0", "workers=0: need at least 1"),
    Case("prepare {CORPUS} --out {OUT} --shard-tokens 0", "shard size 0 must be a positive number"),
    Case("prepare {CORPUS} --out {FILE}", "exists and is not a directory"),
    Case("prepare {CORPUS} --out {STUFF}", "exists and is not a prepared dataset; choose a new directory"),
    Case("prepare {CORPUS} --out {FILE}/sub", "file is a file, not a folder"),
    Case("prepare {CORPUS} --out {OUT} --tokenizer {CORPUS}/nope.json", "nope.json: tokenizer file not found"),
    Case("prepare {CORPUS} --out {OUT} --bos '<s>'", "--bos/--eos name the special tokens of a given --tokenizer"),
    Case("prepare {CORPUS} --out {OUT} --tokenizer {TOK} --vocab-size 100", "beyond the vocab size 100"),
    Case("prepare {CORPUS} --out {OUT} --tokenizer-sample-mb -1", "--tokenizer-sample-mb -1: must be a positive"),
    Case("prepare {CORPUS} --out {OUT} --tokenizer {TOK} --eos 99999", "eos id 99999 is outside the vocabulary"),
    Case("prepare {CORPUS} --out {OUT} --tokenizer {BINARY}.json", "not a Hugging Face `tokenizers` file"),
    # tokenizer
    Case("tokenizer show {EMPTYDIR}", "tokenizer.json: tokenizer file not found"),
    Case("tokenizer show {BINARY}.json", "binary.json: not a Hugging Face `tokenizers` file"),
    Case("tokenizer show {TOK} --text caf{XFF}", "--text: not valid UTF-8 text (byte 0xff at character 3)"),
    Case("tokenizer train {CORPUS} --vocab-size 10000000000 --out {OUT}", "vocab size 10000000000 is too large"),
    Case("tokenizer train {CORPUS} --vocab-size 300 --out {STUFF}", "stuff is a directory): choose another"),
    Case("tokenizer train {CORPUS} --vocab-size 300 --out {FILE}/tok.json", "file is a file, not a folder"),
    Case("tokenizer train {EMPTY} --vocab-size 300 --out {OUT}",
         "no text to train the tokenizer on (every input is empty)"),
    # train
    Case("train tiyn", "recipe 'tiyn' not found (did you mean 'tiny'?)"),
    Case("train {RECIPES}", "is a directory, not a recipe file; pass one of its recipes (a.toml)"),
    Case("train {BADTOML}", "invalid TOML"),
    Case("train --data.path={CORPUS}", "a file, not a prepared dataset directory; tokenize it first with"),
    Case("train --data.path={EMPTYDIR}", "not a prepared dataset (no meta.json)"),
    Case("train --system.threads=-1", "system.threads=-1: must be >= 0"),
    Case("train --train.steps=0", "train.steps=0: must be >= 1"),
    Case("train --train.stepz=3", "unknown key 'train.stepz' in the command line (did you mean 'train.steps'?)"),
    Case("train --train.steps=many", "train.steps='many': expected an integer"),
    Case("train --model.preset=tinyy", "unknown preset 'tinyy' (did you mean 'tiny'?)"),
    Case("train --optim.lr=-1", "optim.lr=-1.0: the learning rate must be positive"),
    Case("train {BINARY}.toml", "binary.toml: not UTF-8 text"),
    Case("train --data.path={DATA} --train.seq_len=100000",
         "train.seq_len=100000 exceeds the model's max_position_embeddings"),
    Case("train --sample.prompt=caf{XFF}", "--sample.prompt: not valid UTF-8 text (byte 0xff at character 3)"),
    Case("train --resume {EMPTYDIR}", "emptydir: no checkpoint in this directory"),
    Case("train --out {STUFF} --train.steps=2", "stuff holds files that are not a training run (notes.odt)"),
    Case("train --data.path={DATA} --train.seq_len=200 --model.max_position_embeddings=256",
         "'val' split has 121 tokens, fewer than train.seq_len=200"),
    # generate
    Case("generate --model {CORPUS}/missing --prompt hi", "missing: no such checkpoint directory"),
    Case("generate --model {TRUNC} --prompt hi", "model.safetensors: truncated or corrupted safetensors file"),
    Case("generate --model {BADTYPE} --prompt hi", "hidden_size='big': must be a positive integer"),
    Case("generate --model {LLAMA} --prompt hi", "model_type='llama' is not supported"),
    Case("generate --model {EMPTYDIR} --prompt hi", "emptydir: no config.json"),
    Case("generate --model {MODEL} --prompt caf{XFF}", "--prompt: not valid UTF-8 text (byte 0xff at character 3)"),
    Case("generate --model {MODEL}", "the prompt on stdin: not valid UTF-8 text (byte 0xff at offset 3)",
         stdin=b"caf\xff\n"),
    Case("generate --model {MODEL}", "empty prompt", stdin=b""),
    Case("generate --model {SMALL} --tokenizer {TOK} --prompt hello", "outside the model's vocabulary (vocab_size=64)"),
    Case("generate --model {SMALL} --prompt hello", "no tokenizer.json; pass --tokenizer DIR"),
    Case("generate --model {MODEL} --prompt hi --max-new-tokens 0", "--max-new-tokens 0: must be at least 1"),
    Case("generate --model {MODEL} --prompt hi --max-new-tokens 1000", "exceeds the model's max_position_embeddings"),
    Case("generate --model {MODEL} --prompt hi --temperature -1", "--temperature -1.0: must be >= 0"),
    Case("generate --model {MODEL} --prompt hi --top-p 2", "--top-p 2.0: must be in (0, 1]"),
    Case("generate --model {MODEL} --prompt hi --top-k -3", "--top-k -3: must be >= 0"),
    Case("generate --model {MODEL} --prompt hi --expert-backend fast",
         "expert_backend='fast': must be one of auto, loop, grouped, triton, gather"),
    Case("generate --model {MODEL} --prompt hi --max-new-tokens 4 --device cpu --expert-backend triton",
         "expert_backend='triton' is not usable here: it needs a CUDA GPU"),
    Case("generate --model {MODEL} --prompt hi --device tpu:0", "--device 'tpu:0'"),
    Case("generate --model {MODEL} --tokenizer {BINARY}.json --prompt hi", "not a Hugging Face `tokenizers` file"),
    Case("generate --model {GARBAGE} --prompt hi", "config.json: unreadable JSON"),
    Case("convert {GARBAGE} {OUT}", "config.json: unreadable JSON"),
    # chat
    Case("chat --model {MODEL} --max-new-tokens 8", "stdin line 2: not valid UTF-8 text (byte 0xff at offset 3)",
         stdin=b"hi\ncaf\xff\n"),
    Case("chat --model {MODEL}", "--max-new-tokens 512 leaves no room for the conversation", stdin=b"hi\n"),
    Case("chat --model {MODEL} --system caf{XFF}", "--system: not valid UTF-8 text"),
    Case("chat --model {LLAMA}", "model_type='llama' is not supported", stdin=b"hi\n"),
    # convert
    Case("convert {CORPUS}/missing {OUT}", "missing: no such checkpoint directory"),
    Case("convert {TRUNC} {OUT}", "model.safetensors: truncated or corrupted safetensors file"),
    Case("convert {LLAMA} {OUT}", "model_type='llama' is not supported"),
    Case("convert {MODEL} {MODEL}", "{MODEL} exists; pass --overwrite to replace it"),
    Case("convert {BADTYPE} {OUT}", "hidden_size='big': must be a positive integer"),
    Case("convert {MODEL} {FILE}/sub", "file is a file, not a folder"),
    Case("convert {MODEL} {OUT} --dtype int8", "argument --dtype: invalid choice: 'int8'"),
    # sft
    Case("sft --data {CHAT} --out {OUT}", "deepseekmoe sft needs a base model: --model DIR|RUN"),
    Case("sft --model {CORPUS}/missing --data {CHAT} --out {OUT}", "missing: no such checkpoint directory"),
    Case("sft --model {MODEL} --out {OUT}", "sft.data is empty: give the record files to fine-tune on"),
    Case("sft --model {MODEL} --data {CORPUS} --out {OUT}", "corpus.txt: text files hold no chat records"),
    Case("sft --model {MODEL} --data {FILE} --out {OUT}", "file: unsupported file type for chat records"),
    Case("sft --model {MODEL} --data {CHAT}/missing.jsonl --out {OUT}", "missing.jsonl: no such file or directory"),
    Case("sft --model {MODEL} --data {NOASSIST} --out {OUT}", "line 1: no assistant turn, so nothing to learn from"),
    Case("sft --model {MODEL} --data {BADROLE} --out {OUT}", "message 0 has role 'usr' (did you mean 'user'?)"),
    Case("sft --model {MODEL} --data {LONGCHAT} --out {OUT} --sft.overlong=drop",
         "no training conversation left (train: 1 records -> 0 conversations kept (0 truncated), dropped: 1 longer "
         "than seq_len=96"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --sft.template=nope", "template 'nope': choose one of"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --sft.template=jinja:{BADJINJA}",
         "the chat template is not valid Jinja (line 1"),
    Case("sft --model {MODEL} --data {SYSCHAT} --out {OUT} --sft.template=jinja:{RAISEJINJA}",
         "does not render this conversation: TemplateError: system messages are not supported"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --sft.overlong=cut", "sft.overlong='cut': must be one of"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --lora --lora.r=0", "lora.r=0: the rank must be a positive"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --lora --lora.targets=[qq_proj,v_proj]",
         "lora.targets: 'qq_proj' is not a module LoRA can adapt"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --parallel.pp=2", "fine-tuning does not run pipeline parallel"),
    Case("sft --model {MODEL} --data {CHAT} --out {OUT} --sft.val_fraction=2", "sft.val_fraction=2.0: must be"),
    Case("generate --model {MODEL} --adapter {ADAPTER} --prompt hi", "the adapter was made for another base model"),
    Case("generate --model {MODEL} --adapter {EMPTYDIR} --prompt hi", "emptydir: not a LoRA adapter directory"),
    Case("chat --model {MODEL} --adapter {ADAPTER}", "has shape [4, 48], this model needs [4, 32]", stdin=b"hi\n"),
    # eval / analyze
    Case("eval --model {CORPUS}/missing", "missing: no such checkpoint directory"),
    Case("eval --model {TRUNC}", "model.safetensors: truncated or corrupted safetensors file"),
    Case("eval --model {MODEL} --lm-data {DATA} --lm-split nope", "nope"),
    Case("eval --model {MODEL} --tasks hellaswag", "--data-dir"),
    Case("analyze --model {LLAMA}", "model_type='llama' is not supported"),
    Case("eval --model {MODEL} --lm-data {DATA} --max-length 100000",
         "--max-length 100000: beyond the model's max_position_embeddings (96)"),
    Case("eval --model {MODEL} --lm-data {DATA} --out {STUFF}", "stuff is a directory): choose another"),
    Case("eval --model {LLAMA}", "model_type='llama' is not supported"),
    Case("eval --model {BADTYPE}", "hidden_size='big': must be a positive integer"),
    Case("eval --model {MODEL} --lm-text {LATIN1}", "not valid UTF-8 at byte offset 3"),
    Case("eval --model {MODEL} --lm-data {DATA} --out {FILE}/r.json", "file is a file, not a folder"),
    Case("analyze --model {MODEL} --text {EMPTY}", "empty.txt: no non-empty documents"),
    Case("analyze --model {MODEL} --data {DATA} --out {FILE}/sub", "file is a file, not a folder"),
    Case("analyze --model {MODEL} --data {DATA} --seq-len 100000",
         "--seq-len 100000: beyond this model's context of 96 tokens"),
    Case("analyze --model {MODEL} --data {EMPTYDIR}", "not a prepared dataset (no meta.json)"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The fixtures named in FIXTURES, built once (a second or so)."""
    import torch

    from deepseekmoe.data import prepare, train_tokenizer
    from tests.helpers import tiny_model

    d = tmp_path_factory.mktemp("reliability")
    (d / "tok").mkdir()
    train_tokenizer(TEXT * 4, 300, d / "tok" / "tokenizer.json")
    with torch.device("cpu"):
        tiny_model(vocab=300).save_pretrained(d / "model", tokenizer_dir=d / "tok")
        tiny_model(vocab=64).save_pretrained(d / "small")
    (d / "corpus.txt").write_text("".join(TEXT))
    (d / "corpus2.txt").write_text("".join(TEXT[:3]))
    prepare([d / "corpus.txt", d / "corpus2.txt"], d / "data", tokenizer=d / "tok", val_fraction=0.3, workers=1,
            progress=False)
    (d / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin1"))
    (d / "empty.txt").write_text("")
    (d / "emptydir").mkdir()
    for ext in ("json", "toml"):
        (d / f"binary.{ext}").write_bytes(bytes(range(256)) * 4)
    for name, edit in (("trunc", None), ("badtype", {"hidden_size": "big"}), ("garbage", None)):
        (d / name).mkdir()
        for f in (d / "model").iterdir():
            (d / name / f.name).write_bytes(f.read_bytes())
        if name == "garbage":
            (d / name / "config.json").write_bytes(bytes(range(256)) * 4)
        elif edit is None:
            st = d / name / "model.safetensors"
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        else:
            cfg = json.loads((d / name / "config.json").read_text())
            (d / name / "config.json").write_text(json.dumps({**cfg, **edit}))
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "stuff").mkdir()
    (d / "stuff" / "notes.odt").write_text("mine")
    (d / "recipes").mkdir()
    (d / "recipes" / "a.toml").write_text("[train]\nsteps = 2\n")
    (d / "bad.toml").write_text("[train\nsteps = = 2\n")
    (d / "file").write_text("x")
    _chat_fixtures(d)
    paths = {"MODEL": "model", "SMALL": "small", "TOK": "tok", "DATA": "data", "CORPUS": "corpus.txt",
             "CORPUS2": "corpus2.txt", "LATIN1": "latin1.txt", "EMPTY": "empty.txt", "EMPTYDIR": "emptydir",
             "BINARY": "binary", "TRUNC": "trunc", "GARBAGE": "garbage", "BADTYPE": "badtype", "LLAMA": "llama",
             "STUFF": "stuff", "RECIPES": "recipes", "BADTOML": "bad.toml", "FILE": "file", "CHAT": "chat.jsonl",
             "NOASSIST": "noassist.jsonl", "BADROLE": "badrole.jsonl", "LONGCHAT": "long.jsonl",
             "SYSCHAT": "sys.jsonl", "BADJINJA": "bad.jinja", "RAISEJINJA": "raise.jinja", "ADAPTER": "adapter48"}
    assert set(paths) == set(FIXTURES)
    return {k: str(d / v) for k, v in paths.items()}


def _chat_fixtures(d: Path) -> None:
    """The fine-tuning fixtures of FIXTURES (CHAT ... ADAPTER)."""
    from deepseekmoe.model.lora import LoraConfig, apply_lora, save_adapter
    from tests.helpers import tiny_model

    def jsonl(name, *conversations):
        (d / name).write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))

    user, reply = ({"role": "user", "content": "Say it"}, {"role": "assistant", "content": "It."})
    jsonl("chat.jsonl", *[[{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]
                          for i in range(8)])
    jsonl("noassist.jsonl", [user])
    jsonl("badrole.jsonl", [{"role": "usr", "content": "hi"}, reply])
    jsonl("long.jsonl", [{"role": "user", "content": "word " * 300}, reply])
    jsonl("sys.jsonl", [{"role": "system", "content": "Be brief."}, user, reply])
    (d / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    (d / "raise.jinja").write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('system "
                                   "messages are not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    other = tiny_model(vocab=300, hidden_size=48)
    apply_lora(other, LoraConfig(r=4, alpha=8.0, dropout=0.0), seed=0)
    save_adapter(other, d / "adapter48")


def _argv(case: Case, env: dict[str, str], out: Path) -> list[str]:
    fill = {**env, "OUT": str(out), "XFF": "\udcff"}
    return [a.format(**fill) for a in shlex.split(case.argv)]


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c.argv.split()[0]}" for i, c in enumerate(CASES)])
def test_bad_input(case, env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = _argv(case, env, out)
    before = {p: sorted(Path(p).rglob("*")) if Path(p).is_dir() else None for p in env.values()}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin or b"")))
    monkeypatch.chdir(tmp_path)  # a command's default output (runs/...) lands here, checked below
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit 2 too, with usage
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith(f"deepseekmoe {argv[0]}: error: ")]
    assert len(errors) == 1, err
    assert case.message.format(**env) in errors[0], err
    assert not out.exists(), f"{out} was written"
    assert not (tmp_path / "runs").exists()
    after = {p: sorted(Path(p).rglob("*")) if Path(p).is_dir() else None for p in env.values()}
    assert after == before, "a fixture directory changed"


def _interrupt_on_call(n: int, real):
    """`real`, except that its n-th call runs and then raises KeyboardInterrupt (Ctrl-C mid-way)."""
    calls = []

    def wrapper(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return out
    return wrapper


@pytest.mark.parametrize("command", ["prepare", "convert"])
def test_ctrl_c_midway_leaves_nothing_half_written(command, env, tmp_path, capsys, monkeypatch):
    import importlib

    import safetensors.torch

    prepare_mod = importlib.import_module("deepseekmoe.data.prepare")
    if command == "prepare":
        (tmp_path / "big.txt").write_text("".join(TEXT) * 200)
        for knob in ("JOB_CHARS", "PIECE_CHARS"):  # several encoding jobs: stop after the 2nd
            monkeypatch.setattr(prepare_mod, knob, 2000)
        monkeypatch.setattr(prepare_mod, "_encode_job", _interrupt_on_call(2, prepare_mod._encode_job))
        argv = ["prepare", str(tmp_path / "big.txt"), "--out", str(tmp_path / "out"), "--tokenizer", env["TOK"],
                "--workers", "1", "--quiet", "--val-fraction", "0"]
    else:
        assert main(["convert", env["MODEL"], str(tmp_path / "native")]) == 0
        monkeypatch.setattr(safetensors.torch, "save_file", _interrupt_on_call(2, safetensors.torch.save_file))
        argv = ["convert", str(tmp_path / "native"), str(tmp_path / "out"), "--max-shard-size", "20KB"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"deepseekmoe {command}: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary left beside it


def render_table() -> str:
    rows = ["| # | command line | error line contains | exit |", "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        line = "deepseekmoe " + c.argv.replace("{XFF}", "\\xff")
        if c.stdin is not None:
            line = f"printf {shlex.quote(c.stdin.decode('latin1').encode('unicode_escape').decode())} | {line}"
        cells = [str(i), f"`{line}`", c.message, "2"]
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")  # GFM: \| inside a cell
    legend = "\n".join(f"- `{{{k}}}`: {v}" for k, v in FIXTURES.items())
    return f"{BEGIN}\n{legend}\n- `{{OUT}}`: a fresh path that must not appear\n\n" + "\n".join(rows) + f"\n{END}"


def test_doc_table_is_the_case_list():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC}: the generated case table is missing"
    got = text[text.index(BEGIN): text.index(END) + len(END)]
    assert got == render_table(), "docs/reliability.md differs from CASES: run python tests/test_reliability_inputs.py"
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_gives_every_option_a_help_and_states_defaults_once(name, capsys):
    import argparse
    import importlib

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for argv, p in [([name], parser)] + [([name, n], sp) for a in subs for n, sp in a.choices.items()]:
        options = [a for a in p._actions if not isinstance(a, argparse._SubParsersAction)]
        silent = [a.dest for a in options if not a.help]
        assert not silent, f"deepseekmoe {' '.join(argv)}: no help for {silent}"
        twice = [a.dest for a in options if HelpFormatter("x")._expand_help(a).lower().count("default") > 1]
        assert not twice, f"deepseekmoe {' '.join(argv)}: the default is stated twice for {twice}"
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
        for noise in ("(default: None)", "(default: False)", "(default: [])"):
            assert noise not in text, f"deepseekmoe {' '.join(argv)} --help: {noise}"


def test_top_level_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom deepseekmoe.cli import main\nfor a in (['--help'], ['--version']):\n"
            "    try:\n        main(a)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: deepseekmoe" in r.stdout and "deepseekmoe 0." in r.stdout


if __name__ == "__main__":
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN)] + render_table() + text[text.index(END) + len(END):])
    print(f"wrote {DOC}: {len(CASES)} cases")
