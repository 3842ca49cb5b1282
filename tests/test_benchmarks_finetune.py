"""benchmarks/finetune.py on CPU: the tiny smoke run end to end (JSON figures and the table), the
step data both stacks get (the same conversations packed and padded), and the out-of-memory ladder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "finetune.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_the_figures_and_prints_the_table(tmp_path):
    out = tmp_path / "ft.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--skip-released", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["cases"]) == {"16b-lora", "2b-full"}
    assert res["settings"]["lora"]["r"] == 8 and res["settings"]["lora"]["alpha"] == 32.0
    assert res["settings"]["released"] is False and res["env"]["device"] == "cpu"
    for case in res["cases"].values():
        ours = case["ours"]
        assert ours["status"] == "ok", ours
        assert 0 < ours["tokens_per_step"] <= case["rows"] * case["seq_len"] == 2 * 128
        assert case["packing_fill"] > 0.9
        assert ours["tokens_per_s"] == pytest.approx(ours["tokens_per_step"] / ours["step_s_median"])
        assert ours["finite"] and np.isfinite(ours["loss_first"])
        assert ours["attempts"] == [{"rows_per_forward": 2, "activation_checkpointing": False, "outcome": "ok"}]
        assert ours["peak_allocated_gib"] is None  # no CUDA memory figure on CPU
        assert "released" not in case
    lora, full = res["cases"]["16b-lora"]["ours"], res["cases"]["2b-full"]["ours"]
    assert 0 < lora["trainable_params"] < lora["total_params"]
    assert full["trainable_params"] == full["total_params"]
    assert "| case | stack | tokens/step" in proc.stdout and "| 16b-lora | ours |" in proc.stdout
    assert "goal: >= 5x the reference's tokens/s" in proc.stdout


def test_both_stacks_get_the_same_conversations():
    fb = _module()
    step = fb.step_batches(np.random.default_rng(0), rows=3, seq_len=256, vocab=500, max_len=512, pad_id=1)
    packed, padded = step["packed"], step["padded"]
    assert packed.input_ids.shape == (3, 256)
    assert step["tokens"] == packed.num_tokens == int(padded["attention_mask"].sum())
    # the same tokens and the same labelled tokens
    real = padded["attention_mask"].bool()
    ours = _real(packed)
    assert int(ours.sum()) == step["tokens"]
    assert torch.equal(torch.sort(padded["input_ids"][real]).values, torch.sort(packed.input_ids[ours]).values)
    assert int((padded["labels"] != -100).sum()) == int((packed.labels != -100).sum()) > 0
    # positions restart per conversation: one start per padded row
    assert int((packed.position_ids.eq(0) & ours).sum()) == padded["input_ids"].shape[0] > 3


def _real(packed) -> torch.Tensor:
    """bool [B, L]: the packed rows' real tokens. Conversations are laid from the start of a row and
    padding follows; a padding token sees only itself, a conversation's last token more than itself."""
    sees = packed.attention_mask[:, 0].sum(-1)
    fill = torch.tensor([int(torch.nonzero(row > 1).max()) + 1 for row in sees])
    return torch.arange(packed.input_ids.shape[1])[None] < fill[:, None]


class _Flaky:
    """measure()'s run protocol, running out of memory until one row per forward."""

    def __init__(self):
        self.micro, self.ac, self.calls = 4, False, 0

    def step(self, batch):
        self.calls += 1
        if self.micro > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1.0

    def zero_grad(self):
        pass

    def shrink(self):
        if self.micro > 1:
            self.micro = (self.micro + 1) // 2
            return True
        return False


def test_out_of_memory_halves_the_rows_per_forward_and_records_each_attempt():
    fb = _module()
    steps = [{"tokens": 100}] * 3
    res = fb.measure(_Flaky(), steps, warmup=1, dev=torch.device("cpu"))
    assert res["status"] == "ok" and res["rows_per_forward"] == 1 and res["tokens_per_step"] == 100
    assert [a["rows_per_forward"] for a in res["attempts"]] == [4, 2, 1]
    assert [a["outcome"].split(":")[0] for a in res["attempts"]] == ["out of memory", "out of memory", "ok"]

    class Never(_Flaky):
        def step(self, batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    res = fb.measure(Never(), steps, warmup=1, dev=torch.device("cpu"))
    assert res["status"] == "oom" and len(res["attempts"]) == 3
