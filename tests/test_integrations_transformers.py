"""The native transformers class (deepseekmoe.integrations.transformers): the reference checkpoint
and the other released layouts through AutoModelForCausalLM against the reference vectors and this
project's Transformer, forward and backward; the stacked-expert packing against the per-expert
weights; masks with left padding; generate (dynamic and static cache) against this project's
generate_ids; exported directories opened by trust_remote_code and AutoTokenizer as they are, and
their remote code's message without the package. PEFT, the HF Trainer and lm-eval's `hf` model are
in tests/test_integrations_ecosystem.py.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import deepseekmoe.integrations.transformers as dt
from deepseekmoe import Transformer
from deepseekmoe.data import train_tokenizer
from deepseekmoe.errors import ConfigError
from deepseekmoe.inference.generate import generate_ids
from tests.helpers import rel_err, tiny_model
from tests.test_hf import LAYOUTS, REF, ref_forward, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = [f"the cat sat on a mat while dogs ran far away from home {i} times" for i in range(30)]


@pytest.fixture(scope="module")
def expected():
    if not (REF / "expected.pt").is_file():
        pytest.skip(f"reference vectors not found in {REF} (place the shared reference/ folder next to the repo)")
    return torch.load(REF / "expected.pt", weights_only=True)


def _grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _released_grads(model: Transformer) -> dict[str, torch.Tensor]:
    """The project model's gradients under the released tensor names (expert slices of w13 / w2)."""
    from deepseekmoe.checkpoint import hf

    params = dict(model.named_parameters())
    out = {}
    for name, (_, target) in hf.tensor_plan(model.config).items():
        g = params[target.param].grad
        if g is not None:
            g = g[target.expert] if target.expert is not None else g
            out[name] = g[target.rows[0]:target.rows[1]] if target.rows is not None else g
    return out


# ---------------------------------------------------------------------- parity
def test_reference_p1_through_automodel(expected):
    assert isinstance(AutoConfig.from_pretrained(REF), dt.DeepseekConfig)
    model = AutoModelForCausalLM.from_pretrained(REF)
    assert type(model) is dt.DeepseekForCausalLM and not model.training and model.dtype == torch.float32
    ids = expected["input_ids"]
    with torch.no_grad():
        out = model(ids)
    assert (out.logits - expected["logits"]).abs().max().item() <= 2e-5
    assert out.aux_loss is None  # the balance loss is a training term
    model.train()
    out = model(ids, labels=ids)
    # The released objective: LM loss + each MoE layer's sequence-level balance loss (weight 1).
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    _, ref_aux = ref_forward(sd, json.loads((REF / "config.json").read_text()), ids)
    assert abs(out.aux_loss.item() - ref_aux.item()) <= 1e-7 and out.aux_loss.item() > 0
    assert abs((out.loss - out.aux_loss).item() - expected["train_lm_loss"].item()) <= 2e-5
    out.loss.backward()
    grads = _grads(model)
    for name, g in expected["gate_grads"].items():
        assert rel_err(grads[name], g) <= 1e-4, name
    # Every other gradient (the experts' through the stacked fast path included) is the project model's.
    ours = Transformer.from_pretrained(REF, expert_backend="loop").train()
    ours(ids, labels=ids).loss.backward()
    want = _released_grads(ours)
    assert set(want) == set(grads)
    for name, g in want.items():
        assert rel_err(grads[name], g) <= 1e-5, name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_layouts_match_the_project_model(tmp_path, layout):
    # gqa_norm_freq2: GQA, norm_topk_prob, moe_layer_freq 2, first_k_dense_replace 0, no shared experts;
    # shared2_bias_tied: two shared experts, attention biases, tied embeddings, sharded files.
    c = LAYOUTS[layout]
    sd = write_checkpoint(tmp_path, c, shard_every=7 if layout.startswith("shared") else None)
    ids = torch.randint(0, c["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    ref_logits, _ = ref_forward(sd, c, ids)
    ours = Transformer.from_pretrained(tmp_path).train()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert theirs.model_config == ours.config.replace(name=theirs.model_config.name)
    with torch.no_grad():
        logits = theirs(ids).logits
    assert (logits - ref_logits).abs().max().item() <= 2e-5
    assert (logits - ours.eval()(ids).logits).abs().max().item() <= 1e-5
    theirs.train()
    ours.train()
    a, b = theirs(ids, labels=ids), ours(ids, labels=ids)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-6 and abs(a.aux_loss.item() - b.balance_loss.item()) <= 1e-8
    a.loss.backward()
    b.loss.backward()
    grads, want = _grads(theirs), _released_grads(ours)
    if c.get("tie_word_embeddings"):
        assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    for name, g in want.items():
        assert rel_err(grads[name], g) <= 1e-5, name


@pytest.mark.parametrize("tied", [False, True])
def test_from_transformer_copies_the_project_model(tied):
    ours = tiny_model(tie_word_embeddings=tied)
    model = dt.DeepseekForCausalLM.from_transformer(ours)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.data_ptr() != ours.layers[1].mlp.experts.w13.data_ptr()
    bf16 = dt.DeepseekForCausalLM.from_transformer(ours, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_a_new_model_is_initialised_like_the_project_model():
    cfg = tiny_model().config  # initializer_range 0.2
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(cfg))
    for name, p in model.named_parameters():
        if "layernorm" in name or name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # normal(0, initializer_range), no leftover uninitialised storage
            assert abs(p.std().item() - 0.2) < 0.05 and abs(p.mean().item()) < 0.05, name


def test_labels_loss_is_transformers_causal_lm_loss():
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(tiny_model().config)).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - want.item()) <= 1e-6 and out.aux_loss is None
    # num_items_in_batch (the Trainer's gradient-accumulation count): summed loss over that count.
    n = int((labels[:, 1:] != -100).sum())
    out2 = model(ids, labels=labels, num_items_in_batch=torch.tensor(2 * n))
    assert abs(out2.loss.item() - want.item() / 2) <= 1e-6


