"""The single-device Transformer: blocks (attention + dense MLP or MoE) and the model.

Module names mirror the released deepseek-moe checkpoint (`embed_tokens`, `layers.N.self_attn.
q_proj`, `mlp.gate`, `mlp.shared_experts`, `norm`, `lm_head`) so that checkpoint/hf.py maps tensors by name;
only the routed experts differ (stacked, see moe/experts.py). Parallelism is applied after
construction by deepseekmoe.parallel; nothing here knows about devices or ranks.

The forward returns `ModelOutput`: logits, the LM loss (next-token cross-entropy, labels aligned
with input_ids and shifted inside, -100 ignored), the summed balance losses of the MoE layers (in
training), and their sum `loss`, the objective the released code trains. With
`config.lm_loss_chunk` > 0 the LM loss comes from model/loss.py's fused head + cross-entropy
(chunked over tokens; no logits returned), `lm_loss` on the logits being its reference twin.

Pipeline stages are Transformers too (torchtitan's way): `Transformer.stage(layer_ids, first, last)`
keeps some blocks under their original indices (`layers` is a `Blocks` dict) and sets the embedding
or the final norm and head to None; its forward is `forward_stage` (a tensor in and out, as torch's
PipelineStage needs). `forward` and `forward_stage` share one embedding / rope / block loop
(`_hidden`), so there is one copy of the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.layers import MLP, Attention, RMSNorm, rope_cos_sin
from deepseekmoe.model.loss import lm_head_loss_fused
from deepseekmoe.model.moe.layer import MoE
from deepseekmoe.model.moe.router import BalanceLoss


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when the fused head + loss computed the loss (lm_loss_chunk > 0)
    loss: torch.Tensor | None = None  # lm_loss + balance_loss: the trained objective
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # all MoE layers' balance terms (training only)
    expert_balance_loss: torch.Tensor | None = None  # its expert-level part (None when off)
    device_balance_loss: torch.Tensor | None = None  # its device-level part (None when off)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` in forward; in backward the auxiliary loss receives gradient 1 (the released
    DeepSeek code's device): a pipeline stage attaches its balance losses to its output this way,
    since only the last stage computes the loss the schedule backpropagates."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_meta = (aux.dtype, aux.device, aux.shape)
        # A copy, not a view: FSDP2 hooks a stage's output for backward, and warns on (and
        # cannot protect) a view. One hidden-state copy per micro-batch and stage.
        return x.clone()

    @staticmethod
    def backward(ctx, grad_x):
        dtype, device, shape = ctx.aux_meta
        return grad_x, torch.ones(shape, dtype=dtype, device=device)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32: labels aligned with the inputs (shifted here), -100
    ignored. The reference twin of model/loss.py's fused head + loss (`lm_loss_chunk` > 0)."""
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


class Blocks(nn.ModuleDict):
    """The blocks keyed by layer index ("0", "1", ...: parameter names `layers.N.` as with a
    ModuleList). A pipeline stage keeps its blocks under their original indices, so its parameter
    names are the whole model's. Like the ModuleList it replaces, iterating yields the blocks in
    order and an int index is a layer index; keys() / values() / items() are the dict's."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, idx: int | str) -> nn.Module:
        return super().__getitem__(str(idx))

    def __setitem__(self, idx: int | str, block: nn.Module) -> None:
        super().__setitem__(str(idx), block)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = Blocks({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
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
        if position_ids is None:
            start = 0 if cache_position is None else cache_position[0]
            position_ids = (torch.arange(L, device=input_ids.device) + start).unsqueeze(0).expand(B, L)
        x, balance = self._hidden(input_ids, position_ids, attention_mask, kv_cache, cache_position)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        # config.lm_loss_chunk > 0: the loss straight from the hidden states, chunk by chunk, no logits
        fused = labels is not None and not logits_to_keep and self.config.lm_loss_chunk > 0
        logits = None if fused else self.lm_head(x)
        out = ModelOutput(logits=logits, balance_loss=balance.total, expert_balance_loss=balance.expert,
                          device_balance_loss=balance.device)
        if labels is not None:
            out.lm_loss = (lm_head_loss_fused(x, self.lm_head.weight, labels, self.config.lm_loss_chunk) if fused
                           else lm_loss(logits, labels))
            out.loss = out.lm_loss if balance.total is None else out.lm_loss + balance.total
        return out

    def forward_stage(self, x: torch.Tensor) -> torch.Tensor:
        """A pipeline stage's forward: token ids [B, L] on the first stage, hidden states [B, L, D]
        after; out go hidden states, or logits on the last stage. The stage's balance losses ride
        on its output (AddAuxiliaryLoss, before the head), and [total, expert-level, device-level]
        of this forward stay detached in `last_balance` for logging (None without balance losses)."""
        B, L = x.shape[:2]
        h, balance = self._hidden(x, torch.arange(L, device=x.device).unsqueeze(0).expand(B, L))
        self.last_balance = None
        if balance.total is not None:
            zero = torch.zeros((), device=h.device)
            self.last_balance = torch.stack([t.detach().float() if t is not None else zero for t in
                                             (balance.total, balance.expert, balance.device)])
            h = AddAuxiliaryLoss.apply(h, balance.total)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h

    def _hidden(self, x: torch.Tensor, position_ids: torch.Tensor, attention_mask=None, kv_cache=None,
                cache_position=None) -> tuple[torch.Tensor, BalanceSums]:
        """Embedding (when this model has it: else `x` are hidden states), rope, the blocks; the
        hidden states and the blocks' balance terms."""
        input_ids = x if self.embed_tokens is not None else None  # the Hash router routes by id
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        balance = BalanceSums()
        for layer in self.layers.values():
            h, aux = layer(h, cos, sin, input_ids, attention_mask, kv_cache, cache_position)
            balance.add(aux)
        return h, balance

    def stage(self, layer_ids: list[int], first: bool, last: bool) -> Transformer:
        """A pipeline stage of this model (parallel/pipeline.py): a Transformer holding this one's
        modules for blocks `layer_ids` (under their indices), the embedding only if `first`, the
        final norm and head only if `last` (else None), so parameter names are the whole model's.
        Calling it runs `forward_stage`."""
        stage = Transformer.__new__(Transformer)
        nn.Module.__init__(stage)
        stage.config = self.config
        stage.embed_tokens = self.embed_tokens if first else None
        stage.layers = Blocks({str(i): self.layers[i] for i in layer_ids})
        stage.norm = self.norm if last else None
        stage.lm_head = self.lm_head if last else None
        stage.last_balance = None
        stage.forward = stage.forward_stage  # torch's PipelineStage calls the module: a tensor out
        return stage

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
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", adapter=None, **overrides):
        """Load a checkpoint in the released deepseek-moe format (config.json + safetensors);
        `adapter`: a LoRA adapter directory in PEFT's format applied on top (model/lora.py)."""
        from deepseekmoe.checkpoint import hf

        model = hf.load_model(cls, path, dtype=dtype, device=device, **overrides)
        if adapter is not None:
            from deepseekmoe.model.lora import load_adapter

            load_adapter(model, adapter)
        return model

    def save_pretrained(self, path, max_shard_size: str | int = "5GB", tokenizer_dir=None) -> None:
        """Write the released deepseek-moe format, loadable by its reference code."""
        from deepseekmoe.checkpoint import hf

        hf.save_model(self, path, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir)
