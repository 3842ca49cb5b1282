"""benchmarks/table1_small.py: the shrunk Table 1 / Fig. 3 models keep the paper's proportions,
and the script runs end to end (two tiny models, a few CPU steps)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table1_small", ROOT / "benchmarks" / "table1_small.py")
t1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t1)


def _cfg(name, hidden=256, layers=4, heads=4, ffn=688, vocab=16384):
    from deepseekmoe.model import presets

    ov = t1.overrides(name, hidden, layers, heads, ffn)
    kw = {a.split("=")[0].removeprefix("--model."): int(a.split("=")[1]) for a in ov if "preset" not in a}
    base = [a.split("=")[1] for a in ov if a.startswith("--model.preset=")][0]
    return presets.get(base, vocab_size=vocab, **kw)


def test_shrunk_models_keep_the_paper_proportions():
    d, hs, gs, ds = (_cfg(m) for m in ("dense-2b", "hash-2b", "gshard-2b", "deepseekmoe-2b"))
    m1, m2 = _cfg("shared-m1"), _cfg("shared-m2")
    ffn_params = 3 * 256 * 688
    # every MoE variant holds 16 FFN-widths of experts per layer
    for c in (hs, gs, ds, m1, m2):
        width = (c.n_routed_experts + c.n_shared_experts) * c.moe_intermediate_size
        assert width == 16 * 688, c
    # top-1 variants activate one FFN (like Dense), the rest two; routers differ only by E x d
    assert hs.num_active_params() == d.num_active_params()
    for c in (gs, ds, m1, m2):
        act_ffn = (c.num_experts_per_tok + c.n_shared_experts) * 3 * 256 * c.moe_intermediate_size
        assert act_ffn == 2 * ffn_params, c
    shape = lambda c: (c.n_shared_experts, c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size)
    assert shape(ds) == (1, 63, 7, 172) and shape(m1) == (1, 15, 1, 688) and shape(m2) == (1, 31, 3, 344)
    # Table 2: GShard x1.5 activates 1.5 x GShard's expert parameters; Dense x16 holds (and activates)
    # all 16 FFN widths of an MoE layer.
    g15, d16 = _cfg("gshard-2.9b"), _cfg("dense-2b-x16")
    assert g15.num_ffn_params(active=True) * 2 == gs.num_ffn_params(active=True) * 3
    assert d16.num_ffn_params() == d16.num_ffn_params(active=True) == gs.num_ffn_params()
    assert t1.parse_models("dense,gshard-x1.5,dense-x16") == ["dense-2b", "gshard-2.9b", "dense-2b-x16"]


def test_shards_are_picked_by_number(tmp_path):
    for i in (0, 1, 2, 10):
        (tmp_path / f"train_{i:03d}.jsonl.xz").write_bytes(b"")
    names = lambda spec: [p.name[6:9] for p in t1.parse_shards(spec, tmp_path)]
    assert names("all") == ["000", "001", "002", "010"] and names("1-2") == ["001", "002"]
    assert names("0,10") == ["000", "010"]
    with pytest.raises(SystemExit, match="no train_"):
        t1.parse_shards("5-9", tmp_path)


@pytest.mark.timeout(300)
def test_smoke_run_writes_the_table(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table1_small.py"), "--smoke", "--backend", "grouped",
                        "--models", "dense-2b,shared-m2", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=280, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "table1_small.json").read_text())
    assert {(r["model"], r["seed"]) for r in res["runs"]} == {("dense-2b", 0), ("shared-m2", 0)}
    for row in res["runs"]:
        assert row["finished"] and 0 < row["val_loss"] < 10 and row["step"] == 6
        assert row["tokens_per_active_param"] == pytest.approx(6 * 4 * 32 / row["active_params"])
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table1_small.py"), "--smoke", "--models", "moe-x",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "unknown model 'moe-x'" in bad.stderr


def test_runs_stop_at_the_deadline(tmp_path):
    sleep = lambda s: [sys.executable, "-c", f"import time; time.sleep({s})"]
    jobs = [("fast", 0, tmp_path / "fast", sleep(0.1)), ("slow", 0, tmp_path / "slow", sleep(30)),
            ("late", 0, tmp_path / "late", sleep(0.1))]
    t0 = __import__("time").time()
    took = t1.run_all(jobs, parallel=2, deadline=t0 + 3)
    assert took[("fast", 0)] > 0 and took[("slow", 0)] is None  # stopped at the deadline
    assert took[("late", 0)] > 0  # started beside the slow one when the fast one ended
    assert __import__("time").time() - t0 < 20 and (tmp_path / "slow.log").exists()


def test_steps_are_fitted_to_the_measured_time():
    import types

    a = types.SimpleNamespace(batch_size=32, seq_len=512, fit_s=400, parallel=4, steps=2000)
    meas = {"dense-2b": {"tokens_per_s": 300000, "overhead_s": 15, "est_eval_s": 5},
            "gshard-2b": {"tokens_per_s": 200000, "overhead_s": 15, "est_eval_s": 8}, "hash-2b": {"failed": True}}
    # 4 dense + 8 at the slowest measured rate: (1600 - 264) / (4 x 0.0546 + 8 x 0.0819) = 1528 -> 1500
    assert t1.fit_steps(a, ["dense-2b", "gshard-2b", "deepseekmoe-2b"] * 4, meas) == 1500
    assert t1.fit_steps(a, ["dense-2b"], meas) == 2000  # never above --steps
    a.fit_s = 10
    assert t1.fit_steps(a, ["gshard-2b"] * 8, meas) == 100  # never below 100
