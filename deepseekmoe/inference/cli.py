"""`deepseekmoe generate`: complete prompts with a checkpoint (released format or native).

    deepseekmoe generate --model deepseek-moe-16b-base --prompt "The capital of France is"

Shared with `deepseekmoe chat` (deepseekmoe/inference/chat.py): the sampling flags and
`load_for_inference`, which picks the device and dtype and finds the tokenizer.
"""

from __future__ import annotations

import json
import sys

import torch

from deepseekmoe.errors import ConfigError, DataError, utf8_text
from deepseekmoe.model.dtypes import CLI_NAMES, parse_dtype


def add_common_arguments(p, max_new_tokens: int = 128) -> None:
    from deepseekmoe.model.config import EXPERT_BACKENDS

    p.add_argument("--model", required=True,
                   help="checkpoint directory: released Hugging Face format, native, a training checkpoint, or a "
                        "run of `deepseekmoe train` / `deepseekmoe sft` (a LoRA run: its merged model, else the "
                        "base with the run's adapter)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) applied "
                        "on top of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=list(CLI_NAMES),
                   help="auto: the checkpoint's dtype on GPU, fp32 on CPU")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="most tokens to generate per reply (prompt + these must fit the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "cuda_graph", "compile"],
                   help="decode step execution: auto = cuda_graph on GPU, eager on CPU")
    p.add_argument("--expert-backend", default=None,
                   help=f"routed-expert backend for prefill ({', '.join(EXPERT_BACKENDS)})")


def check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")


def decode_utf8(data: bytes, where: str) -> str:
    """Bytes read from stdin as text; DataError naming the offset of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "give UTF-8 text (e.g. convert it with `iconv -t utf-8`)") from None


def stdin_bytes(line: bool = False) -> bytes:
    """All of stdin (or its next line) as bytes; a replaced sys.stdin without a buffer is read as text."""
    buf = getattr(sys.stdin, "buffer", None)
    if buf is not None:
        return buf.readline() if line else buf.read()
    return (sys.stdin.readline() if line else sys.stdin.read()).encode("utf-8", "surrogateescape")


def load_for_inference(args):
    """(model in eval mode, tokenizer, mode) from the common flags."""
    from deepseekmoe.checkpoint import hf
    from deepseekmoe.inference.generate import load_tokenizer
    from deepseekmoe.model.transformer import Transformer

    check_sampling(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    dtype = parse_dtype(args.dtype, "--dtype")  # any spelling: the lm-eval adapter passes torch names too
    if dtype is None and device.type == "cpu":
        dtype = torch.float32  # CPU bf16 matmuls are slow and lose digits
    from deepseekmoe.checkpoint.finetuned import finetuned_model

    adapter = getattr(args, "adapter", None)  # eval and the lm-eval adapter pass no --adapter
    found = None if adapter else finetuned_model(args.model)  # a LoRA fine-tuning run directory
    model_dir, adapter = found or (args.model, adapter)
    _, path = hf.find_checkpoint(model_dir)
    overrides = {"expert_backend": args.expert_backend} if args.expert_backend else {}
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, adapter=adapter, **overrides)
    tok_dir = args.tokenizer or path
    tok = load_tokenizer(tok_dir, model.config.bos_token_id, model.config.eos_token_id) \
        if _ids_fit(model) else load_tokenizer(tok_dir)
    mode = args.mode if args.mode != "auto" else ("cuda_graph" if device.type == "cuda" else "eager")
    return model, tok, mode


def _ids_fit(model) -> bool:
    V = model.config.vocab_size
    return all(isinstance(i, int) and 0 <= i < V for i in (model.config.bos_token_id, model.config.eos_token_id))


def sampling_kwargs(args, mode: str) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, stop=args.stop, seed=args.seed, mode=mode)


def add_arguments(p) -> None:
    add_common_arguments(p)
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (repeat for a batch); without it, one prompt is read from stdin")
    p.add_argument("--no-bos", action="store_true", help="do not start prompts with the bos token")
    p.add_argument("--no-stream", action="store_true", help="print the completion only when it is done")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion}")


def run(args) -> int:
    from deepseekmoe.inference.generate import generate

    prompts = [utf8_text(p, "--prompt") for p in args.prompt] or [decode_utf8(stdin_bytes(), "the prompt on stdin")]
    if any(not p for p in prompts):
        raise ConfigError("empty prompt: give some text with --prompt or on stdin")
    model, tok, mode = load_for_inference(args)
    kw = sampling_kwargs(args, mode)
    stream = len(prompts) == 1 and not args.no_stream and not args.json
    outs = generate(model, tok, prompts, stream=stream, add_bos=not args.no_bos, **kw)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, outs)], indent=2))
    elif stream:
        print()
    else:
        for i, (p, c) in enumerate(zip(prompts, outs)):
            if len(prompts) > 1:
                print(f"--- [{i}] {p}")
            print(c)
    return 0
