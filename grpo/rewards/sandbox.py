"""Running programs a policy wrote, in a bubblewrap sandbox: the machinery under the code reward.

A policy in RL writes whatever earns reward, including programs that loop forever, fork, eat
memory, read files, open sockets or try to tamper with the grader, so this is a security
boundary. Each sample gets one sandbox start (``Sandbox.session``), in which the harness
(``grpo/rewards/sandbox_harness.py``) runs its tests one by one, each in a forked child:

- bubblewrap (``bwrap``): new user, PID, network, IPC, UTS (and cgroup) namespaces, no
  nested user namespaces, ``--die-with-parent``; read-only binds of ``/usr`` (the system
  libraries the interpreter links, and a system interpreter) and, for an interpreter outside
  it, of that interpreter and its ``lib/``; a read-only root and ``/dev``; private tmpfs of
  ``tmp_size_mb`` each as the working directory (``/tmp``) and ``/dev/shm``. No home, no
  project, no run directory, no /proc, an empty environment. Run as root, the sandbox drops
  to ``nobody`` first (root is exempt from the process limit), with an interpreter
  ``nobody`` can read.
- a cgroup per sample where one can be had (``grpo.rewards.sandbox_cgroup``: a delegated v2 subtree,
  or v1 as root), joined before bwrap starts: ``memory_mb`` for all its processes together
  (tmpfs pages included) and ``processes`` + 4 processes;
- inside, rlimits: address space (``memory_mb``), processes and threads (``processes``, per
  sandbox: its own user namespace counts them), file size, open files, no core files, and
  per test CPU seconds (the timeout, rounded up, plus one);
- outside and inside, the wall clock: the harness kills a test at ``timeout`` seconds and
  clears every process the test left; the grader kills the whole sandbox when the harness
  does not answer in time. Killing bwrap kills the sandbox's init, and with it every process
  in its PID namespace: nothing outlives a session.
- the program's stdout is kept up to ``output_bytes`` (then the test stops), its stderr up to
  4 KiB; verdicts travel on a separate pipe the program cannot reach.

``kind="none"`` runs the same harness as an ordinary process (a temporary working directory,
an empty environment, the rlimits but the process limit): nothing is isolated, so it is only
used when asked for by name. ``run_parallel`` grades many samples at once, one per core: a
sample whose test waits (the harness watches its CPU clock) gives its core to the next one
at once (and takes one back when it computes again), and up to as many again that are still
computing after a while (most likely loops waiting out their timeouts) do too, so timeouts
overlap instead of queueing while a slow correct program keeps at least half a core.
Priorities stay as they were: deprioritizing slow samples would save the CPU of busy loops,
but fails correct programs whose tests together take longer than the threshold (measured: 0
of 8 passed instead of 8 of 8), and letting every slow sample go fails them too (12 of 16
timed out; see tests/grpo/test_code_sandbox.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import marshal
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .sandbox_cgroup import Cgroup, Cgroups
from .sandbox_harness import ASSERT_EXIT, MEMORY_EXIT, SETUP_EXIT, UNGRADABLE_EXIT

__all__ = [
    "ASSERT_EXIT",
    "INSTALL_HINT",
    "MEMORY_EXIT",
    "NONE_WARNING",
    "SANDBOXES",
    "SETUP_EXIT",
    "UNGRADABLE_EXIT",
    "Limits",
    "Run",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailable",
    "Session",
    "cpu_count",
    "default_python",
    "run_parallel",
]

SANDBOXES = ("bwrap", "none")
INSTALL_HINT = (
    "install it with `apt-get install bubblewrap` (Debian, Ubuntu; `dnf install bubblewrap` "
    "on Fedora), or pass --code-sandbox none to run the programs unsandboxed"
)
NONE_WARNING = (
    "--code-sandbox none: the programs the policy writes run as ordinary processes of this "
    "user, limited only in memory, time, file size and open files: they can read and write "
    "every file this user can, use the network, read the environment, signal this user's "
    "processes and leave processes running. Use it only where that is acceptable."
)
_HARNESS = Path(__file__).with_name("sandbox_harness.py").read_text(encoding="utf-8")
# The interpreter's command line: run the harness's code object, sent first on stdin as a
# length and marshal bytes (compiling the harness's source costs ~3 ms, more than a test).
_BOOT = (
    "import marshal,sys;b=sys.stdin.buffer;"
    "exec(marshal.loads(b.read(int.from_bytes(b.read(4),'little'))))"
)
# Run once per interpreter, outside any sandbox, on our own source only: marshal's format
# belongs to the interpreter that reads it, so the sandbox's interpreter compiles it. It also
# names its site-packages: the sandbox runs it with -S (site costs ~1.5 ms a start), and the
# harness puts them on sys.path itself (without .pth files) so programs import what the
# interpreter has installed, as under `python3 prog.py`.
_COMPILE = (
    "import marshal,site,sys;"
    "code=compile(sys.stdin.read(),'sandbox_harness.py','exec');"
    "out=sys.stdout.buffer;out.write('\\n'.join(site.getsitepackages()).encode()+b'\\0');"
    "out.write(marshal.dumps(code))"
)
_NOBODY = 65534
# Seconds the interpreter may take to start inside the sandbox (a loaded machine is slow).
_STARTUP_SECONDS = 30.0
# The grader waits this much beyond the harness's own timeout before killing the sandbox.
_GRACE_SECONDS = 0.5
# From this long into a test, the harness reports a test that waits instead of computing.
_IDLE_AFTER = 0.1


class SandboxError(RuntimeError):
    """The sandbox itself failed (it did not start, or broke its protocol): not the program's
    doing, so the program has no verdict."""


class SandboxUnavailable(ValueError):
    """No working sandbox on this machine: bwrap is missing or cannot create namespaces."""


@dataclass(frozen=True)
class Limits:
    """What one test may use. timeout: wall-clock seconds per test; memory_mb: address space
    per process and, where a cgroup per sample can be had (grpo.rewards.sandbox_cgroup), the memory
    of all the sample's processes together; processes: processes and threads of the program
    at once; file_size_mb: the
    largest file it may write; tmp_size_mb: its /tmp (and its /dev/shm); open_files: open
    descriptors per process; output_bytes: stdout kept (more stops the test)."""

    timeout: float = 5.0
    memory_mb: int = 1024
    processes: int = 16
    file_size_mb: int = 16
    tmp_size_mb: int = 64
    open_files: int = 64
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(
                f"code timeout must be a positive number of seconds, got {self.timeout}"
            )
        # Below this the interpreter itself does not start.
        if self.memory_mb < 64:
            raise ValueError(f"code memory limit must be >= 64 MB, got {self.memory_mb}")
        for name in ("processes", "file_size_mb", "tmp_size_mb", "open_files", "output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox limit {name} must be >= 1, got {getattr(self, name)}")

    def harness(self, *, count_processes: bool) -> dict[str, Any]:
        """The limits as the harness reads them. The sandbox's init and the harness count
        against the process limit too."""
        return {
            "timeout": self.timeout,
            "cpu_seconds": math.ceil(self.timeout) + 1,
            "memory_bytes": self.memory_mb << 20,
            "processes": self.processes + 2 if count_processes else None,
            "file_bytes": self.file_size_mb << 20,
            "open_files": self.open_files,
            "output_bytes": self.output_bytes,
            "idle_after": _IDLE_AFTER,
        }


@dataclass
class Run:
    """One test as the harness saw it. status: "exit" (code), "signal" (signal), "timeout",
    "output_limit", "fork_failed", "crashed" (the harness died: the program killed it), or
    "ungradable" (a function test passes the program something that is not plain data).
    started: the test's children got as far as running the program (False: the harness
    failed to set it up, which no program can fake). passed: a function test's grader ran
    the test to its end against the program's answers (the one way a function test passes).
    For a function test whose program broke off (died, closed its pipe, sent something
    that is not an answer), status and code are the program's: an error, or its memory or
    CPU limit."""

    status: str
    code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: str = ""
    passed: bool = False
    seconds: float = 0.0
    started: bool = True


def _readable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach and read `path` (every directory above
    it searchable by others)."""
    p = Path(path)
    try:
        if not p.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


