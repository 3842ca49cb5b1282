"""Fine-tuning throughput and memory on one GPU: this project against the released stack, same tokens per step.

    python benchmarks/finetune.py --site SITE --code CODE           # GPU (one H200): the cases below
    python benchmarks/finetune.py --tiny --skip-released             # CPU smoke: a tiny model, seconds

Cases (random weights built on the device: meta model + to_empty + init, no CPU copy):
  16b-lora  the deepseek-moe-16b architecture, LoRA with the released finetune script's settings:
            r 8, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down of attention, the dense MLP, the shared
            experts and every routed expert; embed_tokens and lm_head trained in full
  2b-full   the deepseekmoe-2b preset, every parameter trained
Each case runs twice:
  ours      deepseekmoe.Transformer on packed rows of --seq-len tokens (deepseekmoe.data.sft collate /
            pack_rows: positions restart per conversation, per-conversation bool mask [B, 1, L, L]),
            `model(**batch.model_kwargs())`, bf16 autocast, weights as `deepseekmoe sft` keeps them
            (LoRA: frozen base in bf16, adapters / embeddings fp32; full: fp32 master weights), expert
            backend triton when usable else grouped (LoRA dropout > 0 makes triton hand the routed
            experts' LoRA to grouped: deepseekmoe/model/moe/experts.py)
  released  in a child process with --site first on PYTHONPATH (transformers 4.46.3, huggingface_hub,
            tokenizers, peft 0.13.2): the released DeepseekForCausalLM (--code, imported as a package as
            scripts/released_adapter_check.py does), sdpa attention, bf16 weights without autocast and fp32 master
            weights + AdamW state in the optimizer, as the released script runs under DeepSpeed's
            bf16 mode (its MoE training path fails under autocast on a GPU); LoRA through PEFT
            (target_modules q/k/v/o/gate/up/down_proj, modules_to_save embed_tokens, lm_head); the same
            conversations unpacked, one per row, right-padded (the script does not pack);
            `model(input_ids, attention_mask, labels)`
Both: AdamW on the trainable parameters (fused on a GPU), clipping at 1.0, fresh random conversations
(lengths seq_len/16 .. seq_len/4, the first 10-50% a prompt without labels) drawn once from seed 0 for
both sides. An out-of-memory step halves the rows per forward (gradient accumulation, the same tokens
per optimizer step), then turns on activation checkpointing; every attempt is recorded. Figures: median
optimizer-step time over --steps after --warmup (CUDA events; perf_counter with --tiny); tokens/s = real
(non-padding) tokens per step / median step time; peak memory = torch.cuda.max_memory_allocated and
max_memory_reserved of the process. The table prints last; JSON (--out) is written after every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import released_stack  # noqa: E402 - benchmarks/released_stack.py, beside this file
from common import write_json  # noqa: E402 - benchmarks/common.py

CASES = {"16b-lora": ("deepseekmoe-16b", "lora"), "2b-full": ("deepseekmoe-2b", "full")}
LORA = {"r": 8, "alpha": 32.0, "dropout": 0.1}  # the released finetune script's settings
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL = ">= 5x the reference's tokens/s at no more memory; 16B LoRA fits one GPU with room to spare"
ROOM = 0.8  # "room to spare": peak reserved memory at most this share of the GPU
RESERVE = 120.0  # seconds of the time budget a released child leaves for each case after it
T0 = time.time()
RESULTS: dict = {"goal": GOAL, "cases": {}, "errors": {}}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def save(path) -> None:
    """Write RESULTS to `path` through a temporary name (a run cut short leaves the last good file)."""
    if path:
        write_json(path, RESULTS)


# ------------------------------------------------------------------------------------ data
def conversations(rng: np.random.Generator, n_tokens: int, seq_len: int, vocab: int, max_len: int):
    """Random (ids int64, mask bool) conversations of n_tokens in all; mask = the reply's tokens."""
    lo, hi = max(4, seq_len // 16), max(5, min(seq_len // 4, max_len))
    out, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(lo, hi + 1))
        prompt = max(1, int(n * rng.uniform(0.1, 0.5)))
        out.append((rng.integers(2, vocab, n, dtype=np.int64), np.arange(n) >= prompt))
        total += n
    return out


