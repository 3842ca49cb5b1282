"""What `convert`, `generate` and `eval` accept as a model: run directories (newest checkpoint) and
sharded checkpoints of distributed runs, besides native and released-format directories."""

import errno

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.checkpoint import dcp as dcp_ckpt
from deepseekmoe.checkpoint import hf
from deepseekmoe.checkpoint.native import save_native
from deepseekmoe.cli import main
from deepseekmoe.errors import CheckpointError, ConfigError
from deepseekmoe.model import presets
from deepseekmoe.train import recipe

CFG = presets.get("tiny").replace(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _model(seed):
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def _logits(model):
    ids = torch.arange(20).view(2, 10) % CFG.vocab_size
    with torch.no_grad():
        return model(ids).logits


def test_run_directory_means_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    old, new = _model(0), _model(1)
    save_native(run / "checkpoints" / "step_0000002" / "model", CFG, old.state_dict())
    save_native(run / "checkpoints" / "step_0000010" / "model", CFG, new.state_dict())
    (run / "checkpoints" / ".step_0000011.tmp").mkdir()  # an unfinished save is never picked
    kind, path = hf.find_checkpoint(run)
    assert kind == "native" and path == run / "checkpoints" / "step_0000010" / "model"
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    loaded = Transformer.from_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(loaded), _logits(new))
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        hf.find_checkpoint(empty)


def test_distributed_checkpoint_converts_and_loaders_explain(tmp_path, capsys):
    model = _model(2)
    # The trainer stores its whole TrainConfig in state.json; its model section describes CFG.
    state = {"config": recipe.TrainConfig().to_dict()}
    state["config"]["model"].update({k: v for k, v in CFG.to_dict().items() if k != "name"})
    ckpt = dcp_ckpt.save(tmp_path / "step_0000004", model, extra=state)
    assert hf.find_checkpoint(ckpt) == ("dcp", ckpt)
    with pytest.raises(CheckpointError, match="deepseekmoe convert"):
        Transformer.from_pretrained(ckpt)
    assert main(["generate", "--model", str(ckpt), "--prompt", "a"]) == 2
    assert "sharded checkpoint of a distributed run" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(tmp_path / "hf")]) == 0
    loaded = Transformer.from_pretrained(tmp_path / "hf")
    assert loaded.config.hidden_size == CFG.hidden_size
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-6)


def test_distributed_checkpoint_records_its_model_config(tmp_path):
    from deepseekmoe.checkpoint.convert import convert

    model = _model(3)
    # What the trainer writes now: the resolved ModelConfig under "model" (no recipe needed).
    ckpt = dcp_ckpt.save(tmp_path / "step_0000004", model, extra={"model": CFG.to_dict()})
    assert main(["convert", str(ckpt), str(tmp_path / "hf")]) == 0
    loaded = Transformer.from_pretrained(tmp_path / "hf")
    assert loaded.config == CFG.replace(expert_backend=loaded.config.expert_backend)
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-6)
    bare = dcp_ckpt.save(tmp_path / "step_0000008", model, extra={"step": 8})
    with pytest.raises(CheckpointError, match="records no model config"):
        convert(bare, tmp_path / "hf2")


@pytest.mark.parametrize("flag, want", [("bf16", "bfloat16"), ("float16", "float16"), ("auto", "float32")])
def test_convert_dtype_spellings(tmp_path, flag, want):
    import json

    from deepseekmoe.model.dtypes import parse_dtype

    save_native(tmp_path / "native", CFG, _model(0).state_dict())
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--dtype", flag]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == want
    assert Transformer.from_pretrained(tmp_path / "hf").lm_head.weight.dtype == getattr(torch, want)
    with pytest.raises(ConfigError, match=r"--dtype='half': choose one of auto, bf16, fp16, fp32"):
        parse_dtype("half", "--dtype", ("auto", "bf16", "fp16", "fp32"))


def test_released_to_native_keeps_the_tokenizer_and_can_generate(tmp_path, capsys):
    from deepseekmoe.data import train_tokenizer

    cfg = CFG.replace(vocab_size=300)
    torch.manual_seed(4)
    model = Transformer(cfg).eval()
    train_tokenizer(["the cat sat on the mat, a dog ran far away " * 40], 300, tmp_path / "tok" / "tokenizer.json")
    model.save_pretrained(tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "native").iterdir()}
    assert (tmp_path / "native" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "native"), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "error" not in out.err  # a continuation, decoded by the copied tokenizer


def test_unwritable_or_wrong_destination_is_one_line_before_the_load(tmp_path, capsys, monkeypatch):
    from deepseekmoe.checkpoint import files

    save_native(tmp_path / "native", CFG, _model(0).state_dict())
    (tmp_path / "file").write_text("user data")

    def no_load(*a, **k):
        raise AssertionError("the source was loaded before the destination was checked")

    monkeypatch.setattr(Transformer, "from_pretrained", no_load)
    for argv, needle in (([str(tmp_path / "file" / "out")], "file is a file, not a folder"),
                         ([str(tmp_path / "file"), "--overwrite"], "file is a file, not a folder")):
        assert main(["convert", str(tmp_path / "native"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "deepseekmoe convert: error: cannot write" in err and needle in err, err
    assert (tmp_path / "file").read_text() == "user data"
    monkeypatch.undo()

    def denied(*a, **k):  # tests run as root, which a read-only mode does not stop: the refusal is injected
        raise PermissionError(errno.EACCES, "Permission denied", str(k["dir"]))

    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {tmp_path / 'hf'} (Permission denied; " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "native"]
