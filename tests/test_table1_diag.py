"""benchmarks/table1_diag.py: a two-model grid in --smoke sizes writes one JSON per run, the summary
and the figure; a second call reuses the runs; --replot rebuilds the table from the JSONs alone."""

import importlib.util
import json
from pathlib import Path

import pytest

from deepseekmoe.data import prepare, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table1_diag", ROOT / "benchmarks" / "table1_diag.py")
diag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diag)

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in tall green trees".split()
CORPUS = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(80)) + "." for i in range(30)]


def test_grid_summary_and_replot(tmp_path, capsys):
    tok = train_tokenizer(CORPUS, 300)
    tok.save(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "train.txt").write_text("\n".join(CORPUS[:24]))
    (tmp_path / "val.txt").write_text("\n".join(CORPUS[24:]))
    data = prepare([tmp_path / "train.txt"], tmp_path / "data", tokenizer=tmp_path / "tok" / "tokenizer.json",
                   val_inputs=[tmp_path / "val.txt"], workers=1, progress=False)
    out = tmp_path / "out"
    args = ["--smoke", "--data", str(data), "--models", "dense-2b,gshard-2b", "--seeds", "0", "--out", str(out)]
    assert diag.main(args) == 0
    labels = ["dense-2b_lr0.002_step_s0", "gshard-2b_lr0.002_step_s0"]
    assert sorted(p.stem for p in out.glob("*_s0.json")) == labels
    rows = json.loads((out / "diag.json").read_text())["rows"]
    assert set(rows) == set(labels) and "dead_experts" in rows["gshard-2b_lr0.002_step_s0"]
    assert "dead_experts" not in rows["dense-2b_lr0.002_step_s0"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert diag.main(args) == 0 and "== dense-2b" not in capsys.readouterr().out  # reused, not retrained
    assert diag.main(["--replot", "--out", str(out), "--data", str(data)]) == 0
    assert set(json.loads((out / "diag.json").read_text())["rows"]) == set(labels)