def test_router_logits_and_aux_loss_are_returned():
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(tiny_model().config)).train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    moe = [layer.mlp for layer in model.model.layers if layer.is_moe]
    for m in moe:
        m.record = True
    out = model(ids, labels=ids, output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == len(moe) == 2 and out.router_logits[0].shape == (14, 8)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    # The returned logits are the routers': their top-2 are the experts each layer chose.
    for m, logits in zip(moe, out.router_logits):
        assert torch.equal(logits.topk(2).indices, m.last_routing.idx_TK)
        assert torch.allclose(logits.softmax(-1).gather(1, m.last_routing.idx_TK), m.last_routing.w_TK)
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0


# ---------------------------------------------------------------------- stacked experts
def test_expert_weights_are_views_of_the_stacked_tensors_and_follow_changes():
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(tiny_model().config)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    experts = model.model.layers[1].mlp.experts
    model(ids)
    assert experts.packed() and experts.plain()
    w = experts[3].up_proj.weight
    assert w.data_ptr() == experts._w13_E2FD[3, 16:].data_ptr()
    ref = Transformer(model.model_config.replace(expert_backend="loop")).eval()

    def check():
        ref.load_state_dict(_project_state(model))
        with torch.no_grad():
            assert (model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5

    with torch.no_grad():
        w.mul_(3.0)  # in place (what an optimizer step does): the stacked tensor is that storage
    check()
    experts[5].down_proj.weight = torch.nn.Parameter(torch.randn(32, 16))  # a new tensor: repacked
    check()
    assert experts.packed() and experts[5].down_proj.weight.data_ptr() == experts._w2_EDF[5].data_ptr()
    for layer in model.model.layers[1:]:
        layer.mlp.experts.backend = "loop"  # grouped_mm has no float64
    model.to(torch.float64)
    ref.to(torch.float64)
    check()
    assert experts._w13_E2FD.dtype == torch.float64


def _project_state(model) -> dict[str, torch.Tensor]:
    """A DeepseekForCausalLM's weights as a Transformer state dict (through a saved checkpoint's plan)."""
    from deepseekmoe.checkpoint import hf

    cfg = model.model_config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, (_, target) in hf.tensor_plan(cfg).items():
        if target.expert is None:
            out[target.param] = sd[name]
            continue
        E, F_, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        shape = (E, 2 * F_, D) if target.param.endswith("w13") else (E, D, F_)
        buf = out.setdefault(target.param, torch.empty(shape, dtype=sd[name].dtype))
        dst = buf[target.expert]
        dst = dst[target.rows[0]:target.rows[1]] if target.rows else dst
        dst.copy_(sd[name])
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------- masks, cache, generate
def test_left_padding_and_cache_match_unpadded_rows():
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(tiny_model().config)).eval()
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    ids = torch.tensor([a, [0, 0, 0] + b])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(torch.tensor([b])).logits
        assert (padded[1, 3:] - alone[0]).abs().max().item() <= 1e-5
        assert (padded[0] - model(torch.tensor([a])).logits[0]).abs().max().item() <= 1e-5
        # Prefill 4 + one step through a DynamicCache equals the full forward's next position.
        cache = DynamicCache()
        model(ids[:, :4], attention_mask=mask[:, :4], cache=cache, use_cache=True)
        step = model(ids[:, 4:5], attention_mask=mask[:, :5], cache=cache, use_cache=True).logits
        assert (step[:, 0] - padded[:, 4]).abs().max().item() <= 1e-5


def test_unpadded_prefill_into_an_empty_dynamic_cache_takes_the_causal_path():
    """No padding and an empty DynamicCache: keys are the queries, so no explicit mask (SDPA's fused
    causal kernel); the logits and the next cached step are those of the full forward."""
    model = dt.DeepseekForCausalLM.from_transformer(tiny_model(64))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    full = model(ids).logits
    cache = DynamicCache()
    assert model.model._mask(torch.ones_like(ids[:, :5]), cache, 1, 5, 0, torch.arange(5)) is None
    pre = model(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), cache=cache, use_cache=True).logits
    assert (pre - full[:, :5]).abs().max().item() <= 1e-5
    assert model.model._mask(torch.ones_like(ids), cache, 1, 1, 5, torch.arange(5, 6)) is not None
    step = model(ids[:, 5:], attention_mask=torch.ones_like(ids), cache=cache, use_cache=True).logits
    assert (step[:, 0] - full[:, 5]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_greedy_left_padded_equals_generate_ids(tmp_path, cache_implementation):
    ours = tiny_model(64, max_position_embeddings=128)
    ours.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    want = generate_ids(ours, prompts, max_new_tokens=14, eos_token_id=None)
    L = max(map(len, prompts))
    ids = torch.tensor([[1] * (L - len(p)) + p for p in prompts])
    mask = (ids != 1).long()
    kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                         eos_token_id=None, pad_token_id=1, **kw)
    assert out[:, L:].tolist() == want
    assert len({tuple(r) for r in want}) == 3 and len({t for r in want for t in r}) > 4  # rows differ


