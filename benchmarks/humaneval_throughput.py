"""HumanEval generation + sandboxed scoring throughput (problems/s) for a model architecture with
random weights, through the same code path as `deepseekmoe eval --tasks humaneval`.

    python benchmarks/humaneval_throughput.py --data ../shared/data/eval          # GPU: 16B, bf16
    python benchmarks/humaneval_throughput.py --smoke --data ../shared/data/eval  # CPU: tiny preset

What is timed: `deepseekmoe.eval.code.score_code` on the first --limit problems: batched greedy
generation (Scorer.generate: left-padded batches of --batch-size prompts, KV cache, CUDA graph on
GPU) of --max-new-tokens tokens per problem, then every program run in the sandbox. Random weights
never emit a stop sequence, so each completion has exactly --max-new-tokens tokens (the worst case of
the real harness, whose completions stop at the first top-level statement); pass@1 is 0 and only
the throughput means anything. The tokenizer is a byte-level BPE trained on the prompts here (its
ids are a subset of the model's vocabulary). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.checkpoint import hf  # noqa: E402
from deepseekmoe.data.tokenizer import train_tokenizer  # noqa: E402
from deepseekmoe.eval.code import HUMANEVAL_STOP, CodeSettings, load_humaneval, score_code  # noqa: E402
from deepseekmoe.eval.scoring import Scorer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the eval data folder holding humaneval/HumanEval.jsonl.gz")
    p.add_argument("--preset", default="deepseekmoe-16b")
    p.add_argument("--limit", type=int, default=164, help="problems (HumanEval has 164)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--mode", default=None, help="decode mode (default: cuda_graph on GPU, eager on CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, 4 problems, 16 new tokens")
    p.add_argument("--json", default=None, help="write results here (default: $OUT/humaneval_throughput.json)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.preset, args.limit, args.max_new_tokens, args.batch_size = "tiny", 4, 16, 4
    mode = args.mode or ("cuda_graph" if dev.type == "cuda" else "eager")
    docs = load_humaneval(Path(args.data), 0, 0)[:args.limit]
    tok = train_tokenizer([d.prompt + d.canonical for d in docs], vocab_size=2048)
    cfg = presets.get(args.preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = hf.empty_model(Transformer, cfg, dtype, dev)
    model.init_weights(generator=torch.Generator(device=dev).manual_seed(0))
    model.eval()
    scorer = Scorer(model, tok, tok.eos_id, batch_size=args.batch_size, progress=False, gen_mode=mode)
    settings = CodeSettings(timeout=10.0)
    # Warm-up on one batch (kernel autotuning, graph capture), then the timed pass over all problems.
    score_code(scorer, docs[:args.batch_size], "warmup", settings, args.max_new_tokens, HUMANEVAL_STOP)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = score_code(scorer, docs, "humaneval", settings, args.max_new_tokens, HUMANEVAL_STOP)
    wall = time.perf_counter() - t0
    n = len(docs)
    row = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "problems": n,
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "wall_s": round(wall, 2),
           "problems_per_s": round(n / wall, 3), "generated_tokens_per_s": round(n * args.max_new_tokens / wall, 1),
           "pass@1": result.get("pass@1"), "sandbox": result.get("sandbox"),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\nHumanEval throughput, {row['preset']} random {row['dtype']} weights on {row['device']}")
    for k in ("problems", "batch_size", "max_new_tokens", "mode", "wall_s", "problems_per_s", "generated_tokens_per_s",
              "pass@1"):
        print(f"{k:<24} {row[k]}")
    out = args.json or (os.path.join(os.environ["OUT"], "humaneval_throughput.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
