"""Running benchmark tasks on a Scorer: selection, metrics, the results table.

    results = run_tasks(scorer, ["hellaswag", "lambada"], data_dir, limit=50)
    print(format_table(results))

Metrics, as lm-eval reports them:
  multiple choice   acc: the choice with the largest summed log-likelihood of its continuation;
                    acc_norm: the largest log-likelihood per character of the choice (lm-eval's:
                    the leading space not counted), acc_bytes the same per UTF-8 byte (scoring.py's
                    mc_predictions); acc_stderr = sqrt(acc (1 - acc) / (n - 1)); chance = the mean
                    of 1 / number of choices. MMLU also reports the macro average over
                    subjects (acc_macro); WinoGrande and MMLU have no acc_norm (the scored
                    continuations are the same string, or single letters).
  LAMBADA           acc: every token of the last word is the greedy choice; ppl = exp(-mean over
                    documents of the word's summed log-likelihood).
  generation        em: greedy completion up to the first newline, SQuAD-normalised, equals one of
                    the gold answers. GSM8K: em (strict) compares the number after '####' with the
                    gold, em_flexible the last number in the completion.
  code              pass@1 (greedy), or pass@k from n samples by the unbiased estimator; each
                    program runs in the sandbox (eval/code.py, eval/sandbox.py).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

from deepseekmoe.errors import DataError, UserError, suggest
from deepseekmoe.eval.code import CodeSettings, score_code
from deepseekmoe.eval.scoring import Scorer, mc_predictions
from deepseekmoe.eval.tasks import (
    ALIASES,
    TASKS,
    ClozeDoc,
    GenDoc,
    MCDoc,
    first_line,
    gsm8k_answers,
    normalize_answer,
)

LM_TASK = "lm"
GROUPS = {"all": list(TASKS),
          "paper": ["hellaswag", "piqa", "arc_easy", "arc_challenge", "race_middle", "triviaqa", "nq_open",
                    "mmlu", "winogrande", "gsm8k", "humaneval", "mbpp"]}


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """Task names from 'a,b,c' (groups 'all', 'paper'; a few aliases); UserError with a suggestion."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    known = [LM_TASK, *TASKS, *GROUPS]
    for raw in names:
        n = raw.strip().lower().replace("-", "_")
        if not n:
            continue
        n = ALIASES.get(n, n)
        found = GROUPS.get(n, [n] if n in TASKS or n == LM_TASK else None)
        if found is None:
            raise UserError(f"unknown task {raw.strip()!r}{suggest(n, known)}; known tasks: {', '.join(known)}")
        out += [t for t in found if t not in out]
    if not out:
        raise UserError("no task given: pass --tasks lm,hellaswag,... (see `deepseekmoe eval --help`)")
    return out


def check_data(names: list[str], data_dir: str | Path | None) -> Path | None:
    """Check that every benchmark task's files exist before any model is loaded."""
    bench = [n for n in names if n in TASKS]
    if not bench:
        return None if data_dir is None else Path(data_dir)
    if data_dir is None:
        raise DataError(f"task(s) {', '.join(bench)} read local benchmark files: pass --data-dir DIR holding "
                        "the layout of docs/evaluation.md (hellaswag/, piqa/, arc_easy/, ...)")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"--data-dir {d}: no such directory (it should hold hellaswag/, piqa/, ... as "
                        "described in docs/evaluation.md)")
    for n in bench:
        for rel in TASKS[n].files:
            if not (d / rel).exists():
                raise DataError(f"task {n}: {d / rel} not found; --data-dir must hold the task folders "
                                "in the layout of docs/evaluation.md")
    return d


def _limit_docs(docs: list, limit: int | None, interleave: bool) -> list:
    if limit is None:
        return docs
    if interleave:  # round-robin over groups, so a small limit still covers every MMLU subject
        by: dict[str, list] = defaultdict(list)
        for doc in docs:
            by[doc.group].append(doc)
        docs = [g[i] for i in range(max(len(g) for g in by.values())) for g in by.values() if i < len(g)]
    return docs[:limit]


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def score_mc(scorer: Scorer, docs: list[MCDoc], name: str, norm: bool = True, samples: list | None = None) -> dict:
    pairs = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]
    lls = scorer.loglikelihood(pairs, desc=name)
    k = 0
    hits, hits_norm, hits_bytes, chance = [], [], [], 0.0
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        n = len(d.continuations)
        ll = [a for a, _ in lls[k:k + n]]
        k += n
        pred, pred_n, pred_b = mc_predictions(ll, d.continuations)
        hits.append(int(pred == d.gold))
        hits_norm.append(int(pred_n == d.gold))
        hits_bytes.append(int(pred_b == d.gold))
        chance += 1.0 / n
        if d.group:
            by_group[d.group].append(hits[-1])
        if samples is not None:
            samples.append({"doc": i, "gold": d.gold, "pred": pred, "pred_norm": pred_n, "loglikelihoods": ll})
    N = len(docs)
    acc = sum(hits) / N
    out = {"n": N, "acc": acc, "acc_stderr": _stderr(acc, N)}
    if norm:
        out["acc_norm"] = sum(hits_norm) / N
        out["acc_norm_stderr"] = _stderr(out["acc_norm"], N)
        out["acc_bytes"] = sum(hits_bytes) / N
    out["chance"] = chance / N
    if by_group:
        out["acc_macro"] = sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)
        out["groups"] = {g: {"n": len(v), "acc": sum(v) / len(v)} for g, v in sorted(by_group.items())}
    return out


