"""benchmarks/table1_report.py: mean, sample sd and standard error per model, the adjacent-gap
verdicts against 2 SE, both result formats, and the markdown and plots it writes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table1_report", ROOT / "benchmarks" / "table1_report.py")
rep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rep)


def _run(model, seed, loss):
    return {"model": model, "seed": seed, "finished": True, "val_loss": loss, "params": 4e7, "active_params": 1e7,
            "tokens_per_active_param": 5.0, "curve": [[1, loss + 1], [2, loss]], "train_curve": [[1, loss + 2]]}


def test_stats_and_verdicts(tmp_path):
    runs = [_run("dense-2b", s, v) for s, v in enumerate((5.0, 5.2))]
    runs += [_run("hash-2b", s, v) for s, v in enumerate((4.9, 5.1))]  # gap 0.1, SE sqrt(.01 + .01)
    runs += [_run("switch-2b", s, v) for s, v in enumerate((4.0, 4.02, 4.04))]  # far below: reproduced
    runs += [_run("gshard-2b", s, v) for s, v in enumerate((4.5, 4.6))]  # above Switch: reversed
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"runs": runs[:4] + [{"model": "gshard-2b", "seed": 9, "finished": False}]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"runs": runs[4:]}))
    assert rep.report([a, b], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "table1_report.json").read_text())
    st = summary["stats"]["switch-2b"]
    assert st["n"] == 3 and st["mean"] == pytest.approx(4.02) and st["sd"] == pytest.approx(0.02)
    assert st["se"] == pytest.approx(0.02 / math.sqrt(3))
    v = summary["verdicts"]
    assert v["hash-2b < dense-2b"]["gap"] == pytest.approx(0.1)
    assert v["hash-2b < dense-2b"]["se"] == pytest.approx(math.sqrt(0.02))
    assert v["hash-2b < dense-2b"]["verdict"].startswith("within noise")
    assert v["switch-2b < hash-2b"]["verdict"].startswith("reproduced")
    assert v["gshard-2b < switch-2b"]["verdict"].startswith("reversed")
    md = (tmp_path / "out" / "table1_report.md").read_text()
    assert "| Switch | 40.00M | 10.00M | 5.0 | 3 | 4.0000 | 4.0200 | 4.0400 | **4.0200** |" in md
    assert "### Training-stream loss" in md
    # the stream table: the mean training loss after 90% of the steps (here only step 1 of 1)
    assert summary["stream"]["stats"]["switch-2b"]["mean"] == pytest.approx(4.02 + 2)
    for png in ("table1_curves", "table1_train_curves"):
        assert (tmp_path / "out" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_stream_loss_averages_the_last_tenth_of_steps():
    run = {"step": 100, "train_curve": [[50, 5.0], [80, 4.5], [91, 4.2], [100, 4.0]]}
    assert rep.stream_loss(run) == pytest.approx(4.1)
    assert rep.stream_loss({"step": 100, "train_curve": []}) is None


def test_the_first_single_seed_format_is_read(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"args": {"extra": ["--train.seed=2"]}, "rows": {"dense-2b": _run("dense-2b", 0, 5.5)}}))
    runs, analyses = rep.load_runs([p])
    assert [(r["model"], r["seed"], r["val_loss"]) for r in runs] == [("dense-2b", 2, 5.5)] and analyses == []


def test_figs_4_to_6_are_plotted_from_the_analysis(tmp_path):
    fig4 = lambda base: {"rows": [{"fraction": f / 16, "loss": base + f / 10} for f in range(5)]}
    analysis = {"deepseekmoe-2b": {"fig4_redundancy": fig4(3.0), "fig5_shared": {"rows": [
        {"setting": "as trained", "loss": 3.0}, {"setting": "shared off, top_k + 1", "loss": 3.5}]},
        "fig6_topk": {"rows": [{"top_k": k, "loss": 4 - k / 10} for k in range(1, 10)]}},
        "gshard-2.9b": {"fig4_redundancy": fig4(3.1)},
        "gshard-2b": {"fig6_topk": {"rows": [{"top_k": k, "loss": 3.4 - k / 10} for k in (1, 2, 3)]}}}
    written = rep.plot_figs([analysis], tmp_path)
    assert [p.name for p in written] == ["table1_fig4.png", "table1_fig5.png", "table1_fig6.png"]


def test_table2_claims_need_the_reference_to_beat_its_base():
    st = lambda mean, se: {"mean": mean, "se": se}
    # equal within 2 SE, the reference better than its base: reproduced
    v = rep.table2_verdict(st(4.00, 0.01), st(4.01, 0.01), st(4.20, 0.01), "GShard x1.5", "GShard")
    assert v["verdict"] == "reproduced (equal within 2 SE)" and v["gap"] == pytest.approx(-0.01)
    base = st(4.20, 0.01)
    assert rep.table2_verdict(st(4.10, 0.01), st(4.00, 0.01), base, "R", "B")["verdict"].startswith("exceeded")
    assert rep.table2_verdict(st(4.00, 0.01), st(4.10, 0.01), base, "R", "B")["verdict"].startswith("not repro")
    # the reference no better than its base: the claim cannot be tested, the comparison still shown
    v = rep.table2_verdict(st(5.00, 0.01), st(4.88, 0.004), st(4.98, 0.02), "Dense x16", "Dense")
    assert v["verdict"].startswith("not testable at this scale: Dense x16 is not better than Dense (5.0000 vs 4.9800)")
    assert v["verdict"].endswith("exceeded (DeepSeekMoE better by > 2 SE)")
    assert v["reference_vs_base"]["gap"] == pytest.approx(-0.02)
