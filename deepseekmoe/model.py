"""The single-device model: RMSNorm, RoPE, attention, SwiGLU MLP, blocks, Transformer.

Module names mirror the released deepseek-moe checkpoint (`embed_tokens`, `layers.N.self_attn.
q_proj`, `mlp.gate`, `mlp.shared_experts`, `norm`, `lm_head`) so that hf.py maps tensors by name;
only the routed experts differ (stacked, see moe/experts.py). Parallelism is applied after
construction by deepseekmoe.parallel; nothing here knows about devices or ranks.

The forward returns `ModelOutput`: logits, the LM loss (next-token cross-entropy, labels aligned
with input_ids and shifted inside, -100 ignored), the summed balance losses of the MoE layers (in
training), and their sum `loss`, the objective the released code trains.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 (bf16 sums of squares lose digits), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, L, head_dim] for positions [B, L] (HF Llama 'rotate_half' layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                              dtype=torch.float32) / head_dim))
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHLd, cos_BLd, sin_BLd):
    half = x_BHLd.shape[-1] // 2
    rotated = torch.cat([-x_BHLd[..., half:], x_BHLd[..., :half]], dim=-1)
    return x_BHLd * cos_BLd.unsqueeze(1) + rotated * sin_BLd.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with optional grouped KV heads, RoPE and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=b)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, cache_position=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            if attn_mask is None:
                raise ValueError("a KV cache needs an explicit attention mask over its slots "
                                 "(see deepseekmoe.generate)")
            k, v = kv_cache.update(self.layer_idx, k, v, cache_position)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        from .moe.layer import MoE  # the MoE layer builds its shared experts from MLP

        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, MLP) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

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
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, *, seed: int | None = None):
        """Normal(0, initializer_range) for every matrix, ones for norms, zero biases.

        `seed` (the trainer and the parallel code): layout-independent init. Each parameter is
        drawn on the CPU in float32 from its own generator, seeded from (seed, parameter name)
        (each routed expert of a stacked w13 / w2 from (seed, name, expert index)), then cast and
        copied to the parameter's device. So a parameter's values do not depend on the device,
        the dtype's rounding aside, or on which other parameters this module holds: a whole
        model, a pipeline stage and an expert-parallel / FSDP shard (DTensor) of the same
        parameter agree element for element. A sharded parameter receives only its local part;
        the transient host memory is one full non-expert parameter or this rank's experts of one
        stacked tensor.

        Without `seed`: the global RNG (or `generator`) fills the parameters in place, in module
        order, as `Transformer(cfg)` does after `torch.manual_seed`.

        Safe to call after `to_empty()` on a meta-built model (meta parameters are skipped; it also
        rebuilds non-persistent buffers such as the Hash Layer table)."""
        if seed is not None and generator is not None:
            raise ValueError("init_weights: pass either a generator or a seed, not both")
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            name = _canonical_name(name)
            local, offset = _local_part(p) if seed is not None else (p, None)
            if name.endswith("layernorm.weight") or name == "norm.weight":
                local.fill_(1.0)
            elif name.endswith(".bias"):
                local.zero_()
            elif seed is None:
                p.normal_(0.0, std, generator=generator)
            else:
                local.copy_(_seeded_normal(seed, name, tuple(p.shape), offset, tuple(local.shape), std))
        for m in self.modules():
            if hasattr(m, "build_table") and m.table.device.type != "meta":
                m.table.copy_(m.build_table())

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
        balance = None
        for layer in self.layers:
            x, aux = layer(x, cos, sin, input_ids, attention_mask, kv_cache, cache_position)
            if aux is not None:
                balance = aux if balance is None else balance + aux
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        out = ModelOutput(logits=logits, balance_loss=balance)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                          ignore_index=-100)
            out.loss = out.lm_loss if balance is None else out.lm_loss + balance
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
        from . import hf

        return hf.load_model(cls, path, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path, max_shard_size: str | int = "5GB", tokenizer_dir=None) -> None:
        """Write the released deepseek-moe format, loadable by its reference code."""
        from . import hf

        hf.save_model(self, path, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------- seeded init helpers
# Wrappers that parallelize() may insert into parameter names (activation checkpointing,
# torch.compile's OptimizedModule); the seed uses the plain Transformer name.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# Stacked routed-expert tensors: dim 0 indexes experts, each drawn from its own stream so that a
# rank holding E/ep experts generates only those.
_STACKED_EXPERTS = ("experts.w13", "experts.w2")


def _canonical_name(name: str) -> str:
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit generator seed from (seed, parameter name[, expert index]); a stable hash
    (blake2b), not Python's per-process salted hash()."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _local_part(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this process's storage of parameter p, its offset in the global tensor per dimension).

    A DTensor (expert parallel, FSDP2) holds one contiguous block of the global tensor per rank
    (FSDP's shards of an expert slice are sub-blocks of it); its offset comes from the placements,
    without communication. A plain tensor is its own whole."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")  # a DTensor implies this import
    if dtensor_mod is not None and isinstance(p, dtensor_mod.DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()  # under no_grad: the local storage itself (FSDP's shard included)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"init_weights: local shard {tuple(local.shape)} of a {tuple(p.shape)} parameter "
                               f"does not match its placements {p.placements} (expected {tuple(shape)})")
        return local, tuple(offset)
    return p, (0,) * p.dim()


def _seeded_normal(seed: int, name: str, shape: tuple[int, ...], offset: tuple[int, ...],
                   size: tuple[int, ...], std: float) -> torch.Tensor:
    """Block [offset, offset + size) of parameter `name` (global `shape`) drawn as
    Normal(0, std) on the CPU in float32 from the (seed, name) streams."""
    if name.endswith(_STACKED_EXPERTS):
        # Only the experts this block covers: one stream per expert.
        lo, n = offset[0], size[0]
        block = torch.empty((n, *shape[1:]), device="cpu", dtype=torch.float32)
        for i in range(n):
            block[i].normal_(0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name, lo + i)))
        offset = (0, *offset[1:])
    else:
        block = torch.empty(shape, device="cpu", dtype=torch.float32).normal_(
            0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name)))
    return block[tuple(slice(o, o + n) for o, n in zip(offset, size))]
