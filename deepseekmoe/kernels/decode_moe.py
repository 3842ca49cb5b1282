"""Fused routed experts for decode steps (T <= 64 tokens): read only the selected experts' weights.

    y_TD = decode_experts(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)

Same signature and result as the `gather` backend (deepseekmoe.model.moe.experts.experts_gather,
its reference twin) for the stacked expert layout the model stores: w13_E2FD holds gate rows
0..F-1 and up rows F..2F-1 in (out, in) orientation, w2_EDF the down projection. Inference only:
there is no backward (decode runs under no_grad; the custom op has no autograd formula, so a
backward through it raises "no autograd formula was registered").

Two kernels, no sort, no host sync, fixed launch grids (CUDA-graph safe):

  gateup   grid (S slots, F blocks). The program of slot s is the expert's owner when no earlier
           slot chose the same expert; the others exit at once. (With more slots than experts,
           S > E, the grid is (E, F blocks) instead: program e owns e when some slot chose it.)
           The owner finds every token that chose its expert (a [T, K] compare), reads a
           [BLOCK_F, D] slice of that expert's gate and up rows once, multiplies it by those
           tokens' rows (tl.dot for T >= 3; below that a GEMV: elementwise products into a
           [M, BLOCK_F, BLOCK_K] accumulator, reduced once after the loop), and writes
           a = silu(g) * u for each of them in slot order, in the compute dtype. So each activated
           expert is read once per step, however many tokens share it.
  down     grid (S slots, D blocks), same ownership: y_slot = w_tk * (a_slot @ W2_e^T) in fp32,
           written to each slot's own row (no atomics: deterministic). The K slots of a token are
           summed afterwards (one small reduction that torch.compile fuses with the shared-expert
           add that follows).

Accumulation is fp32 throughout (bf16 in). Tiles are autotuned per token-count bucket on the GPU;
the interpreter (TRITON_INTERPRET=1, CPU tests) runs small fixed tiles.

Shape legend: T tokens, K experts per token (K_TOP in kernels), S = T*K slots in flat order
(t*K + k), E experts, D hidden, F expert width.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter multiplies bf16 tiles as raw integers: upcast there, only there.
_UPCAST_DOT = tl.constexpr(INTERPRET)
MAX_TOKENS = 64  # the kernels' token tile covers every token of the step
_INTERP_META = {"gateup": dict(BLOCK_F=16, BLOCK_K=16), "down": dict(BLOCK_D=16, BLOCK_F=16)}


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """An fp32 accumulator: [M, N] for tl.dot; [M, N, KB] for the GEMV, reduced once at the end."""
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    return acc


@triton.jit
def _mm(a, b_t, acc, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b_t^T for a [M, KB] and b_t [N, KB] (fp32; the GEMV adds products elementwise)."""
    if USE_DOT:
        if _UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b_t), acc, input_precision=PREC)
    else:
        acc += a.to(tl.float32)[:, None, :] * b_t.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _acc_result(acc, USE_DOT: tl.constexpr):
    """The [M, N] result of an accumulator from _acc_zeros."""
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    return acc


@triton.jit
def _owner_tokens(idx_ptr, w_ptr, s, T, K_TOP, S_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                  K_P2: tl.constexpr, BY_EXPERT: tl.constexpr, SHARED: tl.constexpr):
    """Program s's expert e and whether it owns it, and per token m: chose e, the slot (m*K + k)
    where it did, and that slot's gate value. Programs are slots (e = the slot's expert, owner =
    no earlier slot chose e) or, with BY_EXPERT (more slots than experts), experts (e = s, owner =
    some slot chose e). SHARED: one expert every token takes with weight 1 (idx/w unread)."""
    offs_m = tl.arange(0, BLOCK_M)
    if SHARED:
        e = s.to(tl.int64) * 0  # expert 0 (a scalar of the right type in every triton version)
        owner = s == 0
        chose_m = offs_m < T
        slot_m = offs_m
        gate_m = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        offs_s = tl.arange(0, S_P2)
        if BY_EXPERT:
            e = s.to(tl.int64)
            chosen = tl.load(idx_ptr + offs_s, mask=offs_s < T * K_TOP, other=-1)
            owner = tl.sum((chosen == e).to(tl.int32), 0) > 0
        else:
            e = tl.load(idx_ptr + s).to(tl.int64)
            before = tl.load(idx_ptr + offs_s, mask=offs_s < s, other=-1)
            owner = tl.sum((before == e).to(tl.int32), 0) == 0
        offs_k = tl.arange(0, K_P2)
        mk = (offs_m[:, None] < T) & (offs_k[None, :] < K_TOP)
        ids = tl.load(idx_ptr + offs_m[:, None] * K_TOP + offs_k[None, :], mask=mk, other=-1)
        hit = ids == e
        chose_m = tl.sum(hit.to(tl.int32), 1) > 0
        slot_m = offs_m * K_TOP + tl.sum(tl.where(hit, offs_k[None, :], 0), 1)
        gate_m = tl.sum(tl.where(hit, tl.load(w_ptr + offs_m[:, None] * K_TOP + offs_k[None, :], mask=mk,
                                              other=0.0), 0.0), 1)
    return e, owner, offs_m, chose_m, slot_m, gate_m


