"""Analysis: routing statistics against counts taken independently from the recorded routing (padding
left out), the section-4.5 sweeps (shapes, each point equals a plain evaluation under the same
knobs, routing restored, bad settings refused), the expected direction of each figure on a briefly
trained model, and `deepseekmoe analyze` (files, tables, one-line errors).
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from deepseekmoe import cli
from deepseekmoe.analysis import lm_loss, redundancy_sweep, routing_statistics, shared_ablation, topk_sweep
from deepseekmoe.analysis.experiments import n_disabled
from deepseekmoe.analysis.routing import format_expert_table, format_layer_table
from deepseekmoe.data import prepare, train_tokenizer
from deepseekmoe.errors import ConfigError
from deepseekmoe.eval import Scorer
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in tall green trees".split()
CORPUS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(60)) + "." for i in range(24)]
# This module's tiny model has two heads and 64 positions; fields given in a call override these.
tiny = functools.partial(tiny_model, num_attention_heads=2, max_position_embeddings=64)


def _routing_is_default(model):
    cfg = model.config
    return all(m.gate.top_k == cfg.num_experts_per_tok and m.gate.mask_top_fraction == 0 and m.shared_enabled
               and not m.record for m in model.moe_layers())


def test_routing_statistics_match_recorded_routing():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 20), generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 12:] = False  # right padding: left out of every count
    valid[2, 5:] = False
    stats = routing_statistics(model, [(ids, valid)], top_n=4, min_count=1)
    assert _routing_is_default(model)
    # Independent count: record the routing of each sequence's real tokens alone.
    model.set_routing(record=True)
    pairs = [Counter() for _ in model.moe_layers()]
    tokens = Counter()
    with torch.no_grad():
        for b in range(3):
            n = int(valid[b].sum())
            model(ids[b:b + 1, :n])
            tokens.update(ids[b, :n].tolist())
            for li, moe in enumerate(model.moe_layers()):
                for t, experts in zip(ids[b, :n].tolist(), moe.last_routing.idx_TK.tolist()):
                    pairs[li].update((e, t) for e in experts)
    model.set_routing()
    n_real = int(valid.sum())
    assert stats["tokens"] == n_real and [L["layer"] for L in stats["layers"]] == [1, 2]  # layer 0 is dense
    for li, L in enumerate(stats["layers"]):
        counts = [sum(c for (e, _), c in pairs[li].items() if e == x) for x in range(8)]
        assert L["counts"] == counts and sum(counts) == n_real * 2
        assert sum(L["load"]) == pytest.approx(1.0)
        assert L["max_over_mean"] == pytest.approx(max(counts) / np.mean(counts))
        p = np.array(counts) / sum(counts)
        assert L["entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())
        for ex in L["experts"]:
            mine = sorted(((c, t) for (e, t), c in pairs[li].items() if e == ex["expert"]), key=lambda x: (-x[0], x[1]))
            assert [(t["count"], t["id"]) for t in ex["top_tokens"]] == mine[:4]
            for t in ex["distinctive_tokens"]:
                assert t["share"] == pytest.approx(pairs[li][(ex["expert"], t["id"])] / tokens[t["id"]], abs=1e-4)
            shares = [t["share"] for t in ex["distinctive_tokens"]]
            assert shares == sorted(shares, reverse=True)
    assert "max/mean" in format_layer_table(stats) and "expert" in format_expert_table(stats, layer=1)
    with pytest.raises(ConfigError, match="not an MoE layer"):
        format_expert_table(stats, layer=0)


def _batches(n=2, B=4, L=24, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (B, L), generator=g), None) for _ in range(n)]


def test_sweeps_are_shaped_and_each_point_is_a_plain_evaluation():
    model = tiny()
    sc = Scorer(model, None, 1, batch_size=4, progress=False)
    batches = _batches()
    base = sc.window_nll(batches)
    base = base[0] / base[1]
    fig4 = redundancy_sweep(sc, batches, [0, 1 / 8, 0.25, 0.5], to_bpb=lambda x: 2 * x)
    assert [r["disabled"] for r in fig4["rows"]] == [0, 1, 2, 4] and fig4["figure"] == "Fig 4"
    assert fig4["rows"][0]["loss"] == pytest.approx(base, rel=1e-6)
    assert fig4["rows"][1]["bpb"] == 2 * fig4["rows"][1]["loss"]
    # Each point equals setting the knob by hand (the router floors ratio x E).
    for r in fig4["rows"]:
        for m in model.moe_layers():
            m.gate.mask_top_fraction = r["fraction"]
        nll, n = sc.window_nll(batches)
        assert r["loss"] == pytest.approx(nll / n, rel=1e-6)
        model.set_routing()
    fig6 = topk_sweep(sc, batches)
    assert [r["top_k"] for r in fig6["rows"]] == [1, 2, 3, 4]
    assert fig6["rows"][1]["loss"] == pytest.approx(base, rel=1e-6)
    assert fig6["rows"][3]["loss"] == pytest.approx(lm_loss(sc, batches, top_k=4), rel=1e-6)
    fig5 = shared_ablation(sc, batches)
    assert [(r["setting"], r["top_k"], r["shared"]) for r in fig5["rows"]] == [
        ("as trained", 2, True), ("shared off, top_k + 1", 3, False), ("shared off", 2, False)]
    assert fig5["rows"][1]["loss"] == pytest.approx(lm_loss(sc, batches, shared_experts=False, top_k=3), rel=1e-6)
    assert fig5["rows"][1]["loss"] != pytest.approx(base)
    assert _routing_is_default(model)
    assert n_disabled(1 / 16, 63) == 3 and n_disabled(0.25, 8) == 2


def test_bad_settings_are_refused():
    model = tiny()
    sc = Scorer(model, None, 1, progress=False)
    b = _batches(1)
    with pytest.raises(ConfigError, match="fewer than top_k"):
        redundancy_sweep(sc, b, [0.9])
    with pytest.raises(ConfigError, match="between 1 and"):
        topk_sweep(sc, b, [0])
    with pytest.raises(ConfigError, match="no shared experts"):
        shared_ablation(Scorer(tiny(n_shared_experts=0), None, 1, progress=False), b)
    with pytest.raises(ConfigError, match="no MoE layers"):
        topk_sweep(Scorer(tiny(n_routed_experts=0, num_experts_per_tok=0), None, 1, progress=False), b)
    with pytest.raises(ConfigError, match="hash"):
        routing_statistics(tiny(router="hash", num_experts_per_tok=1, n_shared_experts=0), b)
    assert _routing_is_default(model)


@pytest.fixture(scope="module")
def trained():
    """A tiny MoE trained ~60 steps on four random bigram 'languages' (structure experts can split)."""
    torch.manual_seed(0)
    V = 48
    model = tiny(V, num_hidden_layers=2, first_k_dense_replace=0, intermediate_size=64, aux_loss_alpha=0.01,
                 initializer_range=0.02)
    g = torch.Generator().manual_seed(0)
    tables = torch.randint(2, V, (4, V, 2), generator=g)

    def batch(B=16, L=33):
        lang, t = torch.randint(0, 4, (B,), generator=g), torch.randint(2, V, (B,), generator=g)
        cols = []
        for _ in range(L):
            cols.append(t)
            t = tables[lang, t, torch.randint(0, 2, (B,), generator=g)]
        return torch.stack(cols, 1)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        x = batch()
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, [(batch(), None) for _ in range(3)]


def test_trained_model_shows_the_papers_directions(trained):
    model, batches = trained
    sc = Scorer(model, None, 1, batch_size=16, progress=False)
    fig4 = [r["loss"] for r in redundancy_sweep(sc, batches, [0, 1 / 8, 2 / 8, 3 / 8])["rows"]]
    # Fig 4: taking a token's favourite experts away hurts, more the more are taken.
    assert fig4[1] > fig4[0] + 0.03 and fig4[3] > fig4[1]
    assert all(b > a - 0.01 for a, b in zip(fig4, fig4[1:]))
    # Fig 5: one more routed expert does not replace the shared one.
    fig5 = [r["loss"] for r in shared_ablation(sc, batches)["rows"]]
    assert fig5[1] > fig5[0] + 0.03
    # Fig 6: a single routed expert is worse than the trained top-2.
    fig6 = [r["loss"] for r in topk_sweep(sc, batches, [1, 2])["rows"]]
    assert fig6[0] > fig6[1]


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("an")
    tok = train_tokenizer(CORPUS, 280)
    tok.save(d / "tok" / "tokenizer.json")
    (d / "train.txt").write_text("\n".join(CORPUS[:16]))
    (d / "val.txt").write_text("\n".join(CORPUS[16:]))
    data = prepare([d / "train.txt"], d / "data", tokenizer=d / "tok" / "tokenizer.json", val_inputs=[d / "val.txt"],
                   workers=1, progress=False)
    tiny(tok.vocab_size).save_pretrained(d / "hf", tokenizer_dir=d / "tok")
    return d, data


def test_analyze_cli_writes_json_png_and_tables(setup, capsys):
    d, data = setup
    out = d / "out"
    rc = cli.main(["analyze", "--model", str(d / "hf"), "--data", str(data), "--limit", "6", "--seq-len", "32",
                   "--batch-size", "4", "--out", str(out), "--fractions", "0,1/8,2/8", "--top-k-values", "1,2,3"])
    assert rc == 0
    printed = capsys.readouterr().out
    for stem in ("routing", "fig4_redundancy", "fig5_shared", "fig6_topk"):
        assert (out / f"{stem}.json").is_file()
    for png in ("routing_load", "fig4_redundancy", "fig5_shared", "fig6_topk"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig4 = json.loads((out / "fig4_redundancy.json").read_text())
    assert [r["disabled"] for r in fig4["rows"]] == [0, 1, 2] and fig4["windows"] == 6 and fig4["seq_len"] == 32
    assert all(r["bpb"] > 0 for r in fig4["rows"])
    fig6 = json.loads((out / "fig6_topk.json").read_text())
    assert fig6["rows"][1]["loss"] == pytest.approx(fig4["rows"][0]["loss"], rel=1e-6)
    routing = json.loads((out / "routing.json").read_text())
    assert routing["tokens"] == 6 * 32 and len(routing["layers"]) == 2
    assert "Fig 4 (redundancy)" in printed and "Fig 5 (shared)" in printed and "distinctive tokens" in printed
    # Raw text input.
    (d / "note.txt").write_text(CORPUS[0])
    assert cli.main(["analyze", "--model", str(d / "hf"), "--text", str(d / "note.txt"), "--experiments", "topk",
                     "--top-k-values", "2", "--seq-len", "16", "--out", str(d / "out2")]) == 0
    assert json.loads((d / "out2" / "fig6_topk.json").read_text())["rows"][0]["bpb"] > 0


def test_analyze_cli_errors_are_one_line(setup, tmp_path, capsys):
    d, data = setup
    base = ["analyze", "--model", str(d / "hf"), "--data", str(data), "--out", str(tmp_path / "o")]
    for extra, needle in ((["--experiments", "topkk"], "did you mean 'topk'"),
                          (["--experiments", "routing", "--layer", "0"], "not an MoE layer"),
                          (["--experiments", "redundancy", "--fractions", "0.95"], "fewer than top_k"),
                          (["--fractions", "a,b"], "comma-separated numbers")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o").exists()
    dense = tmp_path / "dense"
    tiny(280, n_routed_experts=0, num_experts_per_tok=0).save_pretrained(dense, tokenizer_dir=d / "tok")
    assert cli.main(["analyze", "--model", str(dense), "--data", str(data)]) == 2
    assert "no MoE layers" in capsys.readouterr().err


def test_analyze_refuses_a_bad_out_and_a_seq_len_beyond_the_context(setup, tmp_path, capsys):
    d, data = setup
    (tmp_path / "file").write_text("user data")
    base = ["analyze", "--model", str(d / "hf"), "--data", str(data), "--experiments", "routing", "--limit", "2"]
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert cli.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write {out} (" in err and "file is a file, not a folder" in err, err
    assert (tmp_path / "file").read_text() == "user data"
    assert cli.main([*base, "--seq-len", "100000", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq-len 100000: beyond this model's context of 64 tokens" in err, err
    assert not (tmp_path / "o").exists()
