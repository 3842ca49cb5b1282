"""Routing statistics of a model on a corpus: expert load per layer and token-to-expert specialisation.

    stats = routing_statistics(model, batches, tokenizer=tok)
    print(format_layer_table(stats)); print(format_expert_table(stats, layer=stats["layers"][-1]["layer"]))

The model runs with `set_routing(record=True)`, so each MoE layer keeps the expert ids and gate
values it chose for every token (`layer.mlp.last_routing`); padding positions are left out.

Per MoE layer:
  load            fraction of the token-expert assignments each routed expert received (sums to 1)
  max_over_mean   the busiest expert's count / the mean count (1 = perfectly balanced; what the
                  trainer logs as expert_load)
  min_over_mean, cv (std / mean of the counts), unused (experts no token chose)
  entropy         of the load distribution in nats, and normalised by log(E) (1 = uniform)
Per routed expert:
  top_tokens          the token ids it receives most often, with counts
  distinctive_tokens  the tokens (seen at least `min_count` times) whose occurrences it takes the
                      largest share of: share = count(expert, token) / count(token); a token goes to
                      K experts, so shares over experts sum to K. This is the view that shows
                      specialisation, since the raw top tokens of every expert are the corpus's
                      frequent tokens.

Shape legend: T tokens, K experts per token, E routed experts, V vocabulary.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from deepseekmoe.errors import ConfigError


def check_routed(model) -> None:
    """ConfigError unless the model has learned-router MoE layers (what the section-4.5 knobs act on)."""
    cfg = model.config
    if not model.moe_layers():
        raise ConfigError(f"model {cfg.name!r} has no MoE layers (a dense model): nothing to route")
    if cfg.router == "hash":
        raise ConfigError(f"model {cfg.name!r} routes by a fixed token-id hash: the routing knobs (top_k, "
                          "disabling top experts) need a learned router")


def _merge(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv.reshape(-1), weights=counts).astype(np.int64)


@torch.no_grad()
def routing_statistics(model, batches, tokenizer=None, top_n: int = 10, min_count: int = 5) -> dict:
    """Statistics over batches of (ids [B, L], valid [B, L] or None); see the module docstring."""
    check_routed(model)
    cfg = model.config
    moes = model.moe_layers()
    layer_ids = [i for i, blk in enumerate(model.layers) if blk.is_moe]
    E, V = cfg.n_routed_experts, cfg.vocab_size
    counts_LE = np.zeros((len(moes), E), dtype=np.int64)
    gates_LE = np.zeros((len(moes), E), dtype=np.float64)
    token_counts = np.zeros(V, dtype=np.int64)
    pairs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in moes]
    dev = model.embed_tokens.weight.device
    n_tokens = 0
    model.set_routing(record=True)
    try:
        for ids, valid in batches:
            ids = ids.to(dev)
            model(ids, logits_to_keep=1)
            keep_T = None if valid is None else valid.reshape(-1).to(dev)
            tok_T = ids.reshape(-1) if keep_T is None else ids.reshape(-1)[keep_T]
            token_counts += np.bincount(tok_T.cpu().numpy(), minlength=V)
            n_tokens += tok_T.numel()
            for li, moe in enumerate(moes):
                r = moe.last_routing
                idx_TK, w_TK = (r.idx_TK, r.w_TK) if keep_T is None else (r.idx_TK[keep_T], r.w_TK[keep_T])
                e = idx_TK.reshape(-1).cpu().numpy()
                counts_LE[li] += np.bincount(e, minlength=E)
                gates_LE[li] += np.bincount(e, weights=w_TK.reshape(-1).float().cpu().numpy(), minlength=E)
                keys = idx_TK.cpu().numpy().astype(np.int64) * V + tok_T.cpu().numpy()[:, None]
                u, c = np.unique(keys, return_counts=True)
                pairs[li].append((u, c))
    finally:
        model.set_routing()
        for moe in moes:
            moe.last_routing = None
    if n_tokens == 0:
        raise ConfigError("no tokens to analyse (empty corpus)")
    layers = []
    for li, moe in enumerate(moes):
        c = counts_LE[li]
        load = c / c.sum()
        nz = load[load > 0]
        H = float(-(nz * np.log(nz)).sum())
        keys, kc = _merge(np.concatenate([u for u, _ in pairs[li]]), np.concatenate([x for _, x in pairs[li]]))
        pairs[li] = []
        experts = _experts(keys, kc, c, gates_LE[li], token_counts, V, tokenizer, top_n, min_count)
        layers.append({"layer": layer_ids[li], "tokens": n_tokens, "top_k": int(moe.gate.top_k),
                       "counts": c.tolist(), "load": load.tolist(),
                       "max_over_mean": float(c.max() / c.mean()), "min_over_mean": float(c.min() / c.mean()),
                       "cv": float(c.std() / c.mean()), "entropy": H, "entropy_norm": H / math.log(E) if E > 1 else 1.0,
                       "unused": int((c == 0).sum()), "experts": experts})
    return {"model": cfg.name, "n_routed_experts": E, "top_k": cfg.num_experts_per_tok,
            "n_shared_experts": cfg.n_shared_experts, "tokens": n_tokens, "layers": layers}


def _token_str(tokenizer, t: int) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([t])
    except Exception as e:  # noqa: BLE001 - any tokenizer object may be passed; a label only, never fail over one
        # One message text per error type, so Python's default filter shows it once, not per token.
        warnings.warn(f"some token labels are left out (null): the tokenizer's decode raised {type(e).__name__}",
                      RuntimeWarning, stacklevel=2)
        return None


def _experts(keys, kc, counts_E, gates_E, token_counts, V, tokenizer, top_n, min_count) -> list[dict]:
    e_of, t_of = keys // V, keys % V
    share = kc / np.maximum(token_counts[t_of], 1)
    order = np.argsort(e_of, kind="stable")
    bounds = np.searchsorted(e_of[order], np.arange(len(counts_E) + 1))
    out = []
    for e in range(len(counts_E)):
        sel = order[bounds[e]:bounds[e + 1]]
        top = sel[np.lexsort((t_of[sel], -kc[sel]))][:top_n]
        ok = sel[token_counts[t_of[sel]] >= min_count]
        dist = ok[np.lexsort((t_of[ok], -kc[ok], -share[ok]))][:top_n]
        row = lambda i: {"id": int(t_of[i]), "text": _token_str(tokenizer, int(t_of[i])), "count": int(kc[i]),
                         "share": round(float(share[i]), 4)}
        out.append({"expert": e, "count": int(counts_E[e]),
                    "mean_gate": float(gates_E[e] / counts_E[e]) if counts_E[e] else 0.0,
                    "top_tokens": [row(i) for i in top], "distinctive_tokens": [row(i) for i in dist]})
    return out


def format_layer_table(stats: dict) -> str:
    head = ["layer", "tokens", "max/mean", "min/mean", "cv", "entropy/log E", "unused", "busiest experts"]
    rows = []
    for L in stats["layers"]:
        busiest = np.argsort(-np.asarray(L["counts"]), kind="stable")[:3]
        rows.append([L["layer"], L["tokens"], f"{L['max_over_mean']:.3f}", f"{L['min_over_mean']:.3f}",
                     f"{L['cv']:.3f}", f"{L['entropy_norm']:.4f}", L["unused"],
                     ", ".join(f"{int(e)} ({L['load'][e]:.1%})" for e in busiest)])
    return _table(head, rows)


def format_expert_table(stats: dict, layer: int, n_tokens: int = 5) -> str:
    """One MoE layer: each expert's share of the load, mean gate and most distinctive tokens."""
    L = next((x for x in stats["layers"] if x["layer"] == layer), None)
    if L is None:
        have = ", ".join(str(x["layer"]) for x in stats["layers"])
        raise ConfigError(f"layer {layer} is not an MoE layer of this model (MoE layers: {have})")
    head = ["expert", "load", "mean gate", f"distinctive tokens (share of the token's routings), layer {layer}"]
    rows = []
    for ex in L["experts"]:
        toks = ", ".join(f"{(t['text'] if t['text'] is not None else t['id'])!r} {t['share']:.2f}"
                         for t in ex["distinctive_tokens"][:n_tokens])
        rows.append([ex["expert"], f"{L['load'][ex['expert']]:.2%}", f"{ex['mean_gate']:.3f}", toks])
    return _table(head, rows)


def _table(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
