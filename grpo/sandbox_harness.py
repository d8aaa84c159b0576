"""The harness that runs inside the sandbox (grpo.sandbox compiles it once per interpreter and
starts it as a code object with ``python -I -c``).

It is standard library only and runs on the sandbox's interpreter (Python >= 3.8), never
imported by the trainer. One harness serves one sample: it reads the job (the program, the
mode and the limits) as one command on stdin, sets the limits, answers ``{"ready": true}``,
then runs one test per command and answers each with one JSON line. Commands are marshal
frames (the grader writes them); answers go to the result pipe whose number is ``argv[1]``,
never to stdout, so the program's output cannot be mistaken for a verdict. The harness
imports neither json nor base64 (with ``re``, they would cost more than a test).

Each test runs in a child forked from the harness (no interpreter start per test), in a
fresh ``__main__`` module, with its stdin in a memfd and its stdout and stderr in pipes the
harness reads up to a cap. Before the program runs, the child closes every other
descriptor (the result pipe, the command stream), so the program cannot answer for the
harness; the harness itself is made non-dumpable, so a program cannot ptrace it either.
The harness never sees expected outputs: stdout is compared by the grader outside.

Function tests (``check(candidate)`` or bare asserts) must run in the program's process.
There, passing also needs a token the child writes to a private pipe after the tests
returned, so a program that exits early with status 0 (``sys.exit(0)``, ``os._exit(0)``)
does not pass.
"""

# _signal, the C module: `signal` would import enum, for nothing the harness needs.
import _signal as signal
import binascii
import io
import marshal
import os
import resource
import select
import sys
import time

# Exit status of a child whose program ran out of memory (MemoryError); sandbox.py maps it.
MEMORY_EXIT = 213
# A child that failed before the program ran. The grader does not trust the status (a program
# can exit with any): the child reports its start on a pipe of its own, closed before the
# program runs, and no start is what says "setup failed".
SETUP_EXIT = 214
# Function mode: an assert of the tests failed (a wrong answer, not a crash).
ASSERT_EXIT = 212
# Stderr kept per test: enough for a traceback's last lines.
STDERR_BYTES = 4096
_FORK_RETRIES = 20
_LIBC = []  # prctl, once loaded


