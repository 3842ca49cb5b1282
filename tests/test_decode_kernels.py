"""The decode fast path's Triton kernels on the CPU, through Triton's interpreter, against their
reference twins: the fused routed experts (deepseekmoe.kernels.decode_moe) against the `gather`
backend and the `loop` reference, and the decode router (decode_routing) against TopKRouter.

Decode is inference only, so these are forward checks (the kernels have no backward). The
interpreter rule (TRITON_INTERPRET=1 before triton is imported, else a fresh process) is the one
of tests/test_kernels.py, from tests/helpers.py.
"""

import contextlib

import pytest
import torch

from tests.helpers import interpreter_suite, kernels_in_process, triton_interpreter

IN_PROCESS = kernels_in_process()
with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
    pytest.importorskip("triton")
    from deepseekmoe.kernels import decode_moe as dm
    from deepseekmoe.kernels import decode_routing as dr

from deepseekmoe.model.moe.experts import experts_gather, experts_loop  # noqa: E402
from tests.helpers import compile_for_hopper, decode_step_logits, rel_err  # noqa: E402

needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, IN_PROCESS)


def _inputs(T, K, E, D, F, seed=0, idx=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    if idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x.to(dtype), idx, w, w13.to(dtype), w2.to(dtype)


@needs_interp
@pytest.mark.parametrize("T,K,E,D,F", [
    (1, 3, 8, 40, 24),    # batch 1: the GEMV path, D and F not multiples of the tiles
    (2, 2, 5, 32, 16),    # GEMV path with two tokens
    (5, 3, 6, 32, 48),    # the tl.dot path, tokens sharing experts
    (19, 2, 4, 48, 32),   # more slots than experts: every expert read once for many tokens
])
def test_decode_experts_match_gather_and_loop(T, K, E, D, F):
    assert dm.INTERPRET, "the kernels were jitted without TRITON_INTERPRET=1"
    x, idx, w, w13, w2 = _inputs(T, K, E, D, F)
    out = dm.decode_experts(x, idx, w, w13, w2)
    assert out.shape == (T, D) and out.dtype == x.dtype
    ref = experts_gather(x, idx, w, w13, w2)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert rel_err(out, experts_loop(x, idx, w, w13, w2)) < 1e-5
    assert rel_err(dm.decode_experts_reference(x, idx, w, w13, w2), ref) == 0


@needs_interp
def test_decode_experts_shared_experts_on_the_slot_grid():
    """Fewer slots than experts (programs are slots) while tokens share experts, on both paths."""
    for idx in ([[0, 1], [1, 2], [0, 2]], [[3, 1], [1, 3]]):  # 3 tokens: tl.dot; 2 tokens: GEMV
        idx = torch.tensor(idx)
        x, _, w, w13, w2 = _inputs(idx.shape[0], 2, 8, 32, 16, seed=5)
        assert rel_err(dm.decode_experts(x, idx, w, w13, w2), experts_loop(x, idx, w, w13, w2)) < 1e-5


@needs_interp
def test_decode_experts_every_token_on_one_expert_and_bf16():
    x, _, w, w13, w2 = _inputs(6, 1, 4, 32, 16, seed=1)
    idx = torch.full((6, 1), 3)
    assert rel_err(dm.decode_experts(x, idx, w, w13, w2), experts_loop(x, idx, w, w13, w2)) < 1e-5
    # bf16 in, fp32 accumulate: against the fp32 loop on the same bf16 values. (The interpreter
    # truncates fp32 -> bf16 where the GPU rounds, hence the loose bound.)
    x, idx, w, w13, w2 = _inputs(4, 2, 6, 32, 32, seed=2, dtype=torch.bfloat16)
    out = dm.decode_experts(x, idx, w, w13, w2)
    assert out.dtype == torch.bfloat16
    ref = experts_loop(x.float(), idx, w, w13.float(), w2.float())
    assert rel_err(out, ref) < 3e-2, rel_err(out, ref)


@needs_interp
def test_decode_experts_write_every_slot_once():
    """Slot outputs are the per-slot gated expert outputs (no slot left unwritten, none summed twice)."""
    T, K, E, D, F = 3, 2, 4, 32, 16
    x, idx, w, w13, w2 = _inputs(T, K, E, D, F, seed=4)
    y_SD = dm.decode_experts_op(x, idx, w, w13, w2)
    for t in range(T):
        for k in range(K):
            e = idx[t, k]
            h = x[t] @ w13[e].T
            ref = w[t, k] * ((torch.nn.functional.silu(h[:F]) * h[F:]) @ w2[e].T)
            assert rel_err(y_SD[t * K + k], ref) < 1e-5


@needs_interp
@pytest.mark.parametrize("T,D,F", [(1, 40, 24), (2, 32, 48), (5, 32, 40), (19, 48, 32)])
def test_decode_shared_matches_mlp(T, D, F):
    """The shared experts on the same kernels (one expert, every token at weight 1) against the MLP."""
    from deepseekmoe.model.layers import MLP

    torch.manual_seed(T)
    mlp = MLP(D, F)
    x = torch.randn(T, D)
    with torch.no_grad():
        ref = mlp(x)
        got = dm.decode_shared(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        assert got.dtype == torch.float32 and got.shape == (T, D)
        assert rel_err(got, ref) < 1e-5, rel_err(got, ref)
        twin = dm.decode_shared_reference(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        assert rel_err(twin, ref) < 1e-6


@needs_interp
def test_decode_experts_refuses_prefill_sizes():
    x, idx, w, w13, w2 = _inputs(dm.MAX_TOKENS + 1, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="at most"):
        dm.decode_experts(x, idx, w, w13, w2)


@needs_interp
@pytest.mark.parametrize("T,E,D,k,normalize,splits", [(1, 8, 40, 2, False, 1), (5, 6, 32, 3, True, 1),
                                                      (3, 5, 16, 1, True, 1), (4, 64, 48, 6, False, 1),
                                                      (1, 8, 40, 2, False, 2), (3, 64, 48, 6, True, 8)])
def test_decode_router_matches_reference_and_topk_router(T, E, D, k, normalize, splits):
    """One launch, and split-D (splits > 1; with 8 splits of 16-column chunks over D = 48 some are
    empty)."""
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=g)
    w_ED = torch.randn(E, D, generator=g)
    idx, gate = dr.decode_router(x, w_ED, k, normalize, splits)
    ref_idx, ref_gate = dr.decode_router_reference(x, w_ED, k, normalize)
    assert idx.dtype == torch.int64 and gate.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    assert rel_err(gate, ref_gate) < 1e-5
    if normalize and k > 1:
        assert torch.allclose(gate.sum(-1), torch.ones(T))
    # the model's router: same ids and gate values
    from deepseekmoe import ModelConfig
    from deepseekmoe.model.moe.router import TopKRouter

    cfg = ModelConfig(vocab_size=16, hidden_size=D, n_routed_experts=E, num_experts_per_tok=k,
                      norm_topk_prob=normalize, num_attention_heads=2, moe_intermediate_size=16)
    router = TopKRouter(cfg)
    router.weight.data.copy_(w_ED)
    r = router(x)
    assert torch.equal(idx, r.idx_TK) and rel_err(gate, r.w_TK) < 1e-5


# ---------------------------------------------------------------------- the Decoder's fused path
def _decode_logits(model, backend, B=2, steps=4, mode="eager"):
    return decode_step_logits(model, backend, B=B, steps=steps, mode=mode)


@needs_interp
@pytest.mark.parametrize("B,backend", [(1, "fused"), (2, "fused"), (2, "fused_shared")])
def test_fused_decode_steps_match_gather(B, backend):
    from tests.helpers import tiny_model

    model = tiny_model()
    fused, dec = _decode_logits(model, backend, B)
    assert dec.decode_backend == backend
    ref, _ = _decode_logits(model, "gather", B)
    assert rel_err(fused, ref) < 1e-5, rel_err(fused, ref)
    assert all("forward" not in m.__dict__ for m in model.moe_layers()), "the fused forward outlived its block"


@needs_interp
def test_fused_greedy_generation_equals_gather():
    from deepseekmoe.inference.generate import generate_ids
    from tests.helpers import tiny_model

    model = tiny_model()
    prompts = [[0, 5, 9, 3], [0, 7], [0, 11, 12, 13, 14, 2]]
    assert generate_ids(model, prompts, 6, decode_backend="fused") == generate_ids(model, prompts, 6,
                                                                                    decode_backend="gather")


@needs_interp
def test_fused_path_honours_knobs_and_falls_back():
    from deepseekmoe.inference.fast_path import fused_moe_path, layer_takes_fused
    from tests.helpers import tiny_model

    model = tiny_model()
    ids = torch.tensor([[0, 5, 9]])
    model.set_routing(top_k=1, record=True)
    ref = model(ids).logits
    ref_ids = [m.last_routing.idx_TK for m in model.moe_layers()]
    with torch.no_grad(), fused_moe_path(model):
        got = model(ids).logits
    assert rel_err(got, ref) < 1e-5
    assert all(torch.equal(m.last_routing.idx_TK, r) for m, r in zip(model.moe_layers(), ref_ids))
    model.set_routing(mask_top_fraction=0.25)
    assert not any(layer_takes_fused(m) for m in model.moe_layers())  # the knob stays on the model's path
    with torch.no_grad(), fused_moe_path(model):
        assert rel_err(model(ids).logits, model(ids).logits) == 0


@needs_interp
@pytest.mark.parametrize("shared_on_kernels", [False, True])
def test_fused_step_traces_in_one_graph_without_recompiling(shared_on_kernels):
    """torch.compile(fullgraph=True) takes the patched forward and the custom ops in one graph, and
    entering the block again (as every decode step does) does not retrace."""
    from deepseekmoe.inference.fast_path import fused_moe_path
    from tests.helpers import tiny_model

    model = tiny_model()
    ids = torch.tensor([[0, 5, 9], [0, 3, 4]])
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda t: model(t).logits, backend=backend, fullgraph=True)
    with torch.no_grad():
        ref = model(ids).logits
        for _ in range(2):
            with fused_moe_path(model, shared_on_kernels):
                got = fn(ids)
    assert len(graphs) == 1
    assert "decode_experts" in graphs[0].code and "decode_router" in graphs[0].code
    assert ("decode_shared" in graphs[0].code) == shared_on_kernels
    assert rel_err(got, ref) < 1e-5


@needs_interp
def test_fused_backend_is_refused_where_it_cannot_run(monkeypatch):
    from deepseekmoe.errors import ConfigError
    from deepseekmoe.inference.generate import Decoder, default_decode_backend
    from tests.helpers import tiny_model

    model = tiny_model()
    assert default_decode_backend(model, 1, "compile") != "fused"  # CPU stays on the readable path
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="CUDA GPU"):
        Decoder(model, 1, 16, decode_backend="fused")
    hashed = tiny_model(router="hash", n_shared_experts=0, num_experts_per_tok=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="top-k router"):
        Decoder(hashed, 1, 16, decode_backend="fused")


