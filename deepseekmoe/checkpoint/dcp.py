"""Sharded checkpoints with torch.distributed.checkpoint (DCP), loadable at another world size.

Every rank writes only its own shards (FSDP shards, its experts); DCP records the global shape
and offsets of each piece, so a checkpoint saved by 4 ranks as dp2 x ep2 loads on 2 ranks as ep2,
on 8 ranks, or in one process without any process group. Parameter names are the plain
Transformer's (`layers.1.mlp.experts.w13`): get_model_state_dict strips the activation
checkpointing and compile wrappers, and DTensors carry the layout.

Directory layout (one checkpoint):

    <dir>/.metadata, <dir>/__*_*.distcp     DCP: model + optimizer state, sharded
    <dir>/state.json                        `extra` (step, data position, ...), written by rank 0

Crash safety: all ranks write into the temporary `.<dir>.partial.tmp` (files.temp_name: one
name every rank agrees on); after a barrier (every rank's files are fsynced by DCP) rank 0 writes
state.json last and renames the folder to `<dir>` (files.replace_directory), so `<dir>` exists
only when complete. A rank dying mid-save leaves that temporary, which the next save of the same
step replaces and the next start removes (training.remove_stale_temporaries, in one process too),
and the previous checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deepseekmoe.checkpoint.files import atomic_write_text, fsync_dir, is_temporary, replace_directory, temp_name
from deepseekmoe.errors import CheckpointError

STATE_FILE = "state.json"
PARTIAL_TAG = "partial"  # the temporary every rank writes into: .<dir>.partial.tmp


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes a single process' whenever no process group exists: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_dcp_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


# Optimizer state flattened to one entry per parameter ("state.<fqn>.exp_avg",
# "param_groups.<fqn>.lr"): ranks holding different parameters (pipeline stages) never write the
# same key, and a loader at another layout picks exactly the entries of its own parameters.
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def _states(models, optimizers) -> list[tuple[dict, dict | None]]:
    return [(get_model_state_dict(m, options=_OPTS),
             None if o is None else get_optimizer_state_dict(m, o, options=_OPTS))
            for m, o in zip(models, optimizers)]


def _merged(states) -> dict:
    """One state dict for all (stage) modules of this rank; the tensors are shared with `states`,
    so an in-place DCP load fills both."""
    out: dict = {"model": {}, "optim": {}}
    for model_sd, optim_sd in states:
        out["model"].update(model_sd)
        if optim_sd is not None:
            out["optim"].update(optim_sd)
    if not out["optim"]:
        out.pop("optim")
    return out


def _as_lists(model, optimizer):
    models = model if isinstance(model, (list, tuple)) else [model]
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer] * len(models)
    return list(models), list(optimizers)


def save(path: str | Path, model, optimizer=None, extra: dict | None = None,
         files: dict[str, str | Path] | None = None) -> Path:
    """Save model (+ optimizer) shards and `extra` (JSON) to `path`, atomically. Called by every
    rank. `model`/`optimizer` may be lists (pipeline stages held by this rank). `files` maps names
    inside the checkpoint to files rank 0 copies in (e.g. the tokenizer)."""
    path = Path(path)
    partial = temp_name(path, PARTIAL_TAG)
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    models, optimizers = _as_lists(model, optimizer)
    with _quiet():
        dcp.save(_merged(_states(models, optimizers)), checkpoint_id=str(partial), no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        for name, src in (files or {}).items():
            if Path(src).is_file():
                shutil.copyfile(src, partial / name)
        atomic_write_text(partial / STATE_FILE, json.dumps(extra or {}, indent=1, sort_keys=True))
        fsync_dir(partial)
        replace_directory(partial, path)
    _barrier()
    return path


def verify(path: str | Path) -> dict:
    """Check that a DCP checkpoint is complete (every shard file its metadata names exists and is
    long enough) and return its state.json; CheckpointError naming the problem otherwise."""
    path = Path(path)
    if not is_dcp_checkpoint(path):
        hint = " (an unfinished save: a rank died while writing it)" if is_temporary(path.name) else ""
        raise CheckpointError(f"{path} is not a complete distributed checkpoint{hint}: expected .metadata "
                              f"and {STATE_FILE}; point --resume at a finished checkpoint directory")
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged .metadata fails in pickle or in DCP
        raise CheckpointError(f"checkpoint {path} is corrupted (unreadable .metadata: {type(e).__name__})") from e
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: shard {rel} is missing")
        if f.stat().st_size < size:
            raise CheckpointError(f"checkpoint {path} is truncated: shard {rel} has {f.stat().st_size} bytes, "
                                  f"its metadata needs {size}")
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} ({e})") from e


def export_native(path: str | Path, cfg, out_dir: str | Path, dtype=None) -> Path:
    """Write the model of DCP checkpoint `path` as a native model directory (config.json +
    model.safetensors, what `deepseekmoe convert` / `generate` read), in this process alone (no
    process group needed; memory: the whole model on CPU). `cfg` is its ModelConfig."""
    from deepseekmoe.checkpoint.native import save_native
    from deepseekmoe.model.transformer import Transformer

    model = Transformer(cfg)
    load(path, model, no_dist=True)
    sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in model.state_dict().items()}
    save_native(out_dir, cfg, sd)
    return Path(out_dir)


def load(path: str | Path, model, optimizer=None, no_dist: bool | None = None) -> dict:
    """Load a checkpoint written by `save` (at any world size) into this rank's model (+ optimizer),
    whatever their layout; return the `extra` dict. Raises CheckpointError if `path` is not a
    complete checkpoint or does not fit the model. `no_dist=True` loads in this process alone
    (plain, unsharded modules) even while a process group exists."""
    path = Path(path)
    extra = verify(path)
    models, optimizers = _as_lists(model, optimizer)
    states = _states(models, optimizers)
    try:
        with _quiet():
            dcp.load(_merged(states), checkpoint_id=str(path),
                     no_dist=not dist.is_initialized() if no_dist is None else no_dist)
    except Exception as e:  # noqa: BLE001 - DCP raises several types for a mismatch
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path}: {msg}; the checkpoint does not match this model "
                              "(check the model config / recipe it was trained with)") from e
    for model_, opt, (model_sd, optim_sd) in zip(models, optimizers, states):
        set_model_state_dict(model_, model_sd, options=_OPTS)
        if opt is not None:
            set_optimizer_state_dict(model_, opt, optim_sd, options=_OPTS)
    return extra
