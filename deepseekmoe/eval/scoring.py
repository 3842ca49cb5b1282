"""Scoring text with a model: log-likelihoods of continuations, rolling LM loss, greedy answers.

Every evaluation in this package reduces to three primitives on a `Scorer`:

  loglikelihood(pairs)        sum of log p(continuation | context) and whether every continuation
                              token is the argmax (multiple choice, LAMBADA, lm-eval requests)
  window_nll(batches)         summed next-token NLL over packed windows (perplexity, bits/byte,
                              the routing experiments of deepseekmoe.analysis)
  generate(prompts, ...)      greedy completions through deepseekmoe.inference.generate's KV-cache decoder

and `mc_predictions` turns one multiple-choice document's log-likelihoods into lm-eval's three
predictions (acc, acc_norm, acc_bytes).

Two choices keep these exact and cheap:
- Right padding. Attention is causal and routing is per token (no capacity, nothing dropped), so
  pad tokens after a sequence cannot change its logits; no mask or position shift is needed.
- Only the scored positions reach the LM head. The final norm's output is captured with a forward
  hook while the model itself computes logits for one position (`logits_to_keep=1`), then the
  head runs on the selected rows in chunks. Full [B, L, V] logits of a 102K vocabulary at 4K
  tokens would take gigabytes.

Contexts longer than the model's window are cut from the left (the continuation is kept whole),
as lm-eval does. The document-start token (`prefix_id`) goes first when there is room.

Shape legend: B sequences, L tokens, D hidden, V vocabulary, N scored positions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from deepseekmoe.errors import ConfigError

PREFIXES = ("auto", "bos", "eos")


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (silent when stderr is not a terminal or `enabled` is False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _capture_final_hidden(model):
    """Yield a list that receives the output of `model.norm` (the states the LM head reads)."""
    box: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: box.append(out))
    try:
        yield box
    finally:
        handle.remove()


@torch.no_grad()
def final_hidden(model, ids_BL: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states [B, L, D] of a causal forward over `ids_BL`."""
    with _capture_final_hidden(model) as box:
        model(ids_BL, logits_to_keep=1)
    return box[-1]