def test_compare_greedy_reports_first_divergence_and_margins():
    from deepseekmoe.inference.parity import GreedyRun, compare_greedy

    ref = GreedyRun([[1, 2, 3], [4, 5, 6]], [[0.5, 0.1, 0.2], [1.0, 0.01, 2.0]])
    got = GreedyRun([[1, 2, 3], [4, 7, 6]], [[0.5, 0.1, 0.2], [1.0, 0.02, 2.0]])
    rep = compare_greedy(ref, got)
    assert rep["rows_matching"] == 1 and rep["first_divergence"] == 1
    assert rep["per_row"][1] == {"row": 1, "match": False, "first_divergence": 1, "ref_token": 5, "got_token": 7,
                                 "ref_margin": 0.01, "got_margin": 0.02}
    assert rep["max_margin_at_divergence"] == 0.01


@needs_interp
def test_greedy_run_of_the_fused_path_matches_eager():
    from deepseekmoe.inference.generate import Decoder
    from deepseekmoe.inference.parity import compare_greedy, greedy_run
    from tests.helpers import tiny_model

    model = tiny_model()
    prompts = [[0, 5, 9], [0, 7, 3, 2, 8]]
    ref = greedy_run(Decoder(model, 2, 16, decode_backend=None), prompts, 6)
    rep = compare_greedy(ref, greedy_run(Decoder(model, 2, 16, decode_backend="fused"), prompts, 6))
    assert rep["rows_matching"] == 2 and rep["first_divergence"] is None
    assert all(m > 0 for row in ref.margins for m in row)


