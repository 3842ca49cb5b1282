"""The released reference stack for side-by-side benchmarks: one home for loading and training it.

The released deepseek-moe-16b remote code (modeling_deepseek.py, configuration_deepseek.py) imports
only under transformers 4.46.x, so it runs in a child process whose PYTHONPATH puts a folder of
those wheels (--site, `pip install --no-deps --target DIR ...`) first and the repository root after.
Used by benchmarks/finetune.py (LoRA and full fine-tuning) and benchmarks/train_throughput.py
(pretraining steps at the 16B-4l shape).

  run_child(script, spec, site, timeout)  the parent's side: spec -> JSON file, `script --child SPEC
                                          OUT` under the site's path, the child's JSON result back
  build_model(hf_config, code, where, dev) the child's side: DeepseekForCausalLM with random bf16
                                          weights built on the device, sdpa attention, no KV cache
  pretrain_child(spec)                    train_throughput.py's released column: timed pretraining steps
  MasterWeights(params)                   the optimizer's view as DeepSpeed's bf16 mode keeps it:
                                          fp32 master copies (the AdamW state is then fp32 too), bf16
                                          gradients summed into fp32 master gradients, the updated
                                          masters copied back into the bf16 model

Why bf16 weights and no autocast: the released finetune script trains under DeepSpeed with bf16=True,
which runs the cast model as it is; its MoE training path also fails under autocast on a GPU
(index_put of a bf16 expert output into an fp32 buffer). Plain AdamW on bf16 weights would hold less
memory than the script does, and its small updates would mostly round away: hence the masters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SITE_HELP = ("folder with transformers 4.46.3, huggingface_hub 0.36.2, tokenizers 0.20.3, peft 0.13.2, "
             "accelerate 1.1.1 (pip install --no-deps --target DIR)")
DEFAULT_CODE = ROOT.parent / "shared" / "reference" / "released-code"


def child_env(site: str | Path) -> dict:
    """The environment of a released child: --site first on the path, then the repository root."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(site).resolve()), str(ROOT)]))


def run_child(script: str | Path, spec: dict, site: str | Path, timeout: float) -> dict:
    """Run `python script --child SPEC OUT` with the site's path; its JSON result, or a failure record
    ({"status": "failed", "error": ...}) when it times out or writes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec))
        try:
            r = subprocess.run([sys.executable, str(script), "--child", str(tmp / "spec.json"), str(tmp / "out.json")],
                               env=child_env(site), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:.0f}s (the time budget)"}
        if not (tmp / "out.json").is_file():
            return {"status": "failed", "error": f"the child exited {r.returncode}: {r.stderr[-2000:]}"}
        return json.loads((tmp / "out.json").read_text())


def import_released(code: Path, where: Path):
    """(DeepseekConfig, DeepseekForCausalLM) of the released files in `code`, loaded as a package copied
    into `where` (scripts/released_adapter_check.py's import_released, loaded by file path: scripts/ is no
    package, and an installed one of that name would shadow it)."""
    loader = importlib.util.spec_from_file_location("released_adapter_check",
                                                    ROOT / "scripts" / "released_adapter_check.py")
    check = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(check)
    return check.import_released(Path(code), Path(where))


def build_model(hf_config: dict, code: str | Path, where: Path, dev: torch.device) -> torch.nn.Module:
    """The released DeepseekForCausalLM of `hf_config` (a config.json dict, e.g. config_to_hf(cfg)), random
    bf16 weights built on `dev` (as from_pretrained(torch_dtype=bf16) holds them), sdpa attention, no KV
    cache, in train mode."""
    DeepseekConfig, DeepseekForCausalLM = import_released(Path(code), where)
    cfg = DeepseekConfig(**{k: v for k, v in hf_config.items() if k not in ("auto_map", "architectures")})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = DeepseekForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    model.train()
    return model


def versions() -> dict:
    """The versions the child ran under (transformers from the site; peft when it is there)."""
    import transformers

    out = {"transformers": transformers.__version__, "torch": torch.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


class MasterWeights:
    """fp32 masters of trainable bf16 parameters, as DeepSpeed's bf16 mode keeps them (see the module
    docstring). Give `masters` to the optimizer; after backward, accumulate() sums the bf16 gradients into
    the masters' fp32 gradients (and frees them); after the optimizer step, copy_back()."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.masters = [p.detach().float().requires_grad_(True) for p in params]

    def accumulate(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if p.grad is not None:
                    if m.grad is None:
                        m.grad = p.grad.float()
                    else:
                        m.grad.add_(p.grad)
                p.grad = None

    def copy_back(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None


def pretrain_child(spec: dict) -> dict:
    """benchmarks/train_throughput.py's released column, in the child: the model of spec["hf_config"],
    `warmup` + `steps` optimizer steps of one micro-batch of random tokens [micro, seq_len], then
    `big_steps` of `big_accum` micro-batches when they end before spec["deadline"] (time.time()).
    Each step: forward (its loss includes the balance loss in training), backward, the bf16 gradients
    summed into the fp32 masters' per micro-batch (DeepSpeed's bf16 mode), clipping at 1.0 and the
    finiteness check (one host sync), fused AdamW on the masters, the masters copied back. Returns
    {"status", "small"/"big": [(finite, fwd+bwd s, step s)], "warmup_s", "peak_mem_gib", ...}."""
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as where:
        model = build_model(spec["hf_config"], spec["code"], Path(where), dev)
    params = [p for p in model.parameters() if p.requires_grad]
    master = MasterWeights(params)
    opt = torch.optim.AdamW(master.masters, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if cuda else {"foreach": True}))
    gen = torch.Generator(device=dev).manual_seed(0)
    micro, seq, vocab = spec["micro"], spec["seq_len"], spec["hf_config"]["vocab_size"]

    def step(accum: int) -> tuple[bool, float, float]:
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        loss = torch.zeros((), device=dev)
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), device=dev, generator=gen)
            out = model(input_ids=ids, labels=ids)
            (out.loss / accum).backward()
            master.accumulate()
            loss += out.loss.detach().float() / accum
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        gnorm = torch.nn.utils.clip_grad_norm_(master.masters, 1.0, foreach=True)
        ok = bool(torch.isfinite(loss + gnorm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        master.copy_back()
        if cuda:
            ev[2].record()
            ev[2].synchronize()
            return ok, ev[0].elapsed_time(ev[1]) / 1e3, ev[0].elapsed_time(ev[2]) / 1e3
        return ok, t1 - t0, time.perf_counter() - t0

    t = time.perf_counter()
    for _ in range(spec["warmup"]):
        step(1)
    if cuda:
        torch.cuda.synchronize(dev)
    res = {"status": "ok", "warmup_s": time.perf_counter() - t, "small": [step(1) for _ in range(spec["steps"])],
           "params": sum(p.numel() for p in params), "versions": versions(),
           "weights": "bf16, no autocast, fp32 master weights + AdamW state (DeepSpeed's bf16 mode)",
           "attention": model.config._attn_implementation}
    est = statistics.median(t for _, _, t in res["small"]) * spec["big_accum"]
    if spec["big_accum"] > 1 and spec["big_steps"] and time.time() + est * spec["big_steps"] < spec["deadline"]:
        res["big"] = [step(spec["big_accum"]) for _ in range(spec["big_steps"])]
    elif spec["big_accum"] > 1:
        res["big_skipped"] = f"a large step takes ~{est:.0f}s: past the time budget"
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    return res
