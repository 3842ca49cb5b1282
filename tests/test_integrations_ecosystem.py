"""Tools built on transformers, run on the native class (deepseekmoe.integrations.transformers):
PEFT LoRA on attention, shared and routed experts (logits against a merge done by hand, one training
step, adapter save / load), the HF Trainer for a few steps, lm-eval's `hf` model on an exported
directory giving the scores and log-likelihoods of this project's own harness, and the
text-generation pipeline continuing a prompt as this project's generate does.
"""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from peft import LoraConfig, PeftModel, get_peft_model

import deepseekmoe.integrations.transformers as dt
from deepseekmoe import cli
from deepseekmoe.integrations.transformers.experts import ExpertList
from tests.helpers import rel_err, tiny_model
from tests.test_eval_lm_eval import TASK_DIR, offline, workdir  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_hf(**overrides) -> dt.DeepseekForCausalLM:
    torch.manual_seed(0)
    cfg = dt.DeepseekConfig.from_model_config(tiny_model(**overrides).config)
    return dt.DeepseekForCausalLM(cfg).eval()


def _ids(B=2, L=9, seed=1):
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(seed))


def _merged_by_hand(peft_model, lora_cfg) -> dt.DeepseekForCausalLM:
    """A plain model whose weights are W + (alpha / r) B A for every adapted Linear."""
    scale = lora_cfg.lora_alpha / lora_cfg.r
    sd = {}
    modules = dict(peft_model.base_model.model.named_modules())
    for name, t in peft_model.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        if ".base_layer." in name:
            owner = modules[name.rsplit(".base_layer.", 1)[0]]
            A, B = owner.lora_A["default"].weight, owner.lora_B["default"].weight
            t = t + scale * B @ A
            name = name.replace(".base_layer.", ".")
        sd[name] = t.detach().clone()
    plain = _tiny_hf()
    plain.load_state_dict(sd)
    return plain


