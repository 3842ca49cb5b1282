"""Training checkpoints: written atomically, verified on load, pruned to the last N.

A checkpoint is a directory `<run>/checkpoints/step_NNNNNNN/`:

    model/            a native model directory (config.json + model.safetensors, read by
                      `deepseekmoe convert`), plus the run's tokenizer.json
    optimizer.pt      AdamW state (torch.save; loaded with weights_only=True)
    state.json        step, resolved TrainConfig, data-loader position, RNG states (python,
                      numpy, torch CPU, CUDA), counters
    manifest.json     size and SHA-256 of every other file, written last

The directory is assembled under a temporary name and renamed into place only when complete
(deepseekmoe.checkpoint.files.atomic_directory), so a crash or a full disk during a save leaves the previous
checkpoints untouched; old checkpoints are renamed out of the way before they are deleted
(files.prune), and `remove_stale_temporaries` clears what a killed process left. Loading checks
the manifest first: a truncated or altered file raises one CheckpointError naming the file, never
a deep torch/safetensors traceback.

Distributed runs (torchrun) write the same directory names as sharded DCP checkpoints instead
(deepseekmoe.checkpoint.dcp: .metadata, shards, state.json); `verify` and `load_weights`
recognise them and load them at any world size, one process included.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from deepseekmoe.checkpoint.files import atomic_directory, prune, remove_temporaries, write_failure
from deepseekmoe.checkpoint.native import load_native, save_native
from deepseekmoe.errors import CheckpointError

FORMAT = "deepseekmoe-train"
VERSION = 1
PREFIX = "step_"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed process left among the checkpoints (ours by name): half-written ones
    (`.step_N.*.tmp`, a distributed save's `.step_N.partial.tmp` included) and half-deleted ones
    (`.step_N.old`). Run by rank 0 at the start of every run and resume, before anything is saved.
    Returns what was removed."""
    return remove_temporaries(Path(run_dir) / "checkpoints", PREFIX)


# ---------------------------------------------------------------------- RNG states as JSON
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------- save
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict, tokenizer: Path | None = None, keep: int = 2, protect: str | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` (files.prune: each
    is renamed out of the listing before it is deleted) and the one named `protect` (the trainer's
    last checkpoint known good, train/recovery.py).

    A failure (a full disk included) raises CheckpointError; the earlier checkpoints stay as
    they were and no partial directory is left."""
    target = step_dir(run_dir, step)
    try:
        with atomic_directory(target) as tmp:
            save_native(tmp / "model", model.config, model.state_dict())
            if tokenizer is not None and Path(tokenizer).is_file():
                shutil.copyfile(tokenizer, tmp / "model" / "tokenizer.json")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            full = {"format": FORMAT, "version": VERSION, "step": step, **state}
            (tmp / "state.json").write_text(json.dumps(full, indent=1, sort_keys=True))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                        for p in files}
            (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": manifest}, indent=1))
    except Exception as e:  # OSError, and the RuntimeError / SafetensorError that wrap write failures
        earlier = [p.name for p in list_checkpoints(run_dir)]
        kept = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        why = write_failure(e, run_dir, _state_bytes(model, optimizer))
        raise CheckpointError(f"could not save checkpoint {target} ({why}); {kept}. Free space (or "
                              f"choose another --out) and continue with --resume {run_dir}") from e
    prune(prunable_order(list_checkpoints(run_dir), keep, protect)[:-keep])
    return target


def prunable_order(found: list[Path], keep: int, protect: str | None) -> list[Path]:
    """`found` (oldest first) without the checkpoint named `protect` among those `[:-keep]` prunes:
    what `prune(result[:-keep])` deletes is all but the newest `keep` and `protect` (the form the
    distributed save's listing takes too)."""
    old, new = found[:-keep], found[-keep:]
    return [p for p in old if p.name != protect] + new


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for st in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


# ---------------------------------------------------------------------- find and verify
def resolve(spec: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such checkpoint or run directory")
    if any((path / name).exists() for name in ("manifest.json", "state.json", ".metadata")):
        return path  # a checkpoint (native or DCP), complete or not: verify says which
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {spec}: no checkpoint in this directory (expected "
                          f"{path}/checkpoints/{PREFIX}NNNNNNN/ or a checkpoint directory itself)")


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest; return the parsed state.json."""
    ckpt = Path(ckpt)
    if (ckpt / ".metadata").exists():  # a sharded checkpoint of a distributed run (DCP)
        from deepseekmoe.checkpoint.dcp import verify as verify_dcp

        return _check_state(ckpt, verify_dcp(ckpt))
    others = [p.name for p in list_checkpoints(ckpt.parent.parent) if p != ckpt] if ckpt.parent.name == \
        "checkpoints" else []
    hint = f"; earlier checkpoints you can resume from: {', '.join(others)}" if others else ""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = manifest["files"]
        for rel, info in files.items():  # the shape every entry is read with below
            _ = str(rel), int(info["size"]), str(info["sha256"])
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no manifest.json){hint}") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupted (unreadable manifest.json){hint}") from e
    for rel, info in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {rel} is missing{hint}")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {ckpt} is truncated or corrupted: {rel} has {size} bytes, "
                                  f"expected {info['size']}{hint}")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt} is corrupted: {rel} does not match its checksum{hint}")
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable state.json ({e}){hint}") from e
    return _check_state(ckpt, state, hint)


# What a resume reads from state.json (the rest is optional: counters default to 0).
REQUIRED = ("step", "config", "data", "rng")


def _check_state(ckpt: Path, state, hint: str = "") -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{ckpt} is not a deepseekmoe training checkpoint (format={fmt!r}){hint}")
    missing = [k for k in REQUIRED if k not in state]
    if missing or not isinstance(state["step"], int) or not isinstance(state["config"], dict):
        what = f"no {', '.join(missing)}" if missing else "a wrongly typed step or config"
        raise CheckpointError(f"checkpoint {ckpt}: state.json is damaged ({what}){hint}")
    return state


def load_weights(ckpt: Path, model, optimizer, device: torch.device) -> None:
    """Load model (and optimizer) state from a verified checkpoint into built objects (lists of
    them: the stages a pipeline rank holds, DCP checkpoints only)."""
    ckpt = Path(ckpt)
    if (ckpt / ".metadata").exists():  # DCP: resharded to this run's layout, any world size
        from deepseekmoe.checkpoint.dcp import load as load_dcp

        load_dcp(ckpt, model, optimizer)
        return
    import torch.distributed as dist

    if isinstance(model, (list, tuple)) or (dist.is_initialized() and dist.get_world_size() > 1):
        raise CheckpointError(f"checkpoint {ckpt} was written by a single process (native model + optimizer.pt); a "
                              "distributed run resumes sharded (DCP) checkpoints only: continue it in one process")
    cfg, sd = load_native(ckpt / "model", device="cpu")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape mismatch"
        raise CheckpointError(f"checkpoint {ckpt} does not match the model being trained ({first}); "
                              "resume with the run's own config (drop --model.* overrides)") from e
    if optimizer is None:
        return
    try:
        osd = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(osd)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer state unreadable or mismatched ({e})") from e
