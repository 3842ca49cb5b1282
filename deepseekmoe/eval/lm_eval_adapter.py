"""An adapter for EleutherAI's lm-evaluation-harness (the optional `eval` extra).

    pip install 'deepseekmoe[eval]'
    import lm_eval
    from deepseekmoe.eval.lm_eval_adapter import make_lm
    lm = make_lm(pretrained="deepseek-moe-16b-base", dtype="bfloat16", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "piqa"])

lm-eval's own command line, with `deepseekmoe` registered as a model:

    python -m deepseekmoe.eval.lm_eval_adapter --model deepseekmoe \
        --model_args pretrained=DIR,dtype=bfloat16 --batch_size 16 --tasks hellaswag

`--model_args` takes the keys of lm-eval's `hf` model that make sense here (pretrained, tokenizer,
dtype, device, batch_size, max_batch_size, max_length, max_gen_toks, prefix_token_id,
trust_remote_code) plus `prefix` (auto|bos|eos); any other key is an error. The device is chosen
as `hf` chooses it: one this machine has is used; none, "auto", or one it lacks (lm-eval's command
line passes cuda:0 by default) becomes cuda when available, else cpu.

The logic lives in `DeepSeekMoEEvalLM`, which needs nothing from lm-eval: it answers the three
request kinds of lm-eval's `LM` interface from objects with an `args` tuple,
  loglikelihood          args (context, continuation)  -> (sum log p, continuation is greedy)
  loglikelihood_rolling  args (text,)                  -> sum log p of the whole text
  generate_until         args (context, gen_kwargs)    -> completion, cut before the first `until`
with the same batching, truncation and document-start token as `deepseekmoe eval` (a Scorer).
`make_lm` / `lm_eval_class` import lm-eval lazily and mix the class into its `LM` base; without
lm-eval they raise one UserError saying how to install it.
"""

from __future__ import annotations

import argparse
import sys

from deepseekmoe.errors import ConfigError, UserError
from deepseekmoe.eval.scoring import Scorer, default_prefix

INSTALL_HINT = "lm-eval is not installed: `pip install 'deepseekmoe[eval]'` (or `pip install lm-eval`)"


class DeepSeekMoEEvalLM:
    """lm-eval's three request kinds answered by a deepseekmoe model.

    Either pass a loaded `model` and `tokenizer` (and optionally `prefix_id`), or `pretrained`:
    a checkpoint directory opened like `deepseekmoe eval --model` does."""

    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype="auto", max_length: int | None = None, prefix: str = "auto",
                 prefix_id: int | None = None, max_gen_toks: int = 256, progress: bool = True,
                 max_batch_size: int | None = None, prefix_token_id: int | None = None,
                 trust_remote_code: bool = False, **unknown):
        # trust_remote_code is accepted so that `hf` model_args carry over: the model code is this package.
        if unknown:
            raise ConfigError(f"model_args {', '.join(sorted(unknown))}: not accepted by the deepseekmoe model; "
                              f"keys: {', '.join(MODEL_ARGS)}")
        mode = "eager"
        tok_dir = None
        if model is None:
            if pretrained is None:
                raise ConfigError("DeepSeekMoEEvalLM needs a model (and tokenizer) or pretrained=DIR")
            from deepseekmoe.eval.cli import open_model

            ns = argparse.Namespace(model=str(pretrained), tokenizer=None if tokenizer is None else str(tokenizer),
                                    device=resolve_device(device), dtype=_dtype_name(dtype), expert_backend=None,
                                    batch_size=1)
            model, tokenizer, tok_dir, mode = open_model(ns)
            tok_dir = tok_dir.parent if tok_dir.is_file() else tok_dir
        if tokenizer is None:
            raise ConfigError("DeepSeekMoEEvalLM: a model given directly needs its tokenizer too")
        if prefix_id is None:
            prefix_id = prefix_token_id
        if prefix_id is None:
            prefix_id = default_prefix(model, tokenizer, tok_dir, prefix)
        self.scorer = Scorer(model, tokenizer, prefix_id, batch_size=_batch_size(batch_size, max_batch_size),
                             max_length=max_length, progress=progress, gen_mode=mode)
        self.max_gen_toks = int(max_gen_toks)

    # lm-eval reads these on its models
    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def device(self):
        return self.scorer.device

    @property
    def eot_token_id(self) -> int:
        return self.scorer.prefix_id

    def tok_encode(self, text: str) -> list[int]:
        return self.scorer.encode(text)

    def tok_decode(self, ids) -> str:
        return self.scorer.tok.decode(ids)

    # ------------------------------------------------------------------ the three request kinds
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        if not pairs:
            return []
        return self.scorer.loglikelihood(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        ids = [self.scorer.encode(r.args[0]) for r in requests]
        return [-nll for nll, _ in self.scorer.rolling_nll(ids, desc="loglikelihood_rolling")]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same settings go to the decoder together, in their original order.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1] if len(r.args) > 1 and r.args[1] else {})
            if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
                raise UserError("generate_until: only greedy decoding is supported (do_sample=False or "
                                "temperature=0), as benchmark scoring uses")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = self.scorer.generate([requests[i].args[0] for i in idx], max_new, until, desc="generate_until")
            for i, t in zip(idx, texts):
                out[i] = t
        return out


