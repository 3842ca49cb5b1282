"""The printed report of benchmarks/inference.py: the per-kernel tables of the profiled decode steps
and the summary table (decode, prefill, kernel, projection and attention micro-benchmarks, greedy parity,
the batch-1 bound). Reads the benchmark's results dict; adds the derived figures to it."""

from __future__ import annotations

import json

import torch


def print_profiles(rows, top: int = 12) -> None:
    """The per-kernel device-time table of every profiled decode variant."""
    for r in rows:
        pr = r.get("profile")
        if not pr:
            continue
        print(f"\nkernels of decode b{r['batch']} {r['mode']}/{r['backend']}: {pr['kernels_per_step']:.0f} launches, "
              f"{pr['kernel_us_per_step']:.0f} us device time per step (step {r['ms_per_step'] * 1e3:.0f} us)")
        print(f"  {'us/step':>8} {'share':>6} {'calls':>6}  kernel")
        for k in pr["top"][:top]:
            print(f"  {k['us_per_step']:8.1f} {k['us_per_step'] / pr['kernel_us_per_step']:6.1%} "
                  f"{k['calls_per_step']:6.0f}  {k['kernel'][:90]}")


def summary(results: dict, cfg, act: int, anchors: dict) -> None:
    """Print the summary table; `act` = activated weight bytes per token."""
    bw = results.get("copy_bandwidth_GB_s")
    results["activated_bytes_per_token"] = act
    best = {}
    for r in results.get("decode", []):
        if r["tok_s"] > best.get(r["batch"], {"tok_s": 0})["tok_s"]:
            best[r["batch"]] = r
    results["best_decode"] = {str(b): r for b, r in best.items()}
    if bw and 1 in best:
        bound = bw * 1e9 / act
        results["batch1_bound_tok_s"] = bound
        results["batch1_fraction_of_bound"] = best[1]["tok_s"] / bound
    print_profiles(results.get("decode", []))
    print()
    print(f"device: {results.get('device')}   torch {torch.__version__}   triton {results.get('triton')}   "
          f"preset {cfg.name}")
    print(f"{'what':44} {'ours':>14} {'anchor':>12}   kernels/step  max|dlogit| vs eager")
    if "load" in results:
        ld = results["load"]
        print(f"{'load from disk (page cache), s':44} {ld['seconds']:14.1f} {'':>12}")
        if "peak_gpu_GiB" in ld:
            print(f"{'load peak GPU memory, GiB (paper: < 40 GB)':44} {ld['peak_gpu_GiB']:14.2f} {'':>12}")
    for backend, p in results.get("prefill", {}).items():
        print(f"{'prefill ' + str(p['prompt']) + ' tok, tok/s (' + backend + ')':44} {p['tok_s']:14,.0f} "
              f"{anchors['prefill_2k']:12,.0f}")
    for r in results.get("decode", []):
        name = f"decode b{r['batch']} {r['mode']}/{r['backend']}, tok/s"
        anchor = anchors.get(f"decode_b{r['batch']}")
        kern = f"{r['profile']['kernels_per_step']:12.0f}" if "profile" in r else f"{'':>12}"
        print(f"{name:44} {r['tok_s']:14,.1f} {anchor if anchor else '':>12}   {kern}  "
              f"{r.get('max_abs_diff_vs_eager_reference', float('nan')):.3g} (of {r.get('logit_scale', 0):.3g})")
    for kind, k in [("kernel", k) for k in results.get("kernels", [])] + [("proj.", k) for k in
                                                                       results.get("projections", [])]:
        what = f"{kind} b{k['batch']} {k['what']}, us" + (" (GB/s)" if "GB_s" in k else "")
        print(f"{what:44} {k['us']:14.1f} {'':>12}" + (f"   {k['GB_s']:,.0f} GB/s" if "GB_s" in k else ""))
    for k in results.get("attention", []):
        what = f"attn. b{k['batch']} S={k['slots']} {k['what']}, us (GB/s)"
        print(f"{what:44} {k['us']:14.1f} {'':>12}   {k['GB_s']:,.0f} GB/s of the {k['visible']} visible slots' K/V")
    gr = results.get("greedy")
    for name, g in (gr or {}).get("paths", {}).items():
        div = ("" if g["first_divergence"] is None else f", first divergence at {g['first_divergence']} "
               f"(ref margin {g['max_margin_at_divergence']:.3g})")
        what = f"greedy {gr['tokens']} tok {name}"
        print(f"{what:44} {g['rows_matching']:>8}/{g['rows']} rows match{div}")
    if "batch1_bound_tok_s" in results:
        print(f"{'copy bandwidth (read+write), GB/s':44} {bw:14,.0f}")
        print(f"{'activated bytes / token, GB':44} {act / 1e9:14.3f}")
        print(f"{'batch-1 bound (bandwidth / bytes), tok/s':44} {results['batch1_bound_tok_s']:14,.1f}")
        print(f"{'batch-1 best / bound (goal >= 0.60)':44} {results['batch1_fraction_of_bound']:14.2f}")
    if results["errors"]:
        print("errors / skips:", json.dumps(results["errors"], indent=1)[:3000])
