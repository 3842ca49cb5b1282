"""Generation: KV-cache greedy decoding equals argmax by full re-forward for batched prompts of
different lengths; the decode-time `gather` expert backend agrees with the loop reference;
sampling filters; eos / stop strings; the chat template; the decode step traces as one graph;
the generate / chat / convert command lines.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from deepseekmoe import Transformer, cli
from deepseekmoe.inference.generate import (
    Decoder,
    chat_ids,
    chat_text_segments,
    expert_backend,
    generate,
    generate_ids,
    sample_next,
)
from deepseekmoe.model.moe.experts import experts_gather, experts_loop, resolve_backend
from tests.helpers import rel_err, tiny_model

PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]


def reforward_greedy(model, prompt, n):
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    return [reforward_greedy(model, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("decode_backend", ["gather", "grouped", "loop"])
def test_cached_greedy_equals_full_reforward(model, reference, decode_backend):
    got = generate_ids(model, PROMPTS, 10, decode_backend=decode_backend)
    assert got == reference
    # Each row alone (no padding) gives the same tokens as in the batch.
    assert generate_ids(model, PROMPTS[1:2], 10) == reference[1:2]


def test_default_decode_backend_is_gather_for_compiled_small_batches(model):
    assert Decoder(model, 4, 16, mode="compile").decode_backend == "gather"  # 4 x 2 slots <= 8 experts
    assert Decoder(model, 5, 16, mode="compile").decode_backend is None  # 10 slots: the model's own
    assert Decoder(model, 1, 16).decode_backend is None  # uncompiled gather copies weights: slower


def test_gather_backend_matches_loop():
    g = torch.Generator().manual_seed(0)
    T, K, E, D, F = 7, 3, 6, 16, 8
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g, requires_grad=True)
    w2 = torch.randn(E, D, F, generator=g, requires_grad=True)
    ref = experts_loop(x, idx, w, w13, w2)
    out = experts_gather(x, idx, w, w13, w2)
    assert resolve_backend("gather", x.device) is experts_gather
    assert rel_err(out, ref) < 1e-6
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, w13, w2))
    grads = torch.autograd.grad(out.square().sum(), (x, w13, w2))
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-6


def test_decode_step_traces_as_one_graph(model):
    import torch._dynamo

    dec = Decoder(model, 2, 32, decode_backend="gather")
    dec.prefill(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([0, 1]))
    dec.tokens_B1.copy_(torch.tensor([[3], [4]]))
    torch._dynamo.reset()
    with expert_backend(model, "gather"):
        explained = torch._dynamo.explain(dec._step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits[:2]).tolist() == [1, 1]
    assert set(sample_next(logits, 1.0, top_k=1, generator=g).tolist()) == {1}
    top3 = sample_next(logits, 1.0, top_k=3, generator=g)
    assert set(top3.tolist()) == {1, 2, 3}
    # top_p = 0.8: probs 0.64, 0.24, 0.09, ... -> the nucleus is {1, 3} (0.64 < 0.8 <= 0.88).
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {1, 3}
    # Plain sampling follows softmax(logits / T).
    freq = torch.bincount(sample_next(logits, 2.0, generator=g), minlength=5).float() / 4000
    assert (freq - torch.softmax(logits[0] / 2.0, -1)).abs().max().item() < 0.03
    a = sample_next(logits[:50], 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits[:50], 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_eos_stops_each_row(model, reference):
    eos = reference[0][4]
    got = generate_ids(model, PROMPTS, 10, eos_token_id=eos)
    for row, ref in zip(got, reference):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)


def test_sampled_generation_is_seeded(model):
    a = generate_ids(model, PROMPTS, 6, temperature=1.0, top_p=0.9, seed=3)
    b = generate_ids(model, PROMPTS, 6, temperature=1.0, top_p=0.9, seed=3)
    assert a == b and all(len(r) == 6 for r in a)


def test_errors_are_clear(model):
    from deepseekmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="max_position_embeddings=96"):
        generate_ids(model, [[1] * 90], 10)
    with pytest.raises(ConfigError, match="at least one token"):
        generate_ids(model, [[]], 3)


# ---------------------------------------------------------------------- text, chat, CLI
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["User: hello there\n\nAssistant: general kenobi"] * 20, trainer)
    return tk


def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert chat_text_segments(msgs) == ["Be brief.\n\nUser: hi\n\nAssistant: hello", None,
                                        "User: again\n\nAssistant:"]
    ids = chat_ids(tokenizer, msgs, 0, 1)
    # Same ids as encoding the rendered string with bos/eos as special tokens (what HF does).
    rendered = "Be brief.\n\nUser: hi\n\nAssistant: hello<|eos|>User: again\n\nAssistant:"
    assert ids == [0] + tokenizer.encode(rendered, add_special_tokens=False).ids
    assert ids.count(1) == 1 and tokenizer.decode(ids[1:], skip_special_tokens=False) == rendered


def test_text_generation_stop_and_stream(tokenizer, capsys):
    model = tiny_model(vocab=300)
    prompt = "User: hello"
    full = generate(model, tokenizer, prompt, max_new_tokens=12)
    ids = [0] + tokenizer.encode(prompt, add_special_tokens=False).ids
    assert full == tokenizer.decode(reforward_greedy(model, ids, 12))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = generate(model, tokenizer, prompt, max_new_tokens=12, stop=[stop], stream=True)
    assert cut == full[: full.index(stop)]
    assert capsys.readouterr().out == cut
    batch = generate(model, tokenizer, [prompt, "Assistant: general"], max_new_tokens=12)
    assert batch[0] == full


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ckpt")
    src = d / "tok"
    src.mkdir()
    tokenizer.save(str(src / "tokenizer.json"))
    tiny_model(vocab=300).save_pretrained(d / "hf", tokenizer_dir=src)
    return d


def _cli(argv, stdin="", monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli.main(argv)


def test_generate_cli(checkpoint, capsys, tokenizer):
    model = Transformer.from_pretrained(checkpoint / "hf")
    expect = generate(model, tokenizer, ["User: hello", "Assistant"], max_new_tokens=8)
    capsys.readouterr()
    assert _cli(["generate", "--model", str(checkpoint / "hf"), "--prompt", "User: hello", "--prompt",
                 "Assistant", "--max-new-tokens", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["completion"] for g in got] == expect
    assert _cli(["generate", "--model", str(checkpoint / "hf"), "--prompt", "User: hello",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expect[0] + "\n"


def test_chat_cli(checkpoint, capsys, monkeypatch, tokenizer):
    model = Transformer.from_pretrained(checkpoint / "hf")
    ids = chat_ids(tokenizer, [{"role": "user", "content": "hello there"}], 0, 1)
    reply = generate(model, tokenizer, "", prompt_ids=[ids], max_new_tokens=6).lstrip()
    capsys.readouterr()
    rc = _cli(["chat", "--model", str(checkpoint / "hf"), "--max-new-tokens", "6"],
              "hello there\n/reset\nhello there\n/exit\n", monkeypatch)
    assert rc == 0
    assert capsys.readouterr().out == f"Assistant: {reply}\n" * 2


def test_convert_cli_both_ways(checkpoint, capsys):
    hf_dir = checkpoint / "hf"
    assert _cli(["convert", str(hf_dir), str(checkpoint / "native")]) == 0
    assert "native" in capsys.readouterr().out
    # A training checkpoint folder holding the native dir as model/ is accepted too.
    (checkpoint / "run").mkdir()
    (checkpoint / "native").rename(checkpoint / "run" / "model")
    assert _cli(["convert", str(checkpoint / "run"), str(checkpoint / "back"), "--tokenizer",
                 str(checkpoint / "tok"), "--dtype", "bf16"]) == 0
    a, b = Transformer.from_pretrained(hf_dir), Transformer.from_pretrained(checkpoint / "back")
    assert (checkpoint / "back" / "tokenizer.json").is_file()
    assert b.lm_head.weight.dtype == torch.bfloat16
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p.to(torch.bfloat16), q), n
    assert _cli(["convert", str(checkpoint / "run"), str(checkpoint / "again")]) == 0
    c = Transformer.from_pretrained(checkpoint / "again")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for argv in (["convert", str(bad), str(tmp_path / "out")],
                 ["generate", "--model", str(bad), "--prompt", "x"],
                 ["convert", str(checkpoint / "hf"), str(checkpoint / "hf")],
                 ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err, err
    assert not (tmp_path / "out").exists()


def test_generate_cli_takes_every_cpu_backend_its_help_lists(checkpoint, capsys):
    from deepseekmoe.model.config import EXPERT_BACKENDS

    base = ["generate", "--model", str(checkpoint / "hf"), "--prompt", "User: hello", "--max-new-tokens", "6",
            "--no-stream"]
    assert _cli(base) == 0
    expect = capsys.readouterr().out
    for backend in EXPERT_BACKENDS:
        if backend == "triton":  # CUDA kernels: on CPU, one line (a case of test_reliability_inputs)
            continue
        assert _cli(base + ["--expert-backend", backend]) == 0, backend
        assert capsys.readouterr().out == expect, backend


def test_chat_asks_again_after_a_line_that_is_not_utf8(checkpoint, capsys, monkeypatch):
    """At a terminal a mistyped byte costs the line, not the conversation (piped input: exit 2, a
    case of test_reliability_inputs)."""
    args = ["chat", "--model", str(checkpoint / "hf"), "--max-new-tokens", "6"]
    assert _cli(args, "hello there\n/exit\n", monkeypatch) == 0
    expect = capsys.readouterr().out
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xff\nhello there\n/exit\n"))
    monkeypatch.setattr(stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(args) == 0
    got = capsys.readouterr()
    assert "(stdin line 1: not valid UTF-8 text (byte 0xff at offset 3)" in got.err
    assert "type the message again)" in got.err
    assert got.out == "User: User: " + expect + "User: "
