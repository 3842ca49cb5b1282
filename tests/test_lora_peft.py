"""LoRA adapters interchange with PEFT (the installed peft) on a model with the released module names.

`Released` below is a plain-torch model with the released checkpoint's module tree
(model.layers.N.self_attn.q_proj, mlp.gate, mlp.experts.E.gate_proj, mlp.shared_experts.*, ...),
one nn.Linear per expert as the reference code has, and a forward written out here from the
released semantics (one expert at a time). It loads the tensors this project exports
(save_pretrained), so its logits equal the Transformer's; PEFT then wraps its Linears as it would
the reference code's. Checked both ways: an adapter saved here loads with PeftModel.from_pretrained
and gives this project's logits; an adapter PEFT trained-and-saved loads here with load_adapter and
gives PEFT's logits. And the names: PEFT's own target selection from our adapter_config.json adapts
exactly the modules whose tensors we write. The same two ways on the transformers class of this
project (deepseekmoe.integrations.transformers.DeepseekForCausalLM, released module names), loaded
from the exported base with transformers' own from_pretrained.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from deepseekmoe.model.layers import apply_rope, rope_cos_sin
from deepseekmoe.model.lora import LoraConfig, adapter_plan, apply_lora, load_adapter, peft_config, save_adapter
from tests.helpers import rel_err, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ the released module tree
class _Norm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):  # the released MoEGate: a bare weight, softmax scores, top-k
    def __init__(self, E, d):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(E, d))


class _MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = _Gate(cfg.n_routed_experts, cfg.hidden_size)
        self.experts = nn.ModuleList(_MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = _MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)

    def forward(self, x):
        B, L, D = x.shape
        x = x.reshape(-1, D)
        scores = F.linear(x, self.gate.weight).softmax(-1)
        w, idx = scores.topk(self.top_k, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # the reference code's loop over experts
            tok, k = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel():
                y = y.index_add(0, tok, expert(x[tok]) * w[tok, k, None])
        return (y + self.shared_experts(x)).view(B, L, D)


class _Attn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = (t.repeat_interleave(self.h // self.kv, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class _Layer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = _Norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attn(cfg)
        self.post_attention_layernorm = _Norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MoE(cfg) if cfg.is_moe_layer(i) else _MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = _Norm(cfg.hidden_size, cfg.rms_norm_eps)


class Released(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = _Inner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM looks it up
        raise NotImplementedError

    def forward(self, input_ids):
        B, L = input_ids.shape
        pos = torch.arange(L).unsqueeze(0).expand(B, L)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, torch.float32)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


def _pair(tmp_path):
    """This project's tiny model and the released-name tree holding the same (exported) weights."""
    ours = tiny_model(first_k_dense_replace=1, expert_backend="grouped")
    ours.save_pretrained(tmp_path / "base")
    ref = Released(ours.config)
    ref.load_state_dict(load_file(tmp_path / "base" / "model.safetensors"), strict=True)
    return ours, ref.eval()


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def test_reference_tree_matches_the_model(tmp_path):
    ours, ref = _pair(tmp_path)
    assert rel_err(ref(_ids()), ours(_ids()).logits) < 1e-5


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, alpha=8.0, dropout=0.0),
    LoraConfig(r=2, alpha=5.0, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj", "down_proj"),
               experts=False, train_embeddings=True),
    LoraConfig(r=3, alpha=3.0, dropout=0.0, targets=("up_proj",), shared_experts=False, train_router=True),
], ids=["all", "no-experts+embeddings", "up-only+router"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, cfg):
    ours, ref = _pair(tmp_path)
    apply_lora(ours, cfg, seed=0)
    _perturb_trainable(ours, 1)
    save_adapter(ours, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter"))
    # PEFT adapted exactly the modules we wrote tensors for (its own target_modules matching)
    wrapped = {n for n, _ in ref.named_modules() if n.endswith(".lora_A.default")}
    ours_names = {n[len("base_model.model."):-len(".lora_A.weight")] + ".lora_A.default"
                  for n in adapter_plan(ours, cfg) if n.endswith(".lora_A.weight")}
    assert wrapped == ours_names
    assert rel_err(pm.get_base_model()(_ids()), ours(_ids()).logits) < 1e-5


def test_peft_adapter_loads_here_with_the_same_logits(tmp_path):
    ours, ref = _pair(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=targets,
                           modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(ref, pcfg)
    _perturb_trainable(pm, 2)  # as if trained: nonzero B, changed embeddings
    pm.eval()
    want = pm.get_base_model()(_ids())  # the tree with PEFT's layers injected
    pm.save_pretrained(str(tmp_path / "peft"))
    load_adapter(ours, tmp_path / "peft")
    cfg = ours.lora_config
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.experts, cfg.shared_experts, cfg.train_embeddings) == \
        (4, 16, 0.1, True, True, True)
    assert rel_err(ours(_ids()).logits, want) < 1e-5


def test_config_keys_are_peft_loraconfig_fields(tmp_path):
    ours, _ = _pair(tmp_path)
    cfg = peft_config(ours, LoraConfig())
    fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(cfg) <= fields
    parsed = peft.LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})
    assert (parsed.r, parsed.lora_alpha, parsed.lora_dropout, parsed.task_type) == (8, 32.0, 0.1, "CAUSAL_LM")


def _perturb_trainable(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_adapters_interchange_with_peft_on_the_transformers_class(tmp_path):
    from deepseekmoe.integrations.transformers import DeepseekForCausalLM

    ours, _ = _pair(tmp_path)
    ids = _ids()
    apply_lora(ours, LoraConfig(r=4, alpha=8.0, dropout=0.0, train_embeddings=True), seed=0)
    _perturb_trainable(ours, 1)
    save_adapter(ours, tmp_path / "adapter")
    hf = DeepseekForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    assert any(".experts.7.down_proj.lora_A" in n for n, _ in pm.named_modules())
    assert rel_err(pm(input_ids=ids).logits, ours(ids).logits) < 1e-5

    hf2 = DeepseekForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm2 = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, task_type="CAUSAL_LM"))
    _perturb_trainable(pm2, 2)
    pm2.eval()
    want = pm2(input_ids=ids).logits
    pm2.save_pretrained(str(tmp_path / "peft"))
    fresh = tiny_model(first_k_dense_replace=1, expert_backend="grouped")
    load_adapter(fresh, tmp_path / "peft")
    assert rel_err(fresh(ids).logits, want) < 1e-5
