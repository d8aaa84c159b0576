"""The harness that runs inside the sandbox (grpo.rewards.sandbox compiles it once per
interpreter and starts it as a code object with ``python -I -c``).

It is standard library only and runs on the sandbox's interpreter (Python >= 3.8), never
imported by the trainer but for its exit statuses. One harness serves one sample: it reads
the job (the program, the mode and the limits) as one command on stdin, sets the limits,
answers ``{"ready": true}``, then runs one test per command and answers each with one JSON
line. Commands are marshal frames (the grader writes them); answers go to the result pipe
whose number is ``argv[1]``, never to stdout, so the program's output cannot be mistaken for
a verdict. The harness imports neither json nor base64 (with ``re``, they would cost more
than a test).

Each test runs in a child forked from the harness (no interpreter start per test), in a
fresh ``__main__`` module, with its stdin in a memfd and its stdout and stderr in pipes the
harness reads up to a cap. Before the program runs, the child closes every other
descriptor (the result pipe, the command stream), so the program cannot answer for the
harness; the harness itself is made non-dumpable, so a program cannot ptrace it either.
The harness never sees expected outputs: stdout is compared by the grader outside.

Function tests run in two processes, neither of which decides the verdict alone: the
candidate (the program) and the grader, a clean interpreter that never holds an object of
the program. Both are forked from the harness, which never reads a test's source: the grader
reads it from a pipe of its own, so the candidate's memory never held it. The grader runs
the test with the program's names (the entry point, and any other name the test takes from
the program) bound to proxies: each call sends its arguments to the candidate as plain data
and gets the result back as plain data (JSON of None, bool, int, float, str, bytes, complex,
list, tuple, set, frozenset and dict), parsed strictly; anything else the candidate sends,
or its death, fails the test. Only the grader, after the test returned, writes the pass, to
a pipe the candidate cannot reach. The candidate's process ends with ``os._exit`` whatever
happens (no atexit handler, no thread join) and is killed with the rest of the test.
"""

# _signal, the C module: `signal` would import enum, for nothing the harness needs.
import _signal as signal
import binascii
import builtins
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


def _print_exception(skip=1):
    """The current exception's traceback on stderr, without the harness's own `skip` frames
    (it starts in the program, as python3 prints it)."""
    try:
        import traceback

        kind, error, tb = sys.exc_info()
        for _ in range(skip):
            tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
        traceback.print_exception(kind, error, tb)
    except BaseException:
        pass


def _exit_with_traceback():
    """The candidate's end after its program raised: the traceback as python3 prints it, then
    os._exit(1) (no atexit handler, no thread join)."""
    _print_exception()
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(1)


def _fresh_main():
    """stdio on descriptors 0-2 and a fresh __main__ module, as `python3 main.py` has."""
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
    return main


def _run_program(job):
    """In the child of a stdin/stdout test: the program in a fresh __main__, then the
    interpreter's exit."""
    main = _fresh_main()
    code = 0
    try:
        exec(compile(job["program"], "main.py", "exec"), main.__dict__)
    except SystemExit as e:
        code = _exit_code(e)
    except MemoryError:
        code = MEMORY_EXIT
        try:
            sys.stderr.write("MemoryError\n")
        except BaseException:
            pass
    except BaseException:
        code = 1
        _print_exception()
    _finish(code)


# ------------------------------------------------------------------ plain data on pipes
#
# Function tests' calls and results cross between the candidate and the grader as frames:
# a 4-byte little-endian length, then ASCII JSON. None, bool, int, float and str are JSON's
# own; every other value is an array whose first item names its type: ["l", item...] list,
# ["t", ...] tuple, ["s", ...] set, ["F", ...] frozenset, ["d", key, value, ...] dict,
# ["b", latin-1 text] bytes, ["c", real, imag] complex, ["f", "nan" | "inf" | "-inf"].
# The reader takes nothing else (no JSON objects, no NaN constants, nothing after the value).

_MAX_FRAME = 64 << 20
_MAX_DEPTH = 100
_CONTAINERS = ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "F"))
_SPECIAL_FLOATS = ("nan", "inf", "-inf")


class Unsendable(Exception):
    """A value that is not plain data."""


