"""Trainer internals: logged metrics and their accounting, gradient accumulation and activation
checkpointing (each against its plain twin), expert-load counting, the loss-curve PNG."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deepseekmoe import Transformer
from deepseekmoe.model import presets
from deepseekmoe.model.moe.router import Routing
from deepseekmoe.train import recipe
from deepseekmoe.train.metrics import ExpertLoad, peak_flops, read_metrics
from deepseekmoe.train.trainer import Trainer

BASE = [("model.hidden_size", "32"), ("model.num_hidden_layers", "2"), ("model.intermediate_size", "64"),
        ("model.moe_intermediate_size", "16"), ("model.n_routed_experts", "8"), ("model.num_experts_per_tok", "2"),
        ("model.num_attention_heads", "2"), ("train.seq_len", "32"), ("train.batch_size", "4"),
        ("train.steps", "3"), ("log.every", "1"), ("eval.every", "0"), ("eval.max_batches", "1"),
        ("checkpoint.every", "0"), ("log.progress", "false"), ("log.tensorboard", "false"),
        ("log.plot", "false"), ("sample.max_new_tokens", "0")]


def _run(tmp_path, name, *extra):
    cfg = recipe.build(None, BASE + list(extra))
    res = Trainer(cfg, run_dir=tmp_path / name, echo=lambda s: None).run()
    recs = read_metrics(tmp_path / name / "metrics.jsonl")
    weights = load_file(res.checkpoint / "model" / "model.safetensors")
    return res, recs, weights


def _close(wa, wb, atol):
    return max((wa[k] - wb[k]).abs().max().item() for k in wa) <= atol


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    _, ra, wa = _run(tmp_path, "a")
    _, rb, wb = _run(tmp_path, "b", ("train.micro_batch_size", "1"))
    la = [r["loss"] for r in ra if r["kind"] == "train"]
    lb = [r["loss"] for r in rb if r["kind"] == "train"]
    assert la == pytest.approx(lb, abs=2e-5)
    assert _close(wa, wb, 2e-5)


def test_activation_checkpointing_changes_nothing(tmp_path):
    _, ra, wa = _run(tmp_path, "a")
    _, rb, wb = _run(tmp_path, "b", ("system.activation_checkpointing", "true"))
    key = ["loss" if r["kind"] == "train" else "val_loss" for r in ra]
    assert [r[k] for r, k in zip(ra, key)] == pytest.approx([r[k] for r, k in zip(rb, key)], abs=1e-6)
    assert _close(wa, wb, 1e-6)


def test_train_record_fields_and_balance_split(tmp_path):
    res, recs, _ = _run(tmp_path, "a", ("model.device_balance_alpha", "0.05"), ("model.n_device_groups", "2"),
                        ("log.plot", "true"), ("log.tensorboard", "true"))
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["balance_loss"], rel=1e-5)
        # the split recomputed from the routers' affinities adds up to the model's sum
        assert r["expert_balance_loss"] + r["device_balance_loss"] == pytest.approx(r["balance_loss"], rel=1e-5)
        assert r["expert_balance_loss"] > 0 and r["device_balance_loss"] > 0
        assert r["tokens"] == r["step"] * 4 * 32 and r["grad_norm"] > 0 and "mfu" not in r
        assert len(r["expert_load"]) == 1 and 1.0 <= r["expert_load"][0] <= 8 / 2
    assert train[0]["lr"] == pytest.approx(2e-3 * 1 / 20)
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["val_bpb"] > 0
    png = tmp_path / "a" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert res.val_loss == pytest.approx(ev[0]["val_loss"])
    written = json.loads((res.checkpoint / "state.json").read_text())
    assert written["config"]["model"]["device_balance_alpha"] == 0.05


def test_expert_load_counts_exactly():
    cfg = presets.get("tiny", hidden_size=32, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
                      n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=2)
    model = Transformer(cfg)
    load = ExpertLoad(model, torch.device("cpu"))
    moe = model.moe_layers()[0]
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]])  # counts 3, 2, 2, 1 over 8 slots
    moe.last_routing = Routing(idx, torch.ones(4, 2), None)
    load.update()
    load.update()  # accumulates until read
    assert load.read_and_reset() == [round(6 / (16 / 4), 3)]
    assert load.counts[0].sum() == 0


def test_peak_flops_is_none_on_cpu():
    assert peak_flops(torch.device("cpu")) is None


def test_tensorboard_missing_is_said_once_and_real_failures_surface(tmp_path, monkeypatch, capsys):
    import sys

    from deepseekmoe.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    (tmp_path / "a").mkdir()
    log = MetricsLogger(tmp_path / "a", 3, 0, progress=False, tensorboard=True)
    log.write({"kind": "train", "step": 1, "loss": 1.0})
    log.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard logs are off") == 1 and "pip install tensorboard" in err
    assert not (tmp_path / "a" / "tensorboard").exists() and (tmp_path / "a" / "metrics.jsonl").exists()

    class Broken:
        def SummaryWriter(self, logdir):  # noqa: N802 - torch's name
            raise PermissionError(f"cannot write {logdir}")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", Broken())
    (tmp_path / "b").mkdir()
    with pytest.raises(PermissionError, match="cannot write"):
        MetricsLogger(tmp_path / "b", 3, 0, progress=False, tensorboard=True)


def test_run_summary_names_only_the_files_written(tmp_path, capsys):
    """--log.plot=false writes no loss.png, and the closing summary does not name one."""
    from deepseekmoe import cli

    run = tmp_path / "run"
    flags = ["--train.steps=2", "--train.batch_size=2", "--train.seq_len=32", "--eval.every=0", "--eval.max_batches=1",
             "--checkpoint.every=0", "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
             "--sample.max_new_tokens=0", "--system.device=cpu"]
    assert cli.main(["train", "--out", str(run), *flags]) == 0
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("run directory:")]
    assert len(summary) == 1 and "metrics.jsonl" in summary[0] and "loss.png" not in summary[0]
    assert not (run / "loss.png").exists() and (run / "metrics.jsonl").is_file()
