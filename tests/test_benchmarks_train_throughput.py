"""benchmarks/train_throughput.py's CPU smoke mode: both variants (the fast step and its reference
twins), small and accumulated steps, the JSON it writes (the GPU run's figures come from the same code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_writes_both_variants_and_step_sizes(tmp_path):
    out = tmp_path / "tt.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--smoke", "--cases", "tiny",
                           "--variants", "fast,ref", "--no-profile", "--warmup", "1", "--steps", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["errors"]
    got = {(r["variant"], r["accum"]): r for r in res["cases"]}
    assert set(got) == {("fast", 1), ("fast", 3), ("ref", 1), ("ref", 3)}
    assert got[("fast", 3)]["compute_weights"] and got[("fast", 3)]["loss_chunk"] == 50
    assert not got[("ref", 3)]["compute_weights"] and got[("ref", 3)]["loss_chunk"] == 0
    for r in res["cases"]:
        assert r["all_finite"] and r["tokens_per_step"] == 2 * 64 * r["accum"]
        assert 0 < r["fwd_bwd_s_median"] <= r["step_s_median"]
    assert got[("fast", 1)]["expert_dtype"] == "torch.bfloat16"
    assert "training throughput per optimizer step" in proc.stdout
