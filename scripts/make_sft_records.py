"""Chat records for SFT from the offline benchmark files: MBPP tasks 601-974 and the ARC train splits.

    python scripts/make_sft_records.py --eval-dir DATA/eval --out sft_records.jsonl
    python scripts/make_sft_records.py --eval-dir DATA/eval --out mbpp.jsonl --tasks mbpp

MBPP's tasks 601-974 are its training split (11-510 are the test split `deepseekmoe eval` scores,
511-600 validation, 1-10 few-shot prompts), and the ARC train splits are disjoint from the ARC test
files, so records made here never contain an evaluated problem. Each record is one user turn and
one assistant reply:
    mbpp           the task text and its three asserts -> the reference program (LF line ends)
    arc_easy/...   the question and lettered choices -> "<letter>. <answer text>"
The output is written to a temporary name and renamed, so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepseekmoe.checkpoint.files import atomic_write_text
from deepseekmoe.errors import DataError, UserError

MBPP_TRAIN_IDS = range(601, 975)
TASKS = ("mbpp", "arc_easy", "arc_challenge")
ARC_FILES = {"arc_easy": "arc_easy/ARC-Easy-train.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-train.jsonl"}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; --eval-dir must hold mbpp/mbpp.jsonl and the arc_easy/, "
                        "arc_challenge/ folders (docs/evaluation.md)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:line {n}: not valid JSON ({e.msg}); use the published file") from None
    return rows


def _need(row: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: no field {missing[0]!r}; expected the published format")


def mbpp_records(eval_dir: Path) -> list[dict]:
    path = eval_dir / "mbpp" / "mbpp.jsonl"
    out = []
    for r in _jsonl(path):
        _need(r, ("task_id", "text", "code", "test_list"), f"{path}: task {r.get('task_id')}")
        if r["task_id"] not in MBPP_TRAIN_IDS:
            continue
        tests = "\n".join(r["test_list"])
        user = f"{r['text']}\nYour code should pass these tests:\n{tests}"
        code = r["code"].replace("\r\n", "\n").strip()
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": code}],
                    "source": f"mbpp/{r['task_id']}"})
    if not out:
        raise DataError(f"{path}: none of MBPP's training tasks 601-974 found; use the full 974-task file")
    return out


def arc_records(eval_dir: Path, task: str) -> list[dict]:
    path = eval_dir / ARC_FILES[task]
    out = []
    for n, r in enumerate(_jsonl(path), 1):
        where = f"{path}:line {n}"
        _need(r, ("id", "question", "choices", "answerKey"), where)
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        if r["answerKey"] not in labels:
            raise DataError(f"{where}: answerKey {r['answerKey']!r} is not one of {labels}")
        options = "\n".join(f"{lab}. {t}" for lab, t in zip(labels, texts))
        user = f"{r['question']}\n{options}\nAnswer with the letter of the correct choice."
        answer = f"{r['answerKey']}. {texts[labels.index(r['answerKey'])]}"
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                    "source": f"{task}/{r['id']}"})
    return out


def make_records(eval_dir: Path, tasks, system: str | None = None) -> list[dict]:
    records = []
    for task in tasks:
        records += mbpp_records(eval_dir) if task == "mbpp" else arc_records(eval_dir, task)
    if system:
        for r in records:
            r["messages"].insert(0, {"role": "system", "content": system})
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--eval-dir", required=True, type=Path,
                    help="the folder with mbpp/ and arc_*/ (docs/evaluation.md)")
    ap.add_argument("--out", required=True, type=Path, help="the jsonl file to write (replaced atomically)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)} (default: all)")
    ap.add_argument("--system", default=None, help="a system message put first in every record (default: none)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise UserError(f"--tasks {args.tasks!r}: choose from {', '.join(TASKS)}")
        records = make_records(args.eval_dir, tasks, args.system)
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {t: sum(r["source"].startswith(t + "/") for r in records) for t in tasks}
    print(f"wrote {len(records)} records to {args.out} ({', '.join(f'{t} {n}' for t, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
