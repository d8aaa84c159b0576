"""Per-sample cgroups for the sandbox: one memory and process bound over all the processes of
one sample (rlimits bound each process alone, and a sample may fork).

``Cgroups.find()`` looks once for a place to create child cgroups, in this order:

- cgroup v2: this process's own cgroup (or ``$GRPO_SANDBOX_CGROUP``), writable, with the
  memory and pids controllers enabled for its children (``cgroup.subtree_control``), as a
  delegated subtree has them (``systemd-run --user -p Delegate=yes``, a container's root);
- cgroup v1 (a hybrid host, as root): this process's memory cgroup, writable, and its pids
  cgroup where that hierarchy is mounted and writable too.

Each sandbox then gets its own child: ``memory.max`` (v1 ``memory.limit_in_bytes``, and the
swap limit where swap is accounted) and ``pids.max``. The sandbox's first process joins it
before anything else runs (``sh -c 'echo $$ > cgroup.procs; exec ...'``), so every process
of the sample is inside and counted together. Where no such place exists, ``find()`` gives
None and the bound is the rlimits' alone (address space per process, processes per
sandbox).
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cgroup", "Cgroups"]

_ROOT = Path("/sys/fs/cgroup")
_LOCK = threading.Lock()
_FOUND: dict[str, Cgroups | None] = {}
_COUNTER = itertools.count()
_PENDING: list[Path] = []  # children whose processes were still exiting when they were done
# Joins the cgroups named by its first arguments (a '-' for none), then runs the rest.
_JOIN = (
    'for f in "$1" "$2"; do [ "$f" = - ] || echo $$ > "$f" || exit 125; done; shift 2; exec "$@"'
)


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of the cgroup file systems."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, "" for the v2 hierarchy."""
    paths = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _usable(parent: Path) -> bool:
    """Whether a child cgroup can be created (and removed) under parent."""
    probe = parent / f"grpo-probe-{os.getpid()}-{next(_COUNTER)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Cgroups:
    """Where per-sample cgroups are made: version 2 (memory: the one parent) or 1 (memory,
    and pids where it can)."""

    version: int
    memory: Path
    pids: Path | None

    @staticmethod
    def find() -> Cgroups | None:
        """The place on this machine (looked up once), or None."""
        key = os.environ.get("GRPO_SANDBOX_CGROUP", "")
        with _LOCK:
            if key not in _FOUND:
                _FOUND[key] = _find(key)
            return _FOUND[key]

    def create(self, memory_bytes: int, pids: int) -> Cgroup:
        """A child for one sandbox with these bounds. OSError when the cgroup file system
        refuses."""
        _remove_pending()
        name = f"grpo-{os.getpid()}-{next(_COUNTER)}"
        dirs = [self.memory / name] + ([self.pids / name] if self.pids is not None else [])
        # v2: one directory has both controllers.
        made = []
        try:
            for path in dirs:
                path.mkdir()
                made.append(path)
            if self.version == 2:
                _write(dirs[0] / "memory.max", memory_bytes)
                _write(dirs[0] / "memory.swap.max", 0, optional=True)
                _write(dirs[0] / "pids.max", pids)
            else:
                _write(dirs[0] / "memory.limit_in_bytes", memory_bytes)
                _write(dirs[0] / "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                if len(dirs) > 1:
                    _write(dirs[1] / "pids.max", pids)
        except OSError:
            for path in made:
                _remove(path)
            raise
        return Cgroup(tuple(dirs), self.version)


def _find(override: str) -> Cgroups | None:
    mounts, own = _mounts(), _own_paths()
    if override:
        parent = Path(override)
        return Cgroups(2, parent, None) if _ready_v2(parent) else None
    for point, kind, _ in mounts:
        if kind == "cgroup2" and "" in own:
            parent = Path(point) / own[""].lstrip("/")
            if _ready_v2(parent):
                return Cgroups(2, parent, None)
    v1 = {}
    for point, kind, options in mounts:
        for controller in ("memory", "pids"):
            if kind == "cgroup" and controller in options and controller in own:
                parent = Path(point) / own[controller].lstrip("/")
                if _usable(parent):
                    v1[controller] = parent
    if "memory" in v1:
        return Cgroups(1, v1["memory"], v1.get("pids"))
    return None


def _ready_v2(parent: Path) -> bool:
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
    except OSError:
        return False
    return {"memory", "pids"} <= enabled and _usable(parent)


def _write(path: Path, value: int, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError:
        if not optional:
            raise


def _remove(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _remove_pending() -> None:
    with _LOCK:
        _PENDING[:] = [path for path in _PENDING if not _remove(path)]


@atexit.register
def _remove_at_exit() -> None:
    for _ in range(50):  # the last sandboxes' processes take a moment to be reaped
        _remove_pending()
        if not _PENDING:
            return
        time.sleep(0.02)


@dataclass(frozen=True)
class Cgroup:
    """One sandbox's cgroup (its directories: one for v2, memory and pids for v1)."""

    dirs: tuple[Path, ...]
    version: int

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, run from inside this cgroup."""
        procs = [str(d / "cgroup.procs") for d in self.dirs] + ["-"] * (2 - len(self.dirs))
        return ["/bin/sh", "-c", _JOIN, "sh", *procs, *command]

    def peak_bytes(self) -> int | None:
        """The most memory the cgroup held at once (None where the kernel does not say)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.dirs[0] / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process here for the memory bound."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.dirs[0] / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        """Remove the directories now, or (processes still exiting) at a later create or at
        exit."""
        for path in self.dirs:
            for _ in range(5):
                if _remove(path):
                    break
                time.sleep(0.002)
            else:
                with _LOCK:
                    _PENDING.append(path)
