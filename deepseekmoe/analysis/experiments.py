"""The paper's expert-specialisation experiments (section 4.5) as functions of a trained model.

Each one evaluates the LM loss on the same fixed batches of a corpus under changed routing,
through `Transformer.set_routing` (no retraining), and restores the configured routing after.

  redundancy_sweep   Fig 4. Per token, disable the top fraction r of routed experts ranked by
                     affinity and route to the top-K' among the rest. A model whose routed experts
                     hold little redundant knowledge loses more when its favourite experts are taken
                     away (the paper: DeepSeekMoE's loss rises faster than GShard x1.5's).
  shared_ablation    Fig 5. Switch the shared experts off and route one more expert instead (the
                     compute stays about the same); also, for reference, off without the extra
                     expert. The paper: Pile loss 1.808 -> 2.414, the shared expert is irreplaceable.
  topk_sweep         Fig 6. Loss against the number of activated routed experts. The paper:
                     DeepSeekMoE with 4 routed experts matches GShard's full top-2 loss.

Every function returns {"experiment", "figure", "rows": [...], ...}; rows hold the setting, the
loss in nats/token, perplexity, and bits/byte when the corpus can give it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from deepseekmoe.analysis.routing import check_routed
from deepseekmoe.errors import ConfigError

DEFAULT_FRACTIONS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)


def lm_loss(scorer, batches, desc: str = "lm", **routing) -> float:
    """Mean next-token NLL on `batches` with `set_routing(**routing)`; routing restored after."""
    model = scorer.model
    model.set_routing(**routing)
    try:
        nll, n = scorer.window_nll(batches, total=len(batches), desc=desc)
    finally:
        model.set_routing()
    return nll / n


def _row(loss: float, to_bpb: Callable[[float], float] | None, **setting) -> dict:
    return {**setting, "loss": loss, "ppl": math.exp(loss), "bpb": to_bpb(loss) if to_bpb else None}


def n_disabled(fraction: float, n_experts: int) -> int:
    """How many experts the router disables for `fraction` (it floors fraction * E)."""
    return int(math.floor(fraction * n_experts + 1e-9))


def redundancy_sweep(scorer, batches, fractions=DEFAULT_FRACTIONS, to_bpb=None) -> dict:
    """Fig 4: loss against the ratio of disabled top routed experts (top_k kept)."""
    model = scorer.model
    check_routed(model)
    E, k = model.config.n_routed_experts, model.config.num_experts_per_tok
    rows = []
    for f in fractions:
        if not 0 <= f < 1:
            raise ConfigError(f"disabled-expert ratio {f}: must be in [0, 1)")
        m = n_disabled(f, E)
        if m + k > E:
            raise ConfigError(f"disabled-expert ratio {f} disables {m} of {E} routed experts, leaving fewer than "
                              f"top_k={k}; use ratios up to {(E - k) / E:.3f}")
        loss = lm_loss(scorer, batches, desc=f"disable {m}/{E}", mask_top_fraction=f)
        rows.append(_row(loss, to_bpb, fraction=f, disabled=m))
    return {"experiment": "redundancy", "figure": "Fig 4", "n_routed_experts": E, "top_k": k,
            "x": "fraction", "rows": rows}


def shared_ablation(scorer, batches, to_bpb=None) -> dict:
    """Fig 5: shared experts on (as trained) vs off with top_k + 1 routed experts (and off alone)."""
    model = scorer.model
    check_routed(model)
    cfg = model.config
    reason = not_applicable("shared", model)
    if reason:
        raise ConfigError(reason)
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    settings = [("as trained", dict(), k, True)]
    if k + 1 <= E:
        settings.append(("shared off, top_k + 1", dict(shared_experts=False, top_k=k + 1), k + 1, False))
    settings.append(("shared off", dict(shared_experts=False), k, False))
    rows = [_row(lm_loss(scorer, batches, desc=label, **kw), to_bpb, setting=label, top_k=kk, shared=sh)
            for label, kw, kk, sh in settings]
    return {"experiment": "shared", "figure": "Fig 5", "n_shared_experts": cfg.n_shared_experts, "top_k": k,
            "x": "setting", "rows": rows}


def not_applicable(name: str, model) -> str | None:
    """Why experiment `name` cannot run on this model's architecture (None: it can). A model
    without shared experts has no Fig 5 ablation; that is a property of the model, not a bad flag,
    so `deepseekmoe analyze` skips it with this reason and runs the other experiments."""
    cfg = model.config
    if name == "shared" and not cfg.n_shared_experts:
        return f"model {cfg.name!r} has no shared experts: the Fig 5 ablation needs them"
    return None


def default_topk_values(model) -> list[int]:
    E, k = model.config.n_routed_experts, model.config.num_experts_per_tok
    return list(range(1, min(E, k + 2) + 1))


def topk_sweep(scorer, batches, values=None, to_bpb=None) -> dict:
    """Fig 6: loss against the number of activated routed experts."""
    model = scorer.model
    check_routed(model)
    E, k = model.config.n_routed_experts, model.config.num_experts_per_tok
    values = default_topk_values(model) if values is None else list(values)
    rows = []
    for v in values:
        if not 1 <= v <= E:
            raise ConfigError(f"top_k={v}: must be between 1 and the {E} routed experts")
        rows.append(_row(lm_loss(scorer, batches, desc=f"top_k={v}", top_k=v), to_bpb, top_k=v))
    return {"experiment": "topk", "figure": "Fig 6", "n_routed_experts": E, "top_k": k, "x": "top_k", "rows": rows}


def format_rows(result: dict) -> str:
    keys = [k for k in result["rows"][0] if k not in ("ppl",)]
    head = keys + ["ppl"]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    rows = [[fmt(r[k]) for k in head] for r in result["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    title = f"{result['figure']} ({result['experiment']})"
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, rows)])
