"""`DeepseekForCausalLM`: a native transformers causal-LM class for the released deepseek-moe
format, computing with this project's model code.

Modules and parameter names are the released ones (`model.embed_tokens`, `model.layers.N.self_attn.
q_proj`, `model.layers.N.mlp.gate.weight`, `mlp.shared_experts.gate_proj`, `mlp.experts.E.up_proj`,
`model.norm`, `lm_head`), so from_pretrained / save_pretrained, sharded safetensors, `device_map`,
`dtype` and PEFT target names work as for any transformers model. Each decoder layer is the
project's `Block` (RMSNorm, `Attention` over SDPA, dense `MLP` or `MoE` with its router and balance
loss); only the routed experts are swapped for `ExpertList` (experts.py), which keeps one Linear per
expert and packs them into the stacked tensors the fast backends read.

What the forward takes and gives, transformers' way:
- a `Cache` (`DynamicCache`, `StaticCache` for torch.compile) as `cache` (transformers >= 5.24) or
  `past_key_values` (earlier); `cache_position` when given, else the cache's length;
- `attention_mask` 2-D [B, S] (1 = token, left padding fine) -> the boolean SDPA mask [B, 1, L, S_kv]
  (causal, padding masked, and a padding query sees itself so that no row is empty); a 4-D mask
  (bool/int: nonzero = attend; float: additive) is taken as given; `position_ids` default to the
  mask's running count, as transformers' generate computes them;
- `labels` -> `loss` = transformers' causal-LM loss (shifted cross-entropy, -100 ignored,
  `num_items_in_batch` honoured) plus, in training, the MoE layers' balance loss: the released
  code trains that sum (it adds the balance gradient through an identity; here it is in the value
  too, as transformers' MoE models do). `aux_loss` is the balance loss alone (training only);
  `output_router_logits=True` also returns each MoE layer's router logits [B*L, E].
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from deepseekmoe.integrations.transformers.configuration import DeepseekConfig
from deepseekmoe.integrations.transformers.experts import ExpertList
from deepseekmoe.model.layers import RMSNorm, rope_cos_sin
from deepseekmoe.model.moe.router import BalanceLoss, TopKRouter
from deepseekmoe.model.transformer import BalanceSums, Block

try:  # transformers >= 5 initialises through its own functions, which skip loaded weights
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

_TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
# transformers 5.24 renamed the cache fields of its outputs from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _new_dynamic_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


def _max_cache_len(cache) -> int | None:
    """A static cache's slot count, None for a growing one (API spelled differently across versions)."""
    if not getattr(cache, "is_compileable", False):
        return None
    # get_max_length first: 5.x warns on get_max_cache_shape (a graph break under torch.compile).
    for name in ("get_max_length", "get_max_cache_shape"):
        fn = getattr(cache, name, None)
        if fn is not None:
            n = fn()
            return None if n is None or n < 0 else int(n)
    return None


class _CacheView:
    """The project's KV-cache interface (`update(layer, k, v, cache_position)`) over a transformers Cache."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer_idx, k_BHLd, v_BHLd, cache_position_L):
        return self.cache.update(k_BHLd, v_BHLd, layer_idx, {"cache_position": cache_position_L})


def sdpa_mask(attention_mask, batch: int, cache_position_L: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, L, kv_len] (True = attend) for queries at `cache_position_L`.

    2-D `attention_mask` [B, S<=kv_len] (1 = real token): causal over the slots, padding masked; a
    4-D one is converted (float masks are additive: 0 = attend). Either way every query also sees
    its own slot, so a padding row is never all False (SDPA would give NaN, which the cache would
    carry into real rows through 0 * NaN)."""
    slot_S = torch.arange(kv_len, device=cache_position_L.device)
    own_LS = slot_S[None, :] == cache_position_L[:, None]
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask == 0 if attention_mask.is_floating_point() else attention_mask != 0
        if m.shape[-1] < kv_len:
            m = F.pad(m, (0, kv_len - m.shape[-1]), value=False)
        return m | own_LS
    allowed_BLS = (slot_S[None, :] <= cache_position_L[:, None])[None].expand(batch, -1, -1)
    if attention_mask is not None:
        real_BS = attention_mask.to(torch.bool)
        if real_BS.shape[-1] < kv_len:
            real_BS = F.pad(real_BS, (0, kv_len - real_BS.shape[-1]), value=False)
        allowed_BLS = allowed_BLS & real_BS[:, None, :]
    return (allowed_BLS | own_LS[None])[:, None]


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x flags
    _supports_static_cache = True
    _can_compile_fullgraph = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained (released tensor names, shards, safetensors), plus the remote
        code config.json's auto_map names (checkpoint.hf_files.write_remote_code): the directory opens with
        trust_remote_code=True on any machine with this package. A class that transformers loaded as
        remote code would copy this package's source files instead; that copy is switched off."""
        from deepseekmoe.checkpoint import hf_files

        self.config.auto_map = dict(hf_files.AUTO_MAP)
        self._auto_class = self.config._auto_class = None
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self._auto_class, self.config._auto_class
        hf_files.write_remote_code(save_directory)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, TopKRouter):
            _init.normal_(module.weight, mean=0.0, std=std)


def _build_block(cfg, layer_idx: int, device: torch.device) -> Block:
    """The project's Block with its routed experts as per-expert modules, built on the meta device
    (nothing is allocated twice) and then given storage on `device` (transformers initialises it)."""
    with torch.device("meta"):
        block = Block(cfg, layer_idx)
        if block.is_moe:
            block.mlp.experts = ExpertList(cfg)
    return block if device.type == "meta" else block.to_empty(device=device)


