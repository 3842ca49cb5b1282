"""Code tasks: HumanEval and MBPP, scored by running the model's programs against their unit tests.

    docs = load_humaneval(data_dir, 0, seed)                  # CodeDoc per problem
    res = score_code(scorer, docs, "humaneval", CodeSettings(samples=10, temperature=0.8),
                     max_new_tokens=512, stop=HUMANEVAL_STOP)

Protocols (docs/evaluation.md has the details):
  HumanEval  0-shot; the prompt is the problem's function signature + docstring, the completion is
             cut at the original harness's stop sequences, and the program run is prompt +
             completion + the problem's `check` function + `check(entry_point)` (as human-eval's
             execution.py builds it).
  MBPP       3-shot with tasks 2, 3 and 4 as exemplars in the prompt format of the MBPP paper
             (Austin et al. 2021: the task text, its three asserts, the code between [BEGIN] and
             [DONE]); the test split is task ids 11-510; the program run is the completion + the
             task's test_setup_code + its three asserts.
Scores: greedy pass@1 (one sample at temperature 0), or with `samples` n > 1 at a temperature,
pass@k for k in 1, 10, 100 (k <= n) by the unbiased estimator of the HumanEval paper (Chen et al.
2021): 1 - C(n - c, k) / C(n, k) per problem with c of its n samples correct, averaged over
problems. Every program runs in deepseekmoe.eval.sandbox, never in this process.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepseekmoe.errors import ConfigError, DataError

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ("[DONE]",)
MBPP_EXEMPLARS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)
KS = (1, 10, 100)
MAX_SHOTS = {"humaneval": 0, "mbpp": len(MBPP_EXEMPLARS)}


@dataclass
class CodeDoc:
    task_id: str
    prompt: str       # what the model continues
    head: str         # the program before the completion (HumanEval: the prompt; MBPP: nothing)
    tail: str         # the program after it: the unit tests
    canonical: str    # the reference completion

    def program(self, completion: str) -> str:
        return self.head + completion + self.tail


@dataclass(frozen=True)
class CodeSettings:
    samples: int = 1              # completions per problem
    temperature: float = 0.0      # 0: greedy
    top_p: float = 0.95           # nucleus filter while sampling
    timeout: float = 10.0         # wall seconds per program
    workers: int | None = None    # programs run at once (default: the CPU count)
    seed: int = 1234
    tool: str | None = None       # sandbox tool (default: probed)

    def check(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples {self.samples}: must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"--samples {self.samples} with --temperature 0: greedy samples are all the same "
                              "completion; pass --temperature 0.8 (or --samples 1 for greedy pass@1)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.timeout <= 0:
            raise ConfigError(f"--code-timeout {self.timeout}: must be positive seconds")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--code-workers {self.workers}: must be at least 1")


# ---------------------------------------------------------------------- reading the problems
def _rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e.msg}); restore the file from its source") from e
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); restore the file from its source") from e
    return rows


def _need(row: dict, keys: tuple[str, ...], path: Path, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{path}: item {n} has no field {missing[0]!r} (fields: {', '.join(row)}); expected the "
                        "published format (see docs/evaluation.md)")


def check_shots(name: str, shots: int) -> None:
    """HumanEval has no exemplars and MBPP's prompt split three (tasks 2-4)."""
    if shots > MAX_SHOTS[name]:
        have = "no exemplars" if not MAX_SHOTS[name] else "3 exemplars (tasks 2-4)"
        raise ConfigError(f"--num-fewshot {shots}: {name} has {have}, so at most {MAX_SHOTS[name]} shots; "
                          f"evaluate {name} in a run of its own")


def load_humaneval(d: Path, shots: int, seed: int) -> list[CodeDoc]:
    check_shots("humaneval", shots)
    path = d / "humaneval" / "HumanEval.jsonl.gz"
    docs = []
    for n, r in enumerate(_rows(path)):
        _need(r, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), path, n)
        docs.append(CodeDoc(r["task_id"], r["prompt"], r["prompt"],
                            f"\n{r['test']}\ncheck({r['entry_point']})\n", r["canonical_solution"]))
    return docs


