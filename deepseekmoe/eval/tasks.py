"""The paper's benchmarks, read from local files: documents, prompts and few-shot exemplars.

A data directory has the layout below (one folder per task, the files in their published form;
docs/evaluation.md describes each). Nothing is downloaded.

    hellaswag/hellaswag_val_full.txt.bz2   6 lines per item: context, gold (0-3), 4 endings
    piqa/valid.jsonl + valid-labels.lst    goal, sol1, sol2; labels one per line
    arc_easy/ARC-Easy-test.jsonl           question, choices{text,label}, answerKey
    arc_challenge/ARC-Challenge-test.jsonl
    winogrande/dev.jsonl                   sentence with "_", option1, option2, answer (1|2)
    race_middle/test_middle.jsonl          article, question, options, answer letter
      (+ validation_middle.jsonl: the few-shot exemplars)
    mmlu/{dev,test}/SUBJECT_{dev,test}.csv headerless: question, A, B, C, D, answer letter
    lambada/lambada_openai.jsonl           context, continuation (the last word)
    triviaqa_sample/triviaqa_sm_sub.jsonl  context ("Question: ...\\nAnswer:"), answer, aliases
    nq_open/NQ-open.dev.jsonl              question, answer (list)
    gsm8k/test.jsonl                       question, answer (reasoning, then "#### N")
    humaneval/HumanEval.jsonl.gz           task_id, prompt, entry_point, canonical_solution, test
    mbpp/mbpp.jsonl                        task_id, text, code, test_list, test_setup_code (all 974)

Documents come in three kinds:
  MCDoc    multiple choice by log-likelihood: one (context, continuation) per choice. Ordinary
           tasks share the context and vary the continuation; WinoGrande's partial scoring
           varies the context (the sentence up to the blank, filled with each option) and scores
           the same continuation (the rest of the sentence).
  ClozeDoc one continuation to score (LAMBADA: its last word).
  GenDoc   a prompt for greedy generation, the gold answers, and how to compare them.
  CodeDoc  a prompt for code generation and the program its completion is tested in (eval/code.py,
           run in eval/sandbox.py).

Few-shot exemplars for tasks without a separate exemplar split (TriviaQA sample, NQ-open, GSM8K:
only their evaluation split is available locally) are drawn from the same file with a fixed seed,
never including the document being evaluated.
"""

from __future__ import annotations

import bz2
import csv
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deepseekmoe.errors import DataError
from deepseekmoe.eval.code import HUMANEVAL_STOP, MBPP_STOP, load_humaneval, load_mbpp


@dataclass
class MCDoc:
    contexts: list[str]
    continuations: list[str]
    gold: int
    group: str = ""  # MMLU subject


@dataclass
class ClozeDoc:
    context: str
    continuation: str


@dataclass
class GenDoc:
    prompt: str
    answers: list[str]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # "mc" | "cloze" | "gen" | "code"
    files: tuple[str, ...]       # relative to the data directory, checked before anything runs
    shots: int                   # the paper's setting (Table 1 / 3)
    paper: str                   # what the paper reports
    load: Callable | None = None  # (data_dir, shots, seed) -> list of docs
    norm: bool = True            # report acc_norm (not for single-letter or shared continuations)
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    extract: str = "line"        # "line" | "gsm8k"
    interleave: bool = False     # --limit takes documents round-robin over groups (MMLU subjects)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- reading files
def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e.msg}); restore the file from its source") from e
    return rows


def _field(row: dict, key: str, path: Path, n: int):
    if key not in row:
        raise DataError(f"{path}: item {n} has no field {key!r} (fields: {', '.join(row)}); "
                        "expected the published format (see docs/evaluation.md)")
    return row[key]


def _exemplar_ids(n_pool: int, k: int, seed: int) -> list[int]:
    """k + 1 fixed pool indices: each document uses the first k that are not itself."""
    return random.Random(seed).sample(range(n_pool), min(n_pool, k + 1))


def _shots_for(i: int | None, ids: list[int], k: int) -> list[int]:
    return [j for j in ids if j != i][:k]


