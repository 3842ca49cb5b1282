"""Text generation: a static KV cache, sampling, batched left-padded decoding, the chat template.

    out = generate(model, tokenizer, ["The capital of France is", "1, 2, 3,"], max_new_tokens=32)

Design, for speed without surprises:
- `StaticKVCache` preallocates [B, kv_heads, max_len, head_dim] per layer and writes new keys
  and values by index (`Attention` calls `update(layer, k, v, cache_position)`), so every decode
  step has the same shapes: the step can be captured once as a CUDA graph and replayed.
- Prompts of different lengths are left-padded to one length L. Row b's real tokens sit in
  slots [pad_b, L); its position ids are slot - pad_b, and the boolean mask lets a query at slot s
  see slots j with pad_b <= j <= s. Padding queries see only themselves (a row of all-False would
  give NaN in SDPA, and NaNs written to the cache would poison real rows through 0 * NaN).
- The decode step never reads values back to the host: positions, masks and the cache slot are
  computed on the device from a device counter. The host reads each step's tokens one step late
  (a pinned copy behind an event), so checking eos and stop strings overlaps the next step.
- Sampling: temperature, top-k, top-p (nucleus) filters, then an exponential race
  (argmax p_i / E_i with E_i ~ Exp(1), the Gumbel-max trick), which draws from p without the
  host round trip of torch.multinomial. temperature 0 is greedy argmax.
- Modes: "eager"; "cuda_graph" (capture the step after one warm-up); "compile" (torch.compile
  the step with fullgraph=True, then capture it). On CPU the graph modes run the same step
  eagerly (compile still compiles).
- The MoE path of decode steps can differ from prefill's. On a CUDA GPU with triton, batches of
  up to 64 rows take "fused" (inference/fast_path.py: the router and the routed experts as two
  Triton kernels per layer that read only the selected experts' weights; graph- and
  compile-safe). Elsewhere compiled steps with few token slots (batch x top-k <= E) use
  "gather" (the gather fused into the reduction), and the rest the model's own backend
  ("grouped"). CPU stays on the readable path.
- Decode steps on a CUDA GPU also read attention's q|k|v and each MLP's gate|up as one packed
  weight, one GEMV each (inference/packing.py: the Linears' storage is shared, nothing is copied
  or renamed); `pack=True` asks for it elsewhere (tests), `pack=False` never. Prefill keeps the
  modules' own forwards.
- Decode-step attention: "sdpa" (the default: masked SDPA over the whole cache, as prefill) or
  "splitkv" (Decoder(attention="splitkv"): a split-KV Triton kernel that reads only the slots
  pad_b..pos of each row, inference/splitkv.py; CUDA, or the CPU under TRITON_INTERPRET=1).

The 16b-chat template: bos, then "User: {msg}\\n\\n", "Assistant: {reply}<eos>" per turn, and
"Assistant:" to prompt the reply (a system message is its content followed by "\\n\\n").
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from deepseekmoe.errors import ConfigError, DataError, suggest
from deepseekmoe.inference.splitkv import ATTENTIONS, decode_splits, splitkv_attention, splitkv_unavailable_reason

MODES = ("eager", "cuda_graph", "compile")
FUSED_PATHS = ("fused", "fused_shared")  # decode paths on the decode kernels (inference/fast_path.py)


# ---------------------------------------------------------------------- KV cache and masks
class StaticKVCache:
    """Preallocated keys/values per layer: [B, kv_heads, max_len, head_dim]."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> StaticKVCache:
        cfg = model.config
        w = model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
                   w.dtype, w.device)

    def update(self, layer_idx: int, k_BHLd, v_BHLd, cache_position_L):
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        # Index assignment (not index_copy_): torch.compile turns it into an in-place write.
        kc[:, :, cache_position_L] = k_BHLd.to(kc.dtype)
        vc[:, :, cache_position_L] = v_BHLd.to(vc.dtype)
        return kc, vc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def attention_mask(cache_position_L, pad_B, max_len: int):
    """Boolean SDPA mask [B, 1, L, max_len] for queries at slots `cache_position_L`."""
    slot_S = torch.arange(max_len, device=pad_B.device)
    q_L1 = cache_position_L[:, None]
    visible_LS = slot_S[None, :] <= q_L1
    real_BS = slot_S[None, :] >= pad_B[:, None]
    own_LS = slot_S[None, :] == q_L1
    return ((visible_LS[None] & real_BS[:, None]) | own_LS[None])[:, None]


def position_ids(cache_position_L, pad_B):
    return (cache_position_L[None, :] - pad_B[:, None]).clamp(min=0)


