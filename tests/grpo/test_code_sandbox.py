"""The code reward's sandbox against programs that misbehave: each case checks the verdict and
that nothing leaked (no file written or read on the host, no secret, no connection, no
process left), and the grader keeps working afterwards. Needs bubblewrap; skipped only where
bwrap cannot create its namespaces."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from grpo.rewards import sandbox as sandbox_mod
from grpo.rewards import sandbox_cgroup
from grpo.rewards.code import CodeReward, CodeSettings
from grpo.rewards.sandbox import (
    ASSERT_EXIT,
    MEMORY_EXIT,
    SETUP_EXIT,
    Limits,
    Sandbox,
    SandboxUnavailable,
    run_parallel,
)

TIMEOUT = 1.5  # per test: short, so the cases that loop stay fast
LIMITS = Limits(timeout=TIMEOUT, memory_mb=256, processes=8, output_bytes=1 << 16)
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed: apt-get install bubblewrap (.ci/run does)")
    box = Sandbox("bwrap", LIMITS)
    try:
        box.ensure_available()
    except SandboxUnavailable as e:
        pytest.skip(f"bwrap cannot create namespaces on this machine: {e}")
    return box


@pytest.fixture(scope="module")
def reward(sandbox) -> CodeReward:
    return CodeReward(CodeSettings(limits=LIMITS))


def answer(program: str) -> str:
    return f"<think>t</think><answer>```python\n{program}\n```</answer>"


def verdict(reward: CodeReward, program: str, stdin: str = "", expected: str = "ok\n") -> str:
    """The verdict of one stdio test; the reward must agree with it."""
    reward.pop_metrics()
    score = reward([answer(program)], inputs=[[stdin]], outputs=[[expected]])
    counts = {k: v for k, v in reward.pop_metrics().items() if v}
    (name,) = counts
    assert score == [1.0 if name == "passed" else 0.0]
    return name


def run(sandbox: Sandbox, program: str, stdin: str = ""):
    with sandbox.session("stdio", program) as session:
        return session.run(stdin=stdin)


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line or name (comm) holds marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "comm").read_bytes()
            except OSError:
                continue
            if marker.encode() in seen:
                found.append(int(entry.name))
    return found


def assert_gone(marker: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == [], f"sandboxed processes outlived the run: {marker}"


def named(marker: str) -> str:
    """Program text that names its process (and the processes it forks) marker, which the
    host sees in /proc/<pid>/comm (15 characters at most)."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"


# ---------------------------------------------------------------------------- time and CPU


def test_infinite_loop(reward):
    start = time.monotonic()
    assert verdict(reward, "while True:\n    pass") == "timeout"
    assert time.monotonic() - start < TIMEOUT + 2


def test_busy_loop_in_child_process(reward):
    marker = f"busy{uuid.uuid4().hex[:10]}"
    program = named(marker) + (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    while True:\n"
        "        pass\n"
        "print('ok', flush=True)\n"
        "os.waitpid(pid, 0)\n"
    )
    assert verdict(reward, program) == "timeout"
    assert_gone(marker)


def test_fork_bomb(sandbox, reward):
    # Every process forks for ever: the process limit stops it, the timeout ends it.
    marker = f"bomb{uuid.uuid4().hex[:10]}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert verdict(reward, named(marker) + bomb) == "timeout"
    assert_gone(marker)
    # The limit holds: a program that counts its forks stops below it.
    counted = (
        "import os, time\nn = 0\n"
        "try:\n    while n < 1000:\n"
        "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
        "        n += 1\nexcept OSError:\n    pass\n"
        f"print('ok' if n < {LIMITS.processes} else n)"
    )
    assert verdict(reward, counted) == "passed"
    assert verdict(reward, "print(input())", "ok") == "passed"  # and the grader carries on


def test_stopping_the_harness_times_out(reward):
    # SIGSTOP on the harness: only the grader's own wall clock can end this one.
    start = time.monotonic()
    assert verdict(reward, "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)") == "timeout"
    assert time.monotonic() - start < TIMEOUT + 4


