"""Evaluation: continuation log-likelihoods against a direct forward (padding, truncation), the
benchmark loaders + scoring on small fake files of every format (the chosen option is the argmax
of independently computed log-likelihoods), LAMBADA, exact-match extraction, LM loss / bits per
byte on a prepared split and on raw text, the lm-eval adapter without lm-eval, and the command
line's errors and outputs.
"""

from __future__ import annotations

import bz2
import json
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepseekmoe import Transformer, cli
from deepseekmoe.data import prepare, train_tokenizer
from deepseekmoe.errors import ConfigError, DataError, UserError
from deepseekmoe.eval import Scorer, eval_prepared, eval_text, harness, run_tasks
from deepseekmoe.eval.scoring import mc_predictions
from deepseekmoe.eval.tasks import TASKS, gsm8k_answers, load_race_middle, normalize_answer
from tests.helpers import tiny_model

WORDS = ("the cat sat on a mat while dogs ran far away from home and birds sang in tall green trees "
         "water boils at high heat so cook the rice then eat it with fish or beans").split()
CORPUS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) + "." for i in range(30)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, num_hidden_layers=2, n_routed_experts=6, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def scorer(model, tok):
    return Scorer(model, tok, prefix_id=tok.eos_id, batch_size=3, progress=False)


@torch.no_grad()
def ref_ll(model, ctx_ids, cont_ids):
    """Summed log p(cont | ctx) and greedy flag from one plain forward of ctx + cont."""
    lp = model(torch.tensor([ctx_ids + cont_ids])).logits[0].double().log_softmax(-1)
    pos = range(len(ctx_ids) - 1, len(ctx_ids) - 1 + len(cont_ids))
    ll = sum(float(lp[p, t]) for p, t in zip(pos, cont_ids))
    return ll, all(int(lp[p].argmax()) == t for p, t in zip(pos, cont_ids))


def ref_pair(model, tok, ctx, cont):
    return ref_ll(model, [tok.eos_id] + tok.encode(ctx), tok.encode(cont))


# ---------------------------------------------------------------------- scoring primitives
def test_loglikelihood_matches_direct_forward_with_padding(model, tok, scorer):
    pairs = [("the cat sat on", " a mat"), ("water", " boils at high heat"), ("so cook the rice then eat it with",
             " fish"), ("birds sang in tall", " green trees and dogs ran")]
    got = scorer.loglikelihood(pairs)  # batch 3: the rows of different lengths are right-padded
    for (c, x), (ll, greedy) in zip(pairs, got):
        ref, ref_greedy = ref_pair(model, tok, c, x)
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_continuation_tokenised_as_in_the_whole_string(scorer, tok):
    ctx, cont = scorer.encode_pair("the cat sat ", "on a mat")  # the trailing space moves over
    assert ctx == [tok.eos_id] + tok.encode("the cat sat")
    assert cont == tok.encode(" on a mat")


def test_long_context_loses_its_beginning(model, tok):
    s = Scorer(model, tok, tok.eos_id, batch_size=2, max_length=12, progress=False)
    ctx, cont = " ".join(CORPUS[:2]), " green trees"
    ids = [tok.eos_id] + tok.encode(ctx) + tok.encode(cont)
    n = len(tok.encode(cont))
    (ll, _), = s.loglikelihood([(ctx, cont)])
    window = ids[-13:]  # 12 inputs + the last target
    ref, _ = ref_ll(model, window[:-n], window[-n:])
    assert ll == pytest.approx(ref, abs=1e-4)


def test_greedy_generation_equals_full_reforward(model, tok, scorer):
    prompt = "the cat sat on"
    ids = [tok.eos_id] + tok.encode(prompt)
    ref = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + ref])).logits[0, -1].argmax())
            ref.append(nxt)
    out = scorer.generate([prompt, "water boils"], max_new_tokens=6)  # batched: left padding in the decoder
    assert out[0] == tok.decode(ref[: ref.index(tok.eos_id)] if tok.eos_id in ref else ref)


