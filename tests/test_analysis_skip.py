"""`deepseekmoe analyze` on a model without shared experts (a GShard-like model): an explicit
`--experiments` list that includes `shared` runs the other experiments, says in one line that Fig 5
was skipped and why, and exits 0; asking for `shared` alone is a one-line error."""

from __future__ import annotations

import functools
import json

import pytest

from deepseekmoe import cli
from deepseekmoe.data import prepare, train_tokenizer
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in tall green trees".split()
CORPUS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(50)) + "." for i in range(12)]
tiny = functools.partial(tiny_model, num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def no_shared(tmp_path_factory):
    d = tmp_path_factory.mktemp("skip")
    tok = train_tokenizer(CORPUS, 280)
    tok.save(d / "tok" / "tokenizer.json")
    (d / "train.txt").write_text("\n".join(CORPUS[:8]))
    (d / "val.txt").write_text("\n".join(CORPUS[8:]))
    data = prepare([d / "train.txt"], d / "data", tokenizer=d / "tok" / "tokenizer.json",
                   val_inputs=[d / "val.txt"], workers=1, progress=False)
    tiny(tok.vocab_size, n_shared_experts=0, router="gshard", num_experts_per_tok=2).save_pretrained(
        d / "hf", tokenizer_dir=d / "tok")
    return d, data


def test_explicit_shared_on_a_model_without_shared_experts_is_skipped(no_shared, capsys):
    d, data = no_shared
    out = d / "out"
    rc = cli.main(["analyze", "--model", str(d / "hf"), "--data", str(data), "--limit", "2", "--seq-len", "16",
                   "--batch-size", "2", "--out", str(out), "--experiments", "redundancy,shared,topk",
                   "--fractions", "0,1/8", "--top-k-values", "1,2"])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if "skipped" in ln]
    assert lines == [lines[0]] and lines[0].startswith("shared: skipped (") and "no shared experts" in lines[0]
    assert not (out / "fig5_shared.json").exists()
    fig4 = json.loads((out / "fig4_redundancy.json").read_text())
    fig6 = json.loads((out / "fig6_topk.json").read_text())
    assert [r["disabled"] for r in fig4["rows"]] == [0, 1] and [r["top_k"] for r in fig6["rows"]] == [1, 2]
    # The trained top-2 routing is the same evaluation in both sweeps.
    assert fig6["rows"][1]["loss"] == pytest.approx(fig4["rows"][0]["loss"], rel=1e-6)
    assert "Fig 4 (redundancy)" in printed and "Fig 6 (topk)" in printed


def test_shared_alone_on_such_a_model_is_a_one_line_error(no_shared, tmp_path, capsys):
    d, data = no_shared
    rc = cli.main(["analyze", "--model", str(d / "hf"), "--data", str(data), "--experiments", "shared",
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to run" in err and "no shared experts" in err, err
    assert not (tmp_path / "o").exists()