# ---------------------------------------------------------------------- exported directories
@pytest.fixture(scope="module")
def exports(tmp_path_factory, expected):
    """root/p1: the reference checkpoint re-exported by Transformer.save_pretrained; root/tiny: a tiny
    model exported beside a trained bare tokenizer.json (the export writes its tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("export")
    tok = train_tokenizer(CORPUS, 300)
    tok.save(root / "tok" / "tokenizer.json")
    (root / "tok" / "tokenizer_config.json").unlink()
    Transformer.from_pretrained(REF).save_pretrained(root / "p1")
    tiny_model(tok.vocab_size, max_position_embeddings=128).save_pretrained(root / "tiny", tokenizer_dir=root / "tok")
    return root


def test_export_directory_is_complete(exports):
    from deepseekmoe.data.chat import DEEPSEEK_CHAT_JINJA

    d = exports / "tiny"
    files = sorted(p.name for p in d.iterdir())
    assert files == ["config.json", "configuration_deepseek.py", "generation_config.json", "model.safetensors",
                     "modeling_deepseek.py", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|bos|>", "<|eos|>", "<|eos|>")
    assert tc["chat_template"] == DEEPSEEK_CHAT_JINJA
    assert tc["model_input_names"] == ["input_ids", "attention_mask"]  # generate refuses token_type_ids
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 1)
    assert not (exports / "p1" / "tokenizer_config.json").exists()  # nothing to describe without a tokenizer


_REMOTE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
root, r = sys.argv[1], {}
m = AutoModelForCausalLM.from_pretrained(root + "/p1", trust_remote_code=True)
e = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    r["diff"] = (m(e["input_ids"]).logits - e["logits"]).abs().max().item()
r["module"], r["imported"] = type(m).__module__, "deepseekmoe.integrations.transformers" in sys.modules
tok = AutoTokenizer.from_pretrained(root + "/tiny")
m = AutoModelForCausalLM.from_pretrained(root + "/tiny", trust_remote_code=True)
r["chat"] = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
r["pad"] = tok.pad_token
enc = tok(["the cat sat on", "dogs"], return_tensors="pt", padding=True, padding_side="left")
out = m.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=None)
r["ids"], r["new"] = enc["input_ids"].tolist(), out[:, enc["input_ids"].shape[1]:].tolist()
print(json.dumps(r))
"""