def step_batches(rng, rows: int, seq_len: int, vocab: int, max_len: int, pad_id: int) -> dict:
    """One optimizer step's data both ways: `packed` (an SFTBatch of `rows` packed rows) and
    `padded` (the same conversations one per row, right-padded: input_ids, labels, attention_mask)."""
    from deepseekmoe.data.sft import collate, pack_rows

    convs = conversations(rng, (rows + 16) * seq_len, seq_len, vocab, max_len)
    index, starts = pack_rows(np.array([len(c[0]) for c in convs]), seq_len)
    picked = [[convs[int(i)] for i in index[starts[k]:starts[k + 1]]] for k in range(rows)]
    flat = [c for row in picked for c in row]
    lengths = torch.tensor([len(c[0]) for c in flat])
    padded = collate([[c] for c in flat], int(lengths.max()), pad_id)
    mask2d = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    return {"packed": collate(picked, seq_len, pad_id), "tokens": int(lengths.sum()),
            "padded": {"input_ids": padded.input_ids, "labels": padded.labels, "attention_mask": mask2d}}


def chunks(n_rows: int, micro: int) -> list[slice]:
    return [slice(i, min(i + micro, n_rows)) for i in range(0, n_rows, micro)]


# ------------------------------------------------------------------------------------ timing
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_steps(run, steps: list, warmup: int, dev: torch.device) -> dict:
    """Warm-up steps, then one timed optimizer step per remaining batch; figures of the median."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses, times = [], []
    for batch in steps[:warmup]:
        losses.append(run.step(batch))
    sync(dev)
    for batch in steps[warmup:]:
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            losses.append(run.step(batch))
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            losses.append(run.step(batch))
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tokens = statistics.mean(s["tokens"] for s in steps[warmup:])
    gib = 2**30
    return {"status": "ok", "tokens_per_step": tokens, "step_s_median": med, "step_s_min": min(times),
            "step_s_max": max(times), "tokens_per_s": tokens / med, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(np.isfinite(losses)),
            "peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / gib if dev.type == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / gib if dev.type == "cuda" else None}


def measure(run, steps: list, warmup: int, dev: torch.device) -> dict:
    """timed_steps, retried on out-of-memory with fewer rows per forward, then with activation
    checkpointing (run.shrink() says whether another setting is left)."""
    attempts = []
    while True:
        setting = {"rows_per_forward": run.micro, "activation_checkpointing": run.ac}
        try:
            res = timed_steps(run, steps, warmup, dev)
            attempts.append({**setting, "outcome": "ok"})
            return {**res, **setting, "attempts": attempts}
        except torch.cuda.OutOfMemoryError as e:
            why = str(e).splitlines()[0][:200]
        # Out here the exception's traceback, which holds the failed step's activations, is gone.
        attempts.append({**setting, "outcome": f"out of memory: {why}"})
        log(f"  out of memory with {setting}")
        run.zero_grad()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if not run.shrink():
            return {"status": "oom", "error": "out of memory in every setting", **setting, "attempts": attempts}


class Trainee:
    """What measure() drives: micro (rows per forward), ac, step(batch) -> loss, shrink(), zero_grad()."""

    def __init__(self, model, params, dev, micro: int, ac: bool):
        self.model, self.params, self.dev, self.micro, self.ac = model, params, dev, micro, ac
        fused = dev.type == "cuda"
        self.amp = getattr(self, "amp", dev.type == "cuda")  # a subclass that set it keeps its choice
        self.opt = self.make_optimizer(fused)

    def make_optimizer(self, fused: bool):
        return torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.0, fused=fused or None,
                                 foreach=None if fused else True)

    def forward_loss(self, batch, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def n_rows(self, batch) -> int:
        raise NotImplementedError

    def step(self, batch) -> float:
        parts = chunks(self.n_rows(batch), self.micro)
        total = 0.0
        for rows in parts:
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.forward_loss(batch, rows) / len(parts)
            loss.backward()
            total += float(loss.detach())  # one host sync per micro-batch, as a logging trainer has
        self.update()
        return total

    def update(self) -> None:
        """Clip, optimizer step, gradients freed."""
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def shrink(self) -> bool:
        if self.micro > 1:
            self.micro = (self.micro + 1) // 2
            return True
        if not self.ac:
            self.enable_ac()
            self.ac = True
            return True
        return False

    def enable_ac(self) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ this project
class Ours(Trainee):
    def __init__(self, cfg, mode: str, dev: torch.device, rows: int, ac: bool):
        from deepseekmoe import Transformer
        from deepseekmoe.checkpoint import hf
        from deepseekmoe.model.lora import LoraConfig, apply_lora

        half = dev.type == "cuda"
        base = torch.bfloat16 if half and mode == "lora" else torch.float32  # as deepseekmoe sft keeps them
        model = hf.empty_model(Transformer, cfg, base, dev)
        model.init_weights(generator=torch.Generator(device=dev).manual_seed(0))
        model.set_routing(record=False)
        model.train()
        if mode == "lora":
            apply_lora(model, LoraConfig(**LORA, train_embeddings=True), seed=0)
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:  # embeddings trained in full: fp32
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(model, params, dev, rows, False)
        if ac:
            self.enable_ac()
            self.ac = True
        self.info = {"trainable_params": sum(p.numel() for p in params),
                     "total_params": sum(p.numel() for p in model.parameters()),
                     "weights": ("bf16 frozen base, fp32 adapters + embeddings" if mode == "lora" and half else "fp32")
                     + (", bf16 autocast" if half else ""), "expert_backend": cfg.expert_backend}

    def make_optimizer(self, fused: bool):
        from deepseekmoe.train.optim import build_optimizer
        from deepseekmoe.train.recipe import OptimSection

        return build_optimizer(self.model, OptimSection(lr=1e-5, weight_decay=0.0), self.dev)

    def n_rows(self, batch) -> int:
        return batch["packed"].input_ids.shape[0]

    def forward_loss(self, batch, rows: slice) -> torch.Tensor:
        kw = {k: v[rows] for k, v in batch["packed"].model_kwargs().items()}
        return self.model(**kw).loss

    def enable_ac(self) -> None:
        from deepseekmoe.parallel.fsdp import apply_activation_checkpointing

        apply_activation_checkpointing(self.model)


def model_config(name: str, tiny: bool, dev: torch.device):
    from deepseekmoe import kernels, presets

    backend = "triton" if kernels.triton_unavailable_reason(dev) is None else "grouped"
    if tiny:
        return presets.get("tiny", num_hidden_layers=2, expert_backend=backend)
    return presets.get(name, expert_backend=backend)


def run_ours(cfg, mode: str, steps: list, args, dev) -> dict:
    run = None
    try:
        run = Ours(cfg, mode, dev, args.rows, args.activation_checkpointing)
        res = {**measure(run, [_to(s, dev) for s in steps], args.warmup, dev), **run.info}
    finally:
        del run
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _to(step: dict, dev) -> dict:
    return {**step, "packed": step["packed"].to(dev)}


# ------------------------------------------------------------------------------------ the released stack
class Released(Trainee):
    """Runs in the child process (transformers 4.46 + peft from --site): benchmarks/released_stack.py
    builds the model and keeps its fp32 masters (DeepSpeed's bf16 mode, the released script's)."""

    def __init__(self, spec: dict, dev: torch.device, where: Path):
        import peft

        model = released_stack.build_model(spec["hf_config"], spec["code"], where, dev)
        if spec["mode"] == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=PEFT_TARGETS,
                modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.amp = False  # bf16 weights, no autocast (released_stack's docstring says why)
        self.master = released_stack.MasterWeights(params)
        super().__init__(model, self.master.masters, dev, spec["rows_per_forward"], False)
        if spec["activation_checkpointing"]:
            self.enable_ac()
            self.ac = True
        self.info = {"trainable_params": sum(p.numel() for p in params),
                     "total_params": sum(p.numel() for p in model.parameters()),
                     "weights": ("bf16, no autocast, fp32 master weights + AdamW state, as DeepSpeed's bf16 mode"
                                 + (" (PEFT adapters fp32)" if spec["mode"] == "lora" else "")),
                     "attention": "sdpa", "versions": released_stack.versions()}

    def n_rows(self, batch) -> int:
        return batch["padded"]["input_ids"].shape[0]

    def zero_grad(self) -> None:
        super().zero_grad()
        self.master.zero_grad()

    def update(self) -> None:
        self.master.accumulate()  # the step's bf16 gradient sums into the fp32 masters' gradients
        super().update()
        self.master.copy_back()

    def forward_loss(self, batch, rows: slice) -> torch.Tensor:
        p = batch["padded"]
        width = int(p["attention_mask"][rows].sum(1).max())  # pad each micro-batch to its own longest row
        return self.model(input_ids=p["input_ids"][rows, :width], attention_mask=p["attention_mask"][rows, :width],
                          labels=p["labels"][rows, :width]).loss

    def enable_ac(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def child_main(spec_file: Path, out_file: Path) -> int:
    """The released side of one case: build, measure, write the result (also when it fails)."""
    spec = json.loads(spec_file.read_text())
    dev = torch.device(spec["device"])
    res: dict
    try:
        steps = torch.load(spec["batches"], weights_only=True)
        steps = [{"tokens": s["tokens"], "padded": {k: v.to(dev) for k, v in s["padded"].items()}} for s in steps]
        with tempfile.TemporaryDirectory() as where:
            run = Released(spec, dev, Path(where))
            res = {**measure(run, steps, spec["warmup"], dev), **run.info}
    except Exception as e:  # noqa: BLE001 - the parent records it in the table
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    out_file.write_text(json.dumps(res, default=str))
    return 0


def run_released(cfg, mode: str, steps: list, args, dev, timeout: float) -> dict:
    """The released side in a child process with --site first on its path."""
    from deepseekmoe.checkpoint.hf import config_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.pt"
        torch.save([{"tokens": s["tokens"], "padded": s["padded"]} for s in steps], batches)
        spec = {"hf_config": config_to_hf(cfg, torch.bfloat16), "mode": mode, "device": str(dev),
                "code": str(Path(args.code).resolve()), "batches": str(batches), "warmup": args.warmup,
                "rows_per_forward": max(len(s["padded"]["input_ids"]) for s in steps),
                "activation_checkpointing": args.activation_checkpointing}
        return released_stack.run_child(__file__, spec, args.site, timeout)


# ------------------------------------------------------------------------------------ report
def ratios(ours: dict, ref: dict) -> dict:
    """ours / released: tokens/s and peak memory (None where either side has no figure)."""
    if ours.get("status") != "ok" or ref.get("status") != "ok":
        return {"tokens_per_s": None, "peak_allocated": None, "peak_reserved": None}

    def div(a, b):
        return a / b if a is not None and b else None

    return {"tokens_per_s": div(ours["tokens_per_s"], ref["tokens_per_s"]),
            "peak_allocated": div(ours["peak_allocated_gib"], ref["peak_allocated_gib"]),
            "peak_reserved": div(ours["peak_reserved_gib"], ref["peak_reserved_gib"]),
            "same_trainable_params": ours.get("trainable_params") == ref.get("trainable_params")}


def goal_check(gpu_gib: float | None) -> dict:
    """Each part of the goal: True / False, or None where a figure is missing."""
    out = {}
    for name, case in RESULTS["cases"].items():
        r = case.get("ratio", {})
        speed, mem = r.get("tokens_per_s"), r.get("peak_allocated")
        out[f"{name}: >= 5x tokens/s"] = None if speed is None else speed >= 5.0
        out[f"{name}: no more memory"] = None if mem is None else mem <= 1.0
    lora = RESULTS["cases"].get("16b-lora", {}).get("ours", {})
    peak = lora.get("peak_reserved_gib")
    out[f"16b-lora fits one GPU with room to spare (reserved <= {ROOM:.0%})"] = (
        None if peak is None or not gpu_gib else peak <= ROOM * gpu_gib)
    return out


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table() -> str:
    lines = ["| case | stack | tokens/step | rows/forward | AC | step s | tokens/s | peak alloc GB | peak reserved GB "
             "| x released tokens/s | x released memory |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, case in RESULTS["cases"].items():
        for side in ("ours", "released"):
            r = case.get(side)
            if r is None:
                continue
            if r.get("status") != "ok":
                lines.append(f"| {name} | {side} | - | - | - | - | {r.get('status', '?')}: "
                             f"{str(r.get('error', ''))[:80]} | - | - | - | - |")
                continue
            ratio = case.get("ratio", {}) if side == "ours" else {}
            lines.append(f"| {name} | {side} | {r['tokens_per_step']:,.0f} | {r['rows_per_forward']} "
                         f"| {'yes' if r['activation_checkpointing'] else 'no'} | {r['step_s_median']:.3f} "
                         f"| {r['tokens_per_s']:,.0f} | {_cell(r['peak_allocated_gib'], '.1f')} "
                         f"| {_cell(r['peak_reserved_gib'], '.1f')} | {_cell(ratio.get('tokens_per_s'), '.2f')} "
                         f"| {_cell(ratio.get('peak_allocated'), '.2f')} |")
    lines.append(f"goal: {GOAL}")
    for what, ok in RESULTS.get("goal_check", {}).items():
        lines.append(f"  {what}: {'-' if ok is None else 'met' if ok else 'NOT met'}")
    for k, v in RESULTS["errors"].items():
        lines.append(f"error: {k}: {v}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: a tiny model for both cases, 1 warm-up + 2 timed steps, 128-token rows, "
                         "perf_counter timing; the released side runs only if --site is given")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default all)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 5; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps before timing (default 2; 1 with --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="packed row length (default 4096; 128 with --tiny)")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per optimizer step (default 2); the released "
                    "side gets the same conversations, one per row")
    ap.add_argument("--site", default=None, help=released_stack.SITE_HELP + "; needed for the released side")
    ap.add_argument("--code", default=str(released_stack.DEFAULT_CODE),
                    help="folder of the released configuration_deepseek.py / modeling_deepseek.py "
                         "(default ../shared/reference/released-code beside the repository)")
    ap.add_argument("--skip-released", action="store_true", help="measure this project only")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in backward from the start, on both sides (otherwise only after "
                         "an out-of-memory step)")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="seconds; runs not started by then are skipped and recorded (default 540)")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/finetune_h200.json; "
                    "runs/finetune_tiny.json with --tiny, so a smoke run never replaces the GPU figures)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # the spec file says the rest
        return args
    t = args.tiny
    args.steps = args.steps if args.steps is not None else (2 if t else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if t else 2)
    args.seq_len = args.seq_len or (128 if t else 4096)
    args.out = args.out or str(ROOT / ("runs/finetune_tiny.json" if t else "benchmarks/results/finetune_h200.json"))
    for flag in ("steps", "rows", "seq_len"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: give at least 1")
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)}; choose among {', '.join(CASES)}")
    args.released = not args.skip_released and not (t and args.site is None)
    if args.released and (args.site is None or not Path(args.site).is_dir()):
        ap.error(f"--site {args.site}: no such folder; the released side needs it (see --help), or --skip-released")
    if args.released and not (Path(args.code) / "modeling_deepseek.py").is_file():
        ap.error(f"--code {args.code}: no modeling_deepseek.py there; name the released code's folder")
    return args


def run_case(name: str, args, dev: torch.device, reserve: float = 0.0) -> None:
    """Both stacks on one case; the released child gets the time budget left minus `reserve` (seconds
    kept for the cases after this one)."""
    preset, mode = CASES[name]
    cfg = model_config(preset, args.tiny, dev)
    rng = np.random.default_rng(0)
    pad = cfg.eos_token_id if 0 <= cfg.eos_token_id < cfg.vocab_size else 0
    steps = [step_batches(rng, args.rows, args.seq_len, cfg.vocab_size, cfg.max_position_embeddings, pad)
             for _ in range(args.warmup + args.steps)]
    case = RESULTS["cases"][name] = {"preset": cfg.name, "mode": mode, "seq_len": args.seq_len, "rows": args.rows,
                                     "expert_backend": cfg.expert_backend,
                                     "conversations_per_step": len(steps[0]["padded"]["input_ids"]),
                                     "packing_fill": statistics.mean(s["tokens"] for s in steps) /
                                     (args.rows * args.seq_len)}
    log(f"{name}: ours ({cfg.name}, {mode}, {args.rows} x {args.seq_len} packed, backend {cfg.expert_backend})")
    try:
        case["ours"] = run_ours(cfg, mode, steps, args, dev)
    except Exception as e:  # noqa: BLE001 - one failing run must not hide the others
        case["ours"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        log(traceback.format_exc())
    gc.collect()  # the failed run's tensors (held by its traceback until here) go before the child starts
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    log(f"{name}: ours {case['ours'].get('status')}, {case['ours'].get('tokens_per_s', 0):,.0f} tokens/s")
    save(args.out)
    if args.released:
        left = args.time_budget - (time.time() - T0) - reserve
        if left <= 30:
            case["released"] = {"status": "skipped", "error": f"time budget {args.time_budget:.0f}s spent"}
        else:
            log(f"{name}: released stack in a child process")
            case["released"] = run_released(cfg, mode, steps, args, dev, left)
            log(f"{name}: released {case['released'].get('status')}, "
                f"{case['released'].get('tokens_per_s', 0):,.0f} tokens/s")
        case["ratio"] = ratios(case["ours"], case["released"])
    save(args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(Path(args.child[0]), Path(args.child[1]))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if dev.type != "cuda" and not args.tiny:
        log("no CUDA GPU here: the 16B architecture needs one (use --tiny for the CPU smoke run)")
        return 2
    gpu_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else None
    RESULTS["env"] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                      "gpu_memory_gib": gpu_gib, "torch": torch.__version__, "python": sys.version.split()[0],
                      "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    RESULTS["settings"] = {"lora": {**LORA, "targets": PEFT_TARGETS, "trained_in_full": ["embed_tokens", "lm_head"]},
                           "seq_len": args.seq_len, "rows": args.rows, "warmup": args.warmup, "steps": args.steps,
                           "optimizer": "AdamW lr 1e-5, no weight decay, clip 1.0" + (", fused" if gpu_gib else ""),
                           "tiny": args.tiny, "released": args.released}
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    names = args.cases.split(",")
    for i, name in enumerate(names):
        if time.time() - T0 > args.time_budget:
            RESULTS["errors"][name] = f"skipped: time budget {args.time_budget:.0f}s spent"
            continue
        run_case(name, args, dev, reserve=RESERVE * (len(names) - 1 - i))
    RESULTS["goal_check"] = goal_check(gpu_gib)
    save(args.out)
    print(table())
    ok = all(c.get("ours", {}).get("status") == "ok" for c in RESULTS["cases"].values())
    return 0 if ok and RESULTS["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
