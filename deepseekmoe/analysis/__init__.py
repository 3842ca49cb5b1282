"""Expert-specialisation analysis (paper section 4.5): routing statistics and routing experiments.

    from deepseekmoe.analysis import routing_statistics, redundancy_sweep, shared_ablation, topk_sweep
    stats = routing_statistics(model, batches, tokenizer=tok)     # load per layer, tokens per expert
    fig4 = redundancy_sweep(scorer, batches)                      # loss vs disabled top experts
    fig5 = shared_ablation(scorer, batches)                       # shared experts off, one more routed
    fig6 = topk_sweep(scorer, batches)                            # loss vs activated routed experts

`batches` are (ids [B, L], valid [B, L] or None) pairs, e.g. from deepseekmoe.eval.lm.prepared_batches;
`scorer` is a deepseekmoe.eval.Scorer. Rooms: routing.py, experiments.py, plots.py, cli.py
(`deepseekmoe analyze`). docs/evaluation.md maps each to the paper's figures.
"""

from deepseekmoe.analysis.experiments import lm_loss, redundancy_sweep, shared_ablation, topk_sweep
from deepseekmoe.analysis.routing import routing_statistics

__all__ = ["routing_statistics", "lm_loss", "redundancy_sweep", "shared_ablation", "topk_sweep"]
