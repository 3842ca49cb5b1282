"""HumanEval and MBPP: the canonical solutions pass in the sandbox (164/164, 500/500), wrong and
too-slow solutions fail, the pass@k estimator against hand values, the prompts' shape, and a tiny
model end to end through `deepseekmoe eval --tasks humaneval,mbpp`, plus the command's up-front
checks (sampling flags, --max-length, --out).

The problems are the team's copies beside the clone (`<repo>/../shared/data/eval/humaneval`,
`.../mbpp`); without them the data-dependent tests skip, saying where they looked.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest

from deepseekmoe import cli
from deepseekmoe.data import train_tokenizer
from deepseekmoe.errors import ConfigError
from deepseekmoe.eval import Scorer
from deepseekmoe.eval.code import CodeSettings, execute, load_humaneval, load_mbpp, pass_at_k
from deepseekmoe.eval.harness import format_table, run_task
from tests.helpers import tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
needs_data = pytest.mark.skipif(not (DATA / "humaneval" / "HumanEval.jsonl.gz").is_file()
                                or not (DATA / "mbpp" / "mbpp.jsonl").is_file(),
                                reason=f"HumanEval / MBPP not found under {DATA} (humaneval/HumanEval.jsonl.gz, "
                                       "mbpp/mbpp.jsonl)")
WORKERS = os.cpu_count() or 2


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval(DATA, 0, 0)


@pytest.fixture(scope="module")
def mbpp():
    return load_mbpp(DATA, 3, 0)


def run(docs, completions, timeout=10.0):
    outs, _ = execute(docs, [[c] for c in completions], CodeSettings(timeout=timeout, workers=WORKERS), "t",
                      show_progress=False)
    return [o[0] for o in outs]


# ---------------------------------------------------------------------- scoring is right
@needs_data
def test_humaneval_canonical_solutions_all_pass(humaneval):
    outs = run(humaneval, [d.canonical for d in humaneval])
    failed = [(d.task_id, o.status, o.stderr[-200:]) for d, o in zip(humaneval, outs) if not o.passed]
    assert len(humaneval) == 164 and failed == []


@needs_data
def test_mbpp_canonical_solutions_all_pass(mbpp):
    outs = run(mbpp, [d.canonical for d in mbpp])
    failed = [(d.task_id, o.status, o.stderr[-200:]) for d, o in zip(mbpp, outs) if not o.passed]
    assert len(mbpp) == 500 and mbpp[0].task_id == "mbpp/11" and mbpp[-1].task_id == "mbpp/510"
    assert failed == []


@needs_data
def test_wrong_and_slow_solutions_fail(humaneval, mbpp):
    he0, mb = humaneval[0], mbpp[0]
    slow = he0.canonical + "\n\nimport time\ntime.sleep(2)\n"  # module level: once, before check()
    outs = run([he0, mb, he0], ["    return False\n", "def remove_Occ(s, ch):\n    return s\n", slow], timeout=1.0)
    assert [o.status for o in outs] == ["failed", "failed", "timeout"]
    assert "AssertionError" in outs[0].stderr and outs[2].seconds < 2.0 and outs[2].returncode is None
    assert run([he0], [slow], timeout=5.0)[0].passed  # only the time limit failed it


@needs_data
def test_prompts_follow_the_original_formats(humaneval, mbpp):
    he = humaneval[0]
    assert he.prompt.startswith("from typing import List") and he.prompt.endswith('"""\n')
    assert he.program("X").endswith("\ncheck(has_close_elements)\n") and "X\n\n\nMETADATA" in he.program("X")
    p = mbpp[0].prompt
    assert p.count("You are an expert Python programmer, and here is your task:") == 4
    assert p.count("[DONE]") == 3 and p.endswith("[BEGIN]\n") and "similar_elements" in p  # task 2 first
    assert "\r" not in p and "assert remove_Occ(\"hello\",\"l\") == \"heo\"" in p
    assert load_mbpp(DATA, 0, 0)[0].prompt.count("[BEGIN]") == 1
    with pytest.raises(ConfigError, match="tasks 2-4"):
        load_mbpp(DATA, 4, 0)
    with pytest.raises(ConfigError, match="humaneval has no exemplars"):
        load_humaneval(DATA, 1, 0)


