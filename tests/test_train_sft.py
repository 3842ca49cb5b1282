"""`deepseekmoe sft` end to end on the CPU: a tiny model pretrained by the default job (cut short) is
fine-tuned on MBPP / ARC-derived chat records (scripts/make_sft_records.py), in full and with
LoRA; the held-out assistant-token loss falls; a run resumed from a mid-run checkpoint ends
bitwise identical; `generate` and `chat` load the results. Plus the step's target weighting and
the configuration errors."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from deepseekmoe.cli import main
from deepseekmoe.errors import ConfigError
from deepseekmoe.train import recipe
from deepseekmoe.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "data" / "eval"
RECIPE = str(ROOT / "configs" / "sft-tiny.toml")
QUIET = ["--log.progress=false", "--log.tensorboard=false", "--log.plot=false"]


def _records() -> list[dict]:
    """ARC-Easy train questions and MBPP training tasks as chat records (the records script), or,
    without the benchmark files, records of the same form built here."""
    if (EVAL / "mbpp" / "mbpp.jsonl").is_file() and (EVAL / "arc_easy").is_dir():
        spec = importlib.util.spec_from_file_location("make_sft_records", ROOT / "scripts" / "make_sft_records.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        arc, mbpp = mod.make_records(EVAL, ["arc_easy"]), mod.make_records(EVAL, ["mbpp"])
        return arc[:150] + mbpp[:20] + arc[150:180] + mbpp[20:25]  # 170 to train on, 35 held out
    words = ["red", "blue", "green", "cold", "warm", "iron", "water", "stone", "light", "sound"]
    out = []
    for i in range(200):
        a, b = words[i % 10], words[(3 * i + 1) % 10]
        q = f"Which word comes first in the list: {a}, {b}?\nA. {a}\nB. {b}"
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"A. {a}"}]})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(base run directory, training records, held-out records): the default job cut to 20 steps."""
    from deepseekmoe.train.trainer import Trainer

    root = tmp_path_factory.mktemp("sft")
    over = [("train.steps", "20"), ("train.seq_len", "64"), ("train.batch_size", "8"), ("eval.every", "0"),
            ("eval.max_batches", "1"), ("checkpoint.every", "0"), ("sample.max_new_tokens", "0"),
            ("log.progress", "false"), ("log.tensorboard", "false"), ("log.plot", "false")]
    Trainer(recipe.build(None, over), run_dir=root / "base", echo=lambda s: None).run()
    recs = _records()
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs[:170]))
    val.write_text("".join(json.dumps(r) + "\n" for r in recs[170:]))
    return root, train, val


def _sft(work, out: Path, *extra: str) -> Path:
    root, train, val = work
    rc = main(["sft", RECIPE, "--model", str(root / "base"), "--data", str(train), "--out", str(out),
               f"--sft.val_data={json.dumps([str(val)])}", *QUIET, *extra])
    assert rc == 0
    return out


def _val_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]


def test_full_sft_lowers_heldout_loss_and_chat_uses_it(work, capsys, monkeypatch):
    run = _sft(work, work[0] / "full")
    (s0, before), (s1, after) = _val_losses(run)
    assert (s0, s1) == (0, 12)
    assert after < before - 0.5, f"held-out assistant loss {before:.3f} -> {after:.3f}"
    ckpt = run / "checkpoints" / "step_0000012"
    assert (ckpt / "model" / "model.safetensors").is_file()  # full fine-tuning saves the model as pretraining
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "Which is a liquid?", "--max-new-tokens", "4",
                 "--no-stream"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Which is a liquid?\nA. ice\nB. water\n")))
    assert main(["chat", "--model", str(run), "--max-new-tokens", "4"]) == 0
    assert "Assistant:" in capsys.readouterr().out


