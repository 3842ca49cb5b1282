"""The split-KV decode attention (deepseekmoe.kernels.decode_attention) on the CPU, through Triton's
interpreter, against its reference twin (the masked SDPA of Decoder's decode steps): shapes with
grouped-query heads, per-row left padding, the step's slot at 0, at block edges and at the cache's
end, splits entirely past it, bf16; and the Decoder's attention="splitkv" (inference/splitkv.py)
against "sdpa" on a tiny model, packed and not, eager and traced.

The interpreter's tiles are 4 cache slots (block_s), so these small caches cross several block
edges. Interpreter rule: tests/helpers.py (TRITON_INTERPRET=1 before triton is imported, else a
fresh process), as tests/test_decode_kernels.py.
"""

import contextlib

import pytest
import torch

from tests.helpers import interpreter_suite, kernels_in_process, triton_interpreter

IN_PROCESS = kernels_in_process()
with triton_interpreter() if IN_PROCESS else contextlib.nullcontext():
    pytest.importorskip("triton")
    from deepseekmoe.kernels import decode_attention as da

from tests.helpers import compile_for_hopper, decode_step_logits, rel_err, tiny_model  # noqa: E402

needs_interp, _interpreter, test_in_subprocess = interpreter_suite(__file__, IN_PROCESS)
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(B, H, K, S, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, d, generator=g)
    k = torch.randn(B, K, S, d, generator=g)
    v = torch.randn(B, K, S, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@needs_interp
@pytest.mark.parametrize("B,H,K,S,d,pads,pos,n_splits", [
    (2, 4, 2, 13, 32, [0, 3], 9, 4),        # GQA, padding differing per row, pos inside a block
    (3, 4, 4, 9, 64, [0, 0, 0], 0, 1),      # pos at slot 0: one visible slot, one split
    (3, 4, 4, 9, 64, [0, 0, 0], 0, 8),      # ... with 8 splits, 7 of them past pos
    (2, 8, 2, 16, 32, [1, 4], 7, 2),        # pos at the last slot of a block (4-slot tiles)
    (2, 8, 2, 16, 32, [1, 4], 8, 2),        # ... and at the first slot of the next
    (2, 2, 1, 11, 64, [2, 5], 10, 2),       # pos at S - 1, GQA 2:1, S not a multiple of the tile
    (1, 16, 16, 24, 128, [0], 23, 4),       # the 16B model's heads (H = K = 16, d = 128), full cache
    (2, 6, 2, 40, 32, [0, 9], 12, 16),      # many splits of a short visible range: most are empty
    (2, 4, 2, 13, 32, [5, 3], 5, 2),        # one row's first real slot is pos itself
])
def test_decode_attention_matches_the_reference(B, H, K, S, d, pads, pos, n_splits):
    assert da.INTERPRET, "the kernel was jitted without TRITON_INTERPRET=1"
    q, k, v = _inputs(B, H, K, S, d, seed=S + pos)
    pos_1, pad_B = torch.tensor([pos]), torch.tensor(pads)
    scale = d ** -0.5
    out = da.decode_attention(q, k, v, pos_1, pad_B, scale, n_splits)
    assert out.shape == (B, H, d) and out.dtype == q.dtype
    ref = da.decode_attention_reference(q, k, v, pos_1, pad_B, scale)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    # the reference is the plain softmax over the visible slots, head by head
    b, h = B - 1, H - 1
    kv = h // (H // K)
    s = slice(pads[b], pos + 1)
    w = ((k[b, kv, s] @ q[b, h]) * scale).softmax(0)
    assert rel_err(ref[b, h], w @ v[b, kv, s]) < 1e-5


@needs_interp
def test_decode_attention_never_reads_slots_it_cannot_see():
    """NaN in every slot before a row's padding ends and after pos: the output stays the reference's
    on the cleaned cache (the masked SDPA would carry 0 * NaN = NaN)."""
    B, H, K, S, d = 2, 4, 2, 14, 32
    q, k, v = _inputs(B, H, K, S, d, seed=3)
    pos_1, pad_B = torch.tensor([6]), torch.tensor([2, 5])
    ref = da.decode_attention_reference(q, k, v, pos_1, pad_B, d ** -0.5)
    slot = torch.arange(S)
    hidden = ((slot > 6) | (slot[None, :] < pad_B[:, None]))[:, None, :, None]
    kn, vn = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    for n_splits in (1, 4):
        out = da.decode_attention(q, kn, vn, pos_1, pad_B, d ** -0.5, n_splits)
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5


@needs_interp
@pytest.mark.parametrize("H,K,d,n_splits", [(4, 2, 64, 4), (16, 16, 128, 1)])
def test_decode_attention_bf16(H, K, d, n_splits):
    """bf16 in, fp32 softmax and accumulation, bf16 out: against the fp32 computation on the same
    bf16 values (one bf16 rounding of the output), and the bf16 SDPA reference loosely."""
    B, S = 2, 18
    q, k, v = _inputs(B, H, K, S, d, seed=d, dtype=torch.bfloat16)
    pos_1, pad_B = torch.tensor([15]), torch.tensor([0, 6])
    out = da.decode_attention(q, k, v, pos_1, pad_B, d ** -0.5, n_splits)
    assert out.dtype == torch.bfloat16
    ref32 = da.decode_attention_reference(q.float(), k.float(), v.float(), pos_1, pad_B, d ** -0.5)
    assert rel_err(out, ref32) < 1e-2, rel_err(out, ref32)
    assert rel_err(out, da.decode_attention_reference(q, k, v, pos_1, pad_B, d ** -0.5)) < 2e-2


@needs_interp
def test_n_splits_follow_the_static_shapes():
    """Batch 1 spreads over many splits, large batches take one; never more than the cache's blocks."""
    got = [da.n_splits_for(B, 16, 4096, 1, 128, sms=132) for B in (1, 8, 32, 64)]
    assert got == sorted(got, reverse=True) and got[0] >= 16 and got[-1] == 1
    assert da.n_splits_for(1, 16, 3, 1, 128, sms=132) == 1
    assert all(n & (n - 1) == 0 for n in got)
    q, k, v = _inputs(1, 4, 2, 10, 32)
    pos_1, pad_B = torch.tensor([9]), torch.tensor([0])
    assert rel_err(da.decode_attention(q, k, v, pos_1, pad_B, 0.3), da.decode_attention_reference(
        q, k, v, pos_1, pad_B, 0.3)) < 1e-5  # the default split count


# ---------------------------------------------------------------------- the Decoder's attention switch
@needs_interp
@pytest.mark.parametrize("pack", [False, True])
def test_splitkv_decode_steps_equal_sdpa(pack):
    """Greedy decode steps of the tiny model (GQA 4:2, the second row left-padded): same logits
    with attention="splitkv" as with "sdpa", with and without packed q|k|v."""
    model, backend = tiny_model(), None
    ref, _ = decode_step_logits(model, backend, steps=6, pack=pack)
    got, dec = decode_step_logits(model, backend, steps=6, pack=pack, attention="splitkv")
    assert dec.attention == "splitkv" and dec.attention_splits == 2  # B = 2, K = 2 on the CPU's 4 "SMs"
    assert rel_err(got, ref) < 1e-5, rel_err(got, ref)
    assert all(k not in m.__dict__ for m in model.modules() for k in ("forward", "project", "_splitkv_pad_B")), \
        "a decode forward outlived its block"


@needs_interp
def test_splitkv_greedy_generation_equals_sdpa():
    from deepseekmoe.inference.generate import generate_ids

    model = tiny_model()
    prompts = [[0, 5, 9, 3], [0, 7], [0, 11, 12, 13, 14, 2]]
    assert generate_ids(model, prompts, 6, attention="splitkv") == generate_ids(model, prompts, 6)


@needs_interp
def test_splitkv_step_traces_in_one_graph_without_recompiling():
    """torch.compile(fullgraph=True) takes the swapped forward and the custom op in one graph, and
    entering the block again (as every decode step does) does not retrace."""
    from deepseekmoe.inference.generate import Decoder

    model = tiny_model()
    dec = Decoder(model, 2, 16, decode_backend="gather", attention="splitkv")  # CPU compile: no grouped_mm
    dec.prefill(torch.tensor([[0, 5, 9, 3], [1, 1, 0, 7]]), torch.tensor([0, 2]))
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(dec._step, backend=backend, fullgraph=True)
    start = dec.pos_1.clone()
    with torch.no_grad():
        with dec.decode_block():
            ref = dec._step().clone()
        for _ in range(2):
            dec.pos_1.copy_(start)
            with dec.decode_block():
                got = fn()
    assert len(graphs) == 1 and "decode_attention" in graphs[0].code
    assert rel_err(got, ref) < 1e-6


def test_attention_switch_refuses_bad_values(monkeypatch):
    from deepseekmoe.errors import ConfigError
    from deepseekmoe.inference.generate import Decoder

    model = tiny_model()
    with pytest.raises(ConfigError, match=r"attention='splitkvv': choose one of sdpa, splitkv \(did you mean "):
        Decoder(model, 1, 16, attention="splitkvv")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*use attention='sdpa'"):
        Decoder(model, 1, 16, attention="splitkv")


@needs_interp
def test_benchmark_attention_paths_and_rows_run_on_the_interpreter():
    """benchmarks/inference.py's attention pieces (its GPU run is one shot): the NAME+splitkv path
    names and their Decoder keywords, and the attention micro-benchmark rows on a small shape."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.decoder_args("fused_nopack+splitkv") == {"decode_backend": "fused", "pack": False,
                                                         "attention": "splitkv"}
    assert bench.decoder_args("gather") == {"decode_backend": "gather", "pack": True}
    args = argparse.Namespace(decode_backends=["gather", "fused"], decode_attention=["sdpa", "splitkv"])
    assert bench.variants_at(tiny_model(), 2, args, compiled=True) == ["gather", "gather+splitkv", "fused",
                                                                       "fused+splitkv"]
    rows = bench.MICRO.attention_rows(tiny_model(), torch.device("cpu"), 2, [(12, 9)], log=lambda _msg: None)
    assert {r["what"] for r in rows} == {"attention_sdpa", "attention_splitkv"}
    assert all(r["batch"] == 2 and r["slots"] == 12 and r["visible"] == 10 and r["us"] > 0 and r["GB_s"] > 0
               for r in rows)


COMPILE_SNIPPET = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepseekmoe.kernels import decode_attention as da

def compile_(fn, sig, consts, warps):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn=fn, constexprs=consts, signature=sig), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert "cubin" in k.asm

part = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "pad_ptr": "*i64", "m_ptr": "*fp32",
        "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16", "qk_scale": "fp32", "H": "i32", "K": "i32",
        "S": "i32", "d": "i32"}
for G, d, ns in ((1, 128, 8), (1, 128, 1), (4, 64, 4), (8, 32, 2)):
    meta = dict(G=G, G_P2=triton.next_power_of_2(G), D_P2=d, BLOCK_S=da.block_s(G, d), NSPLIT=ns)
    compile_(da._splitkv_partials, part, meta, 4)
comb = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16", "d": "i32"}
for ns in (2, 8, 64):
    compile_(da._splitkv_combine, comb, dict(D_P2=128, NSPLIT=ns), 2)
print("compiled")
"""


def test_decode_attention_compiles_for_hopper():
    """The real compiler (not the interpreter) accepts both kernels for sm_90 at the 16B shape's
    tiles (G = 1, d = 128, one split and several) and GQA shapes, without a GPU."""
    compile_for_hopper(COMPILE_SNIPPET)