def score_cloze(scorer: Scorer, docs: list[ClozeDoc], name: str, samples: list | None = None) -> dict:
    res = scorer.loglikelihood([(d.context, d.continuation) for d in docs], desc=name)
    N = len(docs)
    acc = sum(g for _, g in res) / N
    if samples is not None:
        samples += [{"doc": i, "loglikelihood": a, "greedy": g} for i, (a, g) in enumerate(res)]
    return {"n": N, "acc": acc, "acc_stderr": _stderr(acc, N), "ppl": math.exp(-sum(a for a, _ in res) / N)}


def score_gen(scorer: Scorer, docs: list[GenDoc], name: str, max_new_tokens: int, stop, extract: str,
              samples: list | None = None) -> dict:
    outs = scorer.generate([d.prompt for d in docs], max_new_tokens, stop, desc=name)
    N = len(docs)
    em, flex = 0, 0
    for i, (d, text) in enumerate(zip(docs, outs)):
        if extract == "gsm8k":
            strict, loose = gsm8k_answers(text)
            hit, hit_f = int(strict == d.answers[0]), int(loose == d.answers[0])
            flex += hit_f
            pred = strict
        else:
            pred = first_line(text)
            gold = {normalize_answer(a) for a in d.answers}
            hit = int(normalize_answer(pred) in gold)
        em += hit
        if samples is not None:
            samples.append({"doc": i, "completion": text, "pred": pred, "answers": d.answers[:5], "em": hit})
    out = {"n": N, "em": em / N, "em_stderr": _stderr(em / N, N)}
    if extract == "gsm8k":
        out["em_flexible"] = flex / N
    return out


def run_task(scorer: Scorer, name: str, data_dir: Path, limit: int | None = None, num_fewshot: int | None = None,
             seed: int = 1234, log_samples: bool = False, code: CodeSettings | None = None) -> dict:
    """One task's metrics; `code` sets sampling and the sandbox for the code tasks (default: greedy)."""
    t = TASKS[name]
    shots = t.shots if num_fewshot is None else num_fewshot
    docs = _limit_docs(t.load(data_dir, shots, seed), limit, t.interleave)
    if not docs:
        raise DataError(f"task {name}: no documents in {data_dir}")
    samples: list | None = [] if log_samples and t.kind != "code" else None  # code: in its "problems"
    if t.kind == "mc":
        out = score_mc(scorer, docs, name, t.norm, samples)
    elif t.kind == "cloze":
        out = score_cloze(scorer, docs, name, samples)
    else:
        # A short window (a small model) keeps at least half of it for the prompt.
        max_new = min(t.max_new_tokens, scorer.max_length // 2)
        if max_new < t.max_new_tokens:
            print(f"deepseekmoe eval: {name}: generating at most {max_new} tokens (not {t.max_new_tokens}) to "
                  f"leave room for the prompt in a {scorer.max_length}-token window", file=sys.stderr)
        if t.kind == "code":
            out = score_code(scorer, docs, name, code or CodeSettings(seed=seed), max_new, t.stop, log_samples)
        else:
            out = score_gen(scorer, docs, name, max_new, t.stop, t.extract, samples)
        out["max_new_tokens"] = max_new
    out = {"shots": shots, **out, "paper": t.paper}
    if samples is not None:
        out["samples"] = samples
    return out


def run_tasks(scorer: Scorer, names: list[str], data_dir, limit: int | None = None,
              num_fewshot: int | None = None, seed: int = 1234, log_samples: bool = False,
              code: CodeSettings | None = None) -> dict:
    d = check_data(names, data_dir)
    return {n: run_task(scorer, n, d, limit, num_fewshot, seed, log_samples, code) for n in names if n in TASKS}


# ---------------------------------------------------------------------- presentation
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(results: dict) -> str:
    """A plain-text table: task, shots, n (documents; tokens for lm), acc ± stderr, acc_norm, em,
    pass@1 (with pass@10 / @100 when sampled), ppl, loss, bits/byte, chance."""
    head = ["task", "shots", "n", "acc", "acc_norm", "em", "pass@1", "ppl", "loss", "bpb", "chance"]
    rows = []
    for name, r in results.items():
        acc = r.get("acc")
        acc_s = "-" if acc is None else f"{acc:.4f} ± {r['acc_stderr']:.3f}"
        em = r.get("em")
        em_s = "-" if em is None else (f"{em:.4f}" + (f" (flex {r['em_flexible']:.4f})" if "em_flexible" in r else ""))
        n = f"{r['tokens']} tok" if "tokens" in r else _fmt(r.get("n"))
        p1 = r.get("pass@1")
        more = "".join(f" @{k} {r[f'pass@{k}']:.4f}" for k in (10, 100) if f"pass@{k}" in r)
        pass_s = "-" if p1 is None else f"{p1:.4f}" + (f" ({more.strip()})" if more else "")
        rows.append([name, _fmt(r.get("shots")), n, acc_s, _fmt(r.get("acc_norm")), em_s, pass_s, _fmt(r.get("ppl")),
                     _fmt(r.get("loss")), _fmt(r.get("bpb")), _fmt(r.get("chance"))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