# ---------------------------------------------------------------------- multiple choice
def load_hellaswag(d: Path, shots: int, seed: int) -> list[MCDoc]:
    path = d / "hellaswag" / "hellaswag_val_full.txt.bz2"
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
    docs = []
    for a in range(0, len(lines), 6):
        ctx, label, *ends = lines[a:a + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{a + 2}: gold label {label!r} is not 0-3")
        docs.append(MCDoc([ctx] * 4, [" " + e for e in ends], int(label)))
    return docs


def load_piqa(d: Path, shots: int, seed: int) -> list[MCDoc]:
    path = d / "piqa" / "valid.jsonl"
    rows = _jsonl(path)
    labels = (d / "piqa" / "valid-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise DataError(f"{d / 'piqa'}: {len(rows)} items but {len(labels)} labels")
    docs = []
    for n, (r, y) in enumerate(zip(rows, labels)):
        ctx = f"Question: {_field(r, 'goal', path, n)}\nAnswer:"
        docs.append(MCDoc([ctx] * 2, [" " + _field(r, "sol1", path, n), " " + _field(r, "sol2", path, n)], int(y)))
    return docs


def _load_arc(d: Path, folder: str, prefix: str) -> list[MCDoc]:
    path = d / folder / f"{prefix}-test.jsonl"
    docs = []
    for n, r in enumerate(_jsonl(path)):
        ch = _field(r, "choices", path, n)
        key = _field(r, "answerKey", path, n)
        if key not in ch["label"]:
            raise DataError(f"{path}: item {n}: answerKey {key!r} is not one of {ch['label']}")
        ctx = f"Question: {_field(r, 'question', path, n)}\nAnswer:"
        docs.append(MCDoc([ctx] * len(ch["text"]), [" " + t for t in ch["text"]], ch["label"].index(key)))
    return docs


def load_arc_easy(d: Path, shots: int, seed: int) -> list[MCDoc]:
    return _load_arc(d, "arc_easy", "ARC-Easy")


def load_arc_challenge(d: Path, shots: int, seed: int) -> list[MCDoc]:
    return _load_arc(d, "arc_challenge", "ARC-Challenge")


def load_winogrande(d: Path, shots: int, seed: int) -> list[MCDoc]:
    """Partial scoring: the context is the sentence up to the blank filled with each option; the
    scored continuation is the rest of the sentence, the same for both options."""
    path = d / "winogrande" / "dev.jsonl"
    docs = []
    for n, r in enumerate(_jsonl(path)):
        s = _field(r, "sentence", path, n)
        if "_" not in s:
            raise DataError(f"{path}: item {n} has no blank '_' in its sentence")
        i = s.index("_")
        rest = " " + s[i + 1:].strip()
        opts = [_field(r, "option1", path, n), _field(r, "option2", path, n)]
        docs.append(MCDoc([s[:i] + o for o in opts], [rest, rest], int(_field(r, "answer", path, n)) - 1))
    return docs


def _race_text(r: dict) -> str:
    return f"Article: {r['article']}\n\nQuestion: {r['question']}\nAnswer:"


def load_race_middle(d: Path, shots: int, seed: int) -> list[MCDoc]:
    """RACE-middle test; the k exemplars (whole articles with one answered question each) are a
    fixed draw from the validation split."""
    path, pool_path = d / "race_middle" / "test_middle.jsonl", d / "race_middle" / "validation_middle.jsonl"
    rows = _jsonl(path)
    prefix = ""
    if shots:
        pool = _jsonl(pool_path)
        for j in _exemplar_ids(len(pool), shots, seed)[:shots]:
            r = pool[j]
            prefix += f"{_race_text(r)} {r['options']['ABCD'.index(r['answer'])]}\n\n"
    docs = []
    for n, r in enumerate(rows):
        opts = _field(r, "options", path, n)
        ans = _field(r, "answer", path, n)
        ctx = prefix + _race_text(r)
        docs.append(MCDoc([ctx] * len(opts), [" " + o for o in opts], "ABCD".index(ans)))
    return docs


def _mmlu_question(row: list[str]) -> str:
    q, *opts = row[:5]
    return q + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", opts)) + "\nAnswer:"


def _mmlu_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    for n, r in enumerate(rows):
        if len(r) != 6 or r[5] not in ("A", "B", "C", "D"):
            raise DataError(f"{path}: row {n + 1} is not question,A,B,C,D,answer-letter")
    return rows


def load_mmlu(d: Path, shots: int, seed: int) -> list[MCDoc]:
    """57 subjects; exemplars are the first k rows of the subject's dev file (the standard 5)."""
    test_dir = d / "mmlu" / "test"
    subjects = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise DataError(f"{test_dir}: no SUBJECT_test.csv files")
    docs = []
    for sub in subjects:
        head = f"The following are multiple choice questions (with answers) about {sub.replace('_', ' ')}.\n\n"
        if shots:
            dev = _mmlu_csv(d / "mmlu" / "dev" / f"{sub}_dev.csv")
            if len(dev) < shots:
                raise DataError(f"{d / 'mmlu' / 'dev'}/{sub}_dev.csv: {len(dev)} exemplars, fewer than {shots} shots")
            head += "".join(f"{_mmlu_question(r)} {r[5]}\n\n" for r in dev[:shots])
        for r in _mmlu_csv(test_dir / f"{sub}_test.csv"):
            ctx = head + _mmlu_question(r)
            docs.append(MCDoc([ctx] * 4, [" A", " B", " C", " D"], "ABCD".index(r[5]), group=sub))
    return docs


# ---------------------------------------------------------------------- cloze and generation
def load_lambada(d: Path, shots: int, seed: int) -> list[ClozeDoc]:
    path = d / "lambada" / "lambada_openai.jsonl"
    return [ClozeDoc(_field(r, "context", path, n).rstrip(), " " + _field(r, "continuation", path, n).strip())
            for n, r in enumerate(_jsonl(path))]


def load_triviaqa(d: Path, shots: int, seed: int) -> list[GenDoc]:
    path = d / "triviaqa_sample" / "triviaqa_sm_sub.jsonl"
    rows = _jsonl(path)
    for n, r in enumerate(rows):
        for key in ("context", "answer"):
            _field(r, key, path, n)
    ids = _exemplar_ids(len(rows), shots, seed) if shots else []
    docs = []
    for i, r in enumerate(rows):
        shots_txt = "".join(f"{rows[j]['context']} {rows[j]['answer']}\n\n" for j in _shots_for(i, ids, shots))
        docs.append(GenDoc(shots_txt + r["context"], [r["answer"], *r.get("aliases", [])]))
    return docs


def _nq_question(q: str) -> str:
    q = q.strip()
    return f"Question: {q if q.endswith('?') else q + '?'}\nAnswer:"


def load_nq_open(d: Path, shots: int, seed: int) -> list[GenDoc]:
    path = d / "nq_open" / "NQ-open.dev.jsonl"
    rows = _jsonl(path)
    for n, r in enumerate(rows):
        if not isinstance(_field(r, "answer", path, n), list) or not r["answer"]:
            raise DataError(f"{path}: item {n}: 'answer' must be a non-empty list of strings")
        _field(r, "question", path, n)
    ids = _exemplar_ids(len(rows), shots, seed) if shots else []
    docs = []
    for i, r in enumerate(rows):
        shots_txt = "".join(f"{_nq_question(rows[j]['question'])} {rows[j]['answer'][0]}\n\n"
                            for j in _shots_for(i, ids, shots))
        docs.append(GenDoc(shots_txt + _nq_question(r["question"]), list(r["answer"])))
    return docs


def load_gsm8k(d: Path, shots: int, seed: int) -> list[GenDoc]:
    path = d / "gsm8k" / "test.jsonl"
    rows = _jsonl(path)
    golds = []
    for n, r in enumerate(rows):
        m = re.search(r"####\s*(.+)$", _field(r, "answer", path, n).strip())
        if not m:
            raise DataError(f"{path}: item {n}: the answer has no '#### N' final line")
        _field(r, "question", path, n)
        golds.append(_number(m.group(1)))
    ids = _exemplar_ids(len(rows), shots, seed) if shots else []
    docs = []
    for i, r in enumerate(rows):
        shots_txt = "".join(f"Question: {rows[j]['question']}\nAnswer: {rows[j]['answer']}\n\n"
                            for j in _shots_for(i, ids, shots))
        docs.append(GenDoc(f"{shots_txt}Question: {r['question']}\nAnswer:", [golds[i]]))
    return docs


# ---------------------------------------------------------------------- answer comparison
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


_NUM = re.compile(r"-?[\d,]*\.?\d+")


def _number(s: str) -> str:
    """A number as a canonical string ("1,234.50" -> "1234.5"); other text stripped and kept."""
    s = s.strip().replace(",", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


def gsm8k_answers(text: str) -> tuple[str | None, str | None]:
    """(strict: the number after '####', flexible: the last number in the text)."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    nums = _NUM.findall(text)
    return (_number(m.group(1)) if m else None), (_number(nums[-1]) if nums else None)


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("hellaswag", "mc", ("hellaswag/hellaswag_val_full.txt.bz2",), 0, "HellaSwag (Acc.) 0-shot",
             load_hellaswag),
    TaskSpec("piqa", "mc", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 0, "PIQA (Acc.) 0-shot", load_piqa),
    TaskSpec("arc_easy", "mc", ("arc_easy/ARC-Easy-test.jsonl",), 0, "ARC-easy (Acc.) 0-shot", load_arc_easy),
    TaskSpec("arc_challenge", "mc", ("arc_challenge/ARC-Challenge-test.jsonl",), 0, "ARC-challenge (Acc.) 0-shot",
             load_arc_challenge),
    TaskSpec("winogrande", "mc", ("winogrande/dev.jsonl",), 0, "WinoGrande (Acc.) 0-shot, partial scoring",
             load_winogrande, norm=False),
    TaskSpec("race_middle", "mc", ("race_middle/test_middle.jsonl", "race_middle/validation_middle.jsonl"), 5,
             "RACE-middle (Acc.) 5-shot", load_race_middle),
    TaskSpec("mmlu", "mc", ("mmlu/test", "mmlu/dev"), 5, "MMLU (Acc.) 5-shot", load_mmlu, norm=False,
             interleave=True),
    TaskSpec("lambada", "cloze", ("lambada/lambada_openai.jsonl",), 0, "LAMBADA (OpenAI) last-word acc + ppl",
             load_lambada),
    TaskSpec("triviaqa", "gen", ("triviaqa_sample/triviaqa_sm_sub.jsonl",), 5,
             "TriviaQA (EM) 5-shot (local 3000-question sample)", load_triviaqa),
    TaskSpec("nq_open", "gen", ("nq_open/NQ-open.dev.jsonl",), 5, "NaturalQuestions (EM) 5-shot", load_nq_open),
    TaskSpec("gsm8k", "gen", ("gsm8k/test.jsonl",), 8, "GSM8K (EM) 8-shot", load_gsm8k, max_new_tokens=256,
             stop=("\n\n", "Question:"), extract="gsm8k"),
    TaskSpec("humaneval", "code", ("humaneval/HumanEval.jsonl.gz",), 0, "HumanEval (Pass@1) 0-shot",
             load_humaneval, max_new_tokens=512, stop=HUMANEVAL_STOP),
    TaskSpec("mbpp", "code", ("mbpp/mbpp.jsonl",), 3, "MBPP (Pass@1) 3-shot", load_mbpp, max_new_tokens=512,
             stop=MBPP_STOP),
]}
ALIASES = {"nq": "nq_open", "naturalquestions": "nq_open", "trivia": "triviaqa", "arc_e": "arc_easy",
           "arc_c": "arc_challenge", "race": "race_middle"}