def _encode(value, out, depth=0):
    if depth > _MAX_DEPTH:
        raise Unsendable("nested too deep")
    if value is None:
        out.append("null")
    elif value is True or value is False:
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        text = float.__repr__(value)
        out.append('["f","' + text + '"]' if text in _SPECIAL_FLOATS else text)
    elif isinstance(value, str):
        out.append(_JSON[0](str.__str__(value)))
    elif isinstance(value, (bytes, bytearray)):
        out.append('["b",' + _JSON[0](bytes(value).decode("latin-1")) + "]")
    elif isinstance(value, complex):
        out.append('["c",')
        _encode(value.real, out, depth + 1)
        out.append(",")
        _encode(value.imag, out, depth + 1)
        out.append("]")
    elif isinstance(value, dict):
        out.append('["d"')
        for key, item in dict.items(value):
            out.append(",")
            _encode(key, out, depth + 1)
            out.append(",")
            _encode(item, out, depth + 1)
        out.append("]")
    else:
        for kind, tag in _CONTAINERS:
            if isinstance(value, kind):
                out.append('["' + tag + '"')
                for item in kind.__iter__(value):
                    out.append(",")
                    _encode(item, out, depth + 1)
                out.append("]")
                return
        raise Unsendable(type(value).__name__)


def encode(value):
    """A value as a frame's payload; Unsendable when it is not plain data."""
    out = []
    try:
        _encode(value, out)
    except RecursionError:
        raise Unsendable("nested too deep") from None
    return "".join(out).encode("ascii")


def _reject(*args):
    raise ValueError("not plain data")


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_reject)
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject)


def _number(value):
    if type(value) in (int, float):
        return value
    if type(value) is list and len(value) == 2 and value[0] == "f":
        return _plain(value, 0)
    raise ValueError("not a number")


def _plain(value, depth):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is not list or not value or type(value[0]) is not str or depth > _MAX_DEPTH:
        raise ValueError("not plain data")
    tag, items = value[0], value[1:]
    if tag in ("l", "t", "s", "F"):
        items = [_plain(item, depth + 1) for item in items]
        return {"l": list, "t": tuple, "s": set, "F": frozenset}[tag](items)
    if tag == "d" and len(items) % 2 == 0:
        pairs = [_plain(item, depth + 1) for item in items]
        return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
    if tag == "b" and len(items) == 1 and type(items[0]) is str:
        return items[0].encode("latin-1")
    if tag == "c" and len(items) == 2:
        return complex(_number(items[0]), _number(items[1]))
    if tag == "f" and len(items) == 1 and items[0] in _SPECIAL_FLOATS:
        return float(items[0])
    raise ValueError("not plain data")


def decode(payload):
    """The value of a frame's payload; ValueError unless it is exactly one plain value."""
    try:
        text = payload.decode("ascii")
        value, end = _JSON[1](text, 0)
        if end != len(text):
            raise ValueError("data after the value")
        return _plain(value, 0)
    except (ValueError, TypeError, StopIteration, RecursionError, UnicodeError) as e:
        raise ValueError(f"not plain data: {e}") from None


_JSON = []  # encode_basestring_ascii, the scanner: loaded once per sample (_load_json)


def _load_json():
    """_json, the C module (json itself would import re: ~8 ms a sample)."""
    if not _JSON:
        import _json

        _JSON.extend((_json.encode_basestring_ascii, _json.make_scanner(_ScanContext())))


def write_frame(fd, payload):
    data = len(payload).to_bytes(4, "little") + payload
    while data:
        data = data[os.write(fd, data) :]


