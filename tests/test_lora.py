"""LoRA (deepseekmoe.model.lora, model/moe/lora.py): zero-B identity, merge, the per-expert factors
through every torch backend against the `loop` reference (forward and backward), what is trainable,
save / load round trips and the refusals of adapters for another base. The Triton backend is in
tests/test_lora_triton.py (interpreter), PEFT interchange in tests/test_lora_peft.py.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deepseekmoe import Transformer
from deepseekmoe.checkpoint.files import WriteError
from deepseekmoe.errors import CheckpointError, ConfigError
from deepseekmoe.model.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from deepseekmoe.model.moe.experts import experts_gather, experts_grouped, experts_loop
from deepseekmoe.model.moe.lora import ExpertLora
from tests.helpers import rel_err, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NO_DROP = dict(r=4, alpha=8.0, dropout=0.0)


def _model(**overrides) -> Transformer:
    return tiny_model(**{"first_k_dense_replace": 1, "expert_backend": "grouped", **overrides})


def _ids(seed=0, B=2, L=11, vocab=64):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize_adapters(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _adapted(seed=1, cfg=None, **overrides):
    m = _model(**overrides)
    apply_lora(m, cfg or LoraConfig(**NO_DROP), seed=0)
    _randomize_adapters(m, seed)
    return m


# ------------------------------------------------------------------------------ identity, trainable
@pytest.mark.parametrize("backend", ["loop", "grouped", "gather"])
def test_zero_b_equals_base_exactly(backend):
    m = _model(expert_backend=backend)
    ids = _ids()
    base = m(ids).logits
    apply_lora(m, LoraConfig(r=4, alpha=32.0, dropout=0.1), seed=0)
    assert torch.equal(m(ids).logits, base)
    m.train()  # dropout on the LoRA path only: with B = 0 the output is still the base's
    torch.manual_seed(0)
    out = m(ids).logits
    m.eval()
    assert torch.equal(out, base)
    # A is PEFT's kaiming-uniform(a=sqrt(5)): |A| <= 1/sqrt(in), not all zero; B = 0
    A = m.layers[0].self_attn.q_proj.lora_A
    assert 0 < A.abs().max() <= 1 / A.shape[1] ** 0.5
    EA = m.layers[1].mlp.experts.lora.down_proj_lora_A
    assert 0 < EA.abs().max() <= 1 / EA.shape[2] ** 0.5
    assert all(p.abs().max() == 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_only_adapters_are_trainable_and_names_are_kept():
    m = _model()
    base_names = [n for n, _ in m.named_parameters()]
    apply_lora(m, LoraConfig(**NO_DROP))
    names = [n for n, _ in m.named_parameters()]
    assert [n for n in names if "lora_" not in n] == base_names
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if "lora_" in n}
    # every released projection is adapted, the router never
    assert "layers.0.mlp.gate_proj.lora_A" in trainable and "layers.1.mlp.shared_experts.down_proj.lora_B" in trainable
    assert "layers.2.self_attn.o_proj.lora_A" in trainable and "layers.1.mlp.experts.lora.up_proj_lora_A" in trainable
    assert not any(n.startswith("layers.1.mlp.gate.") and "lora" in n for n in names)
    assert isinstance(m.layers[0].self_attn.q_proj, LoraLinear)
    # experts / shared experts off; embeddings and router trained in full when asked
    m2 = _model()
    apply_lora(m2, LoraConfig(**NO_DROP, targets=("q_proj", "down_proj"), experts=False, shared_experts=False,
                              train_embeddings=True, train_router=True))
    trainable = {n for n, p in m2.named_parameters() if p.requires_grad}
    assert trainable == {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.gate.weight",
                         "layers.2.mlp.gate.weight",
                         *(f"layers.{i}.self_attn.q_proj.lora_{x}" for i in range(3) for x in "AB"),
                         "layers.0.mlp.down_proj.lora_A", "layers.0.mlp.down_proj.lora_B"}
    assert m2.layers[1].mlp.experts.lora is None
    assert set(lora_state_dict(m2)) == trainable


def test_lora_linear_dropout_is_on_the_lora_input_only():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    m = LoraLinear.wrap(lin, r=3, alpha=6.0, dropout=0.5, dtype=torch.float32, seed=2)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 6)
    torch.manual_seed(7)
    got = m(x)
    torch.manual_seed(7)
    want = F.linear(x, lin.weight, lin.bias) + 2.0 * (F.dropout(x, 0.5, True) @ m.lora_A.T) @ m.lora_B.T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, lin.weight, lin.bias) + 2.0 * x @ m.lora_A.T @ m.lora_B.T)
    assert m.weight is lin.weight and m.bias is lin.bias


def test_seeded_init_is_reproducible():
    a, b = _model(), _model()
    apply_lora(a, LoraConfig(**NO_DROP), seed=5)
    apply_lora(b, LoraConfig(**NO_DROP), seed=5)
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _model()
    apply_lora(c, LoraConfig(**NO_DROP), seed=6)
    q = "layers.0.self_attn.q_proj.lora_A"
    assert not torch.equal(lora_state_dict(c)[q], sa[q])


# ------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("cfg", [LoraConfig(**NO_DROP), LoraConfig(r=2, alpha=3.0, dropout=0.0,
                                                                   targets=("v_proj", "up_proj", "down_proj"))])
def test_merged_equals_unmerged(cfg):
    m = _adapted(cfg=cfg)
    ids = _ids(3)
    want = m(ids).logits
    merge_lora(m)
    got = m(ids).logits
    assert rel_err(got, want) < 1e-5
    assert not any("lora_" in n for n, _ in m.named_parameters())
    assert not any(isinstance(x, (LoraLinear, ExpertLora)) for x in m.modules())
    assert m.lora_config is None and all(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------ backends
def _expert_case(T, K, E, D, F_, r, targets, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * F_, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F_, generator=g) / F_**0.5
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    lora = ExpertLora(E, D, F_, r, alpha=2.0 * r, dropout=0.1, targets=targets).eval()
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return x, idx, w, w13, w2, lora, torch.randn(T, D, generator=g)


def expert_fwd_bwd(fn, x, idx, w, w13, w2, lora, dy):
    """y and the grads of x, the gates, the expert weights and every LoRA factor."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w13, w2)]
    facs = list(lora.parameters())
    for p in facs:
        p.grad = None
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3], lora=lora.factors(x.dtype))
    grads = torch.autograd.grad(y, leaves + facs, dy)
    return [y.detach(), *grads]


