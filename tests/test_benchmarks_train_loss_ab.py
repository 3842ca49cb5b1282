"""benchmarks/train_loss_ab.py on CPU: the tiny A/B run end to end on a small prepared text dataset
(the same initial loss on every run, per-step records, the comparison, the table and the PNG, the
--plot-from mode), and the comparison's figures and verdict on made-up curves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and a to in is was he that it his her you as had with for she not at but be my on have him "
         "which by said all this from they so were one we there would if no or out more when up what very "
         "them into then little could an been only your about time some down over now great like house").split()


def _module():
    spec = importlib.util.spec_from_file_location("bench_train_loss_ab", ROOT / "benchmarks" / "train_loss_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from deepseekmoe.data import prepare

    d = tmp_path_factory.mktemp("ab_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12000), ("val", 2000)):
        words = rng.choice(WORDS, size=n)
        (d / f"{split}.txt").write_text("\n".join(" ".join(words[i:i + 12]) + "." for i in range(0, n, 12)))
    return prepare([d / "train.txt"], d / "prepared", vocab_size=300, val_inputs=[d / "val.txt"], progress=False)


def test_tiny_ab_run_records_every_run_and_compares_them(text_data, tmp_path, capsys):
    ab = _module()
    out = tmp_path / "ab.json"
    rc = ab.main(["--tiny", "--data", str(text_data), "--steps", "4", "--micro", "2", "--seq-len", "32",
                  "--window", "3", "--val-batches", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["runs"]) == ["ref", "fast", "reverse"]
    assert res["settings"]["tokens_per_step"] == 64 and res["settings"]["loss_chunk"] == 50
    first = [r["lm"][0] for r in res["runs"].values()]
    for r in res["runs"].values():
        assert r["steps_done"] == 4 and all(r["finite"]) and len(r["lm"]) == len(r["gnorm"]) == 4
        assert r["lm"][0] == pytest.approx(first[0], rel=1e-3)  # same weights, same first batch
        assert np.isfinite(r["val_lm"]) and r["step_s_median"] > 0
        assert r["lr"][:2] == pytest.approx([2e-4, 4e-4])  # 2 warm-up steps to --lr
    cmp_ = res["comparison"]
    assert set(cmp_["runs"]) == {"fast", "reverse"}
    for c in cmp_["runs"].values():
        assert c["common_steps"] == 4 and c["window_steps"] == 3 and len(c["diff"]) == 4
        assert 0 <= c["mean_abs"] <= c["max_abs"] < 0.05  # rounding-level differences only
    assert cmp_["noise_mean_abs"] == cmp_["runs"]["reverse"]["mean_abs"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "within bf16 noise" in printed and "reverse" in printed
    # the table and figure again from the JSON alone
    again = tmp_path / "again.png"
    assert ab.main(["--plot-from", str(out), "--png", str(again)]) == 0
    assert again.read_bytes()[:4] == b"\x89PNG"


def test_compare_reports_the_window_and_the_verdict():
    ab = _module()
    ref = [3.0, 2.0, 1.0, 1.0]
    runs = {"ref": {"lm": ref}, "fast": {"lm": [3.0, 2.0, 1.02, 0.99]},
            "reverse": {"lm": [3.0, 2.0, 1.01, 1.01]}, "repeat": {"lm": ref[:3]}}
    c = ab.compare(runs, window=2, tolerance=2.0)
    fast, rev, rep = c["runs"]["fast"], c["runs"]["reverse"], c["runs"]["repeat"]
    assert fast["mean_abs"] == pytest.approx(0.015) and fast["max_abs"] == pytest.approx(0.02)
    assert fast["mean"] == pytest.approx(0.005)
    assert rev["mean_abs"] == pytest.approx(0.01)
    assert rep["common_steps"] == 3 and rep["mean_abs"] == 0.0  # a deterministic repeat
    assert c["noise_mean_abs"] == pytest.approx(0.01)  # the largest noise figure
    assert c["fast_over_noise"] == pytest.approx(1.5) and c["within_noise"] is True
    assert ab.compare(runs, window=2, tolerance=1.0)["within_noise"] is False
    # no yardstick (only a deterministic repeat): no verdict
    c = ab.compare({"ref": {"lm": ref}, "fast": runs["fast"], "repeat": {"lm": ref}}, window=2, tolerance=2.0)
    assert c["within_noise"] is None and c["fast_over_noise"] is None