@contextlib.contextmanager
def expert_backend(model, name: str | None):
    """Temporarily run the routed experts of every MoE layer with backend `name` (None: as is)."""
    layers = [m.experts for m in model.moe_layers()] if name else []
    old = [e.backend for e in layers]
    for e in layers:
        e.backend = name
    try:
        yield
    finally:
        for e, b in zip(layers, old):
            e.backend = b


@contextlib.contextmanager
def decode_path(model, name: str | None):
    """The MoE path of a decode step: "fused" / "fused_shared" (the decode kernels, without / with
    the shared experts on them; inference/fast_path.py), else the routed-expert backend `name`
    (None: the model's own). (A Decoder's packing puts the dense MLPs of "fused_shared" on the
    kernels too: Decoder.decode_block.)"""
    if name in FUSED_PATHS:
        from deepseekmoe.inference.fast_path import fused_moe_path

        with fused_moe_path(model, shared_on_kernels=name == "fused_shared"):
            yield
    else:
        with expert_backend(model, name):
            yield


def default_decode_backend(model, batch_size: int, mode: str = "eager") -> str | None:
    """'fused' on a CUDA GPU with the decode kernels (batch <= 64, a learned top-k router);
    otherwise 'gather' for compiled decode steps that touch few experts, else the model's own backend.

    Compiled, `gather` fuses the weight gather into its reduction and reads only the selected
    experts (measured on an H100 at batch 1: 263 tok/s vs 138 for grouped + CUDA graph). Uncompiled
    it copies the selected weights first, which loses to grouped_mm (127 vs 138 tok/s at batch 1,
    294 vs 613 at batch 8), so eager and plain CUDA-graph steps keep the model's backend."""
    cfg = model.config
    if model.embed_tokens.weight.device.type == "cuda":
        from deepseekmoe.inference.fast_path import fused_unavailable_reason

        if fused_unavailable_reason(model, batch_size) is None:
            return "fused"
    if mode != "compile" or not cfg.n_routed_experts or cfg.router == "hash":
        return None
    return "gather" if batch_size * cfg.num_experts_per_tok <= cfg.n_routed_experts else None


# ---------------------------------------------------------------------- decoding
class Decoder:
    """Prefill and single-token decode steps of one batch over a static KV cache."""

    def __init__(self, model, batch_size: int, max_len: int, mode: str = "eager",
                 decode_backend: str | None = "default", pack: bool | None = None, attention: str = "sdpa"):
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        if attention not in ATTENTIONS:
            raise ConfigError(f"attention={attention!r}: choose one of {', '.join(ATTENTIONS)}"
                              f"{suggest(str(attention), ATTENTIONS)}")
        if attention == "splitkv":
            reason = splitkv_unavailable_reason(model)
            if reason:
                raise ConfigError(f"attention='splitkv' is not usable here: {reason}; use attention='sdpa'")
        self.model = model
        dev = model.embed_tokens.weight.device
        self.cache = StaticKVCache.for_model(model, batch_size, max_len)
        self.batch_size, self.max_len, self.mode = batch_size, max_len, mode
        self.pad_B = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.pos_1 = torch.zeros(1, dtype=torch.long, device=dev)  # the cache slot the next step writes
        self.tokens_B1 = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.slot_S = torch.arange(max_len, device=dev)
        self.decode_backend = (default_decode_backend(model, batch_size, mode) if decode_backend == "default"
                               else decode_backend)
        if self.decode_backend in FUSED_PATHS:
            from deepseekmoe.inference.fast_path import fused_unavailable_reason

            reason = fused_unavailable_reason(model, batch_size)
            if reason:
                raise ConfigError(f"decode_backend={self.decode_backend!r} is not usable here: {reason}; "
                                  "use 'gather' or None")
        self.packing = None  # inference/packing.py: q|k|v and gate|up as one GEMV each in decode steps
        if pack or (pack is None and dev.type == "cuda"):
            from deepseekmoe.inference.packing import DecodePacking

            self.packing = DecodePacking(model, mlp_on_kernels=self.decode_backend == "fused_shared")
        self.attention = attention  # with "splitkv", its kernel's split count, chosen here from the static shapes
        self.attention_splits = decode_splits(model, batch_size, max_len) if attention == "splitkv" else None
        self.use_graph = mode != "eager" and dev.type == "cuda"
        self._fn = self._step
        if mode == "compile":
            self._fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        self.graph = None
        self.graph_error: str | None = None

    @torch.no_grad()
    def prefill(self, ids_BL, pad_B):
        """Run the (left-padded) prompts, fill the cache; return last-position logits [B, V] fp32."""
        L = ids_BL.shape[1]
        if L >= self.max_len:
            raise ConfigError(f"prompt length {L} leaves no room in a cache of {self.max_len} slots")
        self.pad_B.copy_(pad_B)
        cp_L = torch.arange(L, device=ids_BL.device)
        out = self.model(ids_BL, position_ids=position_ids(cp_L, self.pad_B),
                         attention_mask=attention_mask(cp_L, self.pad_B, self.max_len),
                         kv_cache=self.cache, cache_position=cp_L, logits_to_keep=1)
        self.pos_1.fill_(L)
        return out.logits[:, -1].float()

    def _step(self):
        pos_1 = self.pos_1
        # Decode slots are always >= every row's padding, so only "real and not in the future" masks.
        mask = ((self.slot_S <= pos_1) & (self.slot_S[None, :] >= self.pad_B[:, None]))[:, None, None, :]
        pos_ids = (pos_1 - self.pad_B)[:, None]
        out = self.model(self.tokens_B1, position_ids=pos_ids, attention_mask=mask, kv_cache=self.cache,
                         cache_position=pos_1)
        pos_1.add_(1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens_B):
        """Feed one token per row; return next-token logits [B, V] fp32 (a static buffer in graph
        modes: read it before the next step)."""
        self.tokens_B1.copy_(tokens_B.view(-1, 1))
        with self.decode_block():
            if not self.use_graph:
                return self._fn()
            if self.graph is None:
                return self._capture()
            self.graph.replay()
            return self.logits_BV

    @contextlib.contextmanager
    def decode_block(self):
        """What a decode step runs inside: its MoE path (decode_path), the packed projections
        (re-packed first if the weights moved since; a graph captured before is then dropped) and,
        with attention="splitkv", the split-KV attention (inference/splitkv.py)."""
        packing = self.packing
        if packing is not None and packing.ensure():
            self.graph = None
        with contextlib.ExitStack() as stack:
            stack.enter_context(decode_path(self.model, self.decode_backend))
            if packing is not None:
                stack.enter_context(packing.active())
            if self.attention == "splitkv":
                stack.enter_context(splitkv_attention(self.model, self.pad_B, self.attention_splits))
            yield

    def _capture(self):
        """Warm up on a side stream (this also computes the step for real), then capture."""
        start = self.pos_1.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the second run sees compiled/autotuned kernels, as the capture will
                self.pos_1.copy_(start)
                logits = self._fn()
        torch.cuda.current_stream().wait_stream(side)
        logits = logits.clone()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits_BV = self._fn()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - keep generating eagerly, and say why
            self.graph_error = f"{type(e).__name__}: {e}"
            self.use_graph = False
            print(f"deepseekmoe: CUDA graph capture failed, decoding eagerly ({self.graph_error})",
                  file=sys.stderr)
        # The warm-up already wrote this step's keys/values; the graph's pos increment did not run.
        self.pos_1.copy_(start + 1)
        return logits


