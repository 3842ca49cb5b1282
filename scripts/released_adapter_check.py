"""Does a LoRA adapter written by this project load on the released reference code, through PEFT,
under the transformers those files need (4.46.x), and give this project's logits?

Two processes, because the released modeling code does not import on current transformers:
  1. here (this environment): load a released-format checkpoint, add LoRA on every target the
     fine-tuning command adapts (attention, dense MLP, shared and routed experts) with non-zero B,
     write it with `save_adapter` (PEFT's format) and record this project's logits;
  2. a child with `--site DIR` first on its path (transformers 4.46.3 + PEFT 0.13 installed there
     with `pip install --no-deps --target DIR ...`): the released `modeling_deepseek.py` builds the
     model, its weights are loaded from the same checkpoint, `PeftModel.from_pretrained` reads the
     adapter, and the logits are compared.

Runs on CPU in fp32 (the comparison is of the format and the arithmetic, not of speed):

    pip download transformers==4.46.3 huggingface_hub==0.36.2 tokenizers==0.20.3 peft==0.13.2 accelerate==1.1.1 \\
        --no-deps -d wheels/
    pip install --no-deps --target site446 wheels/*.whl
    python scripts/released_adapter_check.py --site site446 \\
        --checkpoint ../shared/reference/p1 --code ../shared/reference/released-code

Prints a table and writes JSON (--out); exits 1 when the logits differ by more than --tol.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def ours(checkpoint: Path, adapter_dir: Path, ids_file: Path) -> None:
    """This project's side: the adapter written, the input ids and logits saved for the child."""
    import torch

    from deepseekmoe import Transformer
    from deepseekmoe.model.lora import LoraConfig, apply_lora, save_adapter

    model = Transformer.from_pretrained(checkpoint, dtype=torch.float32).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B = 0 would make any loader look right
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, adapter_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_model = Transformer.from_pretrained(checkpoint, dtype=torch.float32).eval()
        torch.save({"ids": ids, "logits": model(ids).logits, "base_logits": base_model(ids).logits}, ids_file)


def import_released(code: Path, where: Path):
    """(DeepseekConfig, DeepseekForCausalLM) of the released files in `code`. They import each other
    relatively (as transformers' remote-code loader packs them), so they are loaded as a package of
    their own, copied into the folder `where`."""
    import importlib
    import shutil

    pkg = where / "released_deepseek"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        shutil.copyfile(code / name, pkg / name)
    sys.path.insert(0, str(pkg.parent))
    return (importlib.import_module("released_deepseek.configuration_deepseek").DeepseekConfig,
            importlib.import_module("released_deepseek.modeling_deepseek").DeepseekForCausalLM)


def released(checkpoint: Path, code: Path, adapter_dir: Path, ids_file: Path, out_file: Path) -> None:
    """The child's side: the released modeling code + PEFT on the same weights and adapter."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    DeepseekConfig, DeepseekForCausalLM = import_released(code, out_file.parent)

    raw = json.loads((checkpoint / "config.json").read_text())
    cfg = DeepseekConfig(**{k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
    cfg._attn_implementation = "sdpa"
    model = DeepseekForCausalLM(cfg).float().eval()
    state = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"the released model does not take the checkpoint: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    saved = torch.load(ids_file, weights_only=True)
    with torch.no_grad():
        base = model(saved["ids"]).logits
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        adapted = wrapped(input_ids=saved["ids"]).logits
    n_lora = sum(1 for n, _ in wrapped.named_parameters() if "lora_A" in n)
    torch.save({"base": base, "adapted": adapted, "lora_modules": n_lora,
                "versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                             "torch": str(torch.__version__)}}, out_file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--site", type=Path, required=True,
                   help="a folder holding transformers 4.46.x, huggingface_hub, tokenizers and peft (pip --target)")
    p.add_argument("--checkpoint", type=Path, default=Path("../shared/reference/p1"),
                   help="a released-format checkpoint (default: ../shared/reference/p1)")
    p.add_argument("--code", type=Path, default=Path("../shared/reference/released-code"),
                   help="the folder of the released configuration_deepseek.py / modeling_deepseek.py")
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative logit difference accepted")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--child", nargs=4, metavar=("ADAPTER", "IDS", "OUT", "_"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        released(args.checkpoint.resolve(), args.code.resolve(), Path(args.child[0]), Path(args.child[1]),
                 Path(args.child[2]))
        return 0
    for what, path in (("--site", args.site), ("--checkpoint", args.checkpoint), ("--code", args.code)):
        if not path.is_dir():
            p.error(f"{what} {path}: no such folder")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours(args.checkpoint, tmp / "adapter", tmp / "ours.pt")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.site.resolve()), str(Path(__file__).parent)]))
        r = subprocess.run([sys.executable, __file__, "--site", str(args.site), "--checkpoint", str(args.checkpoint),
                            "--code", str(args.code), "--child", str(tmp / "adapter"), str(tmp / "ours.pt"),
                            str(tmp / "theirs.pt"), "-"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        mine, theirs = torch.load(tmp / "ours.pt", weights_only=True), torch.load(tmp / "theirs.pt", weights_only=True)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    res = {"checkpoint": str(args.checkpoint), **{f"{k}_version": v for k, v in theirs["versions"].items()},
           "lora_modules": theirs["lora_modules"],
           "base_rel_diff": rel(mine["base_logits"], theirs["base"]),
           "adapted_rel_diff": rel(mine["logits"], theirs["adapted"]),
           "adapter_effect": rel(theirs["adapted"], theirs["base"])}
    rows = [("released code", f"transformers {res['transformers_version']}, peft {res['peft_version']}"),
            ("LoRA modules PEFT wrapped", str(res["lora_modules"])),
            ("base logits, max rel. diff", f"{res['base_rel_diff']:.2e}"),
            ("adapted logits, max rel. diff", f"{res['adapted_rel_diff']:.2e}"),
            ("what the adapter changes (rel.)", f"{res['adapter_effect']:.2e}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    same = res["adapted_rel_diff"] <= args.tol and res["base_rel_diff"] <= args.tol
    ok = same and res["adapter_effect"] > 10 * args.tol  # and the adapter really changes the output
    print("same logits" if ok else f"DIFFERENT (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
