"""`DeepseekForCausalLM.generate` on this project's decoder (inference/generate.py) when the call
is one it computes the same way: greedy or plain sampling, one beam, no streamer, no custom
logits processors or stopping criteria, input ids in, sequences out. Anything else goes to
transformers' own `GenerationMixin.generate` unchanged.

Why: transformers' generate loop adds host work per token (logits processors, stopping criteria,
cache bookkeeping) and its static-cache compile cannot take the project's decode-step fusions,
so on a GPU it ran 12-25% behind `deepseekmoe generate` on the same weights (docs/benchmarks.md).
The decoder runs the class's own modules (its embedding, blocks, norm and head, shared, not
copied) through a `Transformer` shell, so adapters and weight changes are seen at once.

When: `model.fast_generate` = "auto" (default: CUDA weights, eval mode), True (always, e.g. to
test it on a CPU) or False (never). `model.fast_generate_mode` picks the decoder's mode
("compile" on CUDA by default: the first call of a batch size compiles; "eager" on CPU).

What comes back is what transformers returns for such a call: the prompts (as given, left
padding kept) followed by the new tokens, each row's eos kept and the rows that ended early
filled with pad_token_id, as long as the longest row.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# GenerationConfig fields a call may set (to anything) and still take the fast path, besides
# those that only matter when a GenerationConfig is written or validated.
_SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
              "pad_token_id", "bos_token_id", "cache_implementation", "use_cache", "num_beams",
              "num_return_sequences", "min_new_tokens", "min_length", "_from_model_config", "transformers_version",
              "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
              "output_hidden_states", "compile_config", "disable_compile"}
# generate() keyword arguments that name a feature the fast path does not have.
_UNSUPPORTED_KWARGS = {"streamer", "logits_processor", "stopping_criteria", "assistant_model",
                       "prefix_allowed_tokens_fn", "synced_gpus", "negative_prompt_ids",
                       "negative_prompt_attention_mask", "inputs_embeds",
                       "past_key_values", "use_model_defaults", "custom_generate", "assistant_tokenizer", "tokenizer"}


def transformer_shell(model):
    """A `Transformer` holding the class's modules (nothing copied), for the project's decoder."""
    from deepseekmoe.model.transformer import Blocks, Transformer

    inner = model.model
    shell = Transformer.__new__(Transformer)
    nn.Module.__init__(shell)
    shell.config = inner.model_config
    shell.embed_tokens = inner.embed_tokens
    shell.layers = Blocks({str(i): block for i, block in enumerate(inner.layers)})
    shell.norm = inner.norm
    shell.lm_head = model.lm_head
    return shell


def _ids_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def plan(model, inputs, kwargs: dict) -> dict | None:
    """The decoder's arguments for this generate() call, or None where transformers' own loop
    must run it (an unsupported feature, or the fast path switched off)."""
    want = getattr(model, "fast_generate", "auto")
    weight = model.lm_head.weight
    if want is False or (want == "auto" and (weight.device.type != "cuda" or model.training)):
        return None
    if _UNSUPPORTED_KWARGS & {k for k, v in kwargs.items() if v is not None}:
        return None
    ids = kwargs.get("input_ids", inputs)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        return None
    gen_kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "generation_config")}
    import copy

    gc = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    unused = gc.update(**gen_kwargs)
    if unused or set(gc.to_diff_dict()) - _SUPPORTED:
        return None
    # transformers 5 leaves unset fields None (4.x: their defaults, 1 / False).
    if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1 or gc.return_dict_in_generate:
        return None
    eos = _ids_list(gc.eos_token_id)
    if eos and ((gc.min_new_tokens or 0) > 0 or (gc.min_length or 0) > ids.shape[1]):
        return None  # a minimum length masks eos: transformers' processors do that
    new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - ids.shape[1]
    if new < 1:
        return None
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    sample = bool(gc.do_sample)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    return {"ids": ids, "mask": mask.bool(), "max_new_tokens": int(new), "eos": eos, "pad": int(pad),
            "temperature": float(gc.temperature or 1.0) if sample else 0.0,
            "top_k": int(gc.top_k or 0) if sample else 0, "top_p": float(gc.top_p or 1.0) if sample else 1.0}


def fast_generate(model, p: dict) -> torch.LongTensor:
    """Run a plan() on the project's decoder; the sequences transformers would return."""
    from deepseekmoe.inference.generate import generate_ids

    ids, mask = p["ids"], p["mask"]
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]
    cuda = model.lm_head.weight.device.type == "cuda"
    mode = getattr(model, "fast_generate_mode", None) or ("compile" if cuda else "eager")
    eos = set(p["eos"])
    # A row ends on its eos, which it keeps (as transformers does): stop on it rather than drop it.
    rows = generate_ids(transformer_shell(model), prompts, max_new_tokens=p["max_new_tokens"],
                        temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"], pad_token_id=p["pad"],
                        mode=mode, should_stop=(lambda _b, out: out[-1] in eos) if eos else None)
    width = max(len(r) for r in rows)
    tail = torch.full((len(rows), width), p["pad"], dtype=torch.long)
    for b, r in enumerate(rows):
        tail[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat([ids, tail.to(ids.device)], dim=1)