def test_trust_remote_code_and_autotokenizer_open_an_export_as_is(exports):
    from deepseekmoe.data.tokenizer import Tokenizer

    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _REMOTE_SCRIPT, str(exports), str(REF / "expected.pt")],
                         capture_output=True, text=True, cwd=exports, timeout=300,
                         env={"PYTHONPATH": repo, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "HF_HOME": str(exports / "hf_home")})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["diff"] <= 2e-5
    # A fresh process that never imported the package: the export's remote code brought the class in.
    assert r["module"] == "deepseekmoe.integrations.transformers.modeling" and r["imported"]
    assert r["chat"] == "<|bos|>User: hi\n\nAssistant:" and r["pad"] == "<|eos|>"
    # The tokenizer gives this project's ids; generate continues them as this project does.
    tok = Tokenizer.from_file(exports / "tiny" / "tokenizer.json")
    prompts = [tok.encode("the cat sat on"), tok.encode("dogs")]
    assert [row[len(row) - len(p):] for row, p in zip(r["ids"], prompts)] == prompts
    ours = Transformer.from_pretrained(exports / "tiny")
    assert r["new"] == generate_ids(ours, prompts, max_new_tokens=6, eos_token_id=None)


def test_remote_code_without_the_package_names_the_install(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepseekmoe.integrations.transformers", None)  # as if not installed
    for fname in ("modeling_deepseek.py", "configuration_deepseek.py"):
        with pytest.raises(ImportError, match=r"pip install deepseekmoe\[transformers\]"):
            runpy.run_path(str(exports / "p1" / fname))


def test_save_pretrained_of_the_class_writes_the_released_layout(tmp_path, expected):
    model = AutoModelForCausalLM.from_pretrained(REF)
    model.save_pretrained(tmp_path / "out", max_shard_size="100KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "out" / "modeling_deepseek.py").is_file()
    back = Transformer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert (back(expected["input_ids"]).logits - expected["logits"]).abs().max().item() <= 2e-5


def test_config_reads_the_released_file_unchanged_and_refuses_what_it_cannot_run(expected):
    # `expected`: the shared reference/ folder (released-code/ sits beside p1/), or one clear skip
    released = json.loads((REF.parent / "released-code" / "config.json").read_text())
    cfg = dt.DeepseekConfig(**released)
    mc = cfg.to_model_config()
    assert (mc.hidden_size, mc.num_hidden_layers, mc.n_routed_experts, mc.n_shared_experts) == (2048, 28, 64, 2)
    assert (mc.num_experts_per_tok, mc.first_k_dense_replace, mc.vocab_size) == (6, 1, 102400)
    with pytest.raises(ConfigError, match="rope_scaling"):
        dt.DeepseekConfig(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="expert_backend='fast'"):
        dt.DeepseekConfig(expert_backend="fast")


def test_convert_writes_an_export_transformers_opens(tmp_path):
    from deepseekmoe import cli
    from deepseekmoe.checkpoint import native

    ours = tiny_model()
    native.save_native(tmp_path / "native", ours.config, ours.state_dict())
    assert cli.main(["convert", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "modeling_deepseek.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_dtype_and_device_map(expected):
    model = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.bfloat16, device_map="cpu")
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits.float()
    assert (logits - expected["logits"]).abs().max().item() <= 0.1  # bf16 rounding of a random model


@pytest.mark.parametrize("reentrant", [False, True])  # transformers 4.x defaulted to the reentrant form
def test_gradient_checkpointing_keeps_the_balance_gradient(expected, reentrant):
    model = AutoModelForCausalLM.from_pretrained(REF)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids = expected["input_ids"]
    calls = []
    model.model.layers[1].mlp.experts.register_forward_hook(lambda *_: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert model.model.gradient_checkpointing and len(calls) == 2  # the experts ran again in backward
    for name, g in expected["gate_grads"].items():
        assert rel_err(dict(model.named_parameters())[name].grad, g) <= 1e-4, name


def test_stacking_in_the_graph_equals_the_packed_path():
    # What a model compiled before its first eager forward computes with (no packing under tracing).
    model = dt.DeepseekForCausalLM(dt.DeepseekConfig.from_model_config(tiny_model().config)).train()
    experts = model.model.layers[1].mlp.experts
    w13, w2 = experts._stack_in_graph()
    packed13, packed2 = experts.stacked()
    assert torch.equal(w13, packed13) and torch.equal(w2, packed2)
    (w13.square().sum() + w2.sum()).backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad()
    (packed13.square().sum() + packed2.sum()).backward()
    for n, p in experts.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_from_pretrained_builds_the_layers_without_storage(monkeypatch, expected):
    # The weights are allocated once, when transformers loads them (meta on 5.x's torch.device context
    # and on 4.x's init_empty_weights alike), never first as uninitialised blocks.
    import deepseekmoe.integrations.transformers.modeling as md

    seen = []
    build = md._build_block
    monkeypatch.setattr(md, "_build_block", lambda cfg, i, device: seen.append(device.type) or build(cfg, i, device))
    AutoModelForCausalLM.from_pretrained(REF)
    assert seen == ["meta"] * 3