@triton.jit
def _decode_gateup(x_ptr, w1_ptr, w3_ptr, idx_ptr, w_ptr, a_ptr, T, D, F, K_TOP, stride_e,
                   S_P2: tl.constexpr, BLOCK_M: tl.constexpr, K_P2: tl.constexpr, USE_DOT: tl.constexpr,
                   PREC: tl.constexpr, BY_EXPERT: tl.constexpr, SHARED: tl.constexpr, BLOCK_F: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """a[slot(m)] = silu(x_m W1_e^T) * (x_m W3_e^T) for the F block, every token m that chose e
    (W1_e / W3_e: [F, D] row-major at w1/w3 + e * stride_e)."""
    s = tl.program_id(0)
    e, owner, offs_m, chose_m, slot_m, _ = _owner_tokens(idx_ptr, w_ptr, s, T, K_TOP, S_P2, BLOCK_M, K_P2, BY_EXPERT,
                                                         SHARED)
    if owner:
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < F
        rows = e.to(tl.int64) * stride_e + offs_f[:, None].to(tl.int64) * D
        wg_base = w1_ptr + rows
        wu_base = w3_ptr + rows
        acc_g = _acc_zeros(BLOCK_M, BLOCK_F, BLOCK_K, USE_DOT)
        acc_u = _acc_zeros(BLOCK_M, BLOCK_F, BLOCK_K, USE_DOT)
        for k0 in range(0, D, BLOCK_K):
            offs_d = k0 + tl.arange(0, BLOCK_K)
            dmask = offs_d < D
            x = tl.load(x_ptr + offs_m[:, None] * D + offs_d[None, :], mask=chose_m[:, None] & dmask[None, :],
                        other=0.0)
            wmask = fmask[:, None] & dmask[None, :]
            wg = tl.load(wg_base + offs_d[None, :], mask=wmask, other=0.0)
            wu = tl.load(wu_base + offs_d[None, :], mask=wmask, other=0.0)
            acc_g = _mm(x, wg, acc_g, USE_DOT, PREC)
            acc_u = _mm(x, wu, acc_u, USE_DOT, PREC)
        g = _acc_result(acc_g, USE_DOT)
        a = g / (1.0 + tl.exp(-g)) * _acc_result(acc_u, USE_DOT)
        tl.store(a_ptr + slot_m[:, None] * F + offs_f[None, :], a.to(a_ptr.dtype.element_ty),
                 mask=chose_m[:, None] & fmask[None, :])


@triton.jit
def _decode_down(a_ptr, w2_ptr, idx_ptr, w_ptr, y_ptr, T, D, F, K_TOP,
                 S_P2: tl.constexpr, BLOCK_M: tl.constexpr, K_P2: tl.constexpr, USE_DOT: tl.constexpr,
                 PREC: tl.constexpr, BY_EXPERT: tl.constexpr, SHARED: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_F: tl.constexpr):
    """y[slot(m)] = w_m * (a[slot(m)] @ W2_e^T) (fp32) for the D block, every token m that chose e."""
    s = tl.program_id(0)
    e, owner, offs_m, chose_m, slot_m, gate_m = _owner_tokens(idx_ptr, w_ptr, s, T, K_TOP, S_P2, BLOCK_M, K_P2,
                                                              BY_EXPERT, SHARED)
    if owner:
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        w_base = w2_ptr + e.to(tl.int64) * D * F + offs_d[:, None].to(tl.int64) * F
        acc = _acc_zeros(BLOCK_M, BLOCK_D, BLOCK_F, USE_DOT)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            fmask = offs_f < F
            a = tl.load(a_ptr + slot_m[:, None] * F + offs_f[None, :], mask=chose_m[:, None] & fmask[None, :],
                        other=0.0)
            w = tl.load(w_base + offs_f[None, :], mask=dmask[:, None] & fmask[None, :], other=0.0)
            acc = _mm(a, w, acc, USE_DOT, PREC)
        y = _acc_result(acc, USE_DOT) * gate_m[:, None]
        tl.store(y_ptr + slot_m[:, None] * D + offs_d[None, :], y, mask=chose_m[:, None] & dmask[None, :])


def _cfgs(names, *rows):
    return [triton.Config(dict(zip(names, r[:2])), num_warps=r[2], num_stages=r[3]) for r in rows]


# Bandwidth-bound tiles: narrow output blocks (many programs per expert, so batch 1 fills the SMs),
# long contiguous reads along the reduction dimension.
# The BLOCK 8 rows double the programs of a batch-1 step (6 experts x F/8 blocks).
GATEUP_CFGS = _cfgs(("BLOCK_F", "BLOCK_K"), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3), (16, 512, 8, 2),
                    (32, 256, 8, 3), (32, 128, 4, 4))
