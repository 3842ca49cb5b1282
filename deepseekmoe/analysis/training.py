"""Training diagnostics of MoE routers: what the trainer's metrics do not show, over training.

    run = DiagRun(model=cfg, data="data/gutenberg-8k", steps=600, lr=2e-3)
    result = train_with_diagnostics(run)        # JSON-ready dict, see below
    summary = summarize(result)                 # final / best validation loss, rise before decay, ...

A small training loop built from the trainer's own pieces (the model's seeded `init_weights`, the
paper's AdamW groups and schedules from train/optim.py, the packed loader and the evaluation
windows of deepseekmoe.data), one process, no checkpoints. It records

  every step       loss, LM loss, balance loss, lr, global gradient norm (before clipping)
  every `probe`    per MoE layer, over the steps since the last probe: expert load max / mean,
                   dead experts (routed experts no token chose), load entropy / log E; on the
                   probe step's batch: mean per-token router entropy / log E (1 = uniform
                   affinities, 0 = one-hot) and the summed gate values per token; the balance
                   loss's share of the total loss; and the
                   gradient norms of the LM loss and of the balance loss taken apart (one extra
                   backward): on each layer's router weight and over all parameters
  every `eval`     validation loss on fixed windows of the validation split

so a router collapse, a balance loss that dominates the router's gradient, a loss spike or a
validation loss that rises on repeated epochs shows in one file per run. Why not in the trainer:
the separate-gradient probe doubles a step's backward, which a production run should not pay.

Shape legend: T tokens, K experts per token, E routed experts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from deepseekmoe.model.config import ModelConfig
from deepseekmoe.train.recipe import OptimSection, ScheduleSection


@dataclass
class DiagRun:
    """One diagnosed training run: the model, the data and the recipe (train/recipe.py's sections)."""

    model: ModelConfig
    data: str  # a directory written by `deepseekmoe prepare`
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0  # model initialisation (the trainer's train.seed)
    data_seed: int = 0  # order of the training windows (the trainer's data.seed)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    probe_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast (GPU runs)


class _RouterTap:
    """Forward hooks on every learned router: the last Routing of each MoE layer, and the expert
    counts accumulated since the last read."""

    def __init__(self, model):
        self.moes = model.moe_layers()
        self.last = [None] * len(self.moes)
        self.counts_LE = [torch.zeros(m.cfg.n_routed_experts, dtype=torch.int64) for m in self.moes]
        self.handles = [m.gate.register_forward_hook(self._hook(i)) for i, m in enumerate(self.moes)]

    def _hook(self, i):
        def hook(_module, _inputs, routing):
            self.last[i] = routing
            idx = routing.idx_TK.detach().reshape(-1).cpu()
            self.counts_LE[i] += torch.bincount(idx, minlength=self.counts_LE[i].numel())
        return hook

    def read_load(self) -> list[dict]:
        out = []
        for c in self.counts_LE:
            total = int(c.sum())
            load = c.double() / max(total, 1)
            nz = load[load > 0]
            H = float(-(nz * nz.log()).sum())
            E = c.numel()
            out.append({"max_over_mean": float(c.max()) / (total / E) if total else float("nan"),
                        "dead": int((c == 0).sum()), "load_entropy": H / math.log(E) if E > 1 else 1.0})
            c.zero_()
        return out

    def router_entropy(self) -> list[float | None]:
        """Mean per-token entropy of the affinities / log E of the last forward (None: hash)."""
        out = []
        for r in self.last:
            s = None if r is None else r.scores_TE
            if s is None:
                out.append(None)
                continue
            s = s.detach().float()
            H_T = -(s * s.clamp_min(1e-20).log()).sum(-1)
            out.append(float(H_T.mean()) / math.log(s.shape[-1]))
        return out

    def gate_sum(self) -> list[float | None]:
        """Mean over tokens of the summed gate values of the last forward: the scale at which the
        routed experts' output enters the residual (1 for GShard's normalised gates and for hash
        routing; for raw-softmax gates, about K / E at a uniform router)."""
        return [None if r is None else float(r.w_TK.detach().float().sum(-1).mean()) for r in self.last]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _norm(grads) -> float:
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def _backward(model, out, params, routers, probe: bool) -> dict:
    """Fill .grad with d(loss)/d(params); on a probe step take the LM and balance parts apart
    (their sum is the same gradient) and return their norms."""
    bal = out.balance_loss
    if not probe or bal is None or not bal.requires_grad:
        out.loss.backward()
        if not probe:
            return {}
        g = [p.grad for p in params]
        return {"grad_lm_all": _norm(g), "grad_bal_all": 0.0,
                "grad_lm_router": [_norm([r.grad]) for r in routers], "grad_bal_router": [0.0] * len(routers)}
    g_lm = torch.autograd.grad(out.lm_loss, params, retain_graph=True, allow_unused=True)
    g_bal = torch.autograd.grad(bal, params, allow_unused=True)
    where = {id(p): i for i, p in enumerate(params)}
    for p, a, b in zip(params, g_lm, g_bal):
        parts = [t for t in (a, b) if t is not None]
        p.grad = sum(parts[1:], parts[0]) if parts else torch.zeros_like(p)
    return {"grad_lm_all": _norm(g_lm), "grad_bal_all": _norm(g_bal),
            "grad_lm_router": [_norm([g_lm[where[id(r)]]]) for r in routers],
            "grad_bal_router": [_norm([g_bal[where[id(r)]]]) for r in routers]}


@torch.no_grad()
def _validate(model, run: DiagRun, autocast) -> float:
    from deepseekmoe.data import iter_eval_batches

    model.eval()
    total, n = 0.0, 0
    for x in iter_eval_batches(run.data, split="val", seq_len=run.seq_len, batch_size=run.batch_size,
                               max_batches=run.eval_batches or None):
        x = x.to(run.device)
        with autocast():
            out = model(x, labels=x)
        k = x.shape[0] * (x.shape[1] - 1)
        total, n = total + float(out.lm_loss) * k, n + k
    model.train()
    return total / max(n, 1)


def train_with_diagnostics(run: DiagRun, echo=None) -> dict:
    """Train `run.model` for `run.steps` and return {"config", "train", "probes", "eval", ...}."""
    import contextlib

    from deepseekmoe.data import PackedLoader
    from deepseekmoe.model.transformer import Transformer
    from deepseekmoe.train.optim import Schedule, build_optimizer

    torch.manual_seed(run.seed)
    dev = torch.device(run.device)
    with torch.device("meta"):
        model = Transformer(run.model)
    model.to_empty(device=dev)
    model.init_weights(seed=run.seed)
    model.train()
    tap = _RouterTap(model)
    routers = [m.gate.weight for m in tap.moes if hasattr(m.gate, "weight")]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, run.optim, dev)
    sched = Schedule(run.schedule, run.optim.lr, run.steps)
    loader = PackedLoader(run.data, split="train", seq_len=run.seq_len, batch_size=run.batch_size,
                          seed=run.data_seed, vocab_size=run.model.vocab_size)
    autocast = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if run.bf16
                else contextlib.nullcontext)
    clip = run.optim.grad_clip if run.optim.grad_clip > 0 else float("inf")
    train, probes, evals = [], [], []
    t0 = time.perf_counter()
    try:
        for step in range(run.steps):
            lr = sched.set(opt, step)
            x = next(loader).to(dev)
            probe = (step + 1) % run.probe_every == 0 or step + 1 == run.steps
            with autocast():
                out = model(x, labels=x)
            grads = _backward(model, out, params, routers, probe)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            bal = float(out.balance_loss.detach()) if out.balance_loss is not None else 0.0
            rec = {"step": step + 1, "loss": float(out.loss.detach()), "lm_loss": float(out.lm_loss.detach()),
                   "balance_loss": bal, "lr": lr, "grad_norm": gnorm}
            train.append(rec)
            if probe and tap.moes:
                probes.append(_probe_record(rec, tap, grads))
            if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
                evals.append({"step": step + 1, "val_loss": _validate(model, run, autocast)})
                if echo:
                    echo(f"  step {step + 1}: loss {rec['lm_loss']:.4f}, val {evals[-1]['val_loss']:.4f}, "
                         f"{time.perf_counter() - t0:.0f} s")
    finally:
        tap.close()
    tokens = run.steps * run.batch_size * run.seq_len
    return {"config": {**{k: v for k, v in asdict(run).items() if k != "model"}, "model": run.model.to_dict()},
            "params": run.model.num_params(), "active_params": run.model.num_active_params(),
            "tokens": tokens, "epochs": tokens / max(1, loader.n_windows * run.seq_len),
            "seconds": time.perf_counter() - t0, "train": train, "probes": probes, "eval": evals}


