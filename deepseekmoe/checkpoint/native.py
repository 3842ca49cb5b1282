"""The project's native model directory (what training checkpoints and `deepseekmoe convert`
exchange), written atomically (deepseekmoe.checkpoint.files):

    config.json        {"format": "deepseekmoe", "model": ModelConfig.to_dict()}
    model.safetensors  the Transformer's state_dict under this project's parameter names
    tokenizer.json     (and the other hf_files.TOKENIZER_FILES) when the model has a tokenizer
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from deepseekmoe.checkpoint.files import atomic_directory
from deepseekmoe.errors import CheckpointError

NATIVE_FORMAT = "deepseekmoe"


# ---------------------------------------------------------------------- native model directory
def save_native(path: str | Path, cfg, state_dict: dict[str, torch.Tensor], extra: dict | None = None,
                companions: Iterable[Path] = ()) -> None:
    """Write config.json + model.safetensors atomically (a finished directory or nothing), with the
    `companions` files (the tokenizer) copied in beside them."""
    from safetensors.torch import save_file

    tensors = {k: cpu_for_save(v) for k, v in state_dict.items()}
    _untie(tensors)
    meta = {"format": NATIVE_FORMAT, "model": cfg.to_dict(), **(extra or {})}
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in companions:
            shutil.copyfile(f, tmp / Path(f).name)


def cpu_for_save(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, contiguous and on the CPU, in storage of its own when it was a view into a
    larger one (the decode packing's q|k|v and gate|up row slices, inference/packing.py): older
    safetensors releases refuse tensors that share storage. A whole-storage tensor is not copied,
    so tied embeddings still share theirs (`_untie` saves them once)."""
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _untie(tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared storage; tied embeddings are saved once and re-tied on load.
    if "lm_head.weight" in tensors and "embed_tokens.weight" in tensors:
        a, b = tensors["lm_head.weight"], tensors["embed_tokens.weight"]
        if a.data_ptr() == b.data_ptr():
            del tensors["lm_head.weight"]


def is_native(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: the loader names the damage
        return False
    return isinstance(cfg, dict) and cfg.get("format") == NATIVE_FORMAT


def load_native(path: str | Path, device="cpu"):
    """Read a native model directory -> (ModelConfig, state_dict). Clear errors on damage."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from deepseekmoe.model.config import ModelConfig

    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{path}: not a deepseekmoe model directory (needs config.json and "
                              "model.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: corrupted JSON ({e})") from e
    if meta.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{cfg_path}: not a deepseekmoe checkpoint (format={meta.get('format')!r}); "
                              "for the released Hugging Face format use Transformer.from_pretrained")
    cfg = ModelConfig.from_dict(meta["model"])
    try:
        sd = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{w_path}: unreadable or truncated weights ({e})") from e
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return cfg, sd
