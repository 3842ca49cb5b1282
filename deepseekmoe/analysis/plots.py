"""PNG figures for the analyses (matplotlib's Agg canvas: no display, no global backend switch).

  plot_experiment(result, path)   Fig 4 / 6 as loss-against-setting lines, Fig 5 as bars
  plot_load(stats, path)          expert load per MoE layer as a heatmap (load / uniform share)
  plot_training(runs, path)       every diagnosed run's curves (analysis/training.py) in one figure
  plot_curves(curves, path)       validation-loss curves of many runs, coloured by model
"""

from __future__ import annotations

from pathlib import Path


def _figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import io

    from deepseekmoe.checkpoint.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_experiment(result: dict, path: str | Path, title: str = "") -> Path:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    rows = result["rows"]
    losses = [r["loss"] for r in rows]
    exp = result["experiment"]
    if exp == "redundancy":
        xs = [r["fraction"] for r in rows]
        ax.plot(xs, losses, marker="o")
        ax.set_xlabel(f"ratio of disabled top routed experts (of {result['n_routed_experts']})")
        ax.set_xticks(xs, [f"{r['fraction']:.3g}\n({r['disabled']})" for r in rows])
    elif exp == "topk":
        xs = [r["top_k"] for r in rows]
        ax.plot(xs, losses, marker="o")
        ax.axvline(result["top_k"], color="grey", ls="--", lw=0.8, label=f"trained top_k={result['top_k']}")
        ax.set_xlabel("activated routed experts (top_k)")
        ax.set_xticks(xs)
        ax.legend()
    else:
        labels = [r["setting"] for r in rows]
        bars = ax.bar(range(len(rows)), losses, color=["tab:blue"] + ["tab:orange"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels)
        for b, v in zip(bars, losses):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        lo = min(losses)
        ax.set_ylim(lo * 0.95, max(losses) * 1.03)
    ax.set_ylabel("LM loss (nats/token)")
    what = {"redundancy": "loss vs disabled top routed experts", "topk": "loss vs activated routed experts",
            "shared": "shared experts off, one more routed expert"}.get(exp, exp)
    ax.set_title(title or f"{result['figure']} (paper): {what}")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_load(stats: dict, path: str | Path, title: str = "") -> Path:
    import numpy as np

    layers = stats["layers"]
    E = stats["n_routed_experts"]
    rel = np.array([[x * E for x in L["load"]] for L in layers])  # 1 = the uniform share
    fig = _figure(max(6.4, 0.18 * E + 2), max(2.5, 0.35 * len(layers) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(L["layer"]) for L in layers])
    ax.set_ylabel("layer")
    ax.set_xlabel("routed expert")
    fig.colorbar(im, ax=ax, label="load / uniform share")
    ax.set_title(title or f"expert load per layer ({stats['tokens']} tokens, top-{stats['top_k']} of {E})")
    return _save(fig, Path(path))


def _smooth(ys: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def _colours(labels):
    """One colour per model (the label's part before the first '_'), in order of appearance."""
    import matplotlib

    models = list(dict.fromkeys(lb.split("_")[0] for lb in labels))
    cmap = matplotlib.colormaps["tab10"]
    return {lb: cmap(models.index(lb.split("_")[0]) % 10) for lb in labels}


def plot_training(runs: dict, path: str | Path, title: str = "") -> Path:
    """Six panels over steps, one line per run (label model_recipe_seed -> train_with_diagnostics
    result; a colour per model, a line style per recipe): training
    LM loss (moving mean), validation loss, max/mean expert load and dead experts (worst / summed
    over MoE layers), router entropy / log E, and the router's balance / LM gradient-norm ratio."""
    fig = _figure(13, 7.5)
    axes = [fig.add_subplot(2, 3, i + 1) for i in range(6)]
    col = _colours(list(runs))
    # One line style per recipe (the label's parts after the model, before the seed).
    recipes = list(dict.fromkeys("_".join(lb.split("_")[1:-1]) for lb in runs))
    dash = ["-", "--", ":", "-."]
    for label, r in runs.items():
        ls = dash[recipes.index("_".join(label.split("_")[1:-1])) % len(dash)]
        kw = dict(color=col[label], lw=0.9, alpha=0.85, label=label, ls=ls)
        tr = r["train"]
        w = max(1, len(tr) // 40)
        axes[0].plot([t["step"] for t in tr], _smooth([t["lm_loss"] for t in tr], w), **kw)
        axes[1].plot([e["step"] for e in r["eval"]], [e["val_loss"] for e in r["eval"]], marker=".", **kw)
        pr = r["probes"]
        if not pr:
            continue
        s = [p["step"] for p in pr]
        axes[2].plot(s, [max(L["max_over_mean"] for L in p["layers"]) for p in pr], **kw)
        axes[3].plot(s, [sum(L["dead"] for L in p["layers"]) for p in pr], **kw)
        ent = [[L["router_entropy"] for L in p["layers"] if L["router_entropy"] is not None] for p in pr]
        if all(ent):
            axes[4].plot(s, [sum(e) / len(e) for e in ent], **kw)
        ratio = [[L["grad_bal_router"] / L["grad_lm_router"] for L in p["layers"] if L.get("grad_lm_router")]
                 for p in pr]
        if all(ratio):
            axes[5].plot(s, [sum(x) / len(x) for x in ratio], **kw)
    names = ["training LM loss (moving mean)", "validation loss", "expert load max/mean (worst layer)",
             "dead experts (all layers)", "router entropy / log E (mean of layers)",
             "|grad balance| / |grad LM| on the router"]
    for ax, name in zip(axes, names):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[5].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) <= 24:
        axes[1].legend(handles, labels, fontsize=5, ncol=2)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def plot_curves(curves: dict, path: str | Path, title: str = "", ylabel: str = "validation loss (nats/token)"
                ) -> Path:
    """curves: label -> [(step, value), ...]; one colour per model (label before the first '_')."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    col = _colours(list(curves))
    seen = set()
    for label, pts in curves.items():
        model = label.split("_")[0]
        xs, ys = zip(*pts) if pts else ((), ())
        ax.plot(xs, ys, color=col[label], lw=1, marker=".", ms=3, label=None if model in seen else model)
        seen.add(model)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))