def _new_parameter_device() -> torch.device:
    probe = nn.Module()  # a registered empty parameter: no storage, no draw from the RNG
    probe.register_parameter("p", nn.Parameter(torch.empty(0)))
    return probe.p.device


class DeepseekModel(DeepseekPreTrainedModel):
    """Embedding, the decoder layers (`Block`s), the final norm: hidden states out."""

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        cfg = config.to_model_config()
        self.model_config = cfg
        # Where a new parameter would live: honours torch.device(...) contexts (transformers 5 builds
        # on meta that way) and accelerate's init_empty_weights (transformers 4), which moves each
        # registered parameter to meta.
        device = _new_parameter_device()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([_build_block(cfg, i, device) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, output_router_logits=None, cache_position=None,
                past_key_values=None, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = h.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = _new_dynamic_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(L, device=h.device) + past
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
            else:
                position_ids = cache_position.unsqueeze(0).expand(B, L)
        mask = self._mask(attention_mask, cache, B, L, past, cache_position)
        cfg = self.model_config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        kv = _CacheView(cache) if cache is not None else None
        balance, hidden, router_logits = BalanceSums(), [], []
        hooks = [layer.mlp.gate.register_forward_hook(_router_logits_hook(router_logits))
                 for layer in self.layers if output_router_logits and layer.is_moe]
        try:
            for layer in self.layers:
                if output_hidden_states:
                    hidden.append(h)
                if self.gradient_checkpointing and self.training:
                    # Flat tensors out: a reentrant checkpoint (transformers 4.x's default) passes
                    # gradients only to the tensors it returns, not to those inside a NamedTuple.
                    h, *parts = self._gradient_checkpointing_func(functools.partial(_flat_layer, layer), h, cos,
                                                                  sin, input_ids, mask, kv, cache_position)
                    aux = BalanceLoss(*parts) if parts else None
                else:
                    h, aux = layer(h, cos, sin, input_ids, mask, kv, cache_position)
                if aux is not None and aux.total.device != cos.device:  # device_map over several GPUs
                    aux = type(aux)(*(None if t is None else t.to(cos.device) for t in aux))
                balance.add(aux)
        finally:
            for hk in hooks:
                hk.remove()
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        out = MoeModelOutputWithPast(last_hidden_state=h, hidden_states=tuple(hidden) if hidden else None,
                                     router_logits=tuple(router_logits) if router_logits else None,
                                     **{_CACHE_FIELD: cache if use_cache else None})
        out.balance = balance
        return out

    def _mask(self, attention_mask, cache, B, L, past, cache_position):
        """The SDPA mask for this call, or None where plain causal attention is exact (no padding, and
        no cache or a dynamic one still empty, so keys = queries): SDPA then takes its fused causal
        path (a 2K prefill through a DynamicCache ran ~10% slower with the explicit mask)."""
        if cache is None or (_max_cache_len(cache) is None and not torch.compiler.is_compiling() and past == 0):
            if attention_mask is None:
                return None
            if (attention_mask.dim() == 2 and not torch.compiler.is_compiling()
                    and bool(attention_mask.all())):
                return None
            return sdpa_mask(attention_mask, B, cache_position, L)
        kv_len = _max_cache_len(cache) or (past + L)
        return sdpa_mask(attention_mask, B, cache_position, kv_len)


def _flat_layer(layer, *args):
    h, aux = layer(*args)
    return (h,) if aux is None else (h, *aux)


def _router_logits_hook(store: list):
    def hook(module, args, out):
        x_TD = args[0]
        store.append(F.linear(x_TD.float(), module.weight.float()))
    return hook


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_transformer(cls, model, dtype: torch.dtype | None = None) -> DeepseekForCausalLM:
        """This project's `Transformer` as this class, without a trip through disk: the released
        tensors (checkpoint.hf.iter_export) copied in, on the Transformer's device, in eval mode."""
        from deepseekmoe.checkpoint import hf

        first = next(model.parameters())
        config = DeepseekConfig.from_model_config(model.config, dtype or first.dtype)
        with torch.device("meta"):
            out = cls(config)
        sd = {name: t.detach().to(dtype=dtype or t.dtype, copy=True) for name, t in hf.iter_export(model)}
        if model.config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        out.load_state_dict(sd, strict=True, assign=True)
        if model.config.tie_word_embeddings:
            out.lm_head.weight = out.model.embed_tokens.weight
        return out.eval()

    @property
    def model_config(self):
        """This model's config as the project's ModelConfig."""
        return self.model.model_config

    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """transformers' generate; calls the project's decoder computes the same way (greedy or
        plain sampling, one beam, no streamer or custom processors) run on it when `fast_generate`
        allows (by default: CUDA weights, eval mode). See fast_generate.py."""
        from deepseekmoe.integrations.transformers import fast_generate

        p = None if args else fast_generate.plan(self, inputs, {"generation_config": generation_config, **kwargs})
        if p is None:
            return super().generate(inputs, generation_config, *args, **kwargs)
        return fast_generate.fast_generate(self, p)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, output_router_logits=None,
                cache_position=None, logits_to_keep=0, past_key_values=None, return_dict=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, cache_position=cache_position)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        aux = out.balance.total
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
            if aux is not None:
                loss = loss + aux.to(loss.device)
        result = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, hidden_states=out.hidden_states,
                                           router_logits=out.router_logits,
                                           **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()