def default_python() -> str:
    """The interpreter that runs the programs: this one's base interpreter (a virtual
    environment's would bring the project's packages), or, when running as root and it is
    not readable by ``nobody`` (pyenv under /root), the system's python3."""
    exe = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    if os.geteuid() != 0 or _readable_by_others(exe):
        return exe
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(candidate)
        if os.path.isfile(real) and _readable_by_others(real):
            return real
    return exe


def _system_binds() -> list[str]:
    """bwrap arguments for /usr and the top-level links into it (/lib, /lib64, /bin...), as
    the host has them: a merged-/usr system gets symlinks, an older one read-only binds."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _interpreter_binds(python: str) -> list[str]:
    """An interpreter outside /usr (pyenv, conda, a build in /opt): itself and its lib/
    (standard library, libpython), not the rest of its prefix."""
    if python.startswith("/usr/"):
        return []
    prefix = Path(python).parent.parent
    args = ["--ro-bind", python, python]
    if (prefix / "lib").is_dir():
        args += ["--ro-bind", str(prefix / "lib"), str(prefix / "lib")]
    return args


def _cgroup_pids(limits: Limits) -> int:
    """pids.max of a sample: its program's processes, and bwrap, its init, the harness and a
    function test's grader."""
    return limits.processes + 4


class Sandbox:
    """Starts sandboxed sessions for one kind ("bwrap" or "none"), limits and interpreter."""

    def __init__(
        self, kind: str = "bwrap", limits: Limits | None = None, python: str | None = None
    ) -> None:
        if kind not in SANDBOXES:
            raise ValueError(f"unknown sandbox {kind!r}; choose one of {list(SANDBOXES)}")
        self.kind = kind
        self.limits = limits or Limits()
        self.python = python or default_python()
        self._prefix = self._command_prefix()
        # Without setpriv (see _drop_root), subprocess changes the user of a root sandbox.
        root = kind == "bwrap" and os.geteuid() == 0 and not _drop_root()
        self.user_kwargs = {"user": _NOBODY, "group": _NOBODY, "extra_groups": []} if root else {}
        # A cgroup per sample bounds its processes together; without one (or when nobody
        # would have to join it) the rlimits alone bound each process.
        self.cgroups = None if self.user_kwargs else Cgroups.find()

    def bound(self) -> str:
        """The memory and process bound a sample gets on this machine, in words."""
        limits = self.limits
        if self.cgroups is None:
            return (
                f"no cgroup: {limits.memory_mb} MB of address space per process, "
                f"{limits.processes} processes per sandbox (rlimits)"
            )
        return (
            f"cgroup v{self.cgroups.version}: {limits.memory_mb} MB for all the processes of a "
            f"sample together, {_cgroup_pids(limits)} processes (and {limits.memory_mb} MB "
            f"of address space per process)"
        )

    def _command_prefix(self) -> list[str]:
        if self.kind == "none":
            return [self.python, "-I", "-S", "-c", _BOOT]
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            return []
        tmp = self.limits.tmp_size_mb << 20
        return [
            *_drop_root(),
            bwrap,
            *("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc"),
            *("--unshare-uts", "--unshare-cgroup-try", "--disable-userns"),
            *("--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"),
            *_system_binds(),
            *_interpreter_binds(self.python),
            # /dev/shm for multiprocessing's semaphores; --remount-ro is not recursive.
            *("--dev", "/dev", "--size", str(tmp), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"),
            *("--size", str(tmp), "--tmpfs", "/tmp", "--chdir", "/tmp"),
            *("--remount-ro", "/"),
            *(self.python, "-I", "-S", "-c", _BOOT),
        ]

    def command(self, result_fd: int, test_fd: int | None = None) -> list[str]:
        """The command line of a session whose harness answers on result_fd (and whose
        function tests' graders read their tests on test_fd)."""
        if not self._prefix:
            raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
        tests = [] if test_fd is None else [str(test_fd)]
        return [*self._prefix, str(result_fd), "1" if self.kind == "bwrap" else "0", *tests]

    def session(self, mode: str, program: str, entry_point: str | None = None) -> Session:
        """A started sandbox holding `program`, ready to run tests ("stdio" or "function"
        mode). Raises SandboxError when the sandbox does not start."""
        return Session(self, mode, program, entry_point)

    def ensure_available(self) -> None:
        """Raise SandboxUnavailable, with how to fix it, unless a sandboxed program runs and
        its output comes back (checked once per kind and interpreter)."""
        key = (self.kind, self.python, tuple(self._prefix[:1]))
        with _PROBE_LOCK:
            if key not in _PROBES:
                _PROBES[key] = self._probe()
        if _PROBES[key]:
            raise SandboxUnavailable(_PROBES[key])

    def _probe(self) -> str | None:
        if not self._prefix:
            return (
                "the code reward runs programs in bubblewrap (bwrap), which is not installed: "
                + INSTALL_HINT
            )
        try:
            with self.session("stdio", "print(input()[::-1])") as s:
                run = s.run(stdin="ko\n")
        except SandboxError as e:
            return (
                f"bubblewrap cannot start a sandbox here ({e}); it needs unprivileged user "
                f"namespaces (kernel.unprivileged_userns_clone=1, and on Ubuntu >= 23.10 an "
                f"AppArmor profile that allows them for bwrap). Or pass --code-sandbox none"
            )
        if run.status != "exit" or run.code != 0 or run.stdout != b"ok\n":
            return f"a sandboxed test program did not run: {run}"
        return None


_PROBES: dict[tuple, str | None] = {}
_PROBE_LOCK = threading.Lock()


def _drop_root() -> list[str]:
    """Root is exempt from RLIMIT_NPROC: the sandbox runs as nobody instead, through
    util-linux's setpriv where there is one (subprocess cannot vfork when it changes the
    user itself, and forking a trainer that holds a model costs ~4 ms a sandbox)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return []
    return [setpriv, f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups"]


_CODE: dict[str, tuple[bytes, list[str]]] = {}
_CODE_LOCK = threading.Lock()


def _harness_code(python: str) -> tuple[bytes, list[str]]:
    """The harness compiled by `python`, as the frame the boot line reads, and the
    interpreter's site-packages directories (cached)."""
    with _CODE_LOCK:
        if python not in _CODE:
            try:
                done = subprocess.run(
                    [python, "-I", "-S", "-c", _COMPILE],
                    input=_HARNESS.encode(),
                    capture_output=True,
                    env={},
                    timeout=_STARTUP_SECONDS,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SandboxError(f"cannot run the interpreter {python}: {e}") from e
            if done.returncode != 0 or not done.stdout:
                error = done.stderr.decode(errors="replace").strip()
                raise SandboxError(f"the interpreter {python} cannot compile the harness: {error}")
            # Paths, a NUL, then the code in the sandbox interpreter's marshal (which need
            # not be this one's: it is passed on, never read here).
            paths, _, frame = done.stdout.partition(b"\0")
            names = [p for p in paths.decode(errors="surrogateescape").split("\n") if p]
            _CODE[python] = (len(frame).to_bytes(4, "little") + frame, names)
        return _CODE[python]


class Session:
    """One sandbox start for one program: `run` a test at a time, then `close` (or use it as
    a context manager). Not thread-safe; each grading thread holds its own."""

    def __init__(self, sandbox: Sandbox, mode: str, program: str, entry_point: str | None):
        if mode not in ("stdio", "function"):
            raise ValueError(f"mode must be 'stdio' or 'function', got {mode!r}")
        self.limits = sandbox.limits
        self.dead = False
        code, paths = _harness_code(sandbox.python) if sandbox._prefix else (b"", [])
        read_fd, write_fd = os.pipe()
        # Function tests travel on a pipe of their own, which only each test's grader reads:
        # the harness, and so the program forked from it, never holds a test's source.
        test_r, self._tests = os.pipe() if mode == "function" else (None, None)
        try:
            command = sandbox.command(write_fd, test_r)  # SandboxUnavailable without bwrap
        except SandboxUnavailable:
            for fd in (read_fd, write_fd, test_r, self._tests):
                if fd is not None:
                    os.close(fd)
            raise
        self._workdir = tempfile.mkdtemp(prefix="grpo-sandbox-") if sandbox.kind == "none" else None
        self._cgroup: Cgroup | None = None
        if sandbox.cgroups is not None:
            try:
                self._cgroup = sandbox.cgroups.create(
                    self.limits.memory_mb << 20, _cgroup_pids(self.limits)
                )
            except OSError as e:
                for fd in (read_fd, write_fd, test_r, self._tests):
                    if fd is not None:
                        os.close(fd)
                self._remove_workdir()
                raise SandboxError(f"cannot create the sample's cgroup: {e}") from e
            command = self._cgroup.wrap(command)
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,) if test_r is None else (write_fd, test_r),
                env={},  # bwrap's own environment (its init's) is the sandbox's to read
                cwd=self._workdir or "/",
                start_new_session=True,
                **sandbox.user_kwargs,
            )
        except OSError as e:
            os.close(read_fd)
            if self._tests is not None:
                os.close(self._tests)
            self._remove_workdir()
            if self._cgroup is not None:
                self._cgroup.remove()
            raise SandboxError(f"cannot start the sandbox: {e}") from e
        finally:
            os.close(write_fd)
            if test_r is not None:
                os.close(test_r)
        self._results = _LineReader(read_fd)
        job = {
            "mode": mode,
            "program": program,
            "entry_point": entry_point,
            "path": paths,
            "limits": self.limits.harness(count_processes=sandbox.kind == "bwrap"),
        }
        deadline = time.monotonic() + _STARTUP_SECONDS
        try:
            ready = self._send(job, deadline, code) and self._results.readline(deadline)
        except TimeoutError:
            ready = None
        message = _parse(ready) if ready else None
        if not message or not message.get("ready"):
            error = _text(message.get("error", "")) if message else ""
            error = error or self._stderr() or "no answer from the harness"
            self.close()
            raise SandboxError(error)

    def run(
        self,
        stdin: str = "",
        test: str | None = None,
        check: bool = False,
        names: Sequence[str] = (),
    ) -> Run:
        """One test: the program on `stdin` (stdio mode), or `test` run against it, calling
        check(entry_point) when `check`, with `names` (the names the test takes from the
        program) bound to the program's (function mode)."""
        if self.dead:
            raise SandboxError("the session is closed")
        deadline = time.monotonic() + self.limits.timeout + _GRACE_SECONDS
        command = {"op": "run", "stdin": stdin, "check": check, "names": list(names)}
        try:
            sent = self._send(command, deadline)
            if sent and self._tests is not None:
                source = (test or "").encode("utf-8", "surrogateescape")
                frame = len(source).to_bytes(4, "little") + source
                sent = self._send(b"", deadline, frame, self._tests)
            line = sent and self._results.readline(deadline)
            message = _parse(line) if line else None
            while message is not None and (message.get("idle") or message.get("busy")):
                # The test waits, or computes again after waiting: see run_parallel.
                _report_idle() if message.get("idle") else _report_busy()
                line = self._results.readline(deadline)
                message = _parse(line) if line else None
        except TimeoutError:  # the harness is stuck (stopped by the program?): end it all
            self.close()
            return Run("timeout", seconds=self.limits.timeout)
        if message is None:  # the harness is gone or garbled: only the program could do that
            stderr = self._stderr()
            oom = self._cgroup is not None and self._cgroup.oom_killed()
            self.close()
            if oom:  # the sample's memory bound: the kernel killed the harness, or bwrap
                return Run("signal", signal=signal.SIGKILL, stderr=stderr)
            return Run("crashed", stderr=stderr)
        return Run(
            status=message["status"],
            code=message.get("code"),
            signal=message.get("signal"),
            stdout=base64.b64decode(message.get("stdout", "")),
            stderr=_text(message.get("stderr", "")),
            passed=bool(message.get("passed")),
            seconds=float(message.get("seconds", 0.0)),
            started=bool(message.get("started", True)),
        )

    def _send(
        self, message: dict | bytes, deadline: float, before: bytes = b"", fd: int | None = None
    ) -> bool:
        """Write one command (a length, then marshal: the harness need not import json),
        after `before`, to the harness's stdin or `fd` (a message b"": only `before`); False
        when the harness no longer reads."""
        data = before
        if message != b"":
            payload = marshal.dumps(message, 4)  # version 4: read by every Python 3 since 3.4
            data += len(payload).to_bytes(4, "little") + payload
        fd = self._proc.stdin.fileno() if fd is None else fd
        os.set_blocking(fd, False)
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            select.select([], [fd], [], left)
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                return False
        return True

    def _stderr(self) -> str:
        """What bwrap (or a dying harness) said, once the process is gone."""
        try:
            self._proc.kill()
            self._proc.wait(timeout=5)
            return self._proc.stderr.read(8192).decode(errors="replace").strip()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return ""

    def close(self) -> None:
        """End the sandbox: every process in it dies with it."""
        if self.dead:
            return
        self.dead = True
        proc = self._proc
        # No graceful exit to wait for: killing bwrap's process group takes the sandbox's
        # init down (--die-with-parent), and with it every process of its PID namespace.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.stderr.close()
        self._results.close()
        if self._tests is not None:
            os.close(self._tests)
            self._tests = None
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(b64: str) -> str:
    """A base64 field of an answer, as text."""
    try:
        return base64.b64decode(b64).decode("utf-8", "replace")
    except ValueError:
        return ""