# ---------------------------------------------------------------------- benchmark files
def make_benchmarks(root):
    """A few items of every task in its published on-disk format."""
    def jl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    hs = [("Cooking: a man boils water. he", 2, ["sat on a mat", "ran far away", "cooks the rice", "sang in trees"]),
          ("Birds: birds sang in the trees. they", 0, ["sang more", "boil water", "eat fish", "sat on cats"]),
          ("Dogs: the dog ran home. it", 1, ["ate the mat", "sat down", "boils", "is green"])]
    (root / "hellaswag").mkdir(parents=True)
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        for ctx, y, ends in hs:
            f.write("\n".join([ctx, str(y), *ends]) + "\n")
    piqa = [{"goal": "cook the rice", "sol1": "boil water then add rice", "sol2": "eat the mat"},
            {"goal": "stay dry", "sol1": "sit in water", "sol2": "sit at home"},
            {"goal": "feed a cat", "sol1": "give it fish", "sol2": "give it trees"}]
    jl(root / "piqa" / "valid.jsonl", piqa)
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    arc = [{"id": "a", "question": "What boils at high heat?", "choices": {"text": ["water", "a mat", "green"],
            "label": ["A", "B", "C"]}, "answerKey": "A"},
           {"id": "b", "question": "Where do birds sing?", "choices": {"text": ["in rice", "in trees", "on fish",
            "at cats"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}]
    jl(root / "arc_easy" / "ARC-Easy-test.jsonl", arc)
    jl(root / "arc_challenge" / "ARC-Challenge-test.jsonl", arc[::-1])
    wg = [{"qID": "1", "sentence": "The cat sat on the mat because _ was soft.", "option1": "the cat",
           "option2": "the mat", "answer": "2"},
          {"qID": "2", "sentence": "Dogs ran from birds since _ were loud.", "option1": "dogs", "option2": "birds",
           "answer": "2"}]
    jl(root / "winogrande" / "dev.jsonl", wg)
    race = [{"example_id": f"m{i}", "article": f"The cat sat on a mat. Story {i}.",
             "question": "Where did the cat sit?", "options": ["on a mat", "in water", "in trees", "far away"],
             "answer": "A"} for i in range(3)]
    jl(root / "race_middle" / "test_middle.jsonl", race)
    jl(root / "race_middle" / "validation_middle.jsonl",
       [dict(r, article=f"Birds sang. Tale {i}.", answer="C") for i, r in enumerate(race)])
    for split, n in (("dev", 5), ("test", 3)):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        for sub in ("cooking", "zoology_basics"):
            rows = [f"\"{split} {sub} item {i}, sat or ran?\",water,rice,fish,trees,{'ABCD'[i % 4]}" for i in range(n)]
            (root / "mmlu" / split / f"{sub}_{split}.csv").write_text("\n".join(rows) + "\n")
    jl(root / "lambada" / "lambada_openai.jsonl",
       [{"context": "the cat sat on a", "continuation": "mat"}, {"context": "birds sang in tall green",
                                                                "continuation": "trees"}])
    jl(root / "triviaqa_sample" / "triviaqa_sm_sub.jsonl",
       [{"context": f"Question: what item {i} boils?\nAnswer:", "answer": "Water", "aliases": ["Water", "H2O"]}
        for i in range(6)])
    jl(root / "nq_open" / "NQ-open.dev.jsonl", [{"question": f"where do birds sing {i}", "answer": ["in trees",
                                                  "trees"]} for i in range(6)])
    jl(root / "gsm8k" / "test.jsonl", [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
                                       for i in range(10)])
    return {"hellaswag": hs, "piqa": piqa, "arc": arc, "winogrande": wg}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, make_benchmarks(root)


def _expected_mc(model, tok, docs):
    """docs: (contexts, continuations, gold) -> (preds, preds_norm, preds_bytes, lls) by plain forwards;
    the norms divide by the choice without the continuation's leading space, as lm-eval does."""
    preds, preds_n, preds_b, lls = [], [], [], []
    for ctxs, conts, _ in docs:
        ll = [ref_pair(model, tok, c, x)[0] for c, x in zip(ctxs, conts)]
        preds.append(int(np.argmax(ll)))
        assert all(x.startswith(" ") for x in conts)
        preds_n.append(int(np.argmax([v / len(x[1:]) for v, x in zip(ll, conts)])))
        preds_b.append(int(np.argmax([v / len(x[1:].encode()) for v, x in zip(ll, conts)])))
        lls.append(ll)
    return preds, preds_n, preds_b, lls


def test_multiple_choice_tasks_choose_the_argmax_of_direct_loglikelihoods(model, tok, scorer, bench):
    root, raw = bench
    hs, piqa, arc, wg = raw["hellaswag"], raw["piqa"], raw["arc"], raw["winogrande"]
    labels = [0, 1, 0]
    expect = {
        "hellaswag": [([c] * 4, [" " + e for e in ends], y) for c, y, ends in hs],
        "piqa": [([f"Question: {r['goal']}\nAnswer:"] * 2, [" " + r["sol1"], " " + r["sol2"]], y)
                 for r, y in zip(piqa, labels)],
        "arc_easy": [([f"Question: {r['question']}\nAnswer:"] * len(r["choices"]["text"]),
                      [" " + t for t in r["choices"]["text"]], r["choices"]["label"].index(r["answerKey"]))
                     for r in arc],
        # WinoGrande partial scoring: the option fills the blank in the context; the rest is scored.
        "winogrande": [([r["sentence"].split("_")[0] + o for o in (r["option1"], r["option2"])],
                        [" " + r["sentence"].split("_")[1].strip()] * 2, int(r["answer"]) - 1) for r in wg],
    }
    res = run_tasks(scorer, list(expect), root, log_samples=True)
    for name, docs in expect.items():
        preds, preds_n, preds_b, lls = _expected_mc(model, tok, docs)
        r = res[name]
        assert [s["pred"] for s in r["samples"]] == preds, name
        for s, ll in zip(r["samples"], lls):
            assert s["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
        golds = [g for _, _, g in docs]
        assert r["acc"] == pytest.approx(np.mean([p == g for p, g in zip(preds, golds)]))
        assert r["n"] == len(docs) and r["chance"] == pytest.approx(np.mean([1 / len(c) for c, _, _ in docs]))
        if name == "winogrande":
            assert "acc_norm" not in r
        else:
            assert r["acc_norm"] == pytest.approx(np.mean([p == g for p, g in zip(preds_n, golds)]))
            assert r["acc_bytes"] == pytest.approx(np.mean([p == g for p, g in zip(preds_b, golds)]))


def test_mc_predictions_divide_by_the_choice_as_lm_eval():
    # " a" / " bcd": per character of the choice -2/1 < -5/3, so acc_norm picks 1 where acc picks 0
    # (with the leading space counted it would be -2/2 > -5/4, picking 0).
    assert mc_predictions([-2.0, -5.0], [" a", " bcd"]) == (0, 1, 1)
    # " é" is 1 character but 2 bytes: per character -3/1 < -4/2 (1), per byte -3/2 > -4/2 (0).
    assert mc_predictions([-3.0, -4.0], [" é", " bc"]) == (0, 1, 0)
    # A continuation without the delimiter is measured whole; ties go to the first choice.
    assert mc_predictions([-3.0, -2.0], ["ab", " c"]) == (1, 0, 0)  # -3/2 > -2/1 (-3/1 would not be)
    assert mc_predictions([-2.0, -2.0], [" ab", " cd"]) == (0, 0, 0)


def test_mmlu_five_shot_prompt_and_letter_scoring(model, tok, scorer, bench):
    root, _ = bench
    res = run_tasks(scorer, ["mmlu"], root, log_samples=True)["mmlu"]
    assert res["shots"] == 5 and res["n"] == 6 and set(res["groups"]) == {"cooking", "zoology_basics"}
    docs = TASKS["mmlu"].load(root, 5, 0)
    opts = "\nA. water\nB. rice\nC. fish\nD. trees\nAnswer:"
    shots = "".join(f"dev cooking item {i}, sat or ran?{opts} {'ABCD'[i % 4]}\n\n" for i in range(5))
    assert docs[0].contexts[0] == ("The following are multiple choice questions (with answers) about cooking.\n\n"
                                   + shots + f"test cooking item 0, sat or ran?{opts}")
    assert docs[3].contexts[0].startswith("The following are multiple choice questions (with answers) about "
                                          "zoology basics.\n\ndev zoology_basics item 0")
    assert [d.continuations for d in docs[:1]] == [[" A", " B", " C", " D"]] and [d.gold for d in docs] == [0, 1, 2] * 2
    preds, *_ = _expected_mc(model, tok, [(d.contexts, d.continuations, d.gold) for d in docs])
    assert [s["pred"] for s in res["samples"]] == preds
    assert res["acc_macro"] == pytest.approx(np.mean([g["acc"] for g in res["groups"].values()]))
    # A limit takes documents round-robin over subjects.
    lim = harness._limit_docs(docs, 2, True)
    assert [d.group for d in lim] == ["cooking", "zoology_basics"]


def test_race_exemplars_come_from_the_validation_split(bench):
    root, _ = bench
    docs = load_race_middle(root, 2, 1234)
    ctx = docs[0].contexts[0]
    assert ctx.count("Article:") == 3 and ctx.count("Birds sang. Tale") == 2
    assert ctx.count("Answer: in trees\n\n") == 2  # exemplars carry their gold option (C)
    assert ctx.endswith("Article: The cat sat on a mat. Story 0.\n\nQuestion: Where did the cat sit?\nAnswer:")


def test_lambada_accuracy_and_perplexity(model, tok, scorer, bench):
    root, _ = bench
    r = run_tasks(scorer, ["lambada"], root)["lambada"]
    refs = [ref_pair(model, tok, "the cat sat on a", " mat"),
            ref_pair(model, tok, "birds sang in tall green", " trees")]
    assert r["acc"] == np.mean([g for _, g in refs])
    assert r["ppl"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in refs])), rel=1e-4)


