"""GPU check of the core model: every expert backend in bf16 against an fp32 reference, the
grouped path free of host syncs, and a whole-model training step per backend.

Run on a CUDA machine: `python3 scripts/gpu_core_check.py` (prints a table, exits 1 on failure).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from deepseekmoe import Transformer
from deepseekmoe.model import presets
from deepseekmoe.model.moe.experts import experts_grouped, experts_loop, resolve_backend


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def expert_case(T, D, F, E, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, device="cuda", generator=g)
    w13 = torch.randn(E, 2 * F, D, device="cuda", generator=g) / D**0.5
    w2 = torch.randn(E, D, F, device="cuda", generator=g) / F**0.5
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    dy = torch.randn(T, D, device="cuda", generator=g)
    return x, idx, w, w13, w2, dy


def run_backend(fn, dtype, x, idx, w, w13, w2, dy):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, w13, w2)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, ok = [], True
    backends = {"loop": experts_loop, "grouped": experts_grouped}
    triton_fn = resolve_backend("auto", torch.device("cuda"))
    if triton_fn not in backends.values():
        backends["triton"] = triton_fn
    names = ("y", "dx", "dw", "dw13", "dw2")
    for shape in [(4096, 2048, 1408, 64, 6), (1, 2048, 1408, 64, 6), (999, 1280, 854, 63, 7)]:
        data = expert_case(*shape)
        ref = run_backend(experts_loop, torch.float32, *data)
        for name, fn in backends.items():
            got = run_backend(fn, torch.bfloat16, *data)
            errs = {n: rel(g, r) for n, g, r in zip(names, got, ref)}
            worst = max(errs.values())
            passed = worst < 1e-2
            ok &= passed
            rows.append({"shape": shape, "backend": name, "worst_rel": worst, "ok": passed, **errs})
    # grouped: no host-device sync in forward or backward
    data = expert_case(2048, 2048, 1408, 64, 6)
    leaves = [t.detach().bfloat16().requires_grad_() for t in (data[0], data[2], data[3], data[4])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = experts_grouped(leaves[0], data[1], leaves[1], leaves[2], leaves[3])
        y.backward(data[5].bfloat16())
        sync_free = True
    except RuntimeError as e:
        sync_free = False
        print("sync in grouped path:", e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ok &= sync_free
    # whole model, one training step per backend (bf16 autocast, fp32 master weights)
    cfg = presets.get("tiny")
    losses = {}
    for name in backends:
        torch.manual_seed(0)
        model = Transformer(cfg.replace(expert_backend=name)).cuda()
        gen = torch.Generator("cuda").manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        losses[name] = (out.loss.item(), gnorm)
    base = losses["loop"]
    for name, (loss, gn) in losses.items():
        close = abs(loss - base[0]) < 2e-2 and abs(gn - base[1]) / base[1] < 5e-2
        ok &= close
        rows.append({"model_step": name, "loss": loss, "grad_norm": gn, "ok": close})
    print(f"{'shape':28} {'backend':8} {'worst rel':>10} " + " ".join(f"{n:>9}" for n in names))
    for r in rows:
        if "shape" in r:
            print(f"{str(r['shape']):28} {r['backend']:8} {r['worst_rel']:10.2e} "
                  + " ".join(f"{r[n]:9.2e}" for n in names) + ("" if r["ok"] else "  FAIL"))
    for r in rows:
        if "model_step" in r:
            print(f"tiny train step, backend {r['model_step']:8}: loss {r['loss']:.5f} grad-norm {r['grad_norm']:.5f}"
                  + ("" if r["ok"] else "  FAIL"))
    print(f"grouped forward+backward without host sync: {sync_free}")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}: {'PASS' if ok else 'FAIL'}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_core_check.json"), "w") as f:
            json.dump({"rows": rows, "sync_free": sync_free, "ok": ok}, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