@pytest.mark.parametrize("fn", [experts_grouped, experts_gather], ids=["grouped", "gather"])
@pytest.mark.parametrize("T,K,E,D,F_,r,targets", [
    (29, 2, 6, 32, 16, 4, ("gate_proj", "up_proj", "down_proj")),
    (17, 3, 5, 20, 12, 2, ("gate_proj", "up_proj", "down_proj")),  # unaligned D, F and rank: padding paths
    (13, 2, 4, 16, 8, 3, ("up_proj",)),
    (13, 2, 4, 16, 8, 3, ("gate_proj", "down_proj")),
])
def test_expert_lora_backends_match_loop(fn, T, K, E, D, F_, r, targets):
    case = _expert_case(T, K, E, D, F_, r, targets)
    ref = expert_fwd_bwd(experts_loop, *case)
    out = expert_fwd_bwd(fn, *case)
    names = ["y", "dx", "dw", "dw13", "dw2", *(n for n, _ in case[5].named_parameters())]
    assert len(out) == len(names) == len(ref)
    for name, o, rr in zip(names, out, ref):
        assert rel_err(o, rr) < 1e-5, f"{name}: {fn.__name__} vs loop {rel_err(o, rr):.2e}"


def test_expert_lora_empty_experts_get_zero_factor_grads():
    pool = torch.tensor([1, 4])
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([pool[torch.randperm(2, generator=g)] for _ in range(21)])
    case = _expert_case(21, 2, 6, 16, 16, 4, ("gate_proj", "up_proj", "down_proj"), idx=idx)
    ref = expert_fwd_bwd(experts_loop, *case)
    out = expert_fwd_bwd(experts_grouped, *case)
    for o, rr in zip(out, ref):
        assert rel_err(o, rr) < 1e-5
    for grad in out[5:]:  # factor grads: nonzero exactly for the experts that got tokens
        assert grad[[0, 2, 3, 5]].abs().max() == 0 and grad[[1, 4]].abs().max() > 0