@torch.no_grad()
def target_logprobs(model, h_ND: torch.Tensor, target_N: torch.Tensor, chunk_elems: int = 1 << 27):
    """log p(target) under the LM head for each row of h, and whether the target is the argmax.

    Rows go through the head in chunks of about `chunk_elems` logits, in float32."""
    V = model.lm_head.weight.shape[0]
    rows = max(1, chunk_elems // V)
    lp, greedy = [], []
    for a in range(0, h_ND.shape[0], rows):
        logits = model.lm_head(h_ND[a:a + rows]).float()
        logp = logits.log_softmax(-1)
        t = target_N[a:a + rows]
        lp.append(logp.gather(-1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
    if not lp:
        return h_ND.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=h_ND.device)
    return torch.cat(lp), torch.cat(greedy)


def default_prefix(model, tokenizer, tokenizer_dir: str | Path | None, choice: str = "auto") -> int:
    """The token a scored document starts after.

    'bos' for tokenizers that add one (the released deepseek-moe tokenizer_config.json says
    add_bos_token: true); otherwise 'eos', because `deepseekmoe prepare` packs documents as
    text + eos, so a model trained by `deepseekmoe train` has seen every document begin after an eos."""
    if choice not in PREFIXES:
        raise ConfigError(f"--prefix {choice!r}: choose one of {', '.join(PREFIXES)}")
    if choice == "auto":
        choice = "eos"
        cfg = Path(tokenizer_dir) / "tokenizer_config.json" if tokenizer_dir else None
        if cfg is not None and cfg.is_file():
            from deepseekmoe.data.tokenizer import read_json_object

            if read_json_object(cfg, "fix or remove it, or choose --prefix bos|eos").get("add_bos_token") is True:
                choice = "bos"
    V = model.config.vocab_size
    cands = ([model.config.bos_token_id, getattr(tokenizer, "bos_id", None)] if choice == "bos" else
             [model.config.eos_token_id, getattr(tokenizer, "eos_id", None)])
    for tid in cands:
        if isinstance(tid, int) and 0 <= tid < V:
            return tid
    raise ConfigError(f"the model and tokenizer define no {choice} token id inside the vocabulary "
                      f"({V}); pass --prefix {'eos' if choice == 'bos' else 'bos'}")


class Scorer:
    """A model + tokenizer with the batching, truncation and progress that evaluations share."""

    def __init__(self, model, tokenizer, prefix_id: int, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = True, gen_mode: str = "eager"):
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        self.model, self.tok, self.prefix_id = model, tokenizer, int(prefix_id)
        self.batch_size = int(batch_size)
        limit = model.config.max_position_embeddings
        self.max_length = min(int(max_length or limit), limit)
        if self.max_length < 2:
            raise ConfigError(f"--max-length {max_length}: need at least 2 tokens")
        self.show_progress = progress
        self.gen_mode = gen_mode
        self.device = model.embed_tokens.weight.device

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def encode_pair(self, context: str, continuation: str, _ctx_cache: dict | None = None):
        """(prefix + context ids, continuation ids), split so that the continuation is tokenised
        as it appears after the context: trailing spaces of the context move to the continuation,
        and the pair is encoded as one string and cut where the context's own encoding ends."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if _ctx_cache is not None and context in _ctx_cache:
            ctx = _ctx_cache[context]
        else:
            ctx = self.encode(context) if context else []
            if _ctx_cache is not None:
                _ctx_cache[context] = ctx
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else self.encode(continuation)
        if not cont:
            raise ConfigError(f"empty continuation after {context[-40:]!r}: nothing to score")
        return [self.prefix_id] + ctx, cont

    def _fit(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[np.ndarray, int]:
        """ctx + cont cut from the left to the window, as int32 (a benchmark's requests can hold
        tens of millions of tokens); -> (ids, number of scored tokens)."""
        ids = np.asarray([*ctx[-(self.max_length + 1):], *cont], dtype=np.int32)[-(self.max_length + 1):]
        return ids, min(len(cont), len(ids) - 1)

    def _pad(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        L = max(len(r) for r in rows)
        out = torch.full((len(rows), L), self.prefix_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        return out.to(self.device)

    # ------------------------------------------------------------------ log-likelihoods
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "loglikelihood"):
        """[(sum log p(continuation | context), continuation is greedy)] for (context, continuation)."""
        cache: dict[str, list[int]] = {}  # choices of one question share its context
        fitted = []
        for c, x in pairs:
            fitted.append(self._fit(*self.encode_pair(c, x, cache)))
            if len(cache) > 64:
                cache.clear()
        return self._score_fitted(fitted, desc)

    @torch.no_grad()
    def loglikelihood_tokens(self, items: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"):
        return self._score_fitted([self._fit(c, x) for c, x in items], desc)

    @torch.no_grad()
    def _score_fitted(self, fitted: list[tuple[np.ndarray, int]], desc: str):
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up
        # on the first batch rather than at the end.
        order = sorted(range(len(fitted)), key=lambda i: -len(fitted[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(fitted)
        with progress(len(fitted), desc, self.show_progress) as bar:
            for a in range(0, len(order), self.batch_size):
                batch = order[a:a + self.batch_size]
                rows = [fitted[i][0][:-1] for i in batch]  # inputs: all but the last token
                ids = self._pad(rows)
                h = final_hidden(self.model, ids)
                sel_b, sel_p, tgt = [], [], []
                for b, i in enumerate(batch):
                    full, n = fitted[i]
                    L = len(full) - 1
                    sel_b += [b] * n
                    sel_p += range(L - n, L)
                    tgt.append(full[L - n + 1:])
                sel_b_t = torch.tensor(sel_b, device=self.device)
                sel_p_t = torch.tensor(sel_p, device=self.device)
                tgt_t = torch.from_numpy(np.concatenate(tgt).astype(np.int64)).to(self.device)
                lp, gr = target_logprobs(self.model, h[sel_b_t, sel_p_t], tgt_t)
                lp, gr = lp.cpu(), gr.cpu()
                k = 0
                for i in batch:
                    n = fitted[i][1]
                    out[i] = (float(lp[k:k + n].double().sum()), bool(gr[k:k + n].all()))
                    k += n
                bar.update(len(batch))
        return out

    @torch.no_grad()
    def window_nll(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], total: int | None = None,
                   desc: str = "lm") -> tuple[float, int]:
        """(summed NLL in nats, scored tokens) over batches of windows.

        Each batch is (ids [B, L], valid [B, L] bool or None = all real); token t+1 is scored when
        tokens t and t+1 are both real."""
        nll, count = 0.0, 0
        with progress(total or 0, desc, self.show_progress) as bar:
            for ids, valid in batches:
                ids = ids.to(self.device)
                sel = torch.ones_like(ids[:, 1:], dtype=torch.bool) if valid is None else \
                    (valid[:, :-1] & valid[:, 1:]).to(self.device)
                h = final_hidden(self.model, ids[:, :-1])
                lp, _ = target_logprobs(self.model, h[sel], ids[:, 1:][sel])
                nll -= float(lp.double().sum())
                count += int(sel.sum())
                bar.update(1)
        return nll, count

    def rolling_nll(self, docs: Sequence[Sequence[int]], desc: str = "rolling") -> list[tuple[float, int]]:
        """Per document of token ids: (summed NLL, tokens scored) of every token after the prefix,
        in windows of max_length that overlap by one token."""
        rows, owner = [], []
        S = self.max_length
        for d, ids in enumerate(docs):
            seq = [self.prefix_id] + list(ids)
            for start in range(0, max(1, len(seq) - 1), S - 1):
                piece = seq[start:start + S]
                if len(piece) >= 2:
                    rows.append(piece)
                    owner.append(d)
        out = [[0.0, 0] for _ in docs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        with progress(len(rows), desc, self.show_progress) as bar:
            for a in range(0, len(order), self.batch_size):
                batch = order[a:a + self.batch_size]
                ids = self._pad([rows[i] for i in batch])
                valid = torch.zeros(ids.shape, dtype=torch.bool)
                for b, i in enumerate(batch):
                    valid[b, :len(rows[i])] = True
                sel = (valid[:, :-1] & valid[:, 1:]).to(self.device)
                h = final_hidden(self.model, ids[:, :-1])
                lp, _ = target_logprobs(self.model, h[sel], ids[:, 1:][sel])
                lp = lp.cpu().double()
                k = 0
                for i in batch:
                    n = len(rows[i]) - 1
                    out[owner[i]][0] -= float(lp[k:k + n].sum())
                    out[owner[i]][1] += n
                    k += n
                bar.update(len(batch))
        return [(a, b) for a, b in out]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generate", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """Completions (greedy at temperature 0), cut before the first stop string; prompts cut from
        the left to fit. Sampling draws the batch starting at prompt a with seed + a, so repeated
        prompts in different batches get different samples."""
        from deepseekmoe.inference.generate import generate

        room = self.max_length - max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a "
                              f"{self.max_length}-token window")
        ids = [([self.prefix_id] + self.encode(p))[-room:] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [""] * len(ids)
        with progress(len(ids), desc, self.show_progress) as bar:
            for a in range(0, len(order), self.batch_size):
                batch = order[a:a + self.batch_size]
                texts = generate(self.model, self.tok, [""] * len(batch), max_new_tokens=max_new_tokens,
                                 stop=list(stop), prompt_ids=[ids[i] for i in batch], mode=self.gen_mode,
                                 temperature=temperature, top_p=top_p, seed=None if seed is None else seed + a)
                for i, t in zip(batch, texts):
                    out[i] = t
                bar.update(len(batch))
        return out


def choice_text(continuation: str) -> str:
    """The choice string lm-eval measures: the continuation without its target delimiter.

    lm-eval scores `" " + choice` (its default `target_delimiter`) but divides by `len(choice)`;
    every multiple-choice task here builds its continuations the same way."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def mc_predictions(lls: Sequence[float], continuations: Sequence[str]) -> tuple[int, int, int]:
    """(pred, pred_norm, pred_bytes) of one document, as lm-eval's `multiple_choice` computes them:
    the argmax of the summed log-likelihoods (acc), of log-likelihood / characters of the choice
    (acc_norm) and of log-likelihood / UTF-8 bytes of the choice (acc_bytes). Ties go to the first
    choice, as with np.argmax. An empty choice counts as length 1 (lm-eval would divide by zero)."""
    chars = [max(1, len(choice_text(c))) for c in continuations]
    nbytes = [max(1, len(choice_text(c).encode("utf-8"))) for c in continuations]
    idx = range(len(lls))
    return (max(idx, key=lambda j: lls[j]), max(idx, key=lambda j: lls[j] / chars[j]),
            max(idx, key=lambda j: lls[j] / nbytes[j]))


def perplexity(nll: float, n: int) -> float:
    return math.exp(nll / n) if n else float("nan")