def test_generation_tasks_exact_match(scorer, bench, monkeypatch):
    root, _ = bench
    seen = {}

    def fake_generate(prompts, max_new_tokens, stop=(), desc=""):
        seen[desc] = (prompts, max_new_tokens, tuple(stop))
        if desc == "gsm8k":
            return ["0 + 2 = 2\n#### 2", "so the answer is 3", "#### 5", "1,000"][: len(prompts)]
        return [" the Water!\nQuestion: more", " H2O", " fire"][: len(prompts)] if desc == "triviaqa" else \
            [" in trees.", "Trees", " birds"][: len(prompts)]

    monkeypatch.setattr(scorer, "generate", fake_generate)
    res = run_tasks(scorer, ["triviaqa", "nq_open", "gsm8k"], root, limit=3, log_samples=True)
    assert res["triviaqa"]["em"] == pytest.approx(2 / 3) and res["nq_open"]["em"] == pytest.approx(2 / 3)
    res_g = run_tasks(scorer, ["gsm8k"], root, limit=4)["gsm8k"]
    assert res_g["em"] == pytest.approx(1 / 4) and res_g["em_flexible"] == pytest.approx(2 / 4)
    prompts, max_new, stop = seen["gsm8k"]
    assert max_new == 256 and stop == ("\n\n", "Question:")
    for i, p in enumerate(prompts):  # 8 exemplars, never the question being asked
        assert p.count("Question:") == 9 and p.count(f"What is {i} + 2?") == 1
        assert p.endswith(f"What is {i} + 2?\nAnswer:")
    tq = seen["triviaqa"][0][0]
    assert tq.count("Question:") == 6 and tq.endswith("Question: what item 0 boils?\nAnswer:")