# ------------------------------------------------------------------------- memory, output


def test_memory_bomb(reward):
    assert verdict(reward, "x = bytearray(10 ** 10)") == "memory"
    grow = "xs = []\nwhile True:\n    xs.append(bytes(1 << 26))"  # calloc: no page touched
    assert verdict(reward, grow) == "memory"


def test_memory_bound_holds_per_sample(sandbox, monkeypatch):
    """Four children of 200 MB each under a 512 MB limit: each fits its own address space,
    together they do not. With a cgroup per sample the program fails (a child is killed)
    and the sample never held more than the bound; without one, the rlimits are all there
    is (per process), which this test cannot check."""
    limits = Limits(timeout=10.0, memory_mb=512)
    box = Sandbox("bwrap", limits)
    if box.cgroups is None:
        pytest.skip(f"no cgroup to be had here: {box.bound()}")
    peaks = []
    remove = sandbox_cgroup.Cgroup.remove

    def record(self):
        peaks.append(self.peak_bytes())
        remove(self)

    monkeypatch.setattr(sandbox_cgroup.Cgroup, "remove", record)
    program = (
        "import os\nkids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (200 << 20)\n"  # written: every page is touched
        "        import time\n        time.sleep(1)\n        os._exit(0)\n"
        "    kids.append(pid)\n"
        "print('ok' if all(os.waitpid(p, 0)[1] == 0 for p in kids) else 'killed')\n"
    )
    reward = CodeReward(CodeSettings(limits=limits))
    assert reward([answer(program)], inputs=[[""]], outputs=[["ok"]]) == [0.0]
    assert peaks and all(p is None or p <= (limits.memory_mb << 20) for p in peaks), peaks
    # One child alone fits, as it did before.
    alone = program.replace("range(4)", "range(1)")
    assert reward([answer(alone)], inputs=[[""]], outputs=[["ok"]]) == [1.0]


def test_one_gigabyte_of_output(sandbox, reward):
    program = "import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(chunk)"
    start = time.monotonic()
    assert verdict(reward, program) == "output_limit"
    assert time.monotonic() - start < TIMEOUT  # stopped at the cap, not after 1 GB
    result = run(sandbox, program)
    assert result.status == "output_limit" and len(result.stdout) <= LIMITS.output_bytes


# ---------------------------------------------------------------------------- files, secrets


def test_writing_outside_the_sandbox(reward, tmp_path):
    canary = tmp_path / "canary" / "written.txt"  # under the host's /tmp
    project = HERE / f"canary-{uuid.uuid4().hex}.txt"  # in the project
    program = (
        "import os\n"
        f"for path in ({str(canary)!r}, {str(project)!r}, '/usr/canary', '/canary'):\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        open(path, 'w').write('pwned')\n"
        "    except OSError:\n"
        "        pass\n"
        f"print('ok' if not os.path.exists({str(Path(__file__).resolve())!r}) else 'visible')"
    )
    # The project is not there at all (this file is not; a write to the project's path lands
    # in the sandbox's own /tmp when the checkout is under /tmp, as a CI clone may be).
    assert verdict(reward, program) == "passed"
    assert not canary.exists() and not project.exists() and not Path("/canary").exists()
    assert not Path("/usr/canary").exists()


def test_reading_a_host_file(sandbox, tmp_path):
    secret = uuid.uuid4().hex
    canaries = [tmp_path / "secret.txt", HERE / f"secret-{uuid.uuid4().hex}.txt"]
    for path in canaries:
        path.write_text(secret)
    try:
        paths = [str(p) for p in canaries] + ["/etc/passwd", "/root/.bashrc", __file__]
        program = (
            "import os\n"
            f"for path in {paths!r}:\n"
            "    try:\n"
            "        print(open(path).read())\n"
            "    except OSError as e:\n"
            "        print('unreadable', type(e).__name__)\n"
            f"print('project visible' if os.path.exists({str(HERE)!r}) else 'no project')\n"
        )
        result = run(sandbox, program)
        assert result.status == "exit" and result.code == 0
        out = result.stdout.decode()
        assert secret not in out and out.count("unreadable FileNotFoundError") == len(paths)
        assert "no project" in out
    finally:
        for path in canaries:
            path.unlink()