def test_lora_sft_lowers_heldout_loss_writes_adapter_and_merged(work, capsys):
    from safetensors.torch import load_file

    # embed_tokens / lm_head trained in full, as the released finetune script does: the adapters
    # alone move a 20-step base by ~0.15 nats in 12 steps, with them the model learns the answers' tokens.
    run = _sft(work, work[0] / "lora", "--lora", "--lora.merge=true", "--lora.train_embeddings=true",
               "--optim.lr=1e-2")
    (_, before), (_, after) = _val_losses(run)
    assert after < before - 0.5, f"held-out assistant loss {before:.3f} -> {after:.3f}"
    ckpt = run / "checkpoints" / "step_0000012"
    assert not (ckpt / "model").exists()  # the frozen base is not copied into checkpoints
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    full = {n for n in trainable if "lora_" not in n}
    assert full == {"embed_tokens.weight", "lm_head.weight"} and len(trainable) > 20
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(trainable)  # AdamW over the adapters only
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and Path(adapter["base_model_name_or_path"]).is_dir()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "config.json").is_file()

    def completion(*argv):
        capsys.readouterr()
        assert main(["generate", *argv, "--prompt", "Which is a liquid?", "--max-new-tokens", "6", "--json"]) == 0
        return json.loads(capsys.readouterr().out)[0]["completion"]

    merged = completion("--model", str(run))  # the run directory: its merged model
    shutil.move(run / "merged", work[0] / "merged-aside")
    unmerged = completion("--model", str(run))  # no merged/: base + the run's adapter
    explicit = completion("--model", adapter["base_model_name_or_path"], "--adapter", str(run / "adapter"))
    assert merged == unmerged == explicit

    text = work[0] / "heldout.txt"
    text.write_text("Which is a liquid? Water is a liquid at room temperature.\n" * 4)

    def bits_per_byte(model_dir):
        capsys.readouterr()
        assert main(["eval", "--model", str(model_dir), "--lm-text", str(text), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    # eval on the run directory loads base + adapter (no merged/ now) and scores as the merged model
    got, want = bits_per_byte(run), bits_per_byte(work[0] / "merged-aside")
    assert got.keys() == want.keys()
    flat = [(k, v) for k, v in _numbers(got)]
    assert flat and all(abs(v - w) <= 1e-4 * max(1.0, abs(w)) for (_, v), (_, w) in zip(flat, _numbers(want)))


def test_lora_under_bf16_autocast_keeps_the_base_in_bf16(work, capsys):
    """With autocast (bf16 on GPU, here forced on the CPU) a LoRA run keeps the frozen base in bf16
    and what trains in fp32; the sample, the merged export (one dtype) and generate run."""
    from safetensors.torch import load_file

    run = _sft(work, work[0] / "lora-bf16", "--lora", "--lora.merge=true", "--lora.train_embeddings=true",
               "--system.dtype=bfloat16", "--train.steps=2")
    trainable = load_file(str(run / "checkpoints" / "step_0000002" / "trainable.safetensors"))
    assert {v.dtype for v in trainable.values()} == {torch.float32}
    assert json.loads((run / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "sample (" in capsys.readouterr().out
    assert main(["generate", "--model", str(run), "--prompt", "Which is a liquid?", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_from_mid_run_checkpoint_is_bitwise_identical(work, lora):
    from deepseekmoe.train.trainer import train

    root, train_file, val = work
    over = [("sft.model", json.dumps(str(root / "base"))), ("sft.data", json.dumps([str(train_file)])),
            ("sft.val_data", json.dumps([str(val)])), ("train.steps", "6"), ("checkpoint.every", "3"),
            ("sample.max_new_tokens", "0"), ("lora.enabled", "true" if lora else "false"),
            ("log.progress", "false"), ("log.tensorboard", "false"), ("log.plot", "false")]
    cfg = recipe.build(RECIPE, over)
    a = root / f"resume-a-{lora}"
    train(cfg, run_dir=a, echo=lambda s: None)
    b = root / f"resume-b-{lora}"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_0000006")
    for d in ("adapter",):
        shutil.rmtree(b / d, ignore_errors=True)
    train(recipe.build(base=json.loads(json.dumps(cfg.to_dict()))), resume=b / "checkpoints" / "step_0000003",
          echo=lambda s: None)
    name = "trainable.safetensors" if lora else "model/model.safetensors"
    for f in (name, "optimizer.pt"):
        assert (a / "checkpoints" / "step_0000006" / f).read_bytes() == \
            (b / "checkpoints" / "step_0000006" / f).read_bytes(), f
    if lora:
        assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (b / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [r for r in read_metrics(a / "metrics.jsonl") if r["kind"] == "eval"] == \
        [r for r in read_metrics(b / "metrics.jsonl") if r["kind"] == "eval"]


def test_sft_micro_batches_are_weighted_by_their_targets():
    """Two micro-batches with different numbers of assistant tokens accumulate to the gradient of
    the mean over all their tokens: the same as one forward of both rows together."""
    from deepseekmoe.data.sft import SFTBatch
    from deepseekmoe.model.presets import get
    from deepseekmoe.model.transformer import Transformer
    from deepseekmoe.train.step import LocalStep

    torch.manual_seed(0)
    # No balance loss: it is a statistic of each forward's tokens, not a per-token mean.
    model = Transformer(get("tiny", num_hidden_layers=2, vocab_size=64, aux_loss_alpha=0.0)).float()
    L = 12
    ids = torch.randint(0, 64, (2, L))
    labels = ids.clone()
    labels[0, :9] = -100  # row 0: 3 targets; row 1: 11
    pos = torch.arange(L).expand(2, L)
    mask = torch.ones(L, L, dtype=torch.bool).tril().expand(2, 1, L, L)

    def batch(rows):
        return SFTBatch(ids[rows], labels[rows], pos[rows], mask[rows])

    def grads(batches, accum):
        model.zero_grad()
        stats = LocalStep(model, accum, lambda: torch.autocast("cpu", enabled=False), None, "cpu").run(batches)
        return stats.lm, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lm_two, two = grads([batch([0]), batch([1])], 2)
    lm_one, one = grads([batch([0, 1])], 1)
    assert lm_two == pytest.approx(float(lm_one), rel=1e-5)
    for n, g in one.items():
        assert torch.allclose(two[n], g, rtol=1e-4, atol=1e-6), n
    # 1/accum weighting (pretraining's) would differ: the rows' means are far apart here.
    with torch.no_grad():
        naive = sum(float(model(**batch([r]).model_kwargs()).lm_loss) for r in (0, 1)) / 2
    assert naive != pytest.approx(float(lm_one), rel=1e-3)


def test_epochs_set_the_steps(work):
    from deepseekmoe.data.sft import SFTLoader
    from deepseekmoe.train.sft import SFTTrainer

    root, train_file, val = work
    cfg = recipe.build(RECIPE, [("sft.model", json.dumps(str(root / "base"))), ("sft.epochs", "2"),
                                ("sft.data", json.dumps([str(train_file)])), ("sft.val_data", json.dumps([str(val)]))])
    t = SFTTrainer(cfg, run_dir=root / "epochs", echo=lambda s: None)
    rows = SFTLoader(t.data.data.train, 1, seed=cfg.data.seed).rows_in_epoch(0)
    assert rows > 10 and cfg.train.steps == -(-2 * rows // cfg.train.batch_size)
    assert not (root / "epochs").exists()  # nothing written before the run starts


def test_configuration_errors(work, capsys):
    root, train_file, _ = work
    base = [("sft.model", json.dumps(str(root / "base"))), ("sft.data", json.dumps([str(train_file)]))]
    with pytest.raises(ConfigError, match="parallel.pp=2: fine-tuning does not run pipeline parallel"):
        recipe.build(RECIPE, base + [("parallel.pp", "2")])
    with pytest.raises(ConfigError, match="lora.enabled with parallel.ep=2"):
        recipe.build(RECIPE, base + [("lora.enabled", "true"), ("parallel.ep", "2")])
    with pytest.raises(ConfigError, match="lora.merge=true without lora.enabled"):
        recipe.build(RECIPE, base + [("lora.merge", "true")])
    with pytest.raises(ConfigError, match="sft.data is empty"):
        recipe.build(RECIPE, base[:1])
    with pytest.raises(ConfigError, match="lora.targets: 'qproj' is not a module LoRA can adapt.*q_proj"):
        recipe.build(RECIPE, base + [("lora.enabled", "true"), ("lora.targets", '["qproj"]')])
    with pytest.raises(ConfigError, match="sft.model='/nonexistent/base'"):
        recipe.build(RECIPE, [("sft.model", '"/nonexistent/base"'), base[1]])
    assert main(["sft", RECIPE, "--data", str(train_file), "--out", str(root / "never")]) == 2
    assert "needs a base model: --model" in capsys.readouterr().err and not (root / "never").exists()
    assert main(["sft", "--resume", str(root / "base"), "--model", str(root / "base")]) == 2
    assert "drop --model" in capsys.readouterr().err
    # the recipe may follow the record files (`--data FILE... RECIPE.toml`); paths are pinned absolute
    assert main(["sft", "--model", str(root / "base"), "--data", str(train_file), RECIPE, "--print-config"]) == 0
    cfg = recipe.from_dict(__import__("tomllib").loads(capsys.readouterr().out))
    assert cfg.name == "sft-tiny" and cfg.sft.data == [str(train_file.resolve())]
    assert cfg.sft.model == str((root / "base" / "checkpoints" / "step_0000020" / "model").resolve())


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_data_parallel_sft_matches_one_process(work):
    """Full fine-tuning under torchrun (gloo, dp=2, FSDP2): each rank's micro-batch holds another
    number of assistant tokens, and the step's loss and gradient are still the mean over all of
    them, as in one process; validation covers the same rows."""
    import os
    import subprocess

    root, train_file, val = work
    flags = [RECIPE, "--model", str(root / "base"), "--data", str(train_file),
             f"--sft.val_data={json.dumps([str(val)])}", "--train.steps=3", "--log.every=1",
             "--sample.max_new_tokens=0", *QUIET]
    assert main(["sft", *flags, "--out", str(root / "dp1")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "deepseekmoe", "sft", *flags, "--out", str(root / "dp2"), "--parallel.dp=2", "--parallel.timeout_s=60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = {n: read_metrics(root / n / "metrics.jsonl") for n in ("dp1", "dp2")}
    one, two = ([(r["step"], r["lm_loss"]) for r in recs[n] if r["kind"] == "train"] for n in ("dp1", "dp2"))
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    assert [x for _, x in two] == pytest.approx([x for _, x in one], rel=1e-4)
    assert [v for _, v in _val_losses(root / "dp2")] == pytest.approx([v for _, v in _val_losses(root / "dp1")],
                                                                      rel=1e-4)

    # LoRA under torchrun: the sharded adapters are gathered into adapter/ and merged/, which score
    # the held-out records as the run's last validation did.
    cmd = [*cmd[:cmd.index("--out")], "--out", str(root / "dp2-lora"), "--parallel.dp=2", "--lora",
           "--lora.merge=true", "--optim.lr=1e-2", "--train.steps=2", "--parallel.timeout_s=60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from deepseekmoe.data.sft import SFTDataConfig, SFTLoader, build_sft_data
    from deepseekmoe.model.transformer import Transformer
    from deepseekmoe.train.sft import load_base_tokenizer, resolve_base

    run, base = root / "dp2-lora", resolve_base(root / "base")
    for model in (Transformer.from_pretrained(base, adapter=run / "adapter"),
                  Transformer.from_pretrained(run / "merged")):
        tok = load_base_tokenizer(base, model.config)
        data = build_sft_data([val], tok, SFTDataConfig(seq_len=128, template="deepseek-chat"), bos_id=tok.bos_id,
                              eos_id=tok.eos_id)
        total = count = 0
        with torch.no_grad():
            for b in SFTLoader(data.train, 4, endless=False):
                total, count = total + float(model(**b.model_kwargs()).lm_loss) * b.num_label_tokens, \
                    count + b.num_label_tokens
        assert total / count == pytest.approx(_val_losses(run)[-1][1], rel=1e-5)


def _numbers(d, prefix=""):
    """The numeric leaves of a JSON report, in order, with their dotted keys."""
    if isinstance(d, dict):
        return [x for k in sorted(d) for x in _numbers(d[k], f"{prefix}{k}.")]
    if isinstance(d, list):
        return [x for i, v in enumerate(d) for x in _numbers(v, f"{prefix}{i}.")]
    return [(prefix, float(d))] if isinstance(d, (int, float)) and not isinstance(d, bool) else []
