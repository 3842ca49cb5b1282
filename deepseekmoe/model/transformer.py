"""The single-device Transformer: blocks (attention + dense MLP or MoE) and the model.

Module names mirror the released deepseek-moe checkpoint (`embed_tokens`, `layers.N.self_attn.
q_proj`, `mlp.gate`, `mlp.shared_experts`, `norm`, `lm_head`) so that checkpoint/hf.py maps tensors by name;
only the routed experts differ (stacked, see moe/experts.py). Parallelism is applied after
construction by deepseekmoe.parallel; nothing here knows about devices or ranks.

The forward returns `ModelOutput`: logits, the LM loss (next-token cross-entropy, labels aligned
with input_ids and shifted inside, -100 ignored), the summed balance losses of the MoE layers (in
training), and their sum `loss`, the objective the released code trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.layers import MLP, Attention, RMSNorm, rope_cos_sin
from deepseekmoe.model.moe.layer import MoE
from deepseekmoe.model.moe.router import BalanceLoss


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + balance_loss: the trained objective
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # all MoE layers' balance terms (training only)
    expert_balance_loss: torch.Tensor | None = None  # its expert-level part (None when off)
    device_balance_loss: torch.Tensor | None = None  # its device-level part (None when off)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32: labels aligned with the inputs (shifted here), -100
    ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class BalanceSums:
    """The layers' balance terms summed over layers (in layer order, as the objective adds them)."""

    def __init__(self):
        self.total = self.expert = self.device = None

    def add(self, b: BalanceLoss | None) -> None:
        if b is None:
            return
        self.total = _add(self.total, b.total)
        self.expert = _add(self.expert, b.expert)
        self.device = _add(self.device, b.device)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, input_ids=None, attn_mask=None, kv_cache=None, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, cache_position)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux = self.mlp(h, input_ids)
        else:
            y, aux = self.mlp(h), None
        return x + y, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":  # built on meta: nothing to fill
            self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self, generator: torch.Generator | None = None, *, seed: int | None = None) -> None:
        """Initialise in place (deepseekmoe.model.init.init_weights: by module type; `seed` gives
        the same values in any parallel layout)."""
        from deepseekmoe.model.init import init_weights

        init_weights(self, generator, seed=seed)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache=None, cache_position: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """input_ids [B, L]. `attention_mask` is an optional boolean SDPA mask broadcastable to
        [B, 1, L, L_kv] (True = attend), used with padding and KV caches; without it attention is
        causal. `logits_to_keep` > 0 computes logits for the last positions only (generation)."""
        B, L = input_ids.shape
        cfg = self.config
        if position_ids is None:
            start = 0 if cache_position is None else cache_position[0]
            position_ids = (torch.arange(L, device=input_ids.device) + start).unsqueeze(0).expand(B, L)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        balance = BalanceSums()
        for layer in self.layers:
            x, aux = layer(x, cos, sin, input_ids, attention_mask, kv_cache, cache_position)
            balance.add(aux)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        out = ModelOutput(logits=logits, balance_loss=balance.total, expert_balance_loss=balance.expert,
                          device_balance_loss=balance.device)
        if labels is not None:
            out.lm_loss = lm_loss(logits, labels)
            out.loss = out.lm_loss if balance.total is None else out.lm_loss + balance.total
        return out

    # ------------------------------------------------------------------ analysis knobs
    def moe_layers(self):
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def set_routing(self, top_k: int | None = None, mask_top_fraction: float = 0.0,
                    shared_experts: bool = True, record: bool = False) -> None:
        """Change routing at inference without retraining (paper section 4.5).

        top_k: routed experts per token (None restores the configured count);
        mask_top_fraction: per token, disable this top fraction of experts by affinity;
        shared_experts: False switches the shared experts off; record: keep each MoE layer's
        last routing in `layer.mlp.last_routing`."""
        for moe in self.moe_layers():
            moe.gate.top_k = self.config.num_experts_per_tok if top_k is None else top_k
            moe.gate.mask_top_fraction = mask_top_fraction
            moe.shared_enabled = shared_experts
            moe.record = record

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ released format
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", **overrides):
        """Load a checkpoint in the released deepseek-moe format (config.json + safetensors)."""
        from deepseekmoe.checkpoint import hf

        return hf.load_model(cls, path, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path, max_shard_size: str | int = "5GB", tokenizer_dir=None) -> None:
        """Write the released deepseek-moe format, loadable by its reference code."""
        from deepseekmoe.checkpoint import hf

        hf.save_model(self, path, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir)
