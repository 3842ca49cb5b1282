"""Greedy parity of a decode path against a reference path: same tokens, or where and how close.

    ref = greedy_run(Decoder(model, B, max_len), prompts, 256)                        # eager reference
    got = greedy_run(Decoder(model, B, max_len, mode="compile", decode_backend="fused"), prompts, 256)
    report = compare_greedy(ref, got)     # per row: match, first divergence, both paths' logit margins

A fast decode step changes the order of floating-point sums, so a greedy token can flip where the
top two logits are nearly tied. The margin (top-1 minus top-2 logit) of each path at the first
divergence tells such a flip from a real error: a flip at a margin of a few bf16 ulps of the logit
is rounding, a flip at a large margin is a bug. Used by benchmarks/inference.py and the tests.

Shape legend: B rows, N generated tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class GreedyRun:
    """Greedy tokens and the top-1 minus top-2 logit margin at each step, [B][N] lists."""

    tokens: list[list[int]]
    margins: list[list[float]]


@torch.no_grad()
def greedy_run(dec, prompts: Sequence[Sequence[int]], n_tokens: int, pad_id: int = 0) -> GreedyRun:
    """Prefill left-padded `prompts` into Decoder `dec` (batch = len(prompts)), then decode
    `n_tokens` greedy tokens; nothing is read back to the host until the end."""
    B, L = len(prompts), max(len(p) for p in prompts)
    if B != dec.batch_size:
        raise ValueError(f"{B} prompts for a decoder of batch {dec.batch_size}")
    dev = dec.pos_1.device
    ids_BL = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], dtype=torch.long, device=dev)
    pad_B = torch.tensor([L - len(p) for p in prompts], dtype=torch.long, device=dev)
    logits_BV = dec.prefill(ids_BL, pad_B)
    toks, margins = [], []
    for i in range(n_tokens):
        top_B2 = logits_BV.float().topk(2, dim=-1)
        margins.append(top_B2.values[:, 0] - top_B2.values[:, 1])
        toks.append(top_B2.indices[:, 0])
        if i + 1 < n_tokens:  # a graph step overwrites its logits buffer: both reads above come first
            logits_BV = dec.step(toks[-1])
    return GreedyRun(torch.stack(toks, 1).tolist(), torch.stack(margins, 1).tolist())


def compare_greedy(ref: GreedyRun, got: GreedyRun) -> dict:
    """Rows that match token for token, and for the others the first divergent step with the
    reference's and the compared path's margins there."""
    rows = []
    for b, (r, g) in enumerate(zip(ref.tokens, got.tokens)):
        i = next((j for j, (a, c) in enumerate(zip(r, g)) if a != c), None)
        row = {"row": b, "match": i is None, "first_divergence": i}
        if i is not None:
            row.update(ref_token=r[i], got_token=g[i], ref_margin=ref.margins[b][i], got_margin=got.margins[b][i])
        rows.append(row)
    bad = [r for r in rows if not r["match"]]
    return {"rows_matching": len(rows) - len(bad), "rows": len(rows), "n_tokens": len(ref.tokens[0]),
            "first_divergence": min((r["first_divergence"] for r in bad), default=None),
            "max_margin_at_divergence": max((r["ref_margin"] for r in bad), default=None),
            "per_row": rows}
