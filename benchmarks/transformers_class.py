"""The transformers class (deepseekmoe.integrations.transformers) against this project's own
generate, side by side in one process on the same random weights.

    python benchmarks/transformers_class.py --json out.json      # GPU: the 16B architecture, random bf16
    python benchmarks/transformers_class.py --tiny               # CPU smoke: the tiny preset, seconds

Measured (greedy, random prompts, median of --reps runs after a warm-up):
  prefill   one forward over a --prompt-len token prompt at batch 1 (logits of the last position):
            `Decoder.prefill` (ours) vs `DeepseekForCausalLM(..., logits_to_keep=1)` with a DynamicCache;
  decode    at each --batches size, tokens/s of the decode steps alone: B * (N - 1) / (t(N) - t(1)),
            t(n) the wall time of generating n new tokens after a --decode-prompt token prompt. Ours:
            `generate_ids` in --ours-mode (compile: torch.compile + CUDA graph, the project's fastest);
            the class: `model.generate` with its DynamicCache (eager) and with a static cache
            (cache_implementation="static", which transformers compiles on a GPU).
Both sides must produce the same greedy tokens (checked and recorded). The released remote code
(transformers 4.46.3, ../shared/reference/released-code) needs its own environment and is not run
here; its figures on the H200 are in that folder's README. The table prints last; JSON is written
after every phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.checkpoint import hf  # noqa: E402
from deepseekmoe.inference.generate import Decoder, generate_ids  # noqa: E402

RESULTS: dict = {"errors": {}}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save(path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(RESULTS, indent=2, default=str))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def wall(fn, dev: torch.device, reps: int) -> float:
    """Median wall seconds of fn() over `reps` runs after one warm-up (generation reads tokens
    back to the host every step, so wall time is what a user waits)."""
    fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(args, dev: torch.device):
    import deepseekmoe.integrations.transformers as dt

    cfg = presets.get("tiny" if args.tiny else "deepseekmoe-16b")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    ours = hf.empty_model(Transformer, cfg, dtype, dev)
    ours.init_weights(generator=torch.Generator(device=dev).manual_seed(0))
    ours.eval()
    theirs = dt.DeepseekForCausalLM.from_transformer(ours)
    RESULTS["model"] = {"preset": cfg.name, "dtype": str(dtype), "device": str(dev), "params": cfg.num_params(),
                        "active_params": cfg.num_active_params(), "expert_backend": cfg.expert_backend}
    return cfg, ours, theirs


def phase_prefill(args, cfg, ours, theirs, dev) -> None:
    from transformers import DynamicCache

    L = args.prompt_len
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    dec = Decoder(ours, 1, L + 64, decode_backend=None)
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    t_ours = wall(lambda: dec.prefill(ids, pad), dev, args.reps)

    def hf_prefill():
        with torch.no_grad():
            return theirs(ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1).logits

    t_hf = wall(hf_prefill, dev, args.reps)
    with torch.no_grad():
        same = torch.equal(dec.prefill(ids, pad).argmax(-1), hf_prefill()[:, -1].float().argmax(-1))
    RESULTS["prefill"] = {"prompt": L, "ours_tok_s": L / t_ours, "class_tok_s": L / t_hf, "same_argmax": same}
    log(f"prefill {L}: ours {L / t_ours:,.0f} tok/s, class {L / t_hf:,.0f} tok/s")


def _hf_generate(theirs, ids, n: int, static: bool):
    kw = {"cache_implementation": "static"} if static else {}
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


def rate(tokens: int, t_first: float, t_all: float) -> float | None:
    """Decode tokens/s from the time of 1 and of N new tokens; None when timing noise (a tiny
    model on a busy CPU) leaves no positive difference."""
    return tokens / (t_all - t_first) if t_all > t_first else None


def phase_decode(args, cfg, ours, theirs, dev, B: int) -> None:
    P, N = args.decode_prompt, args.decode_tokens
    g = torch.Generator(device=dev).manual_seed(2 + B)
    ids = torch.randint(2, cfg.vocab_size, (B, P), device=dev, generator=g)
    prompts = ids.tolist()
    row: dict = {}

    def ours_gen(n):
        return generate_ids(ours, prompts, max_new_tokens=n, eos_token_id=None, mode=args.ours_mode)

    row["ours_tok_s"] = rate(B * (N - 1), wall(lambda: ours_gen(1), dev, args.reps),
                             wall(lambda: ours_gen(N), dev, args.reps))
    want = ours_gen(N)
    for name, static in (("class_dynamic", False), ("class_static", True)):
        if static and args.no_static:
            continue
        try:
            row[f"{name}_tok_s"] = rate(B * (N - 1), wall(lambda s=static: _hf_generate(theirs, ids, 1, s), dev,
                                                          args.reps),
                                        wall(lambda s=static: _hf_generate(theirs, ids, N, s), dev, args.reps))
            row[f"{name}_same_tokens"] = _hf_generate(theirs, ids, N, static) == want
        except Exception as e:  # noqa: BLE001 - record and go on with the other rows
            RESULTS["errors"][f"decode_b{B}_{name}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    RESULTS.setdefault("decode", {})[f"b{B}"] = {"prompt": P, "new_tokens": N, **row}
    log(f"decode batch {B}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    if not all(v for k, v in row.items() if k.endswith("same_tokens")):
        RESULTS["errors"][f"decode_b{B}"] = "the class and deepseekmoe generate produced different tokens"


def table() -> str:
    lines = ["| figure | ours (deepseekmoe generate) | class, DynamicCache | class, static cache |",
             "|---|---|---|---|"]
    p = RESULTS.get("prefill")
    if p:
        lines.append(f"| prefill {p['prompt']} tok/s (batch 1) | {p['ours_tok_s']:,.0f} | {p['class_tok_s']:,.0f} "
                     "| - |")
    for key, d in RESULTS.get("decode", {}).items():
        cells = [f"{d[k]:,.1f}" if d.get(k) is not None else "-"
                 for k in ("ours_tok_s", "class_dynamic_tok_s", "class_static_tok_s")]
        lines.append(f"| decode {key} tok/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny preset, short prompts, fp32")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--prompt-len", type=int, default=None, help="prefill prompt (default 2048; 32 with --tiny)")
    ap.add_argument("--decode-prompt", type=int, default=None, help="decode prompt (default 256; 8 with --tiny)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="new tokens timed (default 64; 6 with --tiny)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,8; 1,2 with --tiny)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (default 3; 1 with --tiny)")
    ap.add_argument("--ours-mode", default=None, choices=["eager", "cuda_graph", "compile"],
                    help="deepseekmoe generate's mode (default compile on a GPU, eager on CPU)")
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache rows")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    t = args.tiny
    args.prompt_len = args.prompt_len or (32 if t else 2048)
    args.decode_prompt = args.decode_prompt or (8 if t else 256)
    args.decode_tokens = args.decode_tokens or (6 if t else 64)
    args.reps = args.reps or (1 if t else 3)
    args.ours_mode = args.ours_mode or ("compile" if dev.type == "cuda" else "eager")
    batches = [int(b) for b in (args.batches or ("1,2" if t else "1,8")).split(",")]
    import transformers

    RESULTS["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                      "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                      "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "ours_mode": args.ours_mode}
    if dev.type != "cuda" and not t:
        log("no CUDA GPU here: the 16B architecture needs one (use --tiny for the CPU smoke run)")
        return 2
    if t:  # a tiny model on a shared CPU: more threads only contend
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, ours, theirs = build(args, dev)
    log(f"built {cfg.name} ({cfg.num_params() / 1e9:.2f}B params) twice on {dev}")
    save(args.json)
    phase_prefill(args, cfg, ours, theirs, dev)
    save(args.json)
    for B in batches:
        phase_decode(args, cfg, ours, theirs, dev, B)
        save(args.json)
    print(table())
    save(args.json)
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