def _parse(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _LineReader:
    """Lines from a pipe, with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def readline(self, deadline: float) -> bytes | None:
        """The next line without its newline; None at end of file; TimeoutError past the
        deadline."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_WORKER = threading.local()  # run_parallel's hooks for the call running on this thread


def _report_idle() -> None:
    """The current run_parallel call now waits (a test sleeps or blocks): it gives up its
    core."""
    hook = getattr(_WORKER, "idle", None)
    if hook is not None:
        hook()


def _report_busy() -> None:
    """The current run_parallel call computes again after it waited: it takes a core back."""
    hook = getattr(_WORKER, "busy", None)
    if hook is not None:
        hook()


def run_parallel(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    slow_after: float = 1.0,
    max_running: int = 128,
) -> list[R]:
    """[fn(item) for item in items] on threads, each call holding one of `workers` places
    (default: the cores) while it computes, so that programs get the cores they would have
    alone and a wall-clock timeout means what it says.

    A call gives its place to the next item early in two cases. When it waits (the sandbox
    reports a test that sleeps or blocks on a read): it costs no core, so a batch with such
    timeouts takes about one timeout plus the rest of its work. When it is still running after
    `slow_after` seconds (most likely a loop waiting out its timeout), but only while fewer
    than `workers` calls have been let go that way: loops overlap with the rest of the batch,
    and no more than twice the cores compute at once, so a slow correct program keeps at least
    half a core (letting every slow call go, a batch of slow correct programs would share the
    cores until they all timed out). A call that waited and then computes again (the sandbox
    reports that too) takes a place back at once, over the count if it must (no new item
    starts until the count is back under `workers`), and is let go again only as a slow one:
    sleeping first earns no free core. `max_running` bounds the calls in flight (memory).
    """
    n = len(items)
    if n == 0:
        return []
    workers = workers or cpu_count()
    places = threading.Condition()
    holding: dict[int, float] = {}  # index -> start, while it holds a place
    slow: set[int] = set()  # let go after slow_after, still computing
    waiting: set[int] = set()  # let go because it waits
    finished = threading.Event()

    def let_go(i: int) -> bool:  # under the lock
        if holding.pop(i, None) is None:
            return False
        places.notify_all()
        return True

    def idle(i: int) -> None:
        with places:
            if not let_go(i):
                slow.discard(i)
            waiting.add(i)

    def busy(i: int) -> None:
        with places:
            if i in waiting:
                waiting.discard(i)
                holding[i] = time.monotonic()

    def call(i: int) -> R:
        with places:
            places.wait_for(lambda: len(holding) < workers)
            holding[i] = time.monotonic()
        _WORKER.idle = functools.partial(idle, i)
        _WORKER.busy = functools.partial(busy, i)
        try:
            return fn(items[i])
        finally:
            _WORKER.idle = _WORKER.busy = None
            with places:
                let_go(i)
                slow.discard(i)
                waiting.discard(i)

    def watch() -> None:
        while not finished.wait(min(0.05, slow_after / 4)):
            now = time.monotonic()
            with places:
                for i, started in sorted(holding.items(), key=lambda kv: kv[1]):
                    if len(slow) >= workers or now - started <= slow_after:
                        break
                    let_go(i)
                    slow.add(i)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(min(n, max_running)) as pool:
            return list(pool.map(call, range(n)))
    finally:
        finished.set()
        watcher.join()
