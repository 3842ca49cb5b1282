"""benchmarks/train_throughput.py's CPU smoke mode: both variants (the fast step and its reference
twins), small and accumulated steps, the JSON it writes (the GPU run's figures come from the same code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_writes_both_variants_and_step_sizes(tmp_path):
    out = tmp_path / "tt.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--smoke", "--cases", "tiny",
                           "--variants", "fast,ref", "--no-profile", "--warmup", "1", "--steps", "1",
                           "--optim-impl", "fused", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["errors"]
    got = {(r["variant"], r["accum"]): r for r in res["cases"]}
    assert set(got) == {("fast", 1), ("fast", 3), ("ref", 1), ("ref", 3)}
    assert got[("fast", 3)]["compute_weights"] and got[("fast", 3)]["loss_chunk"] == 50
    assert not got[("ref", 3)]["compute_weights"] and got[("ref", 3)]["loss_chunk"] == 0
    assert got[("fast", 1)]["clip"] == "fused" and got[("ref", 1)]["clip"] == "inplace"  # fused AdamW on CPU too
    for r in res["cases"]:
        assert r["all_finite"] and r["tokens_per_step"] == 2 * 64 * r["accum"]
        assert 0 < r["fwd_bwd_s_median"] <= r["step_s_median"]
    assert got[("fast", 1)]["expert_dtype"] == "torch.bfloat16"
    assert "training throughput per optimizer step" in proc.stdout


def _module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(variant, tps, mem, accum=1, compile_=True, case="deepseekmoe-16b-4l"):
    return {"case": case, "variant": variant, "compile": compile_, "accum": accum, "tokens_per_step": 8192 * accum,
            "tokens_per_s": tps, "peak_mem_gib": mem}


def test_side_by_side_takes_our_fastest_row_at_the_released_step_size_and_checks_the_goal():
    tt = _module("train_throughput")
    rows = [_row("released", 20_000.0, 50.0), _row("released", 25_000.0, 52.0, accum=64),
            _row("ref", 60_000.0, 40.0, compile_=False), _row("fast", 90_000.0, 42.0),
            _row("fast", 130_000.0, 53.0, accum=64), _row("fast", 1e9, 1.0, case="deepseekmoe-2b")]
    got = {r["accum"]: r for r in tt.side_by_side(rows)}
    assert set(got) == {1, 64}
    small, big = got[1], got[64]
    assert small["ours"] == "fast +compile" and small["ours_tokens_per_s"] == 90_000.0
    assert small["speed_ratio"] == 4.5 and not small["speed_met"]
    assert small["memory_ratio"] == 42.0 / 50.0 and small["memory_met"]
    assert big["speed_ratio"] == 130_000.0 / 25_000.0 and big["speed_met"]
    assert big["memory_ratio"] == 53.0 / 52.0 and big["memory_met"] is False
    # no memory figure (CPU): the memory half is unknown, not met
    cpu = tt.side_by_side([_row("released", 10.0, None), _row("fast", 60.0, None)])
    assert cpu[0]["memory_ratio"] is None and cpu[0]["memory_met"] is None and cpu[0]["speed_met"]
    assert tt.side_by_side([_row("fast", 60.0, None)]) == []  # no released row, nothing to compare


def test_master_weights_sum_bf16_gradients_in_fp32_and_copy_the_update_back():
    import torch

    rs = _module("released_stack")
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    mw = rs.MasterWeights([p])
    m = mw.masters[0]
    assert m.dtype == torch.float32 and m.requires_grad and torch.equal(m, p.detach().float())
    for g in (0.5, 0.25):  # two micro-batches
        p.grad = torch.full((3,), g, dtype=torch.bfloat16)
        mw.accumulate()
        assert p.grad is None
    assert m.grad.dtype == torch.float32 and torch.equal(m.grad, torch.full((3,), 0.75))
    with torch.no_grad():
        m.add_(1e-3)  # an update below bf16's resolution at 2.0 stays in the master
    mw.copy_back()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    assert float(m[1]) == pytest.approx(2.001, abs=1e-6)
    mw.zero_grad()
    assert m.grad is None and p.grad is None
