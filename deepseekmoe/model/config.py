"""Model configuration and exact parameter / FLOP accounting.

`ModelConfig` is one typed dataclass. Field names follow the released deepseek-moe-16b
`config.json` wherever a field exists there (so `hf.py` maps it one to one); the fields after
`# --- ours ---` are this project's: the routing family of the paper's baselines, the
device-level balance loss, and the expert compute backend.

Accounting lives on the config, not the module, so that a 145B model can be counted without
building it; `tests/test_accounting.py` checks the counts against built modules and against the
paper's tables. The FLOP convention is documented in docs/accounting.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from deepseekmoe.errors import ConfigError, suggest

ROUTERS = ("topk", "switch", "gshard", "hash")
EXPERT_BACKENDS = ("auto", "loop", "grouped", "triton", "gather")  # model/moe/experts.py describes each


@dataclass
class ModelConfig:
    """A decoder-only Transformer whose FFNs are dense or (DeepSeek)MoE layers.

    Defaults describe deepseek-moe-16b. A model is dense everywhere when `n_routed_experts == 0`.
    """

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # width of the dense FFN layers
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (plain MHA)
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6  # routed experts per token (mK - K_s in the paper)
    moe_intermediate_size: int = 1408  # width of one expert
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # expert-level balance factor (alpha_1)
    seq_aux: bool = True  # released code's per-sequence form of the expert-level loss
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    attention_bias: bool = False
    # --- ours ---
    router: str = "topk"  # topk (DeepSeekMoE) | switch (top-1) | gshard (top-2, renormalised) | hash
    device_balance_alpha: float = 0.0  # device-level balance factor (alpha_2); 0 disables it
    n_device_groups: int = 1  # D: contiguous expert groups (devices) for the device-level loss
    expert_backend: str = "auto"  # one of EXPERT_BACKENDS
    hash_seed: int = 0  # seed of the Hash Layer's fixed token-id -> expert table
    name: str = field(default="custom", compare=False)
    # Training loss only: tokens per chunk of the fused LM-head cross-entropy (model/loss.py), which
    # never holds all logits at once; `model(x, labels=...)` then returns logits=None. 0: the plain
    # path (logits materialised and returned). Not written to config.json (a way to compute, like
    # expert_backend).
    lm_loss_chunk: int = 0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and how to fix it."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "moe_layer_freq", "max_position_embeddings"]
        if self.has_dense_layers():
            positive.append("intermediate_size")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                     "first_k_dense_replace", "moe_intermediate_size", "lm_loss_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be a non-negative integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; choose a head count that divides the hidden size")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be "
                              "even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; each KV head serves a whole group")
        if self.router not in ROUTERS:
            raise ConfigError(f"router={self.router!r}: must be one of {', '.join(ROUTERS)}"
                              + suggest(self.router, ROUTERS))
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ConfigError(f"expert_backend={self.expert_backend!r}: must be one of "
                              f"{', '.join(EXPERT_BACKENDS)}" + suggest(self.expert_backend, EXPERT_BACKENDS))
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func={self.scoring_func!r}: only 'softmax' is supported "
                              "(the released deepseek-moe models use softmax)")
        if self.n_routed_experts == 0:
            return
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size={self.moe_intermediate_size}: must be positive "
                              "when n_routed_experts > 0")
        k = self.num_experts_per_tok
        if k < 1:
            raise ConfigError(f"num_experts_per_tok={k}: an MoE layer routes each token to at least 1 "
                              "expert; set n_routed_experts=0 for a dense model")
        if k > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok={k} is larger than n_routed_experts="
                              f"{self.n_routed_experts}; a token cannot pick more experts than exist")
        fixed_k = {"switch": 1, "gshard": 2, "hash": 1}.get(self.router)
        if fixed_k is not None and k != fixed_k:
            raise ConfigError(f"num_experts_per_tok={k}: router={self.router!r} routes each token to "
                              f"exactly {fixed_k} expert(s); set num_experts_per_tok={fixed_k}")
        if self.router == "hash" and self.n_shared_experts:
            raise ConfigError("n_shared_experts must be 0 with router='hash' (Hash Layer has no shared "
                              "experts)")
        D = self.n_device_groups
        if not isinstance(D, int) or D < 1 or self.n_routed_experts % D:
            raise ConfigError(f"n_device_groups={D!r} must be a positive divisor of n_routed_experts="
                              f"{self.n_routed_experts} (experts are split into equal contiguous groups)")
        for name in ("aux_loss_alpha", "device_balance_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: a balance factor cannot be negative")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The released rule: MoE iff idx >= first_k_dense_replace and idx % moe_layer_freq == 0."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def layer_plan(self) -> list[str]:
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    def has_dense_layers(self) -> bool:
        return any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated); unknown fields raise ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        for k in changes:
            if k not in names:
                raise ConfigError(f"unknown model config field {k!r}" + suggest(k, names))
        # A plain-MHA config stays plain MHA when only the head count changes.
        if ("num_attention_heads" in changes and "num_key_value_heads" not in changes
                and self.num_key_value_heads == self.num_attention_heads):
            changes["num_key_value_heads"] = changes["num_attention_heads"]
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ConfigError(f"unknown model config field {unknown[0]!r}" + suggest(unknown[0], names))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ accounting
    def _attn_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        q = d * self.num_attention_heads * hd
        kv = 2 * d * self.num_key_value_heads * hd
        o = self.num_attention_heads * hd * d
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd + d if self.attention_bias else 0
        return q + kv + o + bias

    def _moe_params(self, active: bool) -> int:
        d, f = self.hidden_size, self.moe_intermediate_size
        router = 0 if self.router == "hash" else self.n_routed_experts * d
        shared = 3 * d * f * self.n_shared_experts
        n = self.num_experts_per_tok if active else self.n_routed_experts
        return router + shared + 3 * d * f * n

    def _layer_params(self, i: int, active: bool) -> int:
        ffn = self._moe_params(active) if self.is_moe_layer(i) else 3 * self.hidden_size * self.intermediate_size
        return self._attn_params() + ffn + 2 * self.hidden_size

    def _embedding_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head

    def num_params(self) -> int:
        """Exact count of trainable parameters of `Transformer(self)` (embeddings included)."""
        layers = sum(self._layer_params(i, False) for i in range(self.num_hidden_layers))
        return self._embedding_params() + layers + self.hidden_size

    def num_active_params(self) -> int:
        """Parameters a token touches: all but the routed experts it is not sent to."""
        layers = sum(self._layer_params(i, True) for i in range(self.num_hidden_layers))
        return self._embedding_params() + layers + self.hidden_size

    def num_ffn_params(self, active: bool = False) -> int:
        """Parameters of all FFNs (dense FFNs, shared and routed experts; routers excluded): the
        paper's "expert parameters" (Table 2 counts GShard x1.5 and Dense x16 this way)."""
        d, f = self.hidden_size, self.moe_intermediate_size
        total = 0
        for i in range(self.num_hidden_layers):
            if self.is_moe_layer(i):
                n = self.num_experts_per_tok if active else self.n_routed_experts
                total += 3 * d * f * (self.n_shared_experts + n)
            else:
                total += 3 * d * self.intermediate_size
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), the paper's convention.

        DeepSeek LLM counts a dense model as 72 L d^2 + 12 L d seq (+ 6 d V for the output head):
        6 x (4 d^2 attention projections + ~8 d^2 FFN) per layer, plus attention scores/values.
        The MoE analogue that reproduces every row of the paper's tables (docs/accounting.md):

            6 x sum_layers (4 d^2 + 3 d F_active) + 12 L d seq + 6 d V

        F_active is the layer's dense width or (K_s + K') x expert width. As in DeepSeek LLM,
        attention projections count 4 d^2 even with grouped KV heads, and the router, norms and
        input embedding are not counted.
        """
        layers = sum(self.layer_flops(i, seq_len) for i in range(self.num_hidden_layers))
        return layers + 6.0 * self.hidden_size * self.vocab_size

    def layer_flops(self, i: int, seq_len: int) -> float:
        """Training FLOPs per token of block i: 6 (4 d^2 + 3 d F_active) + 12 d seq (the terms of
        `flops_per_token`; also the pipeline's stage-balancing cost). Integers below 2^53, so the
        float sum over layers is exact."""
        d = self.hidden_size
        if self.is_moe_layer(i):
            f_active = (self.n_shared_experts + self.num_experts_per_tok) * self.moe_intermediate_size
        else:
            f_active = self.intermediate_size
        return 6.0 * (4 * d * d + 3 * d * f_active) + 12.0 * d * seq_len