MODEL_ARGS = ("pretrained", "tokenizer", "dtype", "device", "batch_size", "max_batch_size", "max_length",
              "max_gen_toks", "prefix", "prefix_token_id", "trust_remote_code")


def resolve_device(device: str | None) -> str:
    """The device lm-eval's `hf` model would pick: `device` when this machine has it; else (None,
    "auto", or e.g. lm-eval's default cuda:0 on a machine without CUDA) cuda when available, else cpu."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    auto = "cuda" if n else "cpu"
    if device in (None, "", "auto"):
        return auto
    have = {"cpu", *(["cuda"] if n else []), *(f"cuda:{i}" for i in range(n))}
    if torch.backends.mps.is_available():
        have |= {"mps", "mps:0"}
    if str(device) not in have:
        print(f"deepseekmoe lm-eval: device {device!r} is not available here; using {auto} "
              "(as lm-eval's hf model does)", file=sys.stderr)
        return auto
    return str(device)


def _dtype_name(dtype) -> str:
    """'auto' for None; a torch dtype (hf accepts those too) by its name; strings as given."""
    import torch

    if dtype is None:
        return "auto"
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def _batch_size(batch_size, max_batch_size) -> int:
    """An int from lm-eval's batch_size: a number, or "auto" / "auto:N" (no out-of-memory probing
    here: 8, capped by max_batch_size)."""
    text = str(batch_size)
    if text.startswith("auto"):
        return max(1, min(8, int(max_batch_size or 8)))
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"batch_size={batch_size!r}: give a number or 'auto'") from None


def _import_lm():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise UserError(INSTALL_HINT) from e
    return LM


_CLASS = None


def lm_eval_class():
    """`DeepSeekMoEEvalLM` mixed into lm-eval's `LM` base class (imports lm-eval)."""
    global _CLASS
    if _CLASS is None:
        LM = _import_lm()

        class DeepSeekMoELM(DeepSeekMoEEvalLM, LM):
            def __init__(self, *args, **kwargs):
                LM.__init__(self)
                DeepSeekMoEEvalLM.__init__(self, *args, **kwargs)

        _CLASS = DeepSeekMoELM
    return _CLASS


def make_lm(**kwargs):
    """An lm-eval model object: make_lm(pretrained=DIR, batch_size=8, device='auto', dtype='auto', ...)."""
    return lm_eval_class()(**kwargs)


def register(name: str = "deepseekmoe"):
    """Register the class under `name` in lm-eval's model registry (idempotent); return it."""
    cls = lm_eval_class()
    from lm_eval.api import registry

    try:  # lm-eval fills its registry with its own models (hf, ...) only while it is empty: first theirs
        import lm_eval.models  # noqa: F401
    except ImportError:  # an lm-eval without that package: nothing of its own to keep
        pass

    if name not in getattr(registry, "MODEL_REGISTRY", {}):
        registry.register_model(name)(cls)
    return cls


def main() -> None:
    """lm-eval's command line (`lm_eval ...`) with `deepseekmoe` registered as a model."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
