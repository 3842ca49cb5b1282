"""Evaluation: language-modelling metrics and the paper's benchmarks from local files.

    from deepseekmoe.eval import Scorer, run_tasks, format_table, eval_prepared
    scorer = Scorer(model, tokenizer, prefix_id=tokenizer.eos_id, batch_size=8)
    print(eval_prepared(scorer, "sample").to_dict())          # loss, ppl, bits/byte
    print(format_table(run_tasks(scorer, ["hellaswag", "lambada"], "benchmarks/", limit=50)))

Rooms: scoring.py (log-likelihoods, rolling NLL, greedy generation on a Scorer), lm.py (corpora),
tasks.py (benchmark files -> documents and prompts), code.py (HumanEval / MBPP, pass@k), sandbox.py
(running generated programs in isolation), harness.py (metrics, table), cli.py (`deepseekmoe eval`),
lm_eval_adapter.py (lm-evaluation-harness, optional). docs/evaluation.md
describes every task's protocol.
"""

from deepseekmoe.eval.harness import format_table, resolve_tasks, run_task, run_tasks
from deepseekmoe.eval.lm import LMResult, eval_prepared, eval_text
from deepseekmoe.eval.scoring import Scorer, default_prefix
from deepseekmoe.eval.tasks import TASKS

__all__ = ["Scorer", "default_prefix", "run_tasks", "run_task", "resolve_tasks", "format_table", "TASKS",
           "LMResult", "eval_prepared", "eval_text"]