def test_environment_is_empty(sandbox, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("GRPO_SANDBOX_SECRET", secret)
    program = (
        "import os\nprint(dict(os.environ))\n"
        "for path in ('/proc/1/environ', '/proc/self/environ'):\n"
        "    try:\n        print(open(path).read())\n"
        "    except OSError as e:\n        print('unreadable', path)\n"
    )
    result = run(sandbox, program)
    out = result.stdout.decode()
    assert result.code == 0 and secret not in out and "GRPO_SANDBOX_SECRET" not in out
    assert "unreadable /proc/1/environ" in out


def test_programs_import_what_the_interpreter_has(sandbox):
    """The harness runs with -S (faster starts) yet a program sees the interpreter's
    site-packages, as under `python3 prog.py`; nothing else of the host."""
    show = "import sys\nprint([p for p in sys.path if p.endswith('-packages')])"
    inside = run(sandbox, show)
    assert inside.status == "exit" and inside.code == 0, inside
    outside = subprocess.run(
        [sandbox.python, "-I", "-c", show], capture_output=True, check=True, env={}
    )
    assert inside.stdout == outside.stdout


def test_no_network(reward):
    accepted = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(TIMEOUT + 2)
    port = server.getsockname()[1]

    def serve():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    program = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
        "    print('connected')\n"
        "except OSError:\n"
        "    print('ok')\n"
    )
    try:
        assert verdict(reward, program) == "passed"
    finally:
        server.close()
        thread.join()
    assert accepted == []


# ----------------------------------------------------------------------------- processes


def test_double_forked_daemon_does_not_outlive_the_run(reward):
    marker = f"daemon-{uuid.uuid4().hex}"  # on its command line
    sleeper = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    program = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}, {marker!r}])\n"
        "    os._exit(0)\n"
        "print('ok')\n"
    )
    assert verdict(reward, program) == "passed"  # the program itself did its job
    assert_gone(marker)


def test_killing_its_parent(reward):
    assert verdict(reward, "import os\nos.kill(os.getppid(), 9)") == "runtime_error"
    assert verdict(reward, "import os\nprint('ok', flush=True)\nos.kill(-1, 9)") == "runtime_error"
    assert verdict(reward, "print(input())", "ok") == "passed"


