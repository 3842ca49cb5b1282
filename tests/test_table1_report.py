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
    for png in ("table1_curves", "table1_train_curves"):
        assert (tmp_path / "out" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


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
