"""The released deepseek-moe format: parity with the reference vectors, other layouts checked
against a per-expert reference written here from the documented semantics, bit-exact round trips,
the 16B name/shape plan on the meta device, and one clear error per kind of damaged checkpoint.

The reference (`ref_forward`) reads the released tensor names directly and loops over tokens and
experts, the way the format documents the model; it shares no code with deepseekmoe.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deepseekmoe import Transformer
from deepseekmoe.checkpoint import hf
from deepseekmoe.errors import CheckpointError, ConfigError
from deepseekmoe.model import presets
from deepseekmoe.model.config import ModelConfig
from tests.helpers import rel_err, tiny_model

# The shared reference vectors live next to the repository (see its README.md).
REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "p1"


# ---------------------------------------------------------------------- reference model
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def _lin(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _mlp(sd, p, x):
    return _lin(sd, p + "down_proj", F.silu(_lin(sd, p + "gate_proj", x)) * _lin(sd, p + "up_proj", x))


def ref_forward(sd, c, ids):
    """Logits and summed balance loss of the documented model, from released tensor names."""
    B, L = ids.shape
    D, H = c["hidden_size"], c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    hd, eps, E = D // H, c["rms_norm_eps"], c.get("n_routed_experts")
    x = sd["model.embed_tokens.weight"][ids]
    pos = torch.arange(L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    aux = torch.zeros(())
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = _lin(sd, p + "self_attn.q_proj", h).view(B, L, H, hd).transpose(1, 2)
        k = _lin(sd, p + "self_attn.k_proj", h).view(B, L, KV, hd).transpose(1, 2)
        v = _lin(sd, p + "self_attn.v_proj", h).view(B, L, KV, hd).transpose(1, 2)
        q, k = _rope(q, pos, c["rope_theta"]), _rope(k, pos, c["rope_theta"])
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + _lin(sd, p + "self_attn.o_proj", (att @ v).transpose(1, 2).reshape(B, L, D))
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        is_moe = E is not None and i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
        if not is_moe:
            x = x + _mlp(sd, p + "mlp.", h)
            continue
        K = c["num_experts_per_tok"]
        t = h.reshape(B * L, D)
        scores = (t @ sd[p + "mlp.gate.weight"].T).softmax(-1)
        w, idx = scores.topk(K, -1)
        if c.get("norm_topk_prob") and K > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        rows = []
        for tok in range(B * L):
            acc = torch.zeros(D)
            for j in range(K):
                acc = acc + w[tok, j] * _mlp(sd, f"{p}mlp.experts.{int(idx[tok, j])}.", t[tok])
            rows.append(acc)
        y = torch.stack(rows)
        if c.get("n_shared_experts"):
            y = y + _mlp(sd, p + "mlp.shared_experts.", t)
        x = x + y.view(B, L, D)
        # Expert-level balance loss: alpha * sum_i f_i P_i, f_i = E/(K T) * count_i; per sequence with seq_aux.
        onehot = F.one_hot(idx, E).sum(1).float()  # [T, E] selections per token
        if c.get("seq_aux", True):
            f = onehot.view(B, L, E).sum(1) * E / (L * K)
            P = scores.view(B, L, E).mean(1)
            aux = aux + c["aux_loss_alpha"] * (f * P).sum(1).mean()
        else:
            aux = aux + c["aux_loss_alpha"] * (onehot.sum(0) * E / (B * L * K) * scores.mean(0)).sum()
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T, aux


def write_checkpoint(path, c, seed=0, shard_every=None):
    """Random tensors under the released names for HF config dict `c`, written by hand."""
    g = torch.Generator().manual_seed(seed)
    D, H = c["hidden_size"], c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    hd, V, E = D // H, c["vocab_size"], c.get("n_routed_experts")
    sd = {"model.embed_tokens.weight": torch.randn(V, D, generator=g)}

    def mat(name, o, i, bias=False):
        sd[name + ".weight"] = torch.randn(o, i, generator=g) * i ** -0.5
        if bias:
            sd[name + ".bias"] = torch.randn(o, generator=g) * 0.1

    def mlp(p, width):
        mat(p + "gate_proj", width, D)
        mat(p + "up_proj", width, D)
        mat(p + "down_proj", D, width)

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = c.get("attention_bias", False)
        mat(p + "self_attn.q_proj", H * hd, D, b)
        mat(p + "self_attn.k_proj", KV * hd, D, b)
        mat(p + "self_attn.v_proj", KV * hd, D, b)
        mat(p + "self_attn.o_proj", D, H * hd, b)
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        if E is not None and i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0:
            mat(p + "mlp.gate", E, D)
            for e in range(E):
                mlp(f"{p}mlp.experts.{e}.", c["moe_intermediate_size"])
            if c.get("n_shared_experts"):
                mlp(p + "mlp.shared_experts.", c["n_shared_experts"] * c["moe_intermediate_size"])
        else:
            mlp(p + "mlp.", c["intermediate_size"])
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    if not c.get("tie_word_embeddings"):
        mat("lm_head", V, D)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    if shard_every is None:
        save_file(sd, str(path / "model.safetensors"))
    else:
        names, wm = list(sd), {}
        n = (len(names) + shard_every - 1) // shard_every
        for s in range(n):
            fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            chunk = names[s * shard_every:(s + 1) * shard_every]
            save_file({k: sd[k] for k in chunk}, str(path / fname))
            wm.update(dict.fromkeys(chunk, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return sd


BASE = {"model_type": "deepseek", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 40,
        "moe_intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "aux_loss_alpha": 0.01, "n_routed_experts": 6, "num_experts_per_tok": 3,
        "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1}
LAYOUTS = {
    # grouped-query KV, renormalised gates, global balance loss, MoE every other layer from layer 0,
    # no shared experts (the field left out, as the release's default null).
    "gqa_norm_freq2": {**BASE, "num_key_value_heads": 2, "norm_topk_prob": True, "seq_aux": False,
                       "moe_layer_freq": 2, "first_k_dense_replace": 0},
    # two shared experts, attention biases, tied embeddings, sequence-level loss, sharded files.
    "shared2_bias_tied": {**BASE, "n_shared_experts": 2, "attention_bias": True, "tie_word_embeddings": True,
                          "seq_aux": True, "first_k_dense_replace": 1, "norm_topk_prob": False},
}


# ---------------------------------------------------------------------- parity with the release
@pytest.fixture(scope="module")
def ref_dir() -> Path:
    """The released-format reference checkpoint p1/; the tests that need it skip when it is absent."""
    missing = [f for f in ("config.json", "model.safetensors", "expected.pt") if not (REF / f).is_file()]
    if missing:
        pytest.skip(f"reference vectors not found: looked for {', '.join(missing)} in {REF} "
                    "(place the shared reference/ folder in ../shared/ next to the repository to run this)")
    return REF


@pytest.fixture(scope="module")
def expected(ref_dir):
    return torch.load(ref_dir / "expected.pt", weights_only=True)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_reference_p1_parity(ref_dir, expected, backend):
    model = Transformer.from_pretrained(ref_dir, expert_backend=backend)
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    ids = expected["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - expected["logits"]).abs().max().item() <= 2e-5
    model.train()
    out = model(ids, labels=ids)
    assert abs(out.lm_loss.item() - expected["train_lm_loss"].item()) <= 2e-5
    out.loss.backward()
    params = dict(model.named_parameters())
    assert len(expected["gate_grads"]) == len(model.moe_layers()) == 2
    for name, g in expected["gate_grads"].items():
        got = params[name.removeprefix("model.")].grad
        assert rel_err(got, g) <= 1e-4, name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_layouts_match_per_expert_reference(tmp_path, layout):
    c = LAYOUTS[layout]
    sd = write_checkpoint(tmp_path, c, shard_every=7 if layout.startswith("shared") else None)
    ids = torch.randint(0, c["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    ref_sd = {k: v.clone().requires_grad_(".mlp.gate." in k) for k, v in sd.items()}
    ref_logits, ref_aux = ref_forward(ref_sd, c, ids)
    ref_loss = F.cross_entropy(ref_logits[:, :-1].reshape(-1, c["vocab_size"]), ids[:, 1:].reshape(-1)) + ref_aux
    ref_loss.backward()
    for backend in ("loop", "grouped"):
        model = Transformer.from_pretrained(tmp_path, expert_backend=backend)
        cfg = model.config
        assert cfg.num_key_value_heads == c.get("num_key_value_heads", c["num_attention_heads"])
        assert cfg.layer_plan() == (["moe", "dense", "moe", "dense"] if layout.startswith("gqa")
                                    else ["dense", "moe", "moe", "moe"])
        with torch.no_grad():
            logits = model(ids).logits
        assert (logits - ref_logits.detach()).abs().max().item() <= 2e-5, backend
        model.train()
        out = model(ids, labels=ids)
        assert abs(out.loss.item() - ref_loss.item()) <= 1e-5, backend
        out.loss.backward()
        params = dict(model.named_parameters())
        for name, t in ref_sd.items():
            if t.requires_grad:
                got = params[name.removeprefix("model.")].grad
                assert rel_err(got, t.grad) <= 1e-4, (backend, name)


# ---------------------------------------------------------------------- config.json
def test_config_roundtrip_and_defaults():
    cfg = presets.get("tiny")
    raw = hf.config_to_hf(cfg, torch.bfloat16)
    assert raw["model_type"] == "deepseek" and raw["architectures"] == ["DeepseekForCausalLM"]
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    assert raw["torch_dtype"] == "bfloat16" and raw["n_shared_experts"] == 1
    assert hf.config_from_hf(json.loads(json.dumps(raw))) == cfg
    # Missing fields take the released DeepseekConfig defaults; null experts mean a dense model.
    dense = hf.config_from_hf({"model_type": "deepseek"})
    assert (dense.hidden_size, dense.num_hidden_layers, dense.n_routed_experts) == (4096, 30, 0)
    assert dense.num_key_value_heads == 32 and dense.max_position_embeddings == 2048
    gshard = hf.config_to_hf(presets.get("tiny", router="gshard", num_experts_per_tok=2))
    assert gshard["norm_topk_prob"] is True


def test_config_writes_every_field_the_release_writes(ref_dir):
    raw = hf.config_to_hf(presets.get("tiny"), torch.bfloat16)
    released = json.loads((ref_dir / "config.json").read_text())
    assert set(released) - {"deepseekmoe"} <= set(raw)


@pytest.mark.parametrize("raw, field", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"vocab_size": 10}, "model_type=None"),
    ({"model_type": "deepseek", "hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "deepseek", "rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"model_type": "deepseek", "n_routed_experts": 8}, "num_experts_per_tok"),
])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        hf.config_from_hf(raw)


def test_hash_router_cannot_be_exported():
    with pytest.raises(ConfigError, match="hash"):
        hf.config_to_hf(presets.get("tiny", router="hash", num_experts_per_tok=1, n_shared_experts=0))


# ---------------------------------------------------------------------- round trips
# The round-trip model: 50 tokens, five experts of width 8 (the shapes the assertions below name).
_tiny_model = functools.partial(tiny_model, 50, n_routed_experts=5, moe_intermediate_size=8, max_position_embeddings=64)


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", [None, 3000])
def test_save_load_roundtrip_bit_exact(tmp_path, shard):
    model = _tiny_model()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text('{"fake": 1}')
    model.source_dir = str(tmp_path / "src")
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path / "out", **kw)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files and "tokenizer.json" in files and "generation_config.json" in files
    if shard is None:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 3 and shards == [f for f in files if f.startswith("model-")]
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    back = Transformer.from_pretrained(tmp_path / "out")
    assert back.config == model.config
    _assert_same(model, back)
    # The files hold the released per-expert tensors: gate rows then up rows of w13, and w2.
    files = hf.weight_files(tmp_path / "out")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    t = load_file(str(files[name]))[name]
    w13 = model.layers[1].mlp.experts.w13
    assert torch.equal(t, w13[3, 8:]) and t.shape == (8, 32)


def test_roundtrip_bf16_and_tied(tmp_path):
    model = _tiny_model(tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    names = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    back = Transformer.from_pretrained(tmp_path / "m")
    assert back.lm_head.weight is back.embed_tokens.weight
    assert back.lm_head.weight.dtype == torch.bfloat16
    _assert_same(model, back)
    as_fp32 = Transformer.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert torch.equal(as_fp32.layers[2].mlp.experts.w2, model.layers[2].mlp.experts.w2.float())


def test_16b_plan_on_meta_equals_released_index():
    with torch.device("meta"):
        model = Transformer(presets.get("deepseekmoe-16b"))
    plan = hf.export_plan(model)
    D, V, F_, E = 2048, 102400, 1408, 64
    expected = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(28):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            expected[f"{p}self_attn.{proj}_proj.weight"] = (D, D)
        expected[p + "input_layernorm.weight"] = (D,)
        expected[p + "post_attention_layernorm.weight"] = (D,)
        if i == 0:
            expected.update({p + "mlp.gate_proj.weight": (10944, D), p + "mlp.up_proj.weight": (10944, D),
                             p + "mlp.down_proj.weight": (D, 10944)})
            continue
        expected[p + "mlp.gate.weight"] = (E, D)
        for e in range(E):
            expected.update({f"{p}mlp.experts.{e}.gate_proj.weight": (F_, D),
                             f"{p}mlp.experts.{e}.up_proj.weight": (F_, D),
                             f"{p}mlp.experts.{e}.down_proj.weight": (D, F_)})
        expected.update({p + "mlp.shared_experts.gate_proj.weight": (2816, D),
                         p + "mlp.shared_experts.up_proj.weight": (2816, D),
                         p + "mlp.shared_experts.down_proj.weight": (D, 2816)})
    assert plan == expected and len(plan) == 5466
    assert sum(math.prod(s) for s in plan.values()) == model.config.num_params()
    sizes = {n: math.prod(s) * 2 for n, s in plan.items()}
    shards = hf.shard_plan(sizes, hf.parse_size("5GB"))
    assert len(shards) == 7 and all(sum(sizes[n] for n in s) <= 5e9 for s in shards)
    with pytest.raises(CheckpointError, match="meta"):
        hf.save_model(model, "/nonexistent/never-written")


_PEAK_SCRIPT = """
import sys, threading, time
from deepseekmoe import Transformer
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
Transformer.from_pretrained(sys.argv[1])  # warm imports and lazy initialisation first
peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
base = anon()
t = threading.Thread(target=sample)
t.start()
m = Transformer.from_pretrained(sys.argv[1])
stop[0] = True
t.join()
print(max(peak[0], anon()) - base, sum(p.numel() * p.element_size() for p in m.parameters()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux /proc")
def test_load_peak_host_memory_is_one_copy(tmp_path):
    # 137 MB of fp32 weights; a load through a full state dict would need twice that.
    cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
                      moe_intermediate_size=256)
    Transformer(cfg).save_pretrained(tmp_path / "m")
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "m")], capture_output=True,
                         text=True, cwd=repo, env={"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    peak, weights = map(int, out.stdout.split())
    assert weights == 136_955_904
    assert peak < 1.1 * weights, (peak, weights)


# ---------------------------------------------------------------------- damaged checkpoints
@pytest.fixture()
def saved(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _edit(saved, lambda sd: sd.pop("model.layers.2.mlp.experts.4.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.4\.down_proj"):
        Transformer.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _edit(saved, lambda sd: sd.__setitem__("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(8, 32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        Transformer.from_pretrained(saved)


def test_shape_mismatch_is_named(saved):
    _edit(saved, lambda sd: sd.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(32, 32)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: shape \[32, 32\]"):
        Transformer.from_pretrained(saved)


def test_truncated_file_is_named(saved, tmp_path):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        Transformer.from_pretrained(saved)
    _tiny_model().save_pretrained(tmp_path / "sharded", max_shard_size=3000)
    shard = sorted((tmp_path / "sharded").glob("model-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name + r".*holding model\.layers"):
        Transformer.from_pretrained(tmp_path / "sharded")
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name + ": shard listed"):
        Transformer.from_pretrained(tmp_path / "sharded")


def test_unsupported_model_type_and_missing_dir(saved, tmp_path):
    raw = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**raw, "model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="model_type='mixtral'"):
        Transformer.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Transformer.from_pretrained(tmp_path / "nope")