def read_frame(fd):
    """The next frame's payload; None at the end of the stream; ValueError when the length
    is over the cap."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "little")
    if size > _MAX_FRAME:
        raise ValueError("frame over the size cap")
    return _read_exact(fd, size)


def _read_exact(fd, size):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------ the candidate

# Descriptors of a function test: the candidate reads calls on 3 and answers on 4; the
# grader writes calls on 3, reads answers on 4, reports on 5 and reads its test on 6.
_CALLS, _ANSWERS, _REPORT, _TEST = 3, 4, 5, 6


def _candidate_answer(scope, request):
    """The answer to one request of the grader, as a frame's payload."""
    op = request[0]
    if op == "names":  # what the test takes from the program: functions, values, modules
        kinds = []
        for name in request[1]:
            value = scope.get(name, _reject) if type(name) is str else _reject
            if value is _reject:
                kinds.append(["n"])
            elif type(value) is type(sys):
                kinds.append(["m", getattr(value, "__name__", "")])
            elif callable(value):
                kinds.append(["f"])
            else:
                try:
                    encode(value)
                    kinds.append(["v", value])
                except Unsendable:
                    kinds.append(["n"])
        return encode(["ok", kinds])
    _, name, args, kwargs = request
    if name not in scope:
        return encode(["raise", "NameError", f"name {name!r} is not defined"])
    try:
        result = scope[name](*args, **kwargs)
    except Exception as e:
        kind = next(
            (c.__name__ for c in type(e).__mro__ if _BUILTIN_ERRORS.get(c.__name__) is c),
            "Exception",
        )
        try:
            message = str(e)[:2000]
        except Exception:
            message = ""
        return encode(["raise", kind, message])
    try:
        return encode(["ok", result])
    except Unsendable as e:
        return encode(["unsendable", str(e)])


def _candidate(job):
    """In the candidate's process: the program in a fresh __main__, then its functions
    called on the grader's requests until the grader is done. It leaves with os._exit
    whatever happens: no atexit handler, no thread join, nothing of it after the grader."""
    main = _fresh_main()
    try:
        exec(compile(job["program"], "main.py", "exec"), main.__dict__)
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except SystemExit as e:
        os._exit(_exit_code(e))
    except BaseException:
        _exit_with_traceback()
    try:
        while True:
            payload = read_frame(_CALLS)
            if payload is None:
                os._exit(0)
            write_frame(_ANSWERS, _candidate_answer(main.__dict__, decode(payload)))
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except BaseException:
        _exit_with_traceback()


