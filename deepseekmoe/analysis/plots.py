"""PNG figures for the analyses (matplotlib's Agg canvas: no display, no global backend switch).

  plot_experiment(result, path)   Fig 4 / 6 as loss-against-setting lines, Fig 5 as bars
  plot_load(stats, path)          expert load per MoE layer as a heatmap (load / uniform share)
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
