"""Packed decode projections (deepseekmoe.inference.packing) on the CPU against the modules' own
forwards: decode steps (eager and compiled) and greedy generation equal, the parameters' names,
values and saved files unchanged, re-packing after a cast, the fall-back for LoRA-wrapped and
hooked projections and training mode, one fullgraph trace without recompiles, and the
transformers class's modules through its Transformer shell; and with the fused MoE path
(decode kernels through Triton's interpreter), the dense MLP on the decode kernels included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseekmoe.inference.generate import generate_ids
from deepseekmoe.inference.packing import DecodePacking, packed_handle
from tests.helpers import decode_step_logits, interpreter_suite, kernels_in_process, rel_err, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
# The fused-path tests run the decode kernels through Triton's interpreter (tests/helpers.py).
needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, kernels_in_process())
PROMPTS = [[0, 5, 9, 3], [0, 7], [0, 11, 12, 13, 14, 2]]


def _steps(model, pack, mode="eager", B=2, steps=4, backend=None):
    return decode_step_logits(model, backend, B=B, steps=steps, mode=mode, pack=pack)


def _storage(lin) -> int:
    return lin.weight.untyped_storage().data_ptr()


def _assert_packed(model):
    for block in model.layers.values():
        a = block.self_attn
        assert _storage(a.q_proj) == _storage(a.k_proj) == _storage(a.v_proj)
        mlp = getattr(block.mlp, "shared_experts", None) or block.mlp
        assert _storage(mlp.gate_proj) == _storage(mlp.up_proj)


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}, {"num_key_value_heads": 4}])
def test_packed_decode_steps_equal_the_modules_own(overrides):
    model = tiny_model(**overrides)
    ref, _ = _steps(model, pack=False)
    got, dec = _steps(model, pack=True)
    assert len(dec.packing.entries) == 2 * model.config.num_hidden_layers and not dec.packing.skipped
    _assert_packed(model)
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    assert all("forward" not in m.__dict__ and "project" not in m.__dict__ for m in model.modules()), \
        "a packed forward outlived its block"
    if overrides.get("attention_bias"):
        w, b = (dec.packing.entries[0].attrs[k] for k in ("_decode_packed_w", "_decode_packed_b"))
        a = model.layers[0].self_attn
        assert b is not None and b.shape == (w.shape[0],) and torch.equal(b[:a.q_proj.out_features], a.q_proj.bias)


def test_packed_modules_forward_like_the_reference_twins():
    """Attention.forward / MLP.forward (reference twins) and the packed forwards on one input."""
    model = tiny_model(attention_bias=True)
    packing = DecodePacking(model)
    block = model.layers[0]
    x = torch.randn(2, 3, model.config.hidden_size)
    pos = torch.arange(3)[None].expand(2, 3)
    from deepseekmoe.model.layers import rope_cos_sin

    cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    with torch.no_grad():
        ref_a, ref_m = block.self_attn(x, cos, sin), block.mlp(x)
        with packing.active():
            assert "project" in block.self_attn.__dict__
            got_a, got_m = block.self_attn(x, cos, sin), block.mlp(x)
    assert rel_err(got_a, ref_a) < 1e-6 and rel_err(got_m, ref_m) < 1e-6


def test_packed_greedy_generation_equals_unpacked():
    model = tiny_model()
    want = generate_ids(model, PROMPTS, 8, decode_backend=None, pack=False)
    assert generate_ids(model, PROMPTS, 8, decode_backend=None, pack=True) == want
    assert generate_ids(model, PROMPTS, 8, decode_backend="gather", pack=True) == want


def test_compiled_packed_steps_equal_eager_unpacked():
    model = tiny_model()
    ref, _ = _steps(model, pack=False, steps=3, backend="gather")
    got, _ = _steps(model, pack=True, mode="compile", steps=3, backend="gather")  # CPU compile: no grouped_mm
    assert rel_err(got, ref) < 1e-5


def test_packing_keeps_names_values_and_saved_files(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model(attention_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    model.save_pretrained(tmp_path / "a")
    DecodePacking(model)
    _assert_packed(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p is params[n] for n, p in model.named_parameters()), "Parameter objects were replaced"
    model.save_pretrained(tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        if f.suffix == ".safetensors":
            a, b = load_file(f), load_file(tmp_path / "b" / f.name)
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_saving_a_packed_model_hands_safetensors_tensors_of_their_own_storage():
    """Older safetensors releases (the >= 0.4 the package allows) refuse tensors sharing storage."""
    from deepseekmoe.checkpoint.native import cpu_for_save

    model = tiny_model(tie_word_embeddings=True)
    DecodePacking(model)
    q = model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() > q.numel() * q.element_size()  # a row slice of q|k|v
    saved = {k: cpu_for_save(v) for k, v in model.state_dict().items()}
    packed = [k for k in saved if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    assert packed and all(saved[k].untyped_storage().nbytes() == saved[k].numel() * saved[k].element_size()
                          for k in packed)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # whole-storage tensors are not copied: the tied head still shares the embedding's storage
    assert saved["lm_head.weight"].data_ptr() == saved["embed_tokens.weight"].data_ptr()


def test_a_packed_model_is_not_copied_again_and_repacks_after_a_cast():
    model = tiny_model(expert_backend="gather")  # the grouped_mm backend has no float64
    first = DecodePacking(model)
    ptr = first.entries[0].attrs["_decode_packed_w"].data_ptr()
    second = DecodePacking(model)  # recognised from its storage: a handle, no copy
    assert second.entries[0].attrs["_decode_packed_w"].data_ptr() == ptr == _storage(model.layers[0].self_attn.q_proj)
    assert first.holds() and not first.ensure()
    model.to(torch.float64)
    assert not first.holds()
    assert first.ensure() and first.holds()
    w = first.entries[0].attrs["_decode_packed_w"]
    assert w.dtype == torch.float64 and w.data_ptr() == _storage(model.layers[0].self_attn.q_proj)
    _assert_packed(model)
    ref, _ = _steps(model, pack=False)
    got, dec = _steps(model, pack=True)
    assert (got - ref).abs().max() < 1e-12 * ref.abs().max()
    model.float()  # a Decoder's next step re-packs before it runs
    assert not dec.packing.holds()
    with dec.decode_block():
        assert model.layers[0].self_attn.__dict__["_decode_packed_w"].dtype == torch.float32
    assert dec.packing.holds()
    _assert_packed(model)


def test_lora_hooks_and_training_fall_back_to_the_modules_forward():
    from deepseekmoe.model.lora import LoraConfig, apply_lora

    model = tiny_model()
    apply_lora(model, LoraConfig(r=2, targets=("q_proj", "v_proj")), seed=0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()  # B = 0 would hide a skipped adapter
    model.eval()
    ref, _ = _steps(model, pack=False)
    got, dec = _steps(model, pack=True)
    assert all("self_attn" in k and "LoraLinear" in v for k, v in dec.packing.skipped.items())
    assert len(dec.packing.skipped) == model.config.num_hidden_layers
    assert len(dec.packing.entries) == model.config.num_hidden_layers  # the MLPs are still packed
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    # a hook on a packed projection registered later: the next ensure() drops that module
    plain = tiny_model()
    packing = DecodePacking(plain)
    seen = []
    plain.layers[1].mlp.shared_experts.up_proj.register_forward_hook(lambda *a: seen.append(1))
    assert packing.ensure() and "layers.1.mlp.shared_experts" in packing.skipped
    plain.train()
    assert packing.ensure() and not packing.entries and set(packing.skipped.values()) == {"training mode"}


def test_packed_step_traces_in_one_graph_without_recompiling():
    """fullgraph=True takes the packed forwards (one linear for q|k|v, one for gate|up), and entering
    the block again (every decode step does) does not retrace."""
    model = tiny_model(expert_backend="gather")  # traceable on the CPU (grouped_mm wants bf16 there)
    ids = torch.tensor([[0, 5, 9], [0, 3, 4]])
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    def linears(gm) -> int:
        return sum(n.target is F.linear for n in gm.graph.nodes)

    fn = torch.compile(lambda t: model(t).logits, backend=backend, fullgraph=True)
    with torch.no_grad():
        ref = model(ids).logits
        fn(ids)
        packing = DecodePacking(model)
        for _ in range(3):
            with packing.active():
                got = fn(ids)
    assert len(graphs) == 2  # unpacked, then packed once
    n_layers = model.config.num_hidden_layers
    assert linears(graphs[0]) - linears(graphs[1]) == 2 * n_layers + n_layers  # q,k,v -> 1; gate,up -> 1
    assert rel_err(got, ref) < 1e-6


def test_packed_handle_only_recognises_exact_row_blocks():
    base = torch.randn(10, 4)
    assert packed_handle([base[:3], base[3:7], base[7:]]).data_ptr() == base.data_ptr()
    assert packed_handle([base[:3], base[3:7]]) is None  # not the whole storage
    assert packed_handle([base[:3], base[4:]]) is None  # a gap
    assert packed_handle([torch.randn(3, 4), torch.randn(7, 4)]) is None


def test_the_transformers_class_packs_through_its_shell(tmp_path):
    from transformers import AutoModelForCausalLM

    from deepseekmoe.integrations.transformers.fast_generate import transformer_shell

    tiny_model(64, max_position_embeddings=128).save_pretrained(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    shell = transformer_shell(hf)
    want = generate_ids(shell, PROMPTS, 6, pack=False)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    assert generate_ids(shell, PROMPTS, 6, pack=True) == want
    _assert_packed(shell)
    assert all(torch.equal(v, sd[k]) for k, v in hf.state_dict().items())
    hf.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())
    # PEFT LoRA on the attention projections: those keep their forward (with the adapter), the rest packs
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    pm.eval()
    shell = transformer_shell(pm.base_model.model)
    packing = DecodePacking(shell)
    assert len(packing.skipped) == shell.config.num_hidden_layers
    assert all("self_attn" in k and "q_proj" in v for k, v in packing.skipped.items())
    assert generate_ids(shell, PROMPTS, 6, pack=True) == generate_ids(shell, PROMPTS, 6, pack=False)


@needs_interp
@pytest.mark.parametrize("backend", ["fused", "fused_shared"])
def test_packing_with_the_fused_moe_path(backend):
    """Packed projections beside the decode kernels; with fused_shared the dense MLP runs on them
    too (decode_shared: nothing packed for it)."""
    model = tiny_model()
    ref, _ = _steps(model, pack=False, backend=backend)
    got, dec = _steps(model, pack=True, backend=backend)
    assert rel_err(got, ref) < 1e-5, rel_err(got, ref)
    assert rel_err(got, _steps(model, pack=False, backend="gather")[0]) < 1e-5
    dense = model.layers[0].mlp
    entry = next(e for e in dec.packing.entries if e.module is dense)
    assert ("_decode_packed_w" in entry.attrs) == (backend == "fused")
    assert entry.attrs["forward"].__func__.__name__ == ("kernel_mlp_forward" if backend == "fused_shared"
                                                        else "packed_mlp_forward")


@needs_interp
def test_fused_packed_step_traces_in_one_graph():
    from deepseekmoe.inference.fast_path import fused_moe_path

    model = tiny_model()
    ids = torch.tensor([[0, 5, 9]])
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda t: model(t).logits, backend=backend, fullgraph=True)
    packing = DecodePacking(model, mlp_on_kernels=True)
    with torch.no_grad():
        ref = model(ids).logits
        for _ in range(2):
            with fused_moe_path(model, shared_on_kernels=True), packing.active():
                got = fn(ids)
    assert len(graphs) == 1
    code = graphs[0].code
    assert code.count("decode_shared") >= model.config.num_hidden_layers  # every MLP on the kernels
    assert rel_err(got, ref) < 1e-5


@needs_interp
def test_benchmark_nopack_paths_and_projection_rows():
    """benchmarks/inference.py's packing pieces (its GPU run is one shot): the _nopack path names and
    the projection micro-benchmark rows, on the tiny model (decode kernels through the interpreter)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model()  # 8 experts, top-2
    assert bench.decoder_args("fused_nopack") == {"decode_backend": "fused", "pack": False}
    assert bench.decoder_args("gather") == {"decode_backend": "gather", "pack": True}
    assert bench.backends_at(model, 5, ["gather_nopack", "fused_nopack", "fused"], compiled=True) == [
        "grouped_nopack", "fused_nopack", "fused"]
    assert bench.backends_at(model, 2, ["grouped_nopack", "gather_nopack"], compiled=True) == ["gather_nopack"]
    rows = bench.MICRO.projection_rows(model, torch.device("cpu"), 2, log=lambda _msg: None)
    assert {r["what"] for r in rows} == {"qkv_separate", "qkv_packed"} | {
        f"{m}_mlp_{k}" for m in ("dense", "shared") for k in ("torch", "packed", "kernels")}
    assert all(r["batch"] == 2 and r["us"] > 0 and r["GB_s"] > 0 for r in rows)
