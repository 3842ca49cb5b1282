"""Split-KV attention in decode steps: each Attention reads only the cache slots its rows can see.

    with splitkv_attention(model, pad_B, n_splits):   # what Decoder does around each decode step
        logits = model(tokens_B1, ..., kv_cache=cache, cache_position=pos_1)

Inside the block every Attention module's forward is `splitkv_attention_forward`: the projections
and RoPE of `Attention.project` (the packed q|k|v GEMV when DecodePacking is active,
inference/packing.py), the cache write of Attention.forward, then the kernel
deepseekmoe.kernels.decode_attention (reference twin: the masked SDPA of Attention.forward over
the whole cache; tests/test_decode_attention.py) with the step's slot (`cache_position`, the
Decoder's pos_1), each row's left padding `pad_B` and the split count the Decoder chose once from
its static shapes (`decode_splits`), then o_proj. Calls that are not one-token
steps over a KV cache (prefill) run Attention.forward unchanged, so does a module whose class has
its own forward or whose forward is replaced already.

How it hooks in (as inference/fast_path.py): the forward is a bound method in the module's
__dict__ for the block, pad_B and the split count attributes beside it; all are removed afterwards. torch.compile
guards on the function, the same every step, so a compiled step is not retraced. The kernel is
imported only when the block is entered (CPU installs never import triton).

Shape legend: B batch, L query length (1 in decode), H heads, K kv heads, S cache slots, d head dim.
"""

from __future__ import annotations

import contextlib
import os
import types

from deepseekmoe.model.layers import Attention

ATTENTIONS = ("sdpa", "splitkv")  # a Decoder's decode-step attention
_PAD, _SPLITS = "_splitkv_pad_B", "_splitkv_splits"  # the Decoder's pad_B and split count, on each patched module
_KERNEL: dict = {}


def splitkv_unavailable_reason(model) -> str | None:
    """None when `model`'s decode steps can run the split-KV kernel, else a short reason."""
    dev = model.embed_tokens.weight.device
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the split-KV decode kernel needs a CUDA GPU (the model is on {dev.type})"
    try:
        from deepseekmoe.kernels.decode_attention import MAX_HEAD_DIM
    except ImportError as e:
        return f"the split-KV decode kernel is not available ({e})"
    if model.config.head_dim > MAX_HEAD_DIM:
        return f"head_dim {model.config.head_dim} is above the kernel's {MAX_HEAD_DIM}"
    return None


def splitkv_attention_forward(self, x, cos, sin, attn_mask=None, kv_cache=None, cache_position=None):
    """Attention.forward of a decode step on the split-KV kernel (bound to the module as `self`);
    `attn_mask` is not read: the kernel masks by cache_position and the module's pad_B."""
    B, L, _ = x.shape
    if L != 1 or kv_cache is None or cache_position is None or cache_position.numel() != 1:
        return Attention.forward(self, x, cos, sin, attn_mask, kv_cache, cache_position)
    q_BHLd, k_BKLd, v_BKLd = self.project(x, cos, sin)
    k_BKSd, v_BKSd = kv_cache.update(self.layer_idx, k_BKLd, v_BKLd, cache_position)
    out_BHd = _KERNEL["fn"](q_BHLd[:, :, 0], k_BKSd, v_BKSd, cache_position, getattr(self, _PAD),
                            self.head_dim ** -0.5, getattr(self, _SPLITS))
    return self.o_proj(out_BHd.reshape(B, 1, -1))


def decode_splits(model, batch_size: int, max_len: int) -> int:
    """The kernel's split count for decode steps of `batch_size` rows over `max_len` cache slots
    (decode_attention.n_splits_for: static shapes and the GPU's SM count, read once here)."""
    from deepseekmoe.kernels.decode_attention import n_splits_for, sm_count

    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    return n_splits_for(batch_size, K, max_len, H // K, cfg.head_dim, sm_count(model.embed_tokens.weight.device))


def takes_splitkv(attn) -> bool:
    """Whether this module's forward can be the split-KV one (an Attention on its own forward)."""
    return (isinstance(attn, Attention) and type(attn).forward is Attention.forward
            and "forward" not in attn.__dict__)


@contextlib.contextmanager
def splitkv_attention(model, pad_B, n_splits: int):
    """Every Attention of `model` on splitkv_attention_forward inside the block, with `pad_B` [B]
    (long, on the model's device) as each row's first real cache slot and `n_splits` kernel splits
    (decode_splits)."""
    if not _KERNEL:
        from deepseekmoe.kernels.decode_attention import decode_attention

        _KERNEL["fn"] = decode_attention
    patched = [m for m in model.modules() if takes_splitkv(m)]
    for attn in patched:
        attn.__dict__.update({"forward": types.MethodType(splitkv_attention_forward, attn), _PAD: pad_B,
                              _SPLITS: n_splits})
    try:
        yield
    finally:
        for attn in patched:
            attn.__dict__.pop("forward", None)
            attn.__dict__.pop(_PAD, None)
            attn.__dict__.pop(_SPLITS, None)
