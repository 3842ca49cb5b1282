"""Config validation: bad values fail at construction with one message naming the field."""

import pytest

from deepseekmoe import ModelConfig
from deepseekmoe.cli import main
from deepseekmoe.errors import ConfigError
from deepseekmoe.model import presets

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16)


@pytest.mark.parametrize("change,field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=30), "hidden_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(router="gshrad"), "router"),
    (dict(router="switch"), "num_experts_per_tok"),
    (dict(expert_backend="fast"), "expert_backend"),
    (dict(n_device_groups=3), "n_device_groups"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**SMALL, **change})
    msg = str(e.value)
    assert field in msg
    assert "\n" not in msg


def test_suggestions_and_unknown_fields():
    with pytest.raises(ConfigError, match="did you mean 'gshard'"):
        ModelConfig(**{**SMALL, "router": "gshrad"})
    cfg = ModelConfig(**SMALL)
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        cfg.replace(hiden_size=64)
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({**SMALL, "n_experts": 4})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        presets.get("deepseekmoe-16")
    msg = str(e.value)
    assert "did you mean 'deepseekmoe-16b'" in msg
    for name in presets.names():
        assert name in msg


def test_layer_plan_follows_released_rule():
    cfg = ModelConfig(**{**SMALL, "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    # MoE iff idx >= first_k_dense_replace and idx % moe_layer_freq == 0
    assert cfg.layer_plan() == ["dense", "dense", "moe", "dense", "moe", "dense"]
    cfg = ModelConfig(**{**SMALL, "num_hidden_layers": 3, "first_k_dense_replace": 0})
    assert cfg.layer_plan() == ["moe"] * 3
    dense = ModelConfig(**{**SMALL, "n_routed_experts": 0, "n_shared_experts": 0, "num_experts_per_tok": 0})
    assert dense.layer_plan() == ["dense", "dense"]


def test_round_trip_dict():
    cfg = presets.get("deepseekmoe-145b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_info(capsys):
    assert main(["info", "deepseekmoe-16b"]) == 0
    out = capsys.readouterr().out
    assert "16,375,728,128" in out and "DMMMM" in out
    assert main(["info", "--paper"]) == 0
    assert "deepseekmoe-145b" in capsys.readouterr().out
    assert main(["info", "not-a-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'not-a-model'" in err