@needs_interp
def test_benchmark_kernel_phase_and_backend_choice_run_on_the_interpreter():
    """benchmarks/inference.py's fused-path pieces (its GPU run is one shot): the backend choice per
    batch and the kernel micro-benchmark rows, on the tiny model."""
    import argparse
    import importlib.util
    from pathlib import Path

    from tests.helpers import tiny_model

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model()  # 8 experts, top-2
    assert bench.backends_at(model, 2, ["gather", "fused"], compiled=True) == ["gather", "fused"]
    assert bench.backends_at(model, 5, ["gather", "fused"], compiled=True) == ["grouped", "fused"]
    assert bench.backends_at(model, 5, ["grouped", "gather"], compiled=False) == ["grouped"]
    assert bench.backends_at(model, 65, ["fused"], compiled=True) == []
    bench.phase_kernels(model, torch.device("cpu"), argparse.Namespace(kernel_batches=[1, 2], json=None))
    rows = bench.RESULTS["kernels"]
    assert {(r["batch"], r["what"]) for r in rows} == {
        (b, w) for b in (1, 2) for w in ("router_kernel", "router_kernel_split8", "router_torch", "experts_fused",
                                         "experts_gather_eager", "shared_kernels", "shared_torch")}
    assert all(r["us"] > 0 for r in rows) and all(r["GB_s"] > 0 for r in rows if not r["what"].startswith("router"))


