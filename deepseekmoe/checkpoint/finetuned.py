"""What a fine-tuning run directory (train/sft.py) holds for the commands that load models:
`adapter/` (the LoRA adapter, PEFT's format, naming its base) and, with `lora.merge`, `merged/`
(the merged model, released format). `finetuned_model` maps such a directory to what `generate`,
`chat` and `eval --model RUN` load; any other path is `hf.find_checkpoint`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepseekmoe.errors import CheckpointError

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def finetuned_model(path: str | Path) -> tuple[Path, Path | None] | None:
    """For a fine-tuned LoRA run directory: (model directory, adapter directory or None) to load,
    the merged model when the run wrote one, else the base and the run's adapter. None for any
    other path (a model directory, a full fine-tuning or pretraining run: find_checkpoint's)."""
    run_dir = Path(path)
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return None
    if (run_dir / MERGED_DIR / "config.json").is_file():
        return run_dir / MERGED_DIR, None
    base = _adapter_base(run_dir / ADAPTER_DIR)
    if base is None or not base.exists():
        raise CheckpointError(f"{run_dir}: its adapter's base model {base} is gone; load the base with --model BASE "
                              f"--adapter {run_dir / ADAPTER_DIR}")
    return base, run_dir / ADAPTER_DIR


def _adapter_base(adapter: Path) -> Path | None:
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(base) if base else None
