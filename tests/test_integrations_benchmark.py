"""benchmarks/transformers_class.py stays runnable on CPU CI: its --tiny smoke mode builds the tiny
preset twice (this project's Transformer and the transformers class on the same weights), times
prefill and decode, checks that both produce the same greedy tokens, prints the table and writes
the JSON; without a GPU the full 16B run says it needs one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/transformers_class.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tiny_smoke_run_writes_the_table_and_json(tmp_path):
    out = tmp_path / "tc.json"
    proc = _run(["--tiny", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["model"]["preset"] == "tiny" and r["env"]["ours_mode"] == "eager"
    assert r["prefill"]["prompt"] == 32 and r["prefill"]["same_argmax"] is True
    assert r["prefill"]["ours_tok_s"] > 0 and r["prefill"]["class_tok_s"] > 0
    assert set(r["decode"]) == {"b1", "b2"}
    for row in r["decode"].values():
        assert all(row[f"{k}_same_tokens"] is True for k in ("class", "class_hf_dynamic", "class_hf_static"))
    assert "| decode b2 tok/s |" in proc.stdout.splitlines()[-1]


def test_full_run_needs_a_gpu_and_help_parses():
    proc = _run([])
    assert proc.returncode == 2 and "needs one" in proc.stdout
    assert "usage:" in _run(["--help"]).stdout
