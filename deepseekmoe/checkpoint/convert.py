"""`deepseekmoe convert SRC DST`: native training checkpoints <-> the released Hugging Face format.

The direction is read off SRC: a native model directory (config.json with
`"format": "deepseekmoe"`, or a training checkpoint folder holding one as `model/`) becomes a
released-format directory; a released-format directory (config.json with `model_type:
"deepseek"`) becomes a native one. A sharded checkpoint of a distributed run (DCP) and a run
directory (its newest checkpoint) count as native sources. Both sides are written atomically, so
an interrupted conversion leaves DST as it was, and carry the tokenizer files (hf_files.TOKENIZER_FILES),
so the result can `generate`. A released-format DST is complete for transformers as well
(hf_files.write_transformers_files: remote code importing deepseekmoe.integrations.transformers,
tokenizer_config.json with the chat template, generation_config.json), so AutoModelForCausalLM
(trust_remote_code=True) and AutoTokenizer open it as it is. An unwritable DST is refused before
the source is read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from deepseekmoe.errors import CheckpointError
from deepseekmoe.model.dtypes import ALL_NAMES, parse_dtype


def add_arguments(p) -> None:
    p.add_argument("src", help="native model dir, training checkpoint (single-process or distributed), run "
                   "directory (its newest checkpoint), or a released-format dir")
    p.add_argument("dst", help="output directory (the other format)")
    p.add_argument("--dtype", default="auto", choices=sorted(ALL_NAMES),
                   help="dtype of the written weights (auto keeps the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="shard limit when writing the released format")
    p.add_argument("--tokenizer", default=None,
                   help="directory whose tokenizer files are copied next to the released-format weights")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def convert(src, dst, dtype: torch.dtype | None = None, max_shard_size="5GB", tokenizer=None,
            overwrite: bool = False) -> str:
    """Convert `src` into the other format at `dst`; return the direction ('hf' or 'native' written).
    The tokenizer files (of `tokenizer`, else of the source) are copied along either way."""
    from deepseekmoe.checkpoint import hf, hf_files, native
    from deepseekmoe.checkpoint.files import check_output
    from deepseekmoe.model.transformer import Transformer

    dst = Path(dst)
    if dst.is_dir() and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    check_output(dst, directory=True)  # before the (long) load: a file in the way, a read-only folder
    if Path(src).resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the output must differ from the input")
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise CheckpointError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    kind, path = hf.find_checkpoint(src)
    if kind == "dcp":
        with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
            exported = _export_dcp(path, Path(tmp) / "model")
            saved = path if (path / "tokenizer.json").is_file() else None  # the run's, copied in by dcp.save
            return convert(exported, dst, dtype, max_shard_size, tokenizer or saved, overwrite)
    model = Transformer.from_pretrained(path, dtype=dtype)
    if kind == "native":
        model.save_pretrained(dst, max_shard_size=max_shard_size, tokenizer_dir=tokenizer)
        return "hf"
    src_dir = Path(tokenizer or path)
    native.save_native(dst, model.config, model.state_dict(),
                       companions=[src_dir / f for f in hf_files.TOKENIZER_FILES if (src_dir / f).is_file()])
    return "native"


def _export_dcp(path: Path, out: Path) -> Path:
    """The model of a distributed (DCP) training checkpoint as a native model directory."""
    from deepseekmoe.checkpoint.dcp import export_native, verify

    return export_native(path, dcp_model_config(path, verify(path)), out)


def dcp_model_config(path: Path, state: dict):
    """The ModelConfig a DCP checkpoint's state.json records: the resolved config under "model";
    checkpoints written before that key hold only the recipe, whose model section is a preset name
    plus field overrides (TrainConfig.to_dict)."""
    from deepseekmoe.model import presets
    from deepseekmoe.model.config import ModelConfig

    if isinstance(state.get("model"), dict):
        return ModelConfig.from_dict(state["model"])
    section = dict((state.get("config") or {}).get("model") or {})
    if "preset" not in section:
        raise CheckpointError(f"{path}: its state.json records no model config (neither \"model\" nor a "
                              "recipe's \"config.model\"); not a deepseekmoe training checkpoint")
    return presets.get(section.pop("preset"), **section)


def run(args) -> int:
    dtype = parse_dtype(args.dtype, "--dtype")
    wrote = convert(args.src, args.dst, dtype, args.max_shard_size, args.tokenizer, args.overwrite)
    what = "released Hugging Face format" if wrote == "hf" else "native deepseekmoe format"
    print(f"wrote {args.dst} ({what})")
    return 0
