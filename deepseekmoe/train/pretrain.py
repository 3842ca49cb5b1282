"""What pretraining reads: a prepared dataset, opened and checked before the trainer writes anything
(an empty training split, a missing or too short validation split, token ids beyond the model's
vocabulary: one DataError each). Fine-tuning reads chat records instead (train/sft.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deepseekmoe.errors import DataError
from deepseekmoe.train.recipe import TrainConfig


@dataclass
class PretrainData:
    """A prepared dataset (`deepseekmoe prepare`), checked: where it is, its meta.json, the validation split."""

    path: Path
    meta: dict
    val_split: str


def open_pretrain_data(cfg: TrainConfig, vocab_size: int) -> PretrainData:
    """The dataset of `cfg.data`, with every problem a run would meet later raised now (DataError)."""
    from deepseekmoe import data  # the data package (tokenizer, prepare, loader) loads on first use

    if cfg.data.path:
        path = Path(cfg.data.path)
    else:
        path = Path(data.default_dataset(progress=cfg.log.progress))
    meta = data.load_meta(path)  # DataError on a missing, unprepared or damaged directory
    splits = meta.get("splits", {})
    if not splits.get("train", {}).get("tokens"):
        raise DataError(f"{path}: the training split is empty; prepare the dataset from a non-empty corpus")
    if cfg.data.val_split not in splits:
        raise DataError(f"{path}: no split {cfg.data.val_split!r} for validation (has: {', '.join(splits)}); "
                        "set --data.val_split")
    val_tokens = splits[cfg.data.val_split].get("tokens")
    if val_tokens is not None and val_tokens < cfg.train.seq_len:  # the final validation needs one window
        raise DataError(f"{path}: the {cfg.data.val_split!r} split has {val_tokens} tokens, fewer than "
                        f"train.seq_len={cfg.train.seq_len}; use a shorter --train.seq_len or prepare a larger "
                        "validation split")
    data.check_vocab(meta, vocab_size)  # token ids beyond the model's vocabulary
    return PretrainData(path, meta, cfg.data.val_split)