COMPILE_SNIPPET = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepseekmoe.kernels import decode_moe as dm, decode_routing as dr

def compile_(fn, sig, consts, cfg=None):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {"num_warps": 8}
    k = triton.compile(ASTSource(fn=fn, constexprs=consts, signature=sig), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    assert "cubin" in k.asm

ints = {"T": "i32", "D": "i32", "F": "i32", "K_TOP": "i32"}
up = {"x_ptr": "*bf16", "w1_ptr": "*bf16", "w3_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*fp32", "a_ptr": "*bf16",
      **ints, "stride_e": "i64"}
down = {"a_ptr": "*bf16", "w2_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*fp32", "y_ptr": "*fp32", **ints}
for T, shared in ((1, False), (8, False), (64, False), (1, True), (8, True)):
    bm, dot = dm.token_tile(T)
    meta = dict(S_P2=triton.next_power_of_2(6 * T), BLOCK_M=bm, K_P2=8, USE_DOT=dot, PREC="tf32", BY_EXPERT=T > 10,
                SHARED=shared)
    compile_(dm._decode_gateup, up, {**meta, **dm.GATEUP_CFGS[0].kwargs}, dm.GATEUP_CFGS[0])
    compile_(dm._decode_down, down, {**meta, **dm.DOWN_CFGS[-1].kwargs}, dm.DOWN_CFGS[-1])
rsig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "part_ptr": "*fp32", "idx_ptr": "*i64", "gate_ptr": "*fp32", "D": "i32",
        "E": "i32"}
for ns in (1, 8):
    compile_(dr._decode_router, rsig, dict(NSPLIT=ns, E_P2=64, K_TOP=6, K_P2=8, NORMALIZE=True, BLOCK_K=256))
compile_(dr._router_partials, {"x_ptr": "*bf16", "w_ptr": "*bf16", "part_ptr": "*fp32", "D": "i32", "E": "i32",
                               "CHUNK": "i32"}, dict(NSPLIT=8, E_P2=64, BLOCK_K=256))
print("compiled")
"""


def test_decode_kernels_compile_for_hopper():
    """The real compiler (not the interpreter) accepts the decode kernels for sm_90 at the 16B shape's
    tiles (GEMV and tl.dot paths, both grids, the shared form, both router forms), without a GPU."""
    compile_for_hopper(COMPILE_SNIPPET)