def _probe_record(rec: dict, tap: _RouterTap, grads: dict) -> dict:
    load, ent, gates = tap.read_load(), tap.router_entropy(), tap.gate_sum()
    layers = []
    for i, (L, H, G) in enumerate(zip(load, ent, gates)):
        row = {**L, "router_entropy": H, "gate_sum": G}
        if grads.get("grad_lm_router") and i < len(grads["grad_lm_router"]):
            row["grad_lm_router"] = grads["grad_lm_router"][i]
            row["grad_bal_router"] = grads["grad_bal_router"][i]
        layers.append(row)
    return {"step": rec["step"], "balance_share_of_loss": rec["balance_loss"] / rec["loss"] if rec["loss"] else 0.0,
            "grad_lm_all": grads.get("grad_lm_all"), "grad_bal_all": grads.get("grad_bal_all"), "layers": layers}


def summarize(result: dict) -> dict:
    """One row per run: final and best validation loss; the largest rise of the validation loss
    above its best so far (`max_rise`); how much it fell from 25% to 80% of the run (`drop_mid`:
    small when it stalls before a step decay at 80%) and from 80% to the end (`drop_end`); the
    training loss's largest jump; and the routing health at the end."""
    ev = [(e["step"], e["val_loss"]) for e in result["eval"]]
    best_step, best = min(ev, key=lambda t: t[1])
    rises = [v - min(u for _, u in ev[:i]) for i, (_, v) in enumerate(ev) if i]
    total = result["train"][-1]["step"] if result["train"] else ev[-1][0]
    at = lambda frac: min(ev, key=lambda t: abs(t[0] - frac * total))[1]  # the evaluation nearest frac
    lm = [r["lm_loss"] for r in result["train"]]
    w = max(1, len(lm) // 50)  # jumps against the mean of the preceding window
    spikes = [lm[i] - sum(lm[i - w:i]) / w for i in range(w, len(lm))]
    row = {"final_val": ev[-1][1], "best_val": best, "best_step": best_step,
           "max_rise": max([0.0, *rises]), "drop_mid": at(0.25) - at(0.8), "drop_end": at(0.8) - ev[-1][1],
           "max_spike": max(spikes) if spikes else 0.0, "epochs": result["epochs"], "seconds": result["seconds"]}
    if result["probes"]:
        last = result["probes"][-1]["layers"]
        row["load_max_over_mean"] = max(L["max_over_mean"] for L in last)
        row["dead_experts"] = sum(L["dead"] for L in last)
        ents = [L["router_entropy"] for L in last if L["router_entropy"] is not None]
        row["router_entropy"] = sum(ents) / len(ents) if ents else None
        ratios = [L["grad_bal_router"] / L["grad_lm_router"] for p in result["probes"] for L in p["layers"]
                  if L.get("grad_lm_router")]
        row["bal_over_lm_router_grad"] = sum(ratios) / len(ratios) if ratios else None
        gs = [L.get("gate_sum") for L in last if L.get("gate_sum") is not None]
        row["gate_sum"] = sum(gs) / len(gs) if gs else None
        row["balance_share_of_loss"] = result["probes"][-1]["balance_share_of_loss"]
    return row