DOWN_CFGS = _cfgs(("BLOCK_D", "BLOCK_F"), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3), (16, 512, 8, 2),
                  (32, 256, 8, 3), (32, 128, 4, 4))
_KEY = ["D", "F", "BLOCK_M", "USE_DOT", "PREC", "BY_EXPERT", "SHARED"]
_RAW = {"gateup": _decode_gateup, "down": _decode_down}
_TUNED = {} if INTERPRET else {"gateup": triton.autotune(GATEUP_CFGS, key=_KEY)(_decode_gateup),
                               "down": triton.autotune(DOWN_CFGS, key=_KEY)(_decode_down)}
# {"gateup" | "down": triton.Config} to bypass autotuning (sweeps, or a config known to be best).
FORCE_CONFIG: dict = {}


def _launch(name, grid, args, meta):
    config = FORCE_CONFIG.get(name)
    if INTERPRET or config is not None:
        tiles = _INTERP_META[name] if config is None else dict(config.kwargs)
        opts = {} if config is None else dict(num_warps=config.num_warps, num_stages=config.num_stages)
        return _RAW[name][grid({**meta, **tiles})](*args, **meta, **tiles, **opts)
    return _TUNED[name][grid](*args, **meta)


def token_tile(T: int) -> tuple[int, bool]:
    """(BLOCK_M, USE_DOT): one tile holds every token; tl.dot needs >= 16 rows, so for 1-2 tokens
    the kernels run as GEMVs (elementwise products, one reduction) instead of padding to 16 rows."""
    if T <= 2:
        return triton.next_power_of_2(T), False
    return max(16, triton.next_power_of_2(T)), True


