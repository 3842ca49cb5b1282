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

Every failure to write (a full disk, a read-only or wrong path) is raised as one `WriteError`, a
user error naming the path, the reason, the free space on that filesystem and the fix (`write_error`
builds it; `write_failure` words the reason for callers that add their own context). Outputs get
the permissions the process umask gives an ordinary file or directory, not the private 0600 / 0700
of the temporaries they are written under.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

from deepseekmoe.errors import UserError

TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


class WriteError(UserError):
    """An output could not be written (full disk, no permission, a wrong path); the message names
    the path, the reason, the free space and the fix. `reason` is the middle part alone."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# Words for the errno values a user can cause, and what to do about each.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_NOT_A_DIR = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` reports a full disk; torch.save and safetensors wrap it in a RuntimeError /
    SafetensorError whose text alone says so."""
    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text


def free_space(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing folder), None if unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def write_failure(e: BaseException, path: str | Path, need: int | None = None) -> str:
    """Why writing `path` failed, in words, with the free space on its filesystem; `need` (bytes the
    output takes) lets a generic error be recognised as too little space."""
    if isinstance(e, WriteError):
        return e.reason
    free = free_space(path)
    space = f"{free / 1e9:.2f} GB free on its filesystem" if free is not None else "free space unknown"
    if is_disk_full(e):
        return f"the disk is full: {space}"
    if need is not None and free is not None and free < 1.1 * need:
        return f"not enough disk space: it needs about {need / 1e9:.2f} GB, {space}"
    code = getattr(e, "errno", None)
    if code == errno.EISDIR:
        return f"{path} is a directory; {space}"
    if code in _NOT_A_DIR:
        return f"{_blocking_file(path)} is a file, not a folder; {space}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}; {space}"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}{': ' + first if first else ''}; {space}"


def _blocking_file(path: str | Path) -> Path:
    """The file that stands where a folder of `path` is needed (the nearest existing ancestor)."""
    path = Path(path)
    for folder in path.parents:
        if folder.exists():
            return folder
    return path


def write_error(e: BaseException, path: str | Path, fix: str | None = None) -> WriteError:
    """The one user error for a failed write of `path`; `fix` replaces the default advice."""
    code = getattr(e, "errno", None)
    if fix is None:
        if is_disk_full(e) or code in _NO_SPACE:
            fix = "free space on that disk or choose another output path"
        elif code in _DENIED:
            fix = "choose a writable location or change the folder's permissions"
        elif code in _NOT_A_DIR or code == errno.EISDIR:
            fix = "choose another output path"
        else:
            fix = "check the output path and the free space"
    why = write_failure(e, path)
    return WriteError(f"cannot write {path} ({why}): {fix}", why)


def check_output(path: str | Path, directory: bool) -> None:
    """Refuse, before any expensive work, an output path that cannot be written: a file where a
    directory is written (or the reverse), a file in the way of its folder, a folder this process
    may not write into. Raises the WriteError the write itself would."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        why = f"{path} is a file, not a folder" if directory else f"{path} is a directory"
        raise WriteError(f"cannot write {path} ({why}): choose another output path", why)
    folder = path if path.is_dir() else _blocking_file(path)  # where the new names are made
    if not folder.is_dir():
        raise write_error(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)), path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise write_error(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder)), path)


def _is_write_failure(e: BaseException, tmp: Path, path: Path) -> bool:
    """Whether `e`, raised while `path` was written in `tmp`, is a failure to write it (an OSError
    naming no file or a file there, or a full disk) rather than, say, a missing input read on the
    way, which keeps its own error."""
    if isinstance(e, WriteError) or is_disk_full(e):
        return True
    if not isinstance(e, OSError):
        return False
    if e.filename is None:
        return True
    target = Path(os.fsdecode(e.filename)).absolute()
    return any(target == p or p in target.parents for p in (tmp.absolute(), path.absolute()))


def _umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass  # not Linux: fall back to setting and restoring it
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


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
    """Write `data` to `path` atomically, with the permissions the umask gives a new file; any
    failure raises WriteError and leaves `path` as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it private (0600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the error to report is the one being raised
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _publish_tree(root: Path) -> None:
    """Give every file and folder under `root` the permissions the umask gives a new one (mkdtemp,
    mkstemp and safetensors create them private), and make them durable."""
    mask = _umask()
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fchmod(f.fileno(), 0o666 & ~mask)
                os.fsync(f.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
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
    """Yield a temporary directory; on success it is fsynced and renamed to `path`, with the
    permissions the umask gives a new directory.

    On any exception the temporary directory is removed and an existing `path` is untouched; a
    failure to write (a full disk, no permission, a wrong path) is raised as WriteError.
    With `overwrite`, an existing `path` is replaced (moved aside, then deleted after the rename).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise write_error(e, path) from e
    try:
        yield tmp
        _publish_tree(tmp)
        replace_directory(tmp, path, overwrite)
    except BaseException as e:
        _remove(tmp)
        if _is_write_failure(e, tmp, path) and not isinstance(e, WriteError):
            raise write_error(e, path) from e
        raise


def prune(paths: Iterable[str | Path]) -> None:
    """Delete directories (old checkpoints) so that none is ever half-deleted under its real name:
    each is renamed to its `.old` name first, then deleted. A kill in between leaves only that
    temporary, which `remove_temporaries` deletes at the next start."""
    for path in paths:
        old = _move_aside(Path(path))
        fsync_dir(old.parent)
        _remove(old)
