"""Writing files and directories so that a crash never leaves a half-written one.

Everything the run directory holds (config.json, summary.json, metrics.jsonl rewrites, the
curves PNG, checkpoints) is written under a hidden temporary name next to its target,
`.NAME.tmp-XXXXXXXX`, and renamed into place with `os.replace` only once complete: the
same directory means the same filesystem, so the rename is atomic and a reader sees either
the old version or the new one. On any error (KeyboardInterrupt included) the temporary is
removed.

A directory cannot be renamed over a non-empty one, so replacing a directory takes two
renames: the old one is moved aside to `.NAME.old-XXXXXXXX`, the new one renamed in, the
old one deleted. A crash between the two renames leaves the target absent but both
versions on disk; `grpo.checkpoint.find_checkpoint` puts the newest complete one back.

`lock_directory` keeps a second process from writing the same directory: an advisory lock
(flock) on a file inside it, held by an open descriptor, so the OS drops it when the process
ends in any way, SIGKILL included, and a dead writer never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """A fresh hidden name next to `path` to build its next version under."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def replace(src: str | Path, dst: str | Path) -> None:
    """Move `src` onto `dst` (a file or a directory), replacing what is there.

    A file, or a directory onto a free name, is one os.replace. A directory onto an
    existing one is moved aside first and deleted after (see the module's docstring)."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def remove(path: str | Path) -> None:
    """Delete a file or a directory tree if it exists (errors ignored: cleanup only)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(
    path: str | Path, *, temp: str | Path | None = None, owner: bool = True
) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` when the block succeeds.

    For writers that want a path: `torch.save`, `savefig`, a directory filled by several
    writers (create it yourself inside the block). On any error the temporary is removed
    and the error propagates; `path` is untouched. The parent directory is created.

    temp: the temporary path to use (default: a fresh `temp_path(path)`); several processes
    writing one directory together agree on it first. owner: whether this process creates
    the parent, renames the result into place and cleans up after an error; the others
    only write into it.
    """
    path = Path(path)
    tmp = Path(temp) if temp is not None else temp_path(path)
    if owner:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if owner:
            replace(tmp, path)
    except BaseException:
        if owner:
            remove(tmp)
        raise


def torch_save(obj: object, path: str | Path) -> None:
    """`torch.save` through a buffer: a full disk then raises OSError(ENOSPC) naming the file,
    not torch's zip writer's "unexpected pos" RuntimeError."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


class DirectoryLocked(RuntimeError):
    """Another process holds the lock on the directory (`lock_directory`)."""


# Locks this process holds, by directory: flock is per open file, so a second open() of the
# same file in this process would lock it out of its own directory (a library caller that
# builds two trainers in turn, the tests).
_HELD: dict[Path, int] = {}


def lock_directory(directory: str | Path, name: str) -> bool:
    """Take the lock file `directory/name` for the rest of this process (re-entrant within
    it) and record the process id in it. Returns whether this call created the lock file.
    The directory must exist. Raises DirectoryLocked, naming the holder's pid when it was
    recorded, if another process holds it."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _HELD:
        return False
    path = directory / name
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            fd, created = os.open(path, os.O_RDWR), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (process {holder})" if holder.isdigit() else ""
            raise DirectoryLocked(f"{directory} is in use by another run{pid}") from None
        # The holder may have deleted the file between our open() and flock() (see
        # unlock_directory): then the lock is on a file nobody else will see; try again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    return created


def unlock_directory(directory: str | Path, name: str, *, remove_file: bool = False) -> None:
    """Give up this process's lock on `directory` (and delete the lock file, while still
    holding it, with remove_file). Nothing happens if this process does not hold it."""
    fd = _HELD.pop(Path(directory).resolve(), None)
    if fd is None:
        return
    if remove_file:
        (Path(directory) / name).unlink(missing_ok=True)
    os.close(fd)


# errno -> what to tell the user, for the errors a write can end with.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Libraries that wrap the OS error in their own (safetensors' Rust writer) keep its text.
_WRITE_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "os error 30": errno.EROFS,
}


def file_in_path(path: str | Path) -> Path | None:
    """The existing file (not a directory) that `path` would have to be inside, if any: a
    directory or file cannot be made at `path` then (mkdir's NotADirectoryError, told early)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def write_error(error: BaseException) -> tuple[int, str] | None:
    """(errno, one-line description) when `error`, or an error it was raised from, is a
    filesystem refusing a write (disk full, quota, read-only, permission); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code not in _WRITE_ERRORS:
            code = next((c for text, c in _WRITE_TEXTS.items() if text in str(error)), None)
        if code is not None:
            name = getattr(error, "filename", None)
            detail = getattr(error, "strerror", None)
            what = detail if detail and detail != os.strerror(code) else _WRITE_ERRORS[code]
            return code, what[:1].lower() + what[1:] + (f" ({name})" if name else "")
        error = error.__cause__ or error.__context__
    return None


def write_json(path: str | Path, value: dict) -> None:
    """`value` as indented JSON at `path`, atomically (objects JSON lacks as their str)."""
    atomic_write(path, json.dumps(value, indent=2, default=str))


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically, on disk before the rename: after a
    crash, `path` holds the previous contents or the new ones, never a mix or nothing."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
