"""The cosine and warmup-stable-decay schedules (train/optim.py), beside the paper's step decay:
values at the boundaries, monotonicity, the recipe keys that set them, and a short real run."""

from __future__ import annotations

import math

import pytest

from deepseekmoe.errors import ConfigError
from deepseekmoe.train import recipe
from deepseekmoe.train.optim import Schedule
from deepseekmoe.train.recipe import ScheduleSection


def _curve(kind: str, total: int = 100, warmup: int = 10, **kw) -> list[float]:
    s = Schedule(ScheduleSection(kind=kind, warmup_steps=warmup, **kw), 1.0, total)
    return [s(i) for i in range(total)]


def test_cosine_values():
    lr = _curve("cosine", total=101, warmup=10, min_lr_ratio=0.1)
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup, as the others
    assert lr[10] == 1.0  # the peak at the end of the warmup
    # Halfway through the decay (step 10 + 90/2 = 55): the mean of the two ends.
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[55] == pytest.approx(0.55)
    assert lr[100] == pytest.approx(0.1)  # the last step lands on min_lr_ratio x lr
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # never rises after the warmup
    assert _curve("cosine", min_lr_ratio=0.0)[-1] == pytest.approx(0.0, abs=1e-12)


def test_wsd_values():
    lr = _curve("wsd", total=100, warmup=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr[9] == pytest.approx(1.0)
    assert lr[10:80] == [1.0] * 70  # the stable phase: flat at the peak
    # The decay phase: the last 20 steps, linear, ending at 0 on the last step.
    assert lr[80] == pytest.approx(1 - 1 / 20) and lr[89] == pytest.approx(0.5)
    assert lr[99] == pytest.approx(0.0, abs=1e-12)
    steps = [a - b for a, b in zip(lr[80:], lr[81:])]
    assert max(steps) - min(steps) < 1e-12  # linear: equal decrements
    lr = _curve("wsd", total=100, warmup=10, min_lr_ratio=0.25, decay_fraction=0.5)
    assert lr[49] == 1.0 and lr[50] < 1.0 and lr[99] == pytest.approx(0.25)


def test_wsd_decay_never_starts_inside_the_warmup():
    lr = _curve("wsd", total=20, warmup=15, min_lr_ratio=0.0, decay_fraction=0.9)
    assert lr[14] == pytest.approx(1.0)  # warmup kept whole
    assert lr[15] < 1.0 and lr[19] == pytest.approx(0.0, abs=1e-12)


def test_short_runs_do_not_divide_by_zero():
    # The last step is at min_lr_ratio x lr however short the run (a one-step run included).
    assert _curve("cosine", total=1, warmup=0) == [pytest.approx(0.1)]
    assert _curve("cosine", total=3, warmup=2, min_lr_ratio=0.5) == pytest.approx([0.5, 1.0, 0.5])
    assert _curve("wsd", total=1, warmup=0, min_lr_ratio=0.5) == [0.5]


def test_step_schedule_unchanged():
    """The paper's schedule is untouched by the new keys (tests/test_train_reference.py checks the curve)."""
    lr = _curve("step", total=100, warmup=10, min_lr_ratio=0.5, decay_fraction=0.5)
    assert lr[10:80] == [1.0] * 70 and lr[80] == pytest.approx(0.316) and lr[95] == pytest.approx(0.316 ** 2)


def test_recipe_keys_and_errors():
    cfg = recipe.build(None, [("schedule.kind", "wsd"), ("schedule.decay_fraction", "0.1"),
                              ("schedule.min_lr_ratio", "0")])
    assert (cfg.schedule.kind, cfg.schedule.decay_fraction, cfg.schedule.min_lr_ratio) == ("wsd", 0.1, 0.0)
    with pytest.raises(ConfigError, match="min_lr_ratio=1.5"):
        recipe.build(None, [("schedule.min_lr_ratio", "1.5")])
    with pytest.raises(ConfigError, match="decay_fraction=0"):
        recipe.build(None, [("schedule.decay_fraction", "0")])
    with pytest.raises(ConfigError, match="cosine, wsd"):
        recipe.build(None, [("schedule.kind", "linear")])


def test_pretraining_with_cosine_logs_the_schedule(tmp_path):
    """A real (tiny) pretraining run takes the schedule: the logged lr is the function's value."""
    from deepseekmoe.train.metrics import read_metrics
    from deepseekmoe.train.trainer import Trainer

    over = [("train.steps", "6"), ("train.seq_len", "32"), ("train.batch_size", "2"), ("schedule.kind", "cosine"),
            ("schedule.warmup_steps", "2"), ("log.every", "1"), ("eval.every", "0"), ("eval.max_batches", "1"),
            ("checkpoint.every", "0"), ("log.progress", "false"), ("log.tensorboard", "false"),
            ("log.plot", "false"), ("sample.max_new_tokens", "0")]
    cfg = recipe.build(None, over)
    Trainer(cfg, run_dir=tmp_path / "run", echo=lambda s: None).run()
    got = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    want = Schedule(cfg.schedule, cfg.optim.lr, 6)
    assert got == pytest.approx([want(i) for i in range(6)], rel=1e-6)
    assert got[-1] == pytest.approx(cfg.optim.lr * 0.1, rel=1e-6)
