"""Floating-point dtypes by name: the one map behind every --dtype flag, recipe field and config.json.

The full names are torch's (`float32`, `bfloat16`, `float16`: what config.json's `torch_dtype`
and the recipes hold); the short ones (`bf16`, `fp16`, `fp32`) are the command-line spellings.
Each user of the map accepts the subset it can use (`choices`) and `parse_dtype` names exactly
that subset, and the flag or field, when a value is not in it. "auto" means "let the caller
decide" and parses to None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepseekmoe.errors import ConfigError, suggest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ALL_NAMES = ("auto", *DTYPES, *SHORT_NAMES)
CLI_NAMES = ("auto", *SHORT_NAMES)  # generate, chat, eval, analyze --dtype
# What training computes in: float16 would need loss scaling, which the trainer does not do.
TRAINING_NAMES = ("float32", "bfloat16")


def parse_dtype(name: str, what: str, choices: Sequence[str] = ALL_NAMES) -> torch.dtype | None:
    """The torch dtype `name` stands for (None for "auto"); ConfigError naming `what` (the flag or
    field, e.g. "--dtype" or "system.dtype") and `choices` when `name` is not one of them."""
    if name not in choices:
        raise ConfigError(f"{what}={name!r}: choose one of {', '.join(choices)}" + suggest(str(name), choices))
    return None if name == "auto" else DTYPES[SHORT_NAMES.get(name, name)]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")