def _mbpp_text(r: dict) -> str:
    tests = "\n".join(r["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {r['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def load_mbpp(d: Path, shots: int, seed: int) -> list[CodeDoc]:
    """The test split (task ids 11-510), each prompted with the first `shots` of tasks 2-4."""
    check_shots("mbpp", shots)
    path = d / "mbpp" / "mbpp.jsonl"
    by_id = {}
    for n, r in enumerate(_rows(path)):
        _need(r, ("task_id", "text", "code", "test_list", "test_setup_code"), path, n)
        by_id[r["task_id"]] = r
    missing = [i for i in (*MBPP_EXEMPLARS[:shots], *MBPP_TEST_IDS) if i not in by_id]
    if missing:
        raise DataError(f"{path}: task ids {missing[:5]} are missing; expected the full 974-task mbpp.jsonl")
    code = lambda r: r["code"].replace("\r\n", "\n").strip()  # noqa: E731 (the file has Windows line ends)
    head = "".join(f"{_mbpp_text(by_id[i])}{code(by_id[i])}\n[DONE]\n\n" for i in MBPP_EXEMPLARS[:shots])
    docs = []
    for i in MBPP_TEST_IDS:
        r = by_id[i]
        tests = "\n".join([r["test_setup_code"], *r["test_list"]])
        docs.append(CodeDoc(f"mbpp/{i}", head + _mbpp_text(r), "", f"\n{tests}\n", code(r)))
    return docs


# ---------------------------------------------------------------------- scoring
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from c passing of n (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), as a numerically stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def execute(docs: list[CodeDoc], completions: list[list[str]], settings: CodeSettings, desc: str,
            show_progress: bool = True):
    """(outcomes per problem per sample, the sandbox's isolation) for completions[i] of docs[i]."""
    from deepseekmoe.eval.sandbox import Limits, Sandbox

    box = Sandbox(Limits(timeout=settings.timeout), workers=settings.workers, tool=settings.tool)
    flat = [d.program(c) for d, cs in zip(docs, completions) for c in cs]
    outs = box.run_many(flat, desc=f"{desc} tests", show_progress=show_progress)
    it = iter(outs)
    return [[next(it) for _ in cs] for cs in completions], box.isolation


def summarize(docs: list[CodeDoc], completions: list[list[str]], outcomes, settings: CodeSettings,
              log_samples: bool = False) -> dict:
    n = settings.samples
    problems, scores = [], {k: [] for k in KS if k <= n}
    for d, cs, os_ in zip(docs, completions, outcomes):
        c = sum(o.passed for o in os_)
        for k in scores:
            scores[k].append(pass_at_k(n, c, k))
        row = {"task_id": d.task_id, "passed": c, "status": [o.status for o in os_]}
        if log_samples:
            row["completions"] = cs
            row["errors"] = [o.stderr[-500:] for o in os_]
        problems.append(row)
    N = len(docs)
    out: dict = {"n": N, "n_samples": n, "temperature": settings.temperature}
    if settings.temperature:
        out["top_p"] = settings.top_p
    for k, v in scores.items():
        out[f"pass@{k}"] = float(np.mean(v))
    p = out["pass@1"]
    out["pass@1_stderr"] = float(np.sqrt(p * (1 - p) / (N - 1))) if N > 1 else float("nan")
    out["timeout_s"] = settings.timeout
    out["problems"] = problems
    return out


def score_code(scorer, docs: list[CodeDoc], name: str, settings: CodeSettings, max_new_tokens: int,
               stop: tuple[str, ...], log_samples: bool = False) -> dict:
    """Generate `settings.samples` completions per problem (batched, through Scorer.generate), run
    each program in the sandbox, and report pass@k with the outcome of every problem."""
    settings.check()
    n = settings.samples
    flat = scorer.generate([d.prompt for d in docs for _ in range(n)], max_new_tokens, stop, desc=name,
                           temperature=settings.temperature, top_p=settings.top_p if settings.temperature else 1.0,
                           seed=settings.seed if settings.temperature else None)
    completions = [flat[i * n:(i + 1) * n] for i in range(len(docs))]
    outcomes, isolation = execute(docs, completions, settings, name, scorer.show_progress)
    out = summarize(docs, completions, outcomes, settings, log_samples)
    out["sandbox"] = isolation.describe()
    return out
