"""Recipes, overrides, the optimizer's parameter groups and the paper's LR schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.errors import ConfigError
from deepseekmoe.model import presets
from deepseekmoe.train import recipe
from deepseekmoe.train.cli import split_overrides
from deepseekmoe.train.optim import Schedule, build_optimizer, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_recipe_is_the_default_job():
    assert recipe.from_dict(recipe.load_recipe("tiny")) == recipe.TrainConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_recipe_parses_and_validates(path):
    cfg = recipe.build(str(path))
    assert cfg.name == path.stem
    assert cfg.model_config().name == cfg.model.preset
    # The resolved config written to a run directory reads back to the same config.
    assert recipe.from_dict(__import__("tomllib").loads(recipe.to_toml(cfg))) == cfg


# recipe: (max lr, warmup, schedule, global batch, seq len, training tokens, alpha_1, alpha_2, D)
PAPER = {
    "deepseekmoe-2b": (1.08e-3, 2000, "step", 2048, 2048, 100e9, 0.01, 0.0, 1),
    "gshard-2b": (1.08e-3, 2000, "step", 2048, 2048, 100e9, 0.01, 0.0, 1),
    "switch-2b": (1.08e-3, 2000, "step", 2048, 2048, 100e9, 0.01, 0.0, 1),
    "hash-2b": (1.08e-3, 2000, "step", 2048, 2048, 100e9, 0.0, 0.0, 1),
    "dense-2b": (1.08e-3, 2000, "step", 2048, 2048, 100e9, 0.01, 0.0, 1),
    "deepseekmoe-16b": (4.2e-4, 2000, "step", 4608, 4096, 2e12, 0.001, 0.0, 1),
    "deepseekmoe-145b": (3.0e-4, 2000, "constant", 4608, 4096, 245e9, 0.003, 0.05, 4),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipes_hold_the_papers_hyperparameters(name):
    lr, warmup, kind, batch, seq, tokens, a1, a2, D = PAPER[name]
    cfg = recipe.build(name)
    mc = cfg.model_config()
    assert (cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.kind) == (lr, warmup, kind)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (cfg.train.batch_size, cfg.train.seq_len) == (batch, seq)
    assert cfg.train.steps * batch * seq == pytest.approx(tokens, rel=2e-3)
    if kind == "step":
        assert cfg.schedule.decay_at == [0.8, 0.9] and cfg.schedule.decay_factor == 0.316
    if mc.n_routed_experts:
        assert mc.aux_loss_alpha == a1
    assert (mc.device_balance_alpha, mc.n_device_groups) == (a2, D)
    if name == "deepseekmoe-145b":
        assert cfg.train.steps == 13000


def test_step_schedule_values():
    s = Schedule(recipe.ScheduleSection(kind="step", warmup_steps=10, decay_at=[0.8, 0.9]), 1e-3, 100)
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert s(10) == s(79) == 1e-3
    assert s(80) == pytest.approx(1e-3 * 0.316) and s(89) == pytest.approx(1e-3 * 0.316)
    assert s(90) == pytest.approx(1e-3 * 0.316**2) and s(99) == pytest.approx(1e-3 * 0.316**2)


def test_constant_schedule_values():
    s = Schedule(recipe.ScheduleSection(kind="constant", warmup_steps=2000), 3e-4, 13000)
    assert s(0) == pytest.approx(3e-4 / 2000) and s(999) == pytest.approx(3e-4 / 2)
    assert s(1999) == s(2000) == s(12999) == 3e-4


def test_no_weight_decay_on_norms_and_biases():
    cfg = presets.get("tiny", hidden_size=32, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
                      n_routed_experts=4, num_experts_per_tok=2, attention_bias=True, num_hidden_layers=2)
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd and all(n.endswith(("norm.weight", "layernorm.weight", ".bias")) for n in nd)
    assert {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.gate.weight",
            "layers.1.mlp.experts.w13", "layers.0.self_attn.q_proj.weight"} <= d
    assert len(d) + len(nd) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    opt = build_optimizer(model, recipe.OptimSection(), torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_overrides_parse_typed_values():
    cfg = recipe.build(None, [("train.steps", "7"), ("optim.lr", "3e-4"), ("schedule.decay_at", "[0.5, 0.75]"),
                              ("log.progress", "false"), ("model.hidden_size", "64"), ("name", "x"),
                              ("sample.prompt", "Once upon")])
    assert (cfg.train.steps, cfg.optim.lr, cfg.schedule.decay_at) == (7, 3e-4, [0.5, 0.75])
    assert cfg.log.progress is False and cfg.name == "x" and cfg.sample.prompt == "Once upon"
    assert cfg.model_config().hidden_size == 64


@pytest.mark.parametrize("key, nearest", [("train.stpes", "train.steps"), ("trian.steps", "train.steps"),
                                          ("optim.weight_decy", "optim.weight_decay"),
                                          ("model.hiden_size", "model.hidden_size"),
                                          ("checkpoint.kep", "checkpoint.keep")])
def test_unknown_key_suggests_the_nearest(key, nearest):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'.*did you mean '{nearest}'"):
        recipe.build(None, [(key, "1")])


def test_unknown_key_in_a_recipe_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[train]\nsteps = 3\nbatch_sise = 4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'train.batch_sise' in .*r.toml.*'train.batch_size'"):
        recipe.build(str(p))


@pytest.mark.parametrize("key, value, msg", [
    ("train.steps", "ten", "expected an integer"), ("optim.lr", "true", "expected a number"),
    ("log.progress", "3", "expected true or false"), ("train.steps", "0", "must be >= 1"),
    ("schedule.kind", "cosin", "did you mean 'constant'|must be one of step, constant"),
    ("schedule.decay_at", "[1.5]", "strictly between 0 and 1"), ("train.seq_len", "100000", "max_position_embeddings"),
    ("train.micro_batch_size", "5", "not a multiple"), ("model.preset", "tiyn", "did you mean 'tiny'"),
    ("system.device", "tpu", "use auto, cpu, cuda"),
])
def test_bad_values_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        recipe.build(None, [(key, value)])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe 'deepseekmoe-2c' not found.*did you mean 'deepseekmoe-2b'"):
        recipe.build("deepseekmoe-2c")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        recipe.build(str(bad))
    bad.write_bytes(b"name = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        recipe.build(str(bad))


def test_split_overrides_forms():
    rest, ov = split_overrides(["r.toml", "--train.steps=5", "--optim.lr", "1e-3", "--out", "d", "--name=n",
                                "--resume"])
    assert rest == ["r.toml", "--out", "d", "--resume"]
    assert ov == [("train.steps", "5"), ("optim.lr", "1e-3"), ("name", "n")]


def test_grad_accum_is_derived():
    cfg = recipe.build("deepseekmoe-2b")
    assert cfg.grad_accum() == 2048 // 16 and cfg.grad_accum(world_size=8) == 2048 // (16 * 8)
    assert math.isclose(cfg.model_config().aux_loss_alpha, 0.01)


def test_parse_value_keeps_only_non_literals_as_text():
    assert recipe.parse_value("3e-4") == 3e-4 and recipe.parse_value("[1, 2]") == [1, 2]
    assert recipe.parse_value('"x y"') == "x y" and recipe.parse_value("true") is True
    for bare in ("tiny", "cuda:0", "Once upon", ""):  # not TOML literals: the text itself
        assert recipe.parse_value(bare) == bare


@pytest.mark.parametrize("key, value, msg", [
    ("system.dtype", "float16", r"system.dtype='float16': choose one of auto, float32, bfloat16"),
    ("system.dtype", "bf16", r"system.dtype='bf16': choose one of auto, float32, bfloat16"),
    ("parallel.param_dtype", "auto", r"parallel.param_dtype='auto': choose one of float32, bfloat16"),
])
def test_bad_dtypes_name_the_field_and_the_choices(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        recipe.build(None, [(key, value)])
    assert recipe.build(None, [(key, "bfloat16")]) is not None


def test_a_string_list_whose_quotes_the_shell_removed_still_parses():
    for text in ('["q_proj", "v_proj"]', "[q_proj,v_proj]", "q_proj, v_proj"):
        cfg = recipe.build(overrides=[("lora.targets", text)])
        assert cfg.lora.targets == ["q_proj", "v_proj"], text
    with pytest.raises(ConfigError, match=r"schedule.decay_at='soon': expected a list such as \[0.8, 0.9\]"):
        recipe.build(overrides=[("schedule.decay_at", "soon")])