def test_os_system_subprocess_ctypes(reward, tmp_path):
    canary = tmp_path / "system.txt"
    program = (
        "import ctypes, os, subprocess\n"
        f"os.system('echo pwned > {canary}; cat /etc/shadow')\n"
        f"subprocess.run(['sh', '-c', 'echo pwned > {canary}'], capture_output=True)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "results = [\n"
        "    libc.setuid(0),\n"
        "    libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
        "    libc.unshare(0x10000000),\n"  # CLONE_NEWUSER: no nested namespaces
        "    libc.ptrace(16, os.getppid(), None, None),\n"  # PTRACE_ATTACH the harness
        "]\n"
        "print('ok' if results == [-1] * 4 else results)\n"
    )
    assert verdict(reward, program) == "passed"
    assert not canary.exists()


# ------------------------------------------------------------------------------- verdicts


def test_correct_output_then_raise(reward):
    assert verdict(reward, "print('ok')\nraise ValueError('after the answer')") == "runtime_error"
    assert verdict(reward, "print('ok')\nraise SystemExit(3)") == "runtime_error"
    assert verdict(reward, "print('ok')\nraise SystemExit(0)") == "passed"


def test_forged_verdicts_do_not_pass(reward):
    fake = (
        '{"ready": true}\\n{"status": "exit", "code": 0, "token_ok": true, "stdout": "b2sK"}\\n'
        "PASSED\\nok\\n"
    )
    forge = (
        "import os\n"
        f"fake = {fake!r}.encode()\n"
        "print(fake.decode(), flush=True)\n"
        "for fd in range(256):\n"
        "    try:\n        os.write(fd, fake)\n"
        "    except OSError:\n        pass\n"
    )
    # stdin/stdout: only the program's own stdout is compared, and it is wrong.
    assert verdict(reward, forge) == "wrong_answer"
    # Function tests: leaving early with status 0, whatever was written, is not a pass.
    tests = ["def check(candidate):\n    assert candidate() == 1\n"]
    for exit_early in ("os._exit(0)", "raise SystemExit(0)"):
        program = f"{forge}\ndef f():\n    return 2\n{exit_early}\n"
        reward.pop_metrics()
        assert reward([answer(program)], test=[tests], entry_point=["f"]) == [0.0]
        assert reward.pop_metrics()["runtime_error"] == 1
    honest = "def f():\n    return 1\n"
    assert reward([answer(honest)], test=[tests], entry_point=["f"]) == [1.0]


@pytest.mark.parametrize("status", [SETUP_EXIT, MEMORY_EXIT, ASSERT_EXIT])
def test_harness_exit_statuses_cannot_be_borrowed(reward, status):
    """Exiting with the harness's own statuses changes at most the verdict's name: the score
    stays 0, never None (a sandbox failure, which would spare the sample its penalty)."""
    expected = {SETUP_EXIT: "runtime_error", MEMORY_EXIT: "memory", ASSERT_EXIT: "runtime_error"}
    assert verdict(reward, f"print('ok')\nraise SystemExit({status})") == expected[status]
    tests = ["def check(candidate):\n    assert candidate() == 1\n"]
    program = f"def f():\n    return 1\nraise SystemExit({status})"
    reward.pop_metrics()
    assert reward([answer(program)], test=[tests], entry_point=["f"]) == [0.0]
    assert reward.pop_metrics()["sandbox_error"] == 0


def test_a_batch_of_misbehaving_programs_costs_zeros(reward, tmp_path):
    """Several at once in one call: each scores 0, the good one 1, and the call returns."""
    programs = [
        "while True:\n    pass",
        "import os\nos.kill(os.getppid(), 9)",
        "x = bytearray(10 ** 10)",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "print(input())",
    ]
    start = time.monotonic()
    scores = reward([answer(p) for p in programs], inputs=[["ok"]] * 5, outputs=[["ok"]] * 5)
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - start < 2 * TIMEOUT + 2  # the timeouts overlap


def test_timeouts_overlap_across_the_pool():
    """Six loops on two workers: after a while two of them give up their workers (no more:
    see the next test), so the batch takes about two timeouts, not three in a row."""
    timeout = 2.0
    reward = CodeReward(CodeSettings(limits=Limits(timeout=timeout), workers=2))
    loops = [answer(f"while True:\n    pass  # {i}") for i in range(6)]  # distinct: 6 runs
    start = time.monotonic()
    scores = reward(loops, inputs=[[""]] * 6, outputs=[["x"]] * 6)
    assert scores == [0.0] * 6
    assert time.monotonic() - start < 2.5 * timeout  # in a row: 3 x timeout at least


# ----------------------------------------------------------------------- no sandbox at hand


def test_waiting_programs_give_up_their_cores_at_once():
    """Eight programs that sleep, on two workers: the harness reports them idle, so they wait
    together and the batch takes about one timeout (let go only after a while, as loops are,
    they would take three)."""
    timeout = 1.5
    reward = CodeReward(CodeSettings(limits=Limits(timeout=timeout), workers=2))
    waits = [answer(f"import time\ntime.sleep(100)  # {i}") for i in range(8)]
    start = time.monotonic()
    scores = reward(waits, inputs=[[""]] * 8, outputs=[["x"]] * 8)
    assert scores == [0.0] * 8
    assert reward.pop_metrics()["timeout"] == 8
    assert time.monotonic() - start < timeout + 1.0


def test_slow_correct_programs_are_not_starved_into_timeouts():
    """Slow samples give up their workers, but no more than one per worker: on one worker
    (two cores in CI), correct programs that each need 0.4 of the timeout in CPU run two at a
    time and all pass (letting every slow one go, all 16 would end up sharing the cores and
    time out on the wall clock: 12 of 16 did with 2 workers)."""
    timeout = 2.0
    reward = CodeReward(CodeSettings(limits=Limits(timeout=timeout), workers=1))
    burn = (
        "import time\nend = time.process_time() + {cpu}\nwhile time.process_time() < end:\n"
        "    pass\nprint('ok')  # {i}"
    )
    programs = [answer(burn.format(cpu=0.4 * timeout, i=i)) for i in range(16)]
    scores = reward(programs, inputs=[[""]] * 16, outputs=[["ok"]] * 16)
    assert scores == [1.0] * 16, reward.pop_metrics()


def test_computing_again_after_waiting_takes_a_place_back():
    """run_parallel: a call that reports itself idle and then busy again holds a place again,
    so no new item starts beside it. One worker, three items in the order they get to run
    (the pool may start them in any order): the first waits (the second takes the place),
    computes again, and keeps computing after the second has gone idle too; the third must
    not start until the first is done. Sequenced by events, not sleeps."""
    arrivals, lock = [], threading.Lock()
    second, first_busy, second_idle, third, first_done = (threading.Event() for _ in range(5))
    beside = []

    def sample(i):
        with lock:
            arrivals.append(i)
            role = len(arrivals)
        if role == 1:
            sandbox_mod._report_idle()
            assert second.wait(10)
            sandbox_mod._report_busy()
            first_busy.set()
            assert second_idle.wait(10)
            beside.append(third.wait(0.3))  # computing on: no other item may start
            first_done.set()
        elif role == 2:
            second.set()
            assert first_busy.wait(10)
            sandbox_mod._report_idle()
            second_idle.set()
            assert first_done.wait(10)
        else:
            third.set()
        return i

    assert run_parallel(sample, range(3), workers=1, slow_after=10.0) == [0, 1, 2]
    assert beside == [False]


def test_sleeping_then_spinning_does_not_rob_correct_programs():
    """Programs that sleep (reported idle: they give their worker up), then spin until their
    timeout, beside correct programs that need 0.3 of the timeout in CPU: the spinners take
    their places back when they compute again, so the correct programs keep their share and
    pass (before, every spinner computed beside them and they timed out)."""
    timeout = 2.0
    reward = CodeReward(CodeSettings(limits=Limits(timeout=timeout), workers=1))
    spin = "import time  # {i}\ntime.sleep(0.3)\nwhile True:\n    pass"
    burn = (
        "import time\nend = time.process_time() + {cpu}\nwhile time.process_time() < end:\n"
        "    pass\nprint('ok')  # {i}"
    )
    programs = [answer(spin.format(i=i)) for i in range(6)]
    programs += [answer(burn.format(cpu=0.3 * timeout, i=i)) for i in range(2)]
    scores = reward(programs, inputs=[[""]] * 8, outputs=[["ok"]] * 8)
    assert scores == [0.0] * 6 + [1.0] * 2, reward.pop_metrics()


def test_missing_bwrap_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        Sandbox("bwrap").ensure_available()
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        CodeReward(CodeSettings()).prepare()


def test_sandbox_none_warns_and_runs(monkeypatch):
    monkeypatch.setenv("GRPO_SANDBOX_SECRET", "x")
    reward = CodeReward(CodeSettings(sandbox="none", limits=Limits(timeout=1.0)))
    with pytest.warns(UserWarning, match="--code-sandbox none.*read and write every file"):
        reward.prepare()
    scores = reward(
        [answer("print(input())"), answer("while True: pass")],
        inputs=[["ok"]] * 2,
        outputs=[["ok"]] * 2,
    )
    assert scores == [1.0, 0.0]
    # Its own temporary working directory (removed afterwards) and an empty environment.
    program = "import os\nprint(os.getcwd())\nprint('GRPO_SANDBOX_SECRET' in os.environ)"
    with Sandbox("none").session("stdio", program) as session:
        cwd, secret_seen = session.run().stdout.decode().split()
    assert Path(cwd).name.startswith("grpo-sandbox-") and not Path(cwd).exists()
    assert secret_seen == "False"
