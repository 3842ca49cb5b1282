"""The dense building blocks: RMSNorm, rotary position embeddings, attention (grouped-query,
optional KV cache) and the SwiGLU MLP. Module names mirror the released checkpoint.

Shape legend: B batch, L query length, H heads, Hkv key/value heads, d head dim, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseekmoe.model.config import ModelConfig


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

    def project(self, x, cos, sin):
        """q [B, H, L, d] and k, v [B, Hkv, L, d] of x, RoPE applied to q and k. (Decode steps may
        swap this for one GEMV over packed weights: deepseekmoe/inference/packing.py.)"""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, cache_position=None):
        B, L, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, cache_position)
            if attn_mask is None and k.shape[-2] != L:  # keys = queries (an empty dynamic cache): causal is exact
                raise ValueError("a KV cache holding other slots than this call's tokens needs an explicit "
                                 "attention mask over its slots (see deepseekmoe.inference.generate)")
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