def test_answer_normalisation_and_number_extraction():
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("an apple a day") == "apple day"
    assert gsm8k_answers("so 3 + 4 = 7\n#### 1,234") == ("1234", "1234")
    assert gsm8k_answers("it is 7.50 dollars.") == (None, "7.5")
    assert gsm8k_answers("no number") == (None, None)


def test_task_names_and_data_checks(tmp_path, bench):
    assert harness.resolve_tasks("lm,nq,arc_e,paper")[:3] == ["lm", "nq_open", "arc_easy"]
    with pytest.raises(UserError, match="did you mean 'hellaswag'"):
        harness.resolve_tasks("hellaswg")
    with pytest.raises(DataError, match="--data-dir"):
        harness.check_data(["piqa"], None)
    with pytest.raises(DataError, match="valid-labels.lst"):
        (tmp_path / "piqa").mkdir()
        (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
        harness.check_data(["piqa"], tmp_path)
    assert harness.check_data(["lm"], None) is None


# ---------------------------------------------------------------------- language modelling
@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("lm")
    (d / "train.txt").write_text("\n".join(CORPUS[:20]))
    (d / "val.txt").write_text("\n".join(CORPUS[20:]))
    tok.save(d / "tokenizer.json")
    return prepare([d / "train.txt"], d / "prepared", tokenizer=d / "tokenizer.json", val_inputs=[d / "val.txt"],
                   workers=1, progress=False)


@torch.no_grad()
def _window_loss(model, seq, S):
    nll, n = 0.0, 0
    for a in range(0, len(seq) - 1, S - 1):
        piece = torch.tensor([seq[a:a + S]])
        if piece.shape[1] < 2:
            continue
        lp = model(piece).logits[0, :-1].double().log_softmax(-1)
        nll -= float(lp.gather(-1, piece[0, 1:, None]).sum())
        n += piece.shape[1] - 1
    return nll, n


def test_lm_loss_and_bits_per_byte_on_a_prepared_split(model, scorer, dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    val = np.concatenate([np.fromfile(dataset / s, dtype=meta["dtype"]) for s in meta["splits"]["val"]["shards"]])
    S = 32
    n_win = (len(val) - 1) // (S - 1)
    nll, n = 0.0, 0
    for w in range(n_win):  # whole windows only, overlapping by one token (as the trainer's val)
        a, b = _window_loss(model, val[w * (S - 1): w * (S - 1) + S].astype(np.int64).tolist(), S)
        nll, n = nll + a, n + b
    r = eval_prepared(scorer, dataset, "val", seq_len=S)
    assert r.tokens == n and r.loss == pytest.approx(nll / n, rel=1e-5)
    info = meta["splits"]["val"]
    assert r.bpb == pytest.approx(nll / n * info["tokens"] / info["bytes"] / math.log(2), rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert eval_prepared(scorer, dataset, "val", seq_len=S, limit=3).tokens == 3 * (S - 1)


def test_lm_on_raw_text_scores_every_token_once(model, tok, tmp_path):
    texts = [CORPUS[0] + "\n" + CORPUS[1], "water boils"]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": texts[1]}) + "\n")
    s = Scorer(model, tok, tok.eos_id, batch_size=2, max_length=16, progress=False)
    r = eval_text(s, [tmp_path / "a.txt", tmp_path / "b.jsonl"])
    nll, n = 0.0, 0
    for t in texts:
        a, b = _window_loss(model, [tok.eos_id] + tok.encode(t), 16)
        nll, n = nll + a, n + b
    assert r.tokens == n == sum(len(tok.encode(t)) for t in texts)
    assert r.loss == pytest.approx(nll / n, rel=1e-5)
    assert r.bytes == sum(len(t.encode()) for t in texts)
    assert r.bpb == pytest.approx(nll / math.log(2) / r.bytes, rel=1e-5)


def test_dataset_from_another_tokenizer_is_refused(scorer, dataset, tmp_path):
    other = train_tokenizer(["completely different words here zebra quartz"] * 5, 270)
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="vocabulary differs"):
        eval_prepared(scorer, dataset, "val", seq_len=16, tokenizer_dir=tmp_path)


# ---------------------------------------------------------------------- lm-eval adapter
def _req(*args):
    return SimpleNamespace(args=args)


def test_lm_eval_adapter_answers_the_three_request_kinds(model, tok, scorer):
    from deepseekmoe.eval.lm_eval_adapter import DeepSeekMoEEvalLM

    lm = DeepSeekMoEEvalLM(model=model, tokenizer=tok, prefix_id=tok.eos_id, batch_size="4", progress=False)
    got = lm.loglikelihood([_req("the cat sat on", " a mat"), _req("water", " boils")])
    assert got[0][0] == pytest.approx(ref_pair(model, tok, "the cat sat on", " a mat")[0], abs=1e-4)
    assert got[1][1] == ref_pair(model, tok, "water", " boils")[1]
    (roll,) = lm.loglikelihood_rolling([_req(CORPUS[3])])
    ids = [tok.eos_id] + tok.encode(CORPUS[3])
    assert roll == pytest.approx(-_window_loss(model, ids, 1024)[0], abs=1e-3)
    outs = lm.generate_until([_req("the cat", {"until": ["\n"], "max_gen_toks": 5}), _req("birds", {"until": "."})])
    assert outs[0] == scorer.generate(["the cat"], 5, ["\n"])[0]
    assert outs[1] == scorer.generate(["birds"], 256, ["."])[0]
    with pytest.raises(UserError, match="greedy"):
        lm.generate_until([_req("x", {"do_sample": True, "temperature": 0.7})])


def test_lm_eval_adapter_without_and_with_lm_eval(model, tok, monkeypatch):
    from deepseekmoe.eval import lm_eval_adapter as A

    monkeypatch.setattr(A, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match="pip install"):
        A.make_lm(model=model, tokenizer=tok)
    # A stand-in lm_eval with an abstract LM base, as the real one has.
    import abc

    class LM(abc.ABC):
        def __init__(self):
            self.rank = 0

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

    registry = types.ModuleType("lm_eval.api.registry")
    registry.MODEL_REGISTRY = {}
    registry.register_model = lambda name: (lambda cls: registry.MODEL_REGISTRY.setdefault(name, cls))
    mods = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
            "lm_eval.api.model": types.ModuleType("lm_eval.api.model"), "lm_eval.api.registry": registry}
    mods["lm_eval.api.model"].LM = LM
    mods["lm_eval.api"].registry = registry
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    lm = A.make_lm(model=model, tokenizer=tok, prefix_id=tok.eos_id, progress=False)
    assert isinstance(lm, LM) and lm.rank == 0 and lm.max_length == 1024
    assert A.register() is type(lm) and registry.MODEL_REGISTRY["deepseekmoe"] is type(lm)


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tok):
    d = tmp_path_factory.mktemp("ckpt")
    tok.save(d / "tok" / "tokenizer.json")
    model.save_pretrained(d / "hf", tokenizer_dir=d / "tok")
    return d / "hf"