def test_expert_dropout_only_in_training():
    case = _expert_case(9, 2, 4, 16, 8, 4, ("gate_proj", "up_proj", "down_proj"))
    lora = case[5]
    assert lora.factors(torch.float32).dropout == 0
    lora.train()
    assert lora.factors(torch.float32).dropout == 0.1
    # with dropout active, loop and grouped draw their masks differently: only their means agree; the
    # base path never sees dropout: with B = 0 the output is the base's
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith("_B"):
                p.zero_()
    x, idx, w, w13, w2 = case[:5]
    torch.testing.assert_close(experts_grouped(x, idx, w, w13, w2, lora=lora.factors(x.dtype)),
                               experts_grouped(x, idx, w, w13, w2), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["grouped", "gather"])
def test_model_backends_match_loop_forward_and_backward(backend):
    ids = _ids(4)
    outs = []
    for be in ("loop", backend):
        m = _adapted(expert_backend=be, cfg=LoraConfig(**NO_DROP, train_embeddings=True))
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = outs
    assert rel_err(lb, la) < 1e-5
    assert ga.keys() == gb.keys() and any("experts.lora" in n for n in ga)
    for n in ga:
        assert rel_err(gb[n], ga[n]) < 1e-5, n


def test_expert_lora_refuses_expert_parallel():
    m = _adapted()
    m.layers[1].mlp.experts.dispatcher = object()
    with pytest.raises(ConfigError, match="expert parallel"):
        m(_ids())


# ------------------------------------------------------------------------------ save / load
def test_save_load_roundtrip(tmp_path):
    m = _adapted(cfg=LoraConfig(**NO_DROP, train_embeddings=True))
    with torch.no_grad():
        m.embed_tokens.weight.add_(0.5)
    ids = _ids(5)
    want = m(ids).logits
    save_adapter(m, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporaries left
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[q + ".lora_A.weight"].shape == (4, 32) and tensors[q + ".lora_B.weight"].shape == (32, 4)
    e3 = "base_model.model.model.layers.2.mlp.experts.3.down_proj"
    torch.testing.assert_close(tensors[e3 + ".lora_B.weight"], m.layers[2].mlp.experts.lora.down_proj_lora_B[3],
                               rtol=0, atol=0)
    assert "base_model.model.model.embed_tokens.weight" in tensors and "base_model.model.lm_head.weight" in tensors
    assert all("lora_" in k or k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in tensors)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"], cfg["modules_to_save"]) == (4, 8.0, "LORA",
                                                                                      ["embed_tokens", "lm_head"])
    assert sorted(cfg["target_modules"]) == sorted(LoraConfig().targets)

    fresh = _model(expert_backend="loop")
    assert load_adapter(fresh, tmp_path / "adapter") is fresh
    assert rel_err(fresh(ids).logits, want) < 1e-6
    a, b = lora_state_dict(m), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.lora_config == LoraConfig(**NO_DROP, train_embeddings=True)


def test_from_pretrained_with_adapter(tmp_path):
    base = _model()
    base.save_pretrained(tmp_path / "base")
    m = _model()
    apply_lora(m, LoraConfig(**NO_DROP, experts=False), seed=0)
    _randomize_adapters(m)
    save_adapter(m, tmp_path / "adapter")
    loaded = Transformer.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert rel_err(loaded(_ids()).logits, m(_ids()).logits) < 1e-6
    assert loaded.lora_config.experts is False and loaded.layers[1].mlp.experts.lora is None


def test_released_export_writes_the_base_tensors_only(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "plain")
    apply_lora(m, LoraConfig(**NO_DROP), seed=0)
    _randomize_adapters(m)
    m.save_pretrained(tmp_path / "adapted")
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "adapted" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved(tmp_path, name="adapter", **overrides):
    m = _adapted(**overrides)
    save_adapter(m, tmp_path / name)
    return tmp_path / name


