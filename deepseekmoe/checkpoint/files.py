"""Crash-safe file output: nothing is ever written, replaced or deleted in place.

Files and directories are written under a temporary name in the same folder, flushed with fsync,
and renamed over the target, so a crash or a full disk leaves either the old output or the new
one, never half of one. One naming convention marks every leftover a kill can leave:

    .<name>.<tag>.tmp   being written (`temp_name`, TEMP_SUFFIX): `atomic_write_*` and
                        `atomic_directory` use a random tag, a distributed (DCP) save the fixed
                        tag `partial` that all its ranks agree on
    .<name>.old         being replaced or deleted (`old_name`, OLD_SUFFIX)

A directory being replaced or deleted (`replace_directory`, `prune`) is first renamed to its
`.old` name, so it leaves listings at once and a kill at any moment never leaves a half-written
or half-deleted directory under its real name; `remove_temporaries` deletes what a killed
process left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def temp_name(path: str | Path, tag: str) -> Path:
    """The temporary name of `path` being written: `.<name>.<tag>.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}{TEMP_SUFFIX}")


def old_name(path: str | Path) -> Path:
    """The name `path` is moved to before it is deleted: `.<name>.old` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{OLD_SUFFIX}")


def is_temporary(name: str, prefix: str = "") -> bool:
    """Whether `name` is a temporary (being written or being deleted) of an output named `prefix`..."""
    return name.startswith(f".{prefix}") and name.endswith((TEMP_SUFFIX, OLD_SUFFIX))


def remove_temporaries(root: str | Path, prefix: str = "") -> list[Path]:
    """Delete the temporaries a killed process left in `root` (those of outputs named `prefix`...);
    return what was removed. Only for folders no other process is writing into."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if is_temporary(p.name, prefix) and _remove(p):
                removed.append(p)
    return removed


def _remove(path: Path) -> bool:
    """Delete a file or directory; on failure say what was left and return False (what is left is
    a temporary, harmless under its name, and tried again at the next start)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return True
    except OSError as e:
        warnings.warn(f"could not delete {path} ({e.strerror or e}); it is removed at the next start",
                      RuntimeWarning, stacklevel=3)
        return False


def fsync_dir(path: Path) -> None:
    """Make the renames inside `path` durable (where the filesystem can: not every one opens or
    fsyncs a directory, and then there is nothing more a process can do)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        _warn_no_dir_fsync(e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        _warn_no_dir_fsync(e)
    finally:
        os.close(fd)


def _warn_no_dir_fsync(e: OSError) -> None:
    # One message text, so Python's default filter shows it once, not once per directory.
    warnings.warn(f"this filesystem cannot fsync a directory ({e.strerror}); renames are only as durable "
                  "as it makes them", RuntimeWarning, stacklevel=3)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # the error to report is the one being raised
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _move_aside(path: Path) -> Path:
    """Rename `path` to its `.old` name (atomic: it is gone from its real name at once)."""
    old = old_name(path)
    if old.exists():  # left by a kill during an earlier prune or replace
        _remove(old)
    os.replace(path, old)
    return old


def replace_directory(src: str | Path, path: str | Path, overwrite: bool = True) -> None:
    """Rename the finished directory `src` to `path`; an existing `path` is moved to its `.old`
    name first and deleted after (FileExistsError without `overwrite`). `src` must already be
    fsynced and lie in the same folder."""
    src, path = Path(src), Path(path)
    old = None
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists")
        old = _move_aside(path)
    try:
        os.replace(src, path)
    except BaseException:
        if old is not None:  # put the previous output back under its name
            os.replace(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = True):
    """Yield a temporary directory; on success it is fsynced and renamed to `path`.

    On any exception the temporary directory is removed and an existing `path` is untouched.
    With `overwrite`, an existing `path` is replaced (moved aside, then deleted after the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, path, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def prune(paths: Iterable[str | Path]) -> None:
    """Delete directories (old checkpoints) so that none is ever half-deleted under its real name:
    each is renamed to its `.old` name first, then deleted. A kill in between leaves only that
    temporary, which `remove_temporaries` deletes at the next start."""
    for path in paths:
        old = _move_aside(Path(path))
        fsync_dir(old.parent)
        _remove(old)
