"""Data: tokenizer, `prepare` (corpus -> token shards), the packed resumable loader, the sample.

    from deepseekmoe.data import prepare, PackedLoader, default_dataset
    data_dir = default_dataset()                      # the shipped sample, 4096-entry BPE, cached
    loader = PackedLoader(data_dir, "train", seq_len=256, batch_size=16, seed=0)
    x = next(loader)                                  # int64 [16, 256]; the model shifts labels

The on-disk layout and every function's contract are in docs/data.md.
"""

from deepseekmoe.data.dataset import bits_per_byte, check_vocab, load_meta, unigram_entropy
from deepseekmoe.data.loader import PackedLoader, iter_eval_batches
from deepseekmoe.data.prepare import prepare
from deepseekmoe.data.sample import default_dataset
from deepseekmoe.data.tokenizer import Tokenizer, train_tokenizer


def load_tokenizer(data_dir) -> Tokenizer:
    """The tokenizer of a prepared dataset, with the bos/eos ids its meta.json records."""
    meta = load_meta(data_dir)
    from pathlib import Path

    return Tokenizer.from_file(Path(data_dir) / meta["tokenizer"], meta["bos_id"], meta["eos_id"])


__all__ = ["Tokenizer", "train_tokenizer", "prepare", "load_meta", "load_tokenizer", "PackedLoader",
           "iter_eval_batches", "default_dataset", "unigram_entropy", "bits_per_byte", "check_vocab"]