def _assert_refused(model, path, *needles):
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_adapter(model, path)
    msg = str(e.value)
    for s in needles:
        assert s in msg, msg
    assert getattr(model, "lora_config", None) is None  # untouched
    assert not any("lora" in n for n in model.state_dict())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    return msg


def test_adapter_for_another_base_is_refused(tmp_path):
    wide = _saved(tmp_path, "wide", hidden_size=48)
    msg = _assert_refused(_model(), wide, "adapter_model.safetensors", "hidden_size=32", "another base model")
    assert "[4, 48]" in msg and "[4, 32]" in msg
    more = _saved(tmp_path, "more", n_routed_experts=12)
    msg = _assert_refused(_model(), more, "adapter_model.safetensors", "has no place", "8 routed experts")
    assert re.search(r"mlp\.experts\.(8|9|10|11)\.", msg)
    fewer = _saved(tmp_path, "fewer", n_routed_experts=8)
    _assert_refused(_model(n_routed_experts=10), fewer, "mlp.experts.8.", "is missing")
    deeper = _saved(tmp_path, "deeper", num_hidden_layers=4)
    _assert_refused(_model(), deeper, "layers.3.", "3 layers")


def test_rank_mismatch_and_missing_tensor_are_refused(tmp_path):
    path = _saved(tmp_path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "r": 8}))
    msg = _assert_refused(_model(), path, "adapter_model.safetensors", "rank 4", "adapter_config.json says r=8")
    assert str(path) in msg
    cfg_file.write_text(json.dumps(cfg))
    wfile = path / "adapter_model.safetensors"
    tensors = load_file(wfile)
    gone = "base_model.model.model.layers.1.mlp.experts.5.gate_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, wfile)
    _assert_refused(_model(), path, str(wfile), gone, "missing")


def test_bad_adapter_files_are_refused(tmp_path):
    _assert_refused(_model(), tmp_path, "not a LoRA adapter directory")
    path = _saved(tmp_path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    _assert_refused(_model(), path, "use_dora=True is not supported")
    cfg_file.write_text("{not json")
    _assert_refused(_model(), path, "adapter_config.json: not valid JSON")
    cfg_file.write_text(json.dumps(cfg))
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    _assert_refused(_model(), path, "not a readable safetensors file")


def test_save_is_atomic(tmp_path, monkeypatch):
    m = _adapted()
    save_adapter(m, tmp_path / "adapter")
    first = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    _randomize_adapters(m, seed=9)
    with pytest.raises(WriteError, match="disk is full"):
        save_adapter(m, tmp_path / "adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == first
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(_model(), tmp_path / "other")


def test_config_errors():
    with pytest.raises(ConfigError, match="lora.r=0"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        LoraConfig(targets=("qproj",))
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        LoraConfig.from_dict({"alpah": 3})
    assert LoraConfig.from_dict({"r": 2, "targets": ["q_proj"]}).targets == ("q_proj",)
    m = _adapted()
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(m, LoraConfig())
    with pytest.raises(ConfigError, match="no such module"):
        apply_lora(tiny_model(first_k_dense_replace=0, n_shared_experts=0),
                   LoraConfig(targets=("gate_proj",), experts=False))


def test_adapters_of_an_activation_checkpointed_model_keep_their_names(tmp_path):
    from deepseekmoe.parallel.fsdp import apply_activation_checkpointing

    m = _adapted()
    save_adapter(m, tmp_path / "plain")
    apply_activation_checkpointing(m)
    assert any("_checkpoint_wrapped_module" in n for n, _ in m.named_parameters())
    assert set(lora_state_dict(m)) == set(lora_state_dict(_adapted()))
    save_adapter(m, tmp_path / "wrapped")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "wrapped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_other_modules_is_refused(tmp_path):
    path = _saved(tmp_path)
    wfile = path / "adapter_model.safetensors"
    tensors = load_file(wfile)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, wfile)
    _assert_refused(_model(), path, "lm_head.lora_A.weight", "does not adapt")
