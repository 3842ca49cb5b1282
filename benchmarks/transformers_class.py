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
            the class: `model.generate` as users call it (on a GPU: its fast path, this project's
            decoder over the class's modules), and transformers' own generate loop on the class
            (fast_generate=False) with a DynamicCache (eager) and with a static cache
            (cache_implementation="static", which transformers compiles on a GPU).
Both sides must produce the same greedy tokens (checked and recorded). With --site and --code, the
released remote code (its own random bf16 weights, transformers 4.46.3 from --site, which it needs)
runs the same prefill and decode figures in a child process after ours are freed: its own column,
fewer new tokens (--released-tokens) and one timed repeat, since it decodes at a few tokens/s. The
table prints last; JSON is written after every phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import released_stack  # noqa: E402 - benchmarks/released_stack.py, beside this file
from common import write_json  # noqa: E402 - benchmarks/common.py

from deepseekmoe import Transformer, presets  # noqa: E402
from deepseekmoe.checkpoint import hf  # noqa: E402
from deepseekmoe.inference.generate import Decoder, generate_ids  # noqa: E402

RESULTS: dict = {"errors": {}}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save(path: str | None) -> None:
    if path:
        write_json(path, RESULTS)


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
    # class: model.generate as users call it (on a GPU its fast path, the project's decoder:
    # fast_generate.py); class_hf_*: transformers' own generate loop (fast_generate=False) with a
    # DynamicCache (eager) and a static cache (which transformers compiles on a GPU).
    for name, static, fast in (("class", False, "auto"), ("class_hf_dynamic", False, False),
                               ("class_hf_static", True, False)):
        if static and args.no_static:
            continue
        theirs.fast_generate = fast
        try:
            row[f"{name}_tok_s"] = rate(B * (N - 1), wall(lambda s=static: _hf_generate(theirs, ids, 1, s), dev,
                                                          args.reps),
                                        wall(lambda s=static: _hf_generate(theirs, ids, N, s), dev, args.reps))
            row[f"{name}_same_tokens"] = _hf_generate(theirs, ids, N, static) == want
        except Exception as e:  # noqa: BLE001 - record and go on with the other rows
            RESULTS["errors"][f"decode_b{B}_{name}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            theirs.fast_generate = "auto"
    RESULTS.setdefault("decode", {})[f"b{B}"] = {"prompt": P, "new_tokens": N, **row}
    log(f"decode batch {B}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    if not all(v for k, v in row.items() if k.endswith("same_tokens")):
        RESULTS["errors"][f"decode_b{B}"] = "the class and deepseekmoe generate produced different tokens"


# ------------------------------------------------------------------------------------ the released code
def released_child(spec_file: Path, out_file: Path) -> int:
    """Child process (transformers 4.46.3 first on its path): the released modeling code with its own
    random bf16 weights (released_stack.build_model), prefill and decode timed as above; writes its
    figures (or its error)."""
    spec = json.loads(spec_file.read_text())
    dev = torch.device(spec["device"])
    res: dict = {}
    try:
        with tempfile.TemporaryDirectory() as where:
            model = released_stack.build_model(spec["hf_config"], spec["code"], Path(where), dev).eval()
            res["versions"] = released_stack.versions()
            L, reps, vocab = spec["prompt_len"], spec["reps"], model.config.vocab_size
            ids = torch.randint(2, vocab, (1, L), device=dev)
            with torch.no_grad():
                res["prefill_tok_s"] = L / wall(lambda: model(ids, use_cache=True).logits[:, -1], dev, reps)
            for B in spec["batches"]:
                ids = torch.randint(2, vocab, (B, spec["decode_prompt"]), device=dev)
                n = spec["new_tokens"]
                t1 = wall(lambda x=ids: _hf_generate(model, x, 1, False), dev, reps)
                tn = wall(lambda x=ids, k=n: _hf_generate(model, x, k, False), dev, reps)
                res[f"decode_b{B}_tok_s"] = rate(B * (n - 1), t1, tn)
    except Exception as e:  # noqa: BLE001 - the parent records it
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
    out_file.write_text(json.dumps(res, default=str))
    return 0


def phase_released(args, cfg, dev, batches: list[int]) -> None:
    from deepseekmoe.checkpoint.hf import config_to_hf

    spec = {"hf_config": config_to_hf(cfg, torch.bfloat16), "device": str(dev),
            "code": str(Path(args.code).resolve()), "prompt_len": args.prompt_len,
            "decode_prompt": args.decode_prompt, "batches": batches,
            "new_tokens": args.released_tokens, "reps": 1}
    out = released_stack.run_child(__file__, spec, args.site, timeout=args.released_timeout)
    if out.get("status") == "failed":
        out = {"error": out["error"]}
    RESULTS["released"] = {"new_tokens": args.released_tokens, "reps": 1, **out}
    if "error" in out:
        RESULTS["errors"]["released"] = out["error"]
    log("released code: " + ", ".join(f"{k} {v:,.1f}" for k, v in out.items() if isinstance(v, float)))


def table() -> str:
    lines = ["| figure | ours (deepseekmoe generate) | class (model.generate) | class, transformers loop, "
             "DynamicCache | class, transformers loop, static cache | released code (4.46.3) |",
             "|---|---|---|---|---|---|"]
    rel = RESULTS.get("released", {})

    def cell(v, fmt=",.1f"):
        return format(v, fmt) if isinstance(v, float) else "-"

    p = RESULTS.get("prefill")
    if p:
        lines.append(f"| prefill {p['prompt']} tok/s (batch 1) | {p['ours_tok_s']:,.0f} | {p['class_tok_s']:,.0f} "
                     f"| - | - | {cell(rel.get('prefill_tok_s'), ',.0f')} |")
    for key, d in RESULTS.get("decode", {}).items():
        cells = [cell(d.get(k)) for k in ("ours_tok_s", "class_tok_s", "class_hf_dynamic_tok_s",
                                             "class_hf_static_tok_s")]
        lines.append(f"| decode {key} tok/s | " + " | ".join(cells) + f" | {cell(rel.get(f'decode_{key}_tok_s'))} |")
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
    ap.add_argument("--site", default=None, help="folder holding transformers 4.46.3 + tokenizers 0.20 + "
                    "huggingface_hub 0.36 (pip --target): runs the released column (needs --code)")
    ap.add_argument("--code", default=None, help="the released remote-code folder (modeling_deepseek.py)")
    ap.add_argument("--released-tokens", type=int, default=16, help="new tokens timed on the released code")
    ap.add_argument("--released-timeout", type=float, default=600.0, help="seconds the released child may take")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return released_child(Path(args.child[0]), Path(args.child[1]))
    if (args.site is None) != (args.code is None):
        ap.error("--site and --code go together (the released column needs both)")
    for flag in ("site", "code"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
            ap.error(f"--{flag} {getattr(args, flag)}: no such folder")
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
    if args.site:
        del ours, theirs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        phase_released(args, cfg, dev, batches)
        save(args.json)
    print(table())
    save(args.json)
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