def test_peft_lora_on_experts_matches_a_merge_by_hand_trains_and_round_trips(tmp_path, monkeypatch):
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    base = _tiny_hf()
    base(_ids())  # packed and on the fast path before PEFT wraps the expert Linears
    assert base.model.layers[1].mlp.experts.packed()
    model = get_peft_model(base, lora_cfg)
    experts = base.model.layers[1].mlp.experts
    assert experts.mode == "peft" and experts.packed()  # PEFT's base layers stay in the stacked tensors
    names = [n for n, _ in model.named_modules()]
    assert any(n.endswith("mlp.experts.3.up_proj") for n in names)
    assert any(n.endswith("mlp.shared_experts.gate_proj") for n in names)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # B = 0 would hide a skipped adapter
    ids = _ids()
    with torch.no_grad():
        got = model(ids).logits
        want = _merged_by_hand(model, lora_cfg)(ids).logits
        base = _tiny_hf()(ids).logits
        with model.disable_adapter():  # PEFT's switch, read by the stacked path on every forward
            off = model(ids).logits
        with monkeypatch.context() as m:  # the layer's other way: each expert module with PEFT's forward
            m.setattr(ExpertList, "mode", property(lambda self: "loop"))
            looped = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 and (looped - want).abs().max().item() <= 1e-5
    assert (off - base).abs().max().item() <= 1e-5
    assert (got - base).abs().max().item() > 1e-2  # the adapters change the output
    # One training step moves the adapters and nothing else.
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # (weight decay 0: on the stacked path an expert no token chose gets a zero gradient, not None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as m:  # the same step through PEFT's own per-module forward
        m.setattr(ExpertList, "mode", property(lambda self: "loop"))
        looped = model(ids, labels=ids)
    looped.loss.backward()
    assert abs(looped.loss.item() - out.loss.item()) <= 1e-6
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[n], p.grad) <= 1e-5, n
        elif n in grads:  # an expert no token chose: None there, zero on the stacked path
            assert grads[n].abs().max().item() == 0, n
    routed = [p.grad for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_A" in n]
    assert sum(g is not None and g.abs().sum().item() > 0 for g in routed) > 10  # the routed adapters learn
    opt.step()
    for n, p in model.named_parameters():
        moved = "lora_" in n and p.grad is not None and p.grad.abs().sum() > 0
        assert torch.equal(p, before[n]) != moved, n
    assert sum("lora_" in n and p.grad is not None for n, p in model.named_parameters()) > 60
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(TARGETS)
    back = PeftModel.from_pretrained(_tiny_hf(), tmp_path / "adapter")
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() <= 1e-6


def test_other_peft_wrappers_run_each_expert_module():
    # DoRA is not a plain low-rank term: the layer runs every expert module through PEFT's forward.
    model = get_peft_model(_tiny_hf(), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"], use_dora=True))
    experts = model.base_model.model.model.layers[1].mlp.experts
    calls = []
    experts[0].up_proj.register_forward_hook(lambda *_: calls.append(1))
    assert experts.mode == "loop"
    ids = _ids()
    with torch.no_grad():
        model(ids)
        with model.disable_adapter():
            off = model(ids).logits
    assert (off - _tiny_hf()(ids).logits).abs().max().item() <= 1e-5
    assert calls  # expert 0's wrapped Linear ran (when a token chose it)


def test_hf_trainer_runs_a_few_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_hf()
    rows = [{"input_ids": r, "labels": r} for r in _ids(8, 12, seed=3).tolist()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0)
    w = model.model.layers[1].mlp.experts[2].gate_proj.weight
    before = w.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    assert not torch.equal(w.detach(), before)  # the routed experts train through the stacked path
    assert model.model.layers[1].mlp.experts.packed()


def test_lm_eval_hf_model_scores_an_export_as_deepseekmoe_eval_does(offline):  # noqa: F811 - fixture
    # Both start every document with bos: lm-eval's add_bos_token (the tokenizer then adds it) and
    # deepseekmoe eval's --prefix bos (its default for this tokenizer_config, which asks for no bos, is eos).
    tasks = {"arc_easy_local": "arc_easy", "piqa_local": "piqa"}
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    args = f"pretrained={offline / 'hf'},trust_remote_code=True,dtype=float32,device=cpu,add_bos_token=True"
    theirs = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), task_manager=tm, batch_size=4,
                                     log_samples=True)
    out = offline / "ours_hf.json"
    assert cli.main(["eval", "--model", str(offline / "hf"), "--tasks", ",".join(tasks.values()), "--data-dir",
                     "benchmarks", "--batch-size", "4", "--prefix", "bos", "--log-samples", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["results"]
    for lm_task, task in tasks.items():
        r = theirs["results"][lm_task]
        assert (ours[task]["acc"], ours[task]["acc_norm"]) == (r["acc,none"], r["acc_norm,none"]), task
        samples = sorted(theirs["samples"][lm_task], key=lambda s: s["doc_id"])
        for s, mine in zip(samples, ours[task]["samples"], strict=True):
            lls = [ll for ll, _ in s["filtered_resps"]]
            assert mine["loglikelihoods"] == pytest.approx(lls, rel=1e-6, abs=1e-5), (task, s["doc_id"])


def test_text_generation_pipeline_on_an_export(workdir):  # noqa: F811 - fixture
    from transformers import pipeline

    from deepseekmoe import Transformer
    from deepseekmoe.data.tokenizer import Tokenizer
    from deepseekmoe.inference.generate import generate_ids

    pipe = pipeline("text-generation", model=str(workdir / "hf"), trust_remote_code=True, device="cpu")
    out = pipe("the cat sat on", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    tok = Tokenizer.from_file(workdir / "hf" / "tokenizer.json")
    ours = generate_ids(Transformer.from_pretrained(workdir / "hf"), [tok.encode("the cat sat on")], max_new_tokens=6,
                        eos_token_id=tok.eos_id)[0]
    assert out == tok.decode(ours) and out