def decode_experts_impl(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """The two launches and the sum over each token's K slots; see the module docstring."""
    T, K = idx_TK.shape
    E, twoF, D = w13_E2FD.shape
    F_ = twoF // 2
    if T > MAX_TOKENS:
        raise ValueError(f"decode_experts handles at most {MAX_TOKENS} tokens per call (got {T}); "
                         "use the grouped or triton backend for prefill")
    S = T * K
    if S == 0:
        return torch.zeros(0, D, dtype=torch.float32, device=x_TD.device), x_TD.new_empty(0, F_)
    by_expert = S > E
    n_prog = E if by_expert else S
    meta = _meta(x_TD, T, K, BY_EXPERT=by_expert, SHARED=False)
    x_TD, idx_TK, w_TK = x_TD.contiguous(), idx_TK.contiguous(), w_TK.float().contiguous()
    w13, w2 = w13_E2FD.to(x_TD.dtype).contiguous(), w2_EDF.to(x_TD.dtype).contiguous()
    return _run(x_TD, w13, w13[:, F_:], 2 * F_ * D, w2, idx_TK, w_TK, n_prog, T, K, F_, meta)


def _meta(x_TD, T: int, K: int, **flags) -> dict:
    BLOCK_M, use_dot = token_tile(T)
    return dict(S_P2=triton.next_power_of_2(T * K), BLOCK_M=BLOCK_M, K_P2=triton.next_power_of_2(K), USE_DOT=use_dot,
                PREC="ieee" if x_TD.dtype == torch.float32 else "tf32", **flags)


def _run(x_TD, w1, w3, stride_e: int, w2, idx_TK, w_TK, n_prog: int, T: int, K: int, F_: int, meta: dict):
    """Both launches: a_SF (compute dtype), then the gate-weighted slot outputs y_SD (fp32)."""
    D = x_TD.shape[1]
    a_SF = x_TD.new_empty(T * K, F_)
    _launch("gateup", lambda m: (n_prog, triton.cdiv(F_, m["BLOCK_F"])),
            (x_TD, w1, w3, idx_TK, w_TK, a_SF, T, D, F_, K, stride_e), meta)
    y_SD = torch.empty(T * K, D, dtype=torch.float32, device=x_TD.device)
    _launch("down", lambda m: (n_prog, triton.cdiv(D, m["BLOCK_D"])),
            (a_SF, w2, idx_TK, w_TK, y_SD, T, D, F_, K), meta)
    return y_SD, a_SF


def decode_shared_impl(x_TD, gate_FD, up_FD, down_DF):
    """The shared experts (one SwiGLU MLP of width F, every token at weight 1) on the same two
    kernels: y_TD fp32 = down(silu(x gate^T) * (x up^T))."""
    T, D = x_TD.shape
    F_ = gate_FD.shape[0]
    if T > MAX_TOKENS:
        raise ValueError(f"decode_shared handles at most {MAX_TOKENS} tokens per call (got {T})")
    if T == 0:
        return torch.zeros(0, D, dtype=torch.float32, device=x_TD.device)
    dt = x_TD.dtype
    x_TD = x_TD.contiguous()
    dummy = x_TD.new_empty(0, dtype=torch.int64)
    y_TD, _ = _run(x_TD, gate_FD.to(dt).contiguous(), up_FD.to(dt).contiguous(), 0, down_DF.to(dt).contiguous(),
                   dummy, dummy.float(), 1, T, 1, F_, _meta(x_TD, T, 1, BY_EXPERT=False, SHARED=True))
    return y_TD


@torch.library.custom_op("deepseekmoe::decode_experts", mutates_args=())
def decode_experts_op(x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, w13_E2FD: torch.Tensor,
                      w2_EDF: torch.Tensor) -> torch.Tensor:
    """Per-slot outputs y_SD (fp32, already gate-weighted), [T*K, D]."""
    return decode_experts_impl(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)[0]


@decode_experts_op.register_fake
def _(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    T, K = idx_TK.shape
    return x_TD.new_empty((T * K, x_TD.shape[1]), dtype=torch.float32)


def decode_experts(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """Fused routed experts of a decode step, [T, D] in x's dtype; same signature and result as
    experts_gather (inference only: no backward)."""
    T, K = idx_TK.shape
    y_SD = decode_experts_op(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)
    return y_SD.view(T, K, -1).sum(1).to(x_TD.dtype)


@torch.library.custom_op("deepseekmoe::decode_shared", mutates_args=())
def decode_shared_op(x_TD: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor,
                     down_DF: torch.Tensor) -> torch.Tensor:
    return decode_shared_impl(x_TD, gate_FD, up_FD, down_DF)


@decode_shared_op.register_fake
def _(x_TD, gate_FD, up_FD, down_DF):
    return x_TD.new_empty(x_TD.shape, dtype=torch.float32)


def decode_shared(x_TD, gate_FD, up_FD, down_DF):
    """The shared experts of a decode step on the decode kernels, [T, D] fp32 (inference only);
    reference twin: deepseekmoe.model.layers.MLP (decode_shared_reference)."""
    return decode_shared_op(x_TD, gate_FD, up_FD, down_DF)


def decode_shared_reference(x_TD, gate_FD, up_FD, down_DF):
    """The reference twin: MLP's math, down(silu(gate(x)) * up(x))."""
    import torch.nn.functional as Fn

    return Fn.linear(Fn.silu(Fn.linear(x_TD, gate_FD)) * Fn.linear(x_TD, up_FD), down_DF)


def decode_experts_reference(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF):
    """The reference twin: the `gather` backend's math."""
    from deepseekmoe.model.moe.experts import experts_gather

    return experts_gather(x_TD, idx_TK, w_TK, w13_E2FD, w2_EDF)