def test_pass_at_k_against_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 0, 3) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_sampling_settings_are_checked():
    with pytest.raises(ConfigError, match="--temperature 0.8"):
        CodeSettings(samples=5).check()
    with pytest.raises(ConfigError, match="--code-timeout"):
        CodeSettings(timeout=0).check()


# ---------------------------------------------------------------------- a model end to end
WORDS = "def return for in if else print x y range len list sum the of a to".split()
CORPUS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(30)) + ":\n    pass" for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("code-ckpt")
    tok.save(d / "tok" / "tokenizer.json")
    tiny_model(tok.vocab_size, num_hidden_layers=2, max_position_embeddings=160).save_pretrained(
        d / "hf", tokenizer_dir=d / "tok")
    return d / "hf"


@needs_data
def test_tiny_model_end_to_end_through_the_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli.main(["eval", "--model", str(checkpoint), "--tasks", "humaneval,mbpp", "--data-dir", str(DATA),
                   "--limit", "5", "--code-workers", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    for name, first in (("humaneval", "HumanEval/0"), ("mbpp", "mbpp/11")):
        r = rep["results"][name]
        assert r["n"] == 5 and r["n_samples"] == 1 and len(r["problems"]) == 5
        assert r["problems"][0]["task_id"] == first and len(r["problems"][0]["status"]) == 1
        assert r["pass@1"] == sum(p["passed"] for p in r["problems"]) / 5
        assert r["sandbox"]["network_isolated"] and r["max_new_tokens"] == 80
    assert "pass@1" in printed.splitlines()[0] and "humaneval" in printed and str(out) in printed


@needs_data
def test_sampled_pass_at_k(checkpoint, tok):
    from deepseekmoe import Transformer

    model = Transformer.from_pretrained(checkpoint).eval()
    scorer = Scorer(model, tok, prefix_id=tok.eos_id, batch_size=4, progress=False)
    r = run_task(scorer, "humaneval", DATA, limit=2, log_samples=True,
                 code=CodeSettings(samples=10, temperature=1.0, timeout=5.0, workers=WORKERS))
    assert r["n_samples"] == 10 and set(r) >= {"pass@1", "pass@10"} and "pass@100" not in r and "samples" not in r
    comps = r["problems"][0]["completions"]
    assert len(comps) == 10 and len(set(comps)) > 1  # samples differ (batches drawn with their own seeds)
    assert "pass@1" in format_table({"humaneval": r})


@needs_data
def test_cli_checks_before_evaluating(checkpoint, tmp_path, capsys):
    base = ["eval", "--model", str(checkpoint), "--tasks", "humaneval", "--data-dir", str(DATA)]
    cases = [(["--samples", "4"], "--temperature 0.8"),
             (["--max-length", "100000"], "max_position_embeddings (160)"),
             (["--num-fewshot", "5"], "humaneval has no exemplars"),
             (["--out", str(tmp_path)], "is a directory"),
             (["--out", str(tmp_path / "f.txt" / "r.json")], "not a folder")]
    (tmp_path / "f.txt").write_text("x")
    for extra, needle in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # nothing written


@needs_data
def test_results_are_printed_before_a_failing_write(checkpoint, tmp_path, capsys, monkeypatch):
    from deepseekmoe.checkpoint import files

    def full_disk(path, text):
        raise files.write_error(OSError(errno.ENOSPC, "No space left on device"), path)

    monkeypatch.setattr(files, "atomic_write_text", full_disk)
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", str(checkpoint), "--tasks", "humaneval", "--data-dir", str(DATA), "--limit", "2",
                   "--code-workers", "2", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 2 and "the disk is full" in cap.err and not out.exists()
    assert "humaneval" in cap.out and "pass@1" in cap.out  # the results were shown, not lost