def _one_line_error(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    for n in needles:
        assert n in err, err


def test_cli_errors_are_one_line_before_loading(checkpoint, bench, tmp_path, capsys):
    root, _ = bench
    base = ["eval", "--model", str(checkpoint)]
    _one_line_error(capsys, base + ["--tasks", "hellaswg", "--data-dir", str(root)], "did you mean 'hellaswag'")
    _one_line_error(capsys, base + ["--tasks", "piqa"], "--data-dir")
    _one_line_error(capsys, base + ["--tasks", "piqa", "--data-dir", str(tmp_path / "none")], "no such directory")
    _one_line_error(capsys, base + ["--tasks", "lm", "--lm-data", str(tmp_path / "none")], "no such dataset")
    _one_line_error(capsys, ["eval", "--model", str(tmp_path / "none"), "--tasks", "piqa", "--data-dir", str(root)],
                    "no such checkpoint")


def test_cli_runs_tasks_and_writes_json(checkpoint, tok, bench, tmp_path, capsys):
    root, _ = bench
    (tmp_path / "doc.txt").write_text(CORPUS[5])
    out = tmp_path / "res.json"
    rc = cli.main(["eval", "--model", str(checkpoint), "--tasks", "lm,piqa,lambada", "--data-dir", str(root),
                   "--lm-text", str(tmp_path / "doc.txt"), "--limit", "2", "--batch-size", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert list(rep["results"]) == ["lm", "piqa", "lambada"]
    assert rep["results"]["piqa"]["n"] == 2 and rep["settings"]["prefix_id"] == 1  # eos: add_bos_token false
    assert "piqa" in printed and str(out) in printed
    loaded = Transformer.from_pretrained(checkpoint)
    ref = [ref_pair(loaded, tok, "the cat sat on a", " mat")[0],
           ref_pair(loaded, tok, "birds sang in tall green", " trees")[0]]
    assert rep["results"]["lambada"]["ppl"] == pytest.approx(math.exp(-np.mean(ref)), rel=1e-4)
    assert cli.main(["eval", "--model", str(checkpoint), "--tasks", "piqa", "--data-dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["piqa"]["n"] == 3


def test_scorer_argument_errors(model, tok):
    with pytest.raises(ConfigError, match="batch-size"):
        Scorer(model, tok, 1, batch_size=0)
    s = Scorer(model, tok, 1, max_length=8, progress=False)
    with pytest.raises(ConfigError, match="no room"):
        s.generate(["x"], max_new_tokens=8)


def test_prefix_token_follows_the_tokenizer_config(model, tok, tmp_path):
    from deepseekmoe.eval import default_prefix

    assert default_prefix(model, tok, tmp_path) == tok.eos_id  # packed training data: docs follow an eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert default_prefix(model, tok, tmp_path) == tok.bos_id == 0  # released models: bos first
    assert default_prefix(model, tok, tmp_path, "eos") == tok.eos_id
    with pytest.raises(ConfigError, match="--prefix"):
        default_prefix(model, tok, tmp_path, "pad")


def test_prefix_from_a_malformed_tokenizer_config_is_an_error(model, tok, tmp_path):
    from deepseekmoe.eval import default_prefix

    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": tru')
    with pytest.raises(DataError, match=r"tokenizer_config.json: unreadable .*--prefix bos\|eos"):
        default_prefix(model, tok, tmp_path)
    assert default_prefix(model, tok, tmp_path, "eos") == tok.eos_id  # an explicit choice never reads it