def _send(fd, message):
    """One answer as a JSON line. Its values are numbers, booleans, and names or base64 (ASCII
    without quotes or backslashes), which JSON takes as they are."""
    fields = []
    for key, value in message.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + value + '"'
        fields.append('"' + key + '": ' + text)
    data = ("{" + ", ".join(fields) + "}\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _b64(data):
    return binascii.b2a_base64(bytes(data), newline=False).decode("ascii")


def _receive(stream):
    """The next command: a 4-byte little-endian length, then that many bytes of marshal; None
    at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    return marshal.loads(stream.read(int.from_bytes(head, "little")))


def _libc_prctl():
    """prctl from the C library. Through _ctypes, the C module, where it has what is needed:
    importing ctypes itself costs ~1 ms a sandbox, more than a test."""
    try:
        import _ctypes

        class CInt(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        class Library:
            _handle = _ctypes.dlopen(None)

        return Function(("prctl", Library)), _ctypes.get_errno
    except Exception:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl, ctypes.get_errno


def _nondumpable():
    """No ptrace and no /proc/<pid>/fd of the harness for the programs it runs."""
    prctl, get_errno = _libc_prctl()
    _LIBC.append(prctl)
    pr_set_dumpable = 4
    if prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _fork():
    """fork(), retried while a previous test's processes are still being reaped."""
    for attempt in range(_FORK_RETRIES):
        try:
            return os.fork()
        except BlockingIOError:
            if attempt == _FORK_RETRIES - 1:
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


def _finish(code):
    """Leave as the interpreter would: join non-daemon threads, run atexit, flush stdio."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120  # the interpreter's status when flushing stdout fails
    os._exit(code)


def _exit_code(error):
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _run_program(job, cmd, token_fd, token):
    """In the child: the program (and the tests, in function mode) in a fresh __main__."""
    import builtins
    import types

    def stream(fd, mode):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors="surrogateescape")

    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w")
    sys.stderr = sys.__stderr__ = stream(2, "w")
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    sys.argv = ["main.py"]
    code, testing = 0, False
    try:
        exec(compile(job["program"], "main.py", "exec"), main.__dict__)
        if job["mode"] == "function":
            testing = True
            exec(compile(cmd["test"], "test.py", "exec"), main.__dict__)
            if cmd.get("check"):
                main.__dict__["check"](main.__dict__[job["entry_point"]])
            os.write(token_fd, token)
    except SystemExit as e:
        code = _exit_code(e)
    except MemoryError:
        code = MEMORY_EXIT
        try:
            sys.stderr.write("MemoryError\n")
        except BaseException:
            pass
    except BaseException as e:
        code = ASSERT_EXIT if testing and isinstance(e, AssertionError) else 1
        try:
            import traceback

            kind, error, tb = sys.exc_info()
            # Without this frame: the traceback starts in the program, as python3 prints it.
            traceback.print_exception(kind, error, tb.tb_next)
        except BaseException:
            pass
    _finish(code)


def _child(job, cmd, data, out_w, err_w, token_w, token, started_w, limits):
    """Never returns: sets up the descriptors and limits of one test, then runs it."""
    try:
        os.setpgid(0, 0)
        if _LIBC:  # the test dies with the harness, whoever kills it
            pr_set_pdeathsig = 1
            _LIBC[0](pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        fd = os.memfd_create("stdin")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        _limit(resource.RLIMIT_FSIZE, limits["file_bytes"])  # after the stdin is written
        cpu = limits["cpu_seconds"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.write(started_w, b"1")
        os.dup2(fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        keep = 3
        if token_w is not None:
            os.dup2(token_w, 3)
            keep = 4
        # Everything else goes: the start pipe, the result pipe, the command stream.
        os.closerange(keep, max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536))
    except BaseException:
        os._exit(SETUP_EXIT)
    _run_program(job, cmd, 3, token)


def _kill(pid, own_pidns):
    """The test's processes: in the sandbox's own PID namespace every process but the harness
    and init (daemons that left the process group included); elsewhere the process group."""
    for target, sig in ((-1, signal.SIGKILL), (-pid, signal.SIGKILL)):
        if target == -1 and not own_pidns:
            continue
        try:
            os.kill(target, sig)
        except OSError:
            pass


def _drain(fd, buf, cap):
    """Read what is left in a pipe without waiting for writers that never close it."""
    os.set_blocking(fd, False)
    over = False
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        over = _keep(buf, chunk, cap) or over
    return over


def _keep(buf, chunk, cap):
    """Append up to cap bytes; True when the chunk did not fit."""
    room = cap - len(buf)
    if room > 0:
        buf += chunk[:room]
    return len(chunk) > room


def run_test(job, cmd, limits, own_pidns, notify_idle=None):
    """Run one test in a forked child; returns the answer for the grader. notify_idle() is
    called once if the test waits instead of computing (see _wait)."""
    function = job["mode"] == "function"
    data = cmd.get("stdin", "").encode("utf-8", "surrogateescape")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started_r, started_w = os.pipe()
    token_r = token_w = token = None
    if function:
        token_r, token_w = os.pipe()
        token = os.urandom(16).hex().encode()
    start = time.monotonic()
    try:
        pid = _fork()
    except OSError as e:
        for fd in (out_r, out_w, err_r, err_w, started_r, started_w, token_r, token_w):
            if fd is not None:
                os.close(fd)
        return {"status": "fork_failed", "error": _b64(str(e).encode())}
    if pid == 0:
        _child(job, cmd, data, out_w, err_w, token_w, token, started_w, limits)
    for fd in (out_w, err_w, started_w, token_w):
        if fd is not None:
            os.close(fd)
    caps = {out_r: limits["output_bytes"], err_r: STDERR_BYTES, started_r: 1}
    if token_r is not None:
        caps[token_r] = 64
    bufs = {fd: bytearray() for fd in caps}
    idle = (limits.get("idle_after"), notify_idle) if notify_idle is not None else None
    status, verdict = _wait(pid, bufs, caps, out_r, limits["timeout"], start, idle)
    _kill(pid, own_pidns)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    for fd in caps:
        if verdict is None and _drain(fd, bufs[fd], caps[fd]) and fd == out_r:
            verdict = "output_limit"
        os.close(fd)
    answer = {"seconds": time.monotonic() - start}
    if verdict is not None:
        answer["status"] = verdict
    elif os.WIFSIGNALED(status):
        answer.update(status="signal", signal=os.WTERMSIG(status))
    else:
        answer.update(status="exit", code=os.WEXITSTATUS(status))
    if not function:
        answer["stdout"] = _b64(bufs[out_r])
    answer["stderr"] = _b64(bufs[err_r])
    answer["started"] = bytes(bufs[started_r]) == b"1"
    answer["token_ok"] = function and bytes(bufs[token_r]) == token
    return answer


# A test that used less CPU than this share of a window of wall time is waiting.
_IDLE_SHARE = 0.1
_IDLE_WINDOW = 0.05  # seconds


def _cpu_seconds(pid):
    """The CPU time of process `pid` so far (its process CPU clock, Linux's
    MAKE_PROCESS_CPUCLOCK: no /proc needed); None once it is gone."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def _wait(pid, bufs, caps, out_fd, timeout, start, idle=None):
    """(wait status or None, "timeout" / "output_limit" / None): the child's exit, read while
    it runs, within the wall-clock timeout. idle: (seconds, notify): from that long after the
    start, a child that computes less than _IDLE_SHARE of a window (sleeping, blocked on a
    read: it can only end by the timeout or an event) is reported once with notify(), so the
    grader gives its core to another sample."""
    deadline = start + timeout
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    poller = select.poll()
    for fd in caps:
        poller.register(fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    open_fds = set(caps)
    watch = idle is not None and idle[0] is not None
    if watch:
        watch_from = start + idle[0]
        last = (start, 0.0)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, None
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return None, "timeout"
            if watch and now >= watch_from and now - last[0] >= _IDLE_WINDOW:
                cpu = _cpu_seconds(pid)
                if cpu is not None and cpu - last[1] < _IDLE_SHARE * (now - last[0]):
                    watch = False
                    idle[1]()
                elif cpu is not None:
                    last = (now, cpu)
            # Without a pidfd (Python < 3.9) poll in short steps for the exit.
            wait_ms = left * 1000 if pidfd is not None else min(left * 1000, 5)
            if watch:
                wake = max(watch_from, last[0] + _IDLE_WINDOW)
                wait_ms = min(wait_ms, max(0.0, wake - now) * 1000)
            for fd, _ in poller.poll(max(1, int(wait_ms))):
                if fd == pidfd or fd not in open_fds:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    poller.unregister(fd)
                elif _keep(bufs[fd], chunk, caps[fd]) and fd == out_fd:
                    return None, "output_limit"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def main():
    result_fd = int(sys.argv[1])
    own_pidns = sys.argv[2] == "1"
    commands = sys.stdin.buffer
    job = _receive(commands)
    # The interpreter runs with -S: its site-packages, as site would add them.
    sys.path.extend(p for p in job.get("path") or () if os.path.isdir(p))
    limits = job["limits"]
    try:
        _nondumpable()
        _limit(resource.RLIMIT_AS, limits["memory_bytes"])
        _limit(resource.RLIMIT_NOFILE, limits["open_files"])
        _limit(resource.RLIMIT_CORE, 0)
        if limits.get("processes"):
            _limit(resource.RLIMIT_NPROC, limits["processes"])
    except Exception as e:
        _send(result_fd, {"ready": False, "error": _b64(f"{type(e).__name__}: {e}".encode())})
        return
    _send(result_fd, {"ready": True})
    while True:
        cmd = _receive(commands)
        if cmd is None or cmd.get("op") != "run":
            break
        notify = lambda: _send(result_fd, {"idle": True})  # noqa: E731
        _send(result_fd, run_test(job, cmd, limits, own_pidns, notify))


if __name__ == "__main__":
    main()