# ---------------------------------------------------------------------- sampling
def sample_next(logits_BV, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None):
    """Next token per row: greedy when temperature <= 0, else sample after top-k / top-p filters."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth_B1 = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits.sort(dim=-1, descending=True)
        probs = sorted_BV.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        sorted_BV = sorted_BV.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order_BV, sorted_BV)
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


class _HostCopy:
    """Copy a small device tensor to the host without stalling the stream (CUDA: pinned + event)."""

    def __init__(self, t):
        if t.device.type == "cuda":
            self.buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.buf.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf, self.event = t.clone(), None

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()


def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, mode: str = "eager", decode_backend: str | None = "default",
                 pack: bool | None = None, attention: str = "sdpa",
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt (token-id lists, any lengths); return the new
    ids of each row, without the eos that ended it. `should_stop(row, ids)` may end a row early;
    `on_token(row, id)` sees every kept token as it is produced."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    cfg = model.config
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the model's vocabulary (vocab_size={cfg.vocab_size}): "
                          "the tokenizer does not belong to this model; use the model's own (--tokenizer DIR)")
    B, L = len(prompts), max(len(p) for p in prompts)
    if L + max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}; shorten one of them")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    dev = model.embed_tokens.weight.device
    ids_BL = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], dtype=torch.long, device=dev)
    pad_B = torch.tensor([L - len(p) for p in prompts], dtype=torch.long, device=dev)
    # Round the cache up so repeated calls of similar lengths reuse compiled / captured shapes.
    max_len = -(-(L + max_new_tokens) // 64) * 64
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    dec = Decoder(model, B, max_len, mode=mode, decode_backend=decode_backend, pack=pack, attention=attention)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    with torch.no_grad():
        nxt_B = sample_next(dec.prefill(ids_BL, pad_B), temperature, top_k, top_p, gen)
        for step in range(max_new_tokens):
            host = _HostCopy(nxt_B)
            if step + 1 < max_new_tokens:  # launch the next step before looking at this one
                nxt_B = sample_next(dec.step(nxt_B), temperature, top_k, top_p, gen)
            for b, t in enumerate(host.tolist()):
                if done[b]:
                    continue
                if t in eos:
                    done[b] = True
                    continue
                out[b].append(t)
                if on_token is not None:
                    on_token(b, t)
                if should_stop is not None and should_stop(b, out[b]):
                    done[b] = True
            if all(done):
                break
    return out


# ---------------------------------------------------------------------- text in, text out
class _PlainTokenizer:
    """Fallback over a bare `tokenizers.Tokenizer` with the interface generation needs."""

    def __init__(self, tk, bos_id=None, eos_id=None):
        self._tk, self.bos_id, self.eos_id = tk, bos_id, eos_id

    @property
    def eos_token(self):
        return self._tk.id_to_token(self.eos_id) if self.eos_id is not None else None

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path, bos_id: int | None = None, eos_id: int | None = None):
    """The tokenizer of a checkpoint directory (or a tokenizer.json path)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: no tokenizer.json; pass --tokenizer DIR (the released checkpoints ship "
                        "one beside the weights)")
    try:
        from deepseekmoe.data.tokenizer import Tokenizer
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None:
        return Tokenizer.from_file(file, bos=bos_id, eos=eos_id)
    from tokenizers import Tokenizer as HFTokenizer

    return _PlainTokenizer(HFTokenizer.from_file(str(file)), bos_id, eos_id)