# The builtin exceptions by name, as the harness started (a program may rebind the names).
_BUILTIN_ERRORS = {
    name: value
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


# --------------------------------------------------------------------------- the grader

# Exit statuses of the grader beyond ASSERT_EXIT and MEMORY_EXIT: the candidate died or sent
# something that is not an answer; the test hands the program something that is not plain
# data, which this design cannot grade (not the program's doing).
GONE_EXIT = 215
UNGRADABLE_EXIT = 216


class CandidateFailed(BaseException):
    """The candidate broke off (a BaseException: a test's `except Exception` cannot swallow
    it, and the grader fails the test even if a bare except did)."""


class Ungradable(BaseException):
    """The test passes the program something that is not plain data."""


class _Grader:
    def __init__(self):
        self.failed = None  # why the candidate failed, once it has
        self.ungradable = None  # what the test passed that is not plain data

    def ask(self, request):
        if self.failed is not None:
            raise CandidateFailed(self.failed)
        try:
            payload = encode(request)
        except Unsendable as e:
            self.ungradable = f"the test passes the program a {e}"
            raise Ungradable(self.ungradable) from None
        try:
            write_frame(_CALLS, payload)
            answer = read_frame(_ANSWERS)
            if answer is None:
                raise ValueError("the program's process ended")
            answer = decode(answer)
            if type(answer) is not list or not answer or answer[0] not in ("ok", "raise"):
                raise ValueError(f"not an answer: {answer!r:.200}")
        except (OSError, ValueError) as e:
            self.failed = str(e)
            raise CandidateFailed(self.failed) from None
        return answer

    def call(self, name, args, kwargs):
        answer = self.ask(["call", name, list(args), kwargs])
        if answer[0] == "ok" and len(answer) == 2:
            return answer[1]
        valid = len(answer) == 3 and type(answer[1]) is str
        error = _BUILTIN_ERRORS.get(answer[1]) if valid else None
        if not (isinstance(error, type) and issubclass(error, Exception)):
            self.failed = f"not an answer: {answer!r:.200}"
            raise CandidateFailed(self.failed)
        raise error(answer[2])


class Remote:
    """A function of the program, called in the candidate's process."""

    def __init__(self, grader, name):
        self._grader, self.__name__ = grader, name

    def __call__(self, *args, **kwargs):
        return self._grader.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<function {self.__name__} of the program>"


_ALIASES = {"np": "numpy", "pd": "pandas"}


def _module(free, name):
    """The module the program has under `free`, imported here; None unless its name is
    that name (or ends with it, or is numpy as np or pandas as pd): the program does not get
    to pick some other module for a name the test uses."""
    if type(name) is not str or not name:
        return None
    if free not in (name, name.rpartition(".")[2]) and _ALIASES.get(free) != name:
        return None
    try:
        __import__(name)
    except ImportError:
        return None
    return sys.modules.get(name)


def _grade(job, cmd):
    """In the grader's process: the test against the candidate; exits with the verdict."""
    import builtins

    grader = _Grader()
    try:
        source = read_frame(_TEST)
        code = compile(source.decode("utf-8", "surrogateescape"), "test.py", "exec")
    except BaseException:
        _print_exception(0)
        os._exit(SETUP_EXIT)
    os.write(_REPORT, b"L")  # loaded: the test pipe is read; the candidate may start
    scope = {"__name__": "__main__", "__builtins__": builtins}
    code_out = 1
    try:
        names = list(cmd.get("names") or ())
        # Asked even when empty: the answer says the program loaded.
        answer = grader.ask(["names", names])
        kinds = answer[1] if len(answer) == 2 else None
        if type(kinds) is not list or len(kinds) != len(names):
            grader.failed = "not an answer to names"
            raise CandidateFailed(grader.failed)
        for free, kind in ((names[i], kinds[i]) for i in range(len(names))):
            tag = kind[0] if type(kind) is list and kind else None
            if tag == "f":
                scope[free] = Remote(grader, free)
            elif tag == "v" and len(kind) == 2:
                scope[free] = kind[1]
            elif tag == "m" and len(kind) == 2:
                module = _module(free, kind[1])
                if module is not None:
                    scope[free] = module
        exec(code, scope)
        if cmd.get("check"):
            scope["check"](Remote(grader, job["entry_point"]))
        code_out = 0
    except CandidateFailed:
        pass
    except Ungradable:
        pass
    except AssertionError:
        code_out = ASSERT_EXIT
        _print_exception(0)
    except MemoryError:
        code_out = MEMORY_EXIT
    except BaseException:
        _print_exception(0)
    # Whatever the test made of it (a bare except may have swallowed it).
    if grader.failed is not None:
        _say(f"the program failed to answer: {grader.failed}")
        code_out = GONE_EXIT
    elif grader.ungradable is not None:
        _say(f"ungradable: {grader.ungradable}")
        code_out = UNGRADABLE_EXIT
    elif code_out == 0:
        os.write(_REPORT, b"P")
    os._exit(code_out)


def _say(text):
    try:
        os.write(2, (text[:2000] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


# ------------------------------------------------------------------------------- tests


def _setup(data, limits, started_w):
    """In a test's child: its process group, death with the harness, stdin (a memfd of
    `data`), file size and CPU limits; then the start is reported."""
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
    return fd


def _keep_only(fds):
    """Descriptors 0, 1, ... become `fds`, in order; every other one is closed."""
    moved = [os.dup(fd) for fd in fds]  # a target may be one of the sources
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
    os.closerange(len(fds), max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536))


def _child(job, data, out_w, err_w, started_w, limits, calls=None):
    """Never returns: sets up the descriptors and limits of one test, then runs it (the
    program of a stdin/stdout test, or a function test's candidate)."""
    try:
        stdin = _setup(data, limits, started_w)
        # Everything else goes: the start pipe, the result pipe, the command stream.
        _keep_only([stdin, out_w, err_w, *(calls or ())])
    except BaseException:
        os._exit(SETUP_EXIT)
    if calls is None:
        _run_program(job)
    _candidate(job)


def _grader_child(job, cmd, out_w, err_w, started_w, limits, pipes):
    try:
        stdin = _setup(b"", limits, started_w)
        _keep_only([stdin, out_w, err_w, *pipes])
    except BaseException:
        os._exit(SETUP_EXIT)
    _grade(job, cmd)


def _kill(pids, own_pidns):
    """The test's processes: in the sandbox's own PID namespace every process but the harness
    and init (daemons that left the process group included); elsewhere the process groups."""
    targets = [(-1, signal.SIGKILL)] if own_pidns else []
    for target, sig in targets + [(-pid, signal.SIGKILL) for pid in pids]:
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


def _close(fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


def run_test(job, cmd, limits, own_pidns, notify=None, test_fd=None):
    """Run one test in forked children; returns the answer for the grader outside. notify:
    called with "idle" when the test waits instead of computing and "busy" when it computes
    again (see _wait)."""
    if job["mode"] == "function":
        return _run_function_test(job, cmd, limits, own_pidns, notify, test_fd)
    data = cmd.get("stdin", "").encode("utf-8", "surrogateescape")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started_r, started_w = os.pipe()
    start = time.monotonic()
    try:
        pid = _fork()
    except OSError as e:
        _close((out_r, out_w, err_r, err_w, started_r, started_w))
        return {"status": "fork_failed", "error": _b64(str(e).encode())}
    if pid == 0:
        _child(job, data, out_w, err_w, started_w, limits)
    _close((out_w, err_w, started_w))
    caps = {out_r: limits["output_bytes"], err_r: STDERR_BYTES, started_r: 1}
    bufs = {fd: bytearray() for fd in caps}
    status, verdict = _wait(pid, [pid], bufs, caps, out_r, limits, start, notify)
    _kill([pid], own_pidns)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    verdict = _finish_reads(caps, bufs, out_r, verdict)
    answer = _status(status, verdict, start)
    answer["stdout"] = _b64(bufs[out_r])
    answer["stderr"] = _b64(bufs[err_r])
    answer["started"] = bytes(bufs[started_r]) == b"1"
    return answer


def _finish_reads(caps, bufs, out_r, verdict):
    for fd in caps:
        if verdict is None and _drain(fd, bufs[fd], caps[fd]) and fd == out_r:
            verdict = "output_limit"
        os.close(fd)
    return verdict


def _status(status, verdict, start):
    answer = {"seconds": time.monotonic() - start}
    if verdict is not None:
        answer["status"] = verdict
    elif os.WIFSIGNALED(status):
        answer.update(status="signal", signal=os.WTERMSIG(status))
    else:
        answer.update(status="exit", code=os.WEXITSTATUS(status))
    return answer


def _run_function_test(job, cmd, limits, own_pidns, notify, test_fd):
    """A function test: the grader first (it reads its test, then says so), then the
    candidate; the test is over when the grader is."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started_r, started_w = os.pipe()
    report_r, report_w = os.pipe()
    calls_r, calls_w = os.pipe()
    answers_r, answers_w = os.pipe()
    fds = [out_r, out_w, err_r, err_w, started_r, started_w, report_r, report_w]
    fds += [calls_r, calls_w, answers_r, answers_w]
    start = time.monotonic()
    grader = candidate = None
    try:
        grader = _fork()
        if grader == 0:
            _grader_child(
                job, cmd, out_w, err_w, started_w, limits, (calls_w, answers_r, report_w, test_fd)
            )
        _close((report_w,))
        fds.remove(report_w)
        loaded = _read_exact(report_r, 1)  # the test pipe is read: nothing else can race it
        if loaded != b"L":
            os.waitpid(grader, 0)
            error = _b64(b"the grader did not load the test")
            _close(fds)
            return {"status": "exit", "code": SETUP_EXIT, "started": False, "error": error}
        candidate = _fork()
        if candidate == 0:
            _child(job, b"", out_w, err_w, started_w, limits, (calls_r, answers_w))
    except OSError as e:
        _kill([p for p in (grader, candidate) if p], own_pidns)
        for pid in (grader, candidate):
            if pid:
                os.waitpid(pid, 0)
        _close(fds)
        return {"status": "fork_failed", "error": _b64(str(e).encode())}
    _close((out_w, err_w, started_w, calls_r, calls_w, answers_r, answers_w))
    caps = {out_r: limits["output_bytes"], err_r: STDERR_BYTES, started_r: 2, report_r: 1}
    bufs = {fd: bytearray() for fd in caps}
    pids = [grader, candidate]
    status, verdict = _wait(grader, pids, bufs, caps, out_r, limits, start, notify)
    if status is None:
        _kill(pids, own_pidns)
        status = os.waitpid(grader, 0)[1]
    gone = verdict is None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == GONE_EXIT
    candidate_status = None
    if gone:  # how the candidate ended says more (memory, CPU time) than the grader's status
        deadline = time.monotonic() + 0.1
        while candidate_status is None and time.monotonic() < deadline:
            done, candidate_status = os.waitpid(candidate, os.WNOHANG)
            if not done:
                candidate_status = None
                time.sleep(0.002)
    _kill(pids, own_pidns)
    if candidate_status is None:
        candidate_status = os.waitpid(candidate, 0)[1]
        if gone:  # still running after it broke off: our SIGKILL is no verdict
            candidate_status = 1 << 8
    verdict = _finish_reads(caps, bufs, out_r, verdict)
    passed = (
        verdict is None
        and os.WIFEXITED(status)
        and os.WEXITSTATUS(status) == 0
        and bytes(bufs[report_r]) == b"P"
    )
    if gone:
        status = candidate_status
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) != MEMORY_EXIT:
            status = 1 << 8  # it ended, or broke off, before the grader was done: an error
    answer = _status(status, verdict, start)
    if verdict is None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == UNGRADABLE_EXIT:
        answer["status"] = "ungradable"
    answer["passed"] = passed
    answer["stderr"] = _b64(bufs[err_r])
    answer["started"] = bytes(bufs[started_r]) == b"11"
    return answer


# A test that used less CPU than this share of a window of wall time is waiting; one that
# used more than _BUSY_SHARE after that computes again.
_IDLE_SHARE = 0.1
_BUSY_SHARE = 0.5
_IDLE_WINDOW = 0.05  # seconds


def _cpu_seconds(pids):
    """The CPU time of processes `pids` so far (their process CPU clocks, Linux's
    MAKE_PROCESS_CPUCLOCK: no /proc needed; a process gone counts 0 from then on)."""
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(((~pid) << 3) | 2)
        except OSError:
            pass
    return total


def _wait(pid, pids, bufs, caps, out_fd, limits, start, notify=None):
    """(wait status or None, "timeout" / "output_limit" / None): the exit of `pid`, read
    while it runs, within the wall-clock timeout. From limits["idle_after"] after the start,
    the CPU time of `pids` is watched in windows: a test that computes less than _IDLE_SHARE
    of a window (sleeping, blocked on a read) is reported with notify("idle"), so the grader
    gives its core to another sample, and one that then computes more than _BUSY_SHARE of a
    window with notify("busy"), so it takes a core back: sleeping first earns no free core."""
    deadline = start + limits["timeout"]
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    poller = select.poll()
    for fd in caps:
        poller.register(fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    open_fds = set(caps)
    watch = notify is not None and limits.get("idle_after") is not None
    idle = False
    if watch:
        watch_from = start + limits["idle_after"]
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
                cpu = _cpu_seconds(pids)
                share = (cpu - last[1]) / (now - last[0])
                if not idle and share < _IDLE_SHARE:
                    idle = True
                    notify("idle")
                elif idle and share > _BUSY_SHARE:
                    idle = False
                    notify("busy")
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
    test_fd = int(sys.argv[3]) if len(sys.argv) > 3 else None
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
        if job["mode"] == "function":
            _load_json()
    except Exception as e:
        _send(result_fd, {"ready": False, "error": _b64(f"{type(e).__name__}: {e}".encode())})
        return
    _send(result_fd, {"ready": True})
    while True:
        cmd = _receive(commands)
        if cmd is None or cmd.get("op") != "run":
            break
        notify = lambda what: _send(result_fd, {what: True})  # noqa: E731
        answer = run_test(job, cmd, limits, own_pidns, notify, test_fd)
        _send(result_fd, answer)
        if answer.get("started") is False and job["mode"] == "function":
            break  # the test pipe may hold the rest of a test no one read


if __name__ == "__main__":
    main()
