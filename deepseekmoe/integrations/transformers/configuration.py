"""`DeepseekConfig`: the transformers config of model_type "deepseek", reading a released
deepseek-moe config.json unchanged.

Field names and defaults are the released ones (`checkpoint.hf.HF_DEFAULTS`); unknown keys
(`pretraining_tp`, `attention_dropout`, `auto_map`, this project's `deepseekmoe` extras) are kept
as attributes, as transformers does. The mapping to this project's `ModelConfig` has one home,
`checkpoint.hf.config_from_hf` / `config_to_hf`: `to_model_config()` and `from_model_config()` call it.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from deepseekmoe.checkpoint.hf import HF_DEFAULTS, MODEL_TYPE, config_from_hf, config_to_hf
from deepseekmoe.errors import ConfigError
from deepseekmoe.model.config import EXPERT_BACKENDS, ModelConfig

# Handled by PretrainedConfig itself (generation and weight tying read them there). rope_scaling is
# not stored: transformers 5 turns it into rope_parameters, and only null is supported anyway.
_BASE_FIELDS = ("bos_token_id", "eos_token_id", "tie_word_embeddings")


class DeepseekConfig(PretrainedConfig):
    """The released deepseek-moe config (see HF_DEFAULTS for every field and its default), plus
    `expert_backend`: this project's routed-expert backend ("auto": triton on a GPU, else grouped)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, expert_backend: str = "auto", use_cache: bool = True, **kwargs):
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:  # config_from_hf's error: only plain RoPE, as released
            config_from_hf({"model_type": MODEL_TYPE, "rope_scaling": rope_scaling})
        for k, v in HF_DEFAULTS.items():
            if k not in (*_BASE_FIELDS, "rope_scaling"):
                setattr(self, k, kwargs.pop(k, v))
        if expert_backend not in EXPERT_BACKENDS:
            raise ConfigError(f"expert_backend={expert_backend!r}: choose one of {', '.join(EXPERT_BACKENDS)}")
        self.expert_backend = expert_backend
        self.use_cache = use_cache
        base = {k: kwargs.pop(k, HF_DEFAULTS[k]) for k in _BASE_FIELDS}
        super().__init__(**base, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """This config as the project's ModelConfig (the released defaults fill gaps)."""
        raw = {k: v for k, v in self.to_dict().items() if not k.startswith("_") or k == "_name_or_path"}
        cfg = config_from_hf({**raw, "model_type": MODEL_TYPE})
        if cfg.router == "hash":
            raise ConfigError("router='hash' has no released-format gate weight; load such a model with "
                              "deepseekmoe.Transformer.from_pretrained instead")
        return cfg.replace(expert_backend=self.expert_backend)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, dtype: torch.dtype | None = None) -> DeepseekConfig:
        """The config.json that `Transformer.save_pretrained` writes for `cfg`, as a DeepseekConfig."""
        return cls(**config_to_hf(cfg, dtype), expert_backend=cfg.expert_backend)