def _as_tokenizer(tok):
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return tok
    return _PlainTokenizer(tok) if isinstance(tok, HFTokenizer) else tok


def _special_ids(model, tok) -> tuple[int | None, int | None]:
    """bos/eos: the model config's when they fit its vocabulary, else the tokenizer's."""
    V = model.config.vocab_size
    bos = model.config.bos_token_id
    eos = model.config.eos_token_id
    bos = bos if isinstance(bos, int) and 0 <= bos < V else getattr(tok, "bos_id", None)
    eos = eos if isinstance(eos, int) and 0 <= eos < V else getattr(tok, "eos_id", None)
    return bos, eos


def chat_text_segments(messages: Sequence[dict], add_generation_prompt: bool = True) -> list[str | None]:
    """The 16b-chat template as text pieces; None marks where an eos token goes (data/chat.py)."""
    from deepseekmoe.data.chat import chat_text_segments as segments

    return segments(messages, add_generation_prompt)


def chat_ids(tokenizer, messages: Sequence[dict], bos_id: int, eos_id: int,
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation: bos, then the template, eos after each assistant reply.

    Pieces between eos tokens are encoded separately, which is what encoding the rendered string
    does when eos is a special token (special tokens split the text before BPE)."""
    tok = _as_tokenizer(tokenizer)
    ids = [bos_id]
    for piece in chat_text_segments(messages, add_generation_prompt):
        ids += [eos_id] if piece is None else tok.encode(piece)
    return ids


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not yet safe to print: a partial UTF-8 sequence, or the
    start of a stop string."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 128, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (),
             stream: bool | Callable[[int, str], None] = False, add_bos: bool = True, seed: int | None = None,
             mode: str = "eager", decode_backend: str | None = "default", prompt_ids=None):
    """Complete one prompt (returns a str) or a batch (returns a list of str).

    Stops at the model's eos, at `max_new_tokens`, or before the first of the `stop` strings.
    `stream=True` prints a single prompt's text as it is generated; a callable gets (row, text)."""
    tok = _as_tokenizer(tokenizer)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    bos, eos = _special_ids(model, tok)
    if prompt_ids is None:
        prompt_ids = [([bos] if add_bos and bos is not None else []) + tok.encode(t) for t in texts]
    if stream is True:
        if len(prompt_ids) != 1:
            raise ConfigError("stream=True prints one prompt at a time; pass a callback for batches")
        stream = _print_stream
    stops = [s for s in stop if s]
    emitted = [0] * len(prompt_ids)
    finals: list[str | None] = [None] * len(prompt_ids)

    def emit(b, text, final):
        upto = len(text) if final else len(text) - _holdback(text, stops)
        if stream and upto > emitted[b]:
            stream(b, text[emitted[b]:upto])
            emitted[b] = upto

    def should_stop(b, ids):
        if not stops and not stream:
            return False
        text = tok.decode(ids)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            finals[b] = text[:cut]
            emit(b, finals[b], True)
            return True
        emit(b, text, False)
        return False

    new = generate_ids(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos, seed=seed, mode=mode, decode_backend=decode_backend,
                       should_stop=should_stop)
    results = []
    for b, ids in enumerate(new):
        text = finals[b] if finals[b] is not None else tok.decode(ids)
        emit(b, text, True)
        results.append(text)
    return results[0] if single else results


def _print_stream(_row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
