"""Function-test grading against wrong programs that try to forge a pass (issue 27, part 1).

Every row is a wrong ``add(a, b)`` (wrong on at least one of the tests below) plus one forgery
technique; each runs against the tests both as a list of asserts and as ``check(candidate)``,
and must score 0. The control, a correct ``add``, must score 1 both ways. The techniques are
what a policy optimising the reward could find: reaching the pass token (frames, descriptors),
running after a failed assert (atexit, threads), replacing what the grader calls (builtins,
the harness's own globals, the serializer), answering with objects that compare equal to
anything, shadowing the builtins the tests use, reading the tests from memory, and leaving
early or printing a verdict. Needs bubblewrap (skipped only where it cannot create
namespaces, as test_code_sandbox.py)."""

from __future__ import annotations

import shutil

import pytest

from grpo.rewards.code import CodeReward, CodeSettings
from grpo.rewards.sandbox import Limits, Sandbox, SandboxUnavailable

ASSERTS = [
    "assert add(1, 2) == 3\n",
    "assert add(-4, 10) == 6\n",
    "assert abs(add(0.5, 0.25) - 0.75) < 1e-9\n",
    "assert len(str(add(40, 2))) == 2\n",
]
CHECK = "def check(candidate):\n" + "".join(
    "    " + line.replace("add(", "candidate(") for line in ASSERTS
)
WRONG = "def add(a, b):\n    return a - b\n"

# Collects short bytes from every frame's locals and globals (a token) and writes the likeliest
# to every descriptor, with forged answers in the formats a grader might read if asked.
STEAL = """
import gc, os, sys
FAKE = [b'{"status": "exit", "code": 0, "token_ok": true, "passed": true}\\n',
        b'\\x04\\x00\\x00\\x00true', b'PASSED\\n', b'["ok"]\\n']
def _secrets():
    found = []
    for f in [sys._getframe()] + list(sys._current_frames().values()):
        while f is not None:
            for scope in (f.f_locals, f.f_globals):
                for v in list(scope.values()):
                    if isinstance(v, (bytes, bytearray)) and 8 <= len(v) <= 64:
                        found.append(bytes(v))
            f = f.f_back
    return found
def _forge(fake=False):
    found = _secrets()
    # A token is an exact match: the shape of the harness's own (16 random bytes, as hex).
    found = [s for s in found if len(s) == 32] or found
    for data in found[:1] + (FAKE if fake else []):
        for fd in range(3, 64):
            try:
                os.write(fd, data)
            except OSError:
                pass
"""

# Reads the tests' source from this process's memory (frames, then every dict the collector
# tracks) and answers with the values the asserts expect.
READ_TESTS = """
import ast, gc, sys
def _sources():
    f = sys._getframe()
    while f is not None:
        for v in list(f.f_locals.values()):
            yield v
        f = f.f_back
    for o in gc.get_objects():
        if isinstance(o, dict):
            yield from list(o.values())
def _expected():
    table = {}
    for v in _sources():
        texts = [v] if isinstance(v, str) else []
        if isinstance(v, dict):
            texts = [t for t in v.values() if isinstance(t, str)]
        for text in texts:
            if 'assert' not in text:
                continue
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
                    call, value = node.left, node.comparators[0]
                elif isinstance(node, ast.BinOp) and isinstance(node.left, ast.Call):
                    call, value = node.left, node.right
                else:
                    continue
                try:
                    key = tuple(ast.literal_eval(a) for a in call.args)
                    table[key] = ast.literal_eval(value)
                except ValueError:
                    pass
    return table
TABLE = _expected()
def add(a, b):
    return TABLE.get((a, b), a - b)
"""

ROWS = {
    # The pass token of the harness's frames, written to every descriptor, then leave.
    "frame_token": WRONG + STEAL + "_forge()\nos._exit(0)\n",
    # Forged verdicts in every format, on every descriptor, then carry on being wrong.
    "pipe_fds": WRONG + STEAL + "_forge(fake=True)\n",
    # After the failed assert: an atexit handler forges the pass and leaves with status 0.
    "atexit": WRONG + STEAL + "import atexit\natexit.register(lambda: (_forge(), os._exit(0)))\n",
    # After the failed assert: a non-daemon thread, which the interpreter's exit joins.
    "thread": WRONG
    + STEAL
    + (
        "import threading, time\n"
        "def late():\n    time.sleep(0.3)\n    _forge()\n    os._exit(0)\n"
        "threading.Thread(target=late).start()\n"
    ),
    # exec through builtins: the tests are never run (and check is a no-op).
    "builtins_exec": WRONG
    + (
        "import builtins\n"
        "def fake_exec(source, scope=None, *args):\n"
        "    if scope is not None:\n        scope['check'] = lambda candidate: None\n"
        "builtins.exec = fake_exec\n"
    ),
    # compile through builtins: the tests compile to something harmless.
    "builtins_compile": WRONG
    + (
        "import builtins\nreal = builtins.compile\n"
        "def fake_compile(source, name, mode, *args, **kwargs):\n"
        "    return real('def check(candidate):\\n    pass\\n', name, mode)\n"
        "builtins.compile = fake_compile\n"
    ),
    # Right on integers, wrong on floats: abs shadowed in the globals the tests run in.
    "shadow_abs": "def add(a, b):\n    return int(a) + int(b)\ndef abs(x):\n    return 0\n",
    # Wrong on (40, 2): len shadowed.
    "shadow_len": "def add(a, b):\n    return 7 if a == 40 else a + b\ndef len(x):\n    return 2\n",
    # An answer equal to everything, smaller than anything, absorbing arithmetic.
    "eq_always_true": (
        "class Anything:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    __lt__ = __gt__ = __le__ = __ge__ = __eq__\n"
        "    def __sub__(self, other):\n        return 0\n"
        "    def __str__(self):\n        return 'xx'\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Anything()\n"
    ),
    # The same through a subclass of int, which a loose serializer would pass as it is.
    "int_subclass_eq": (
        "class Int(int):\n"
        "    def __eq__(self, other):\n        return True\n"
        "    def __sub__(self, other):\n        return 0\n"
        "    def __str__(self):\n        return 'xx'\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(a - b)\n"
    ),
    # The tests' source read from memory: a lookup table of their expected values.
    "read_tests": READ_TESTS,
    # The harness's own functions replaced through its frames' globals.
    "harness_globals": WRONG
    + STEAL
    + (
        "def _win(*args, **kwargs):\n    _forge()\n    os._exit(0)\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    g = f.f_globals\n"
        "    if g is not globals():\n"
        "        for k, v in list(g.items()):\n"
        "            if callable(v) and k.startswith('_') and not k.startswith('__'):\n"
        "                g[k] = _win\n"
        "        for k in ('ASSERT_EXIT', 'MEMORY_EXIT'):\n"
        "            if k in g:\n                g[k] = 0\n"
        "    f = f.f_back\n"
    ),
    # The serializer a grader might use, replaced: json and marshal answer "passed".
    "hook_serializer": WRONG
    + (
        "import json, marshal\n"
        'json.dumps = lambda *a, **k: \'{"passed": true, "status": "exit", "code": 0}\'\n'
        "json.loads = lambda *a, **k: {'passed': True}\n"
        "marshal.dumps = lambda *a, **k: b'T'\n"
    ),
    # Leaving early with status 0, by either door, after printing a verdict.
    "os_exit_0": WRONG + "import os\nprint('PASSED', flush=True)\nos._exit(0)\n",
    "system_exit_0": WRONG + "print('{\"passed\": true}')\nraise SystemExit(0)\n",
    # Everything else in the sandbox killed, or stopped, at load.
    "kill_all": WRONG + "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "stop_all": WRONG + "import os, signal\nos.kill(-1, signal.SIGSTOP)\n",
    # An answer that is not plain data: a generator that would give the right sum.
    "not_plain_data": "def add(a, b):\n    return (x for x in [a + b])\n",
}
CONTROL = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def reward() -> CodeReward:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed: apt-get install bubblewrap (.ci/run does)")
    limits = Limits(timeout=2.0, memory_mb=256)
    try:
        Sandbox("bwrap", limits).ensure_available()
    except SandboxUnavailable as e:
        pytest.skip(f"bwrap cannot create namespaces on this machine: {e}")
    return CodeReward(CodeSettings(limits=limits))


def answer(program: str) -> str:
    return f"<think>t</think><answer>```python\n{program}\n```</answer>"


def scores(reward: CodeReward, program: str) -> list[float | None]:
    """The program's score against the asserts, then against check(candidate)."""
    return reward([answer(program)] * 2, test=[ASSERTS, CHECK], entry_point=["add", "add"])


def test_control_passes(reward):
    assert scores(reward, CONTROL) == [1.0, 1.0]


@pytest.mark.parametrize("name", list(ROWS))
def test_forgery_scores_zero(reward, name):
    assert scores(reward, ROWS[name]) == [0.0, 0.0], name


# ------------------------------------------------------------------- what the grader takes

FIDELITY_PROGRAM = """
import math
SCALE = 3
def shape(kind):
    values = {
        "tuple": (1, (2, 3)), "list": [1, [2.5, None]], "set": {1, 2}, "frozen": frozenset("ab"),
        "dict": {1: "a", (2, 3): [True]}, "bytes": b"\\x00\\xff", "complex": 1 + 2j,
        "nan": float("nan"), "inf": float("-inf"), "big": 2 ** 100, "text": "é\\n\\"",
    }
    return values[kind]
def halve(x):
    if x < 0:
        raise ValueError("negative")
    return x / 2
def helper(x):
    return x * SCALE
"""
FIDELITY_TEST = """
def check(candidate):
    assert candidate("tuple") == (1, (2, 3)) and type(candidate("tuple")) is tuple
    assert candidate("list") == [1, [2.5, None]]
    assert candidate("set") == {1, 2} and candidate("frozen") == frozenset("ab")
    assert candidate("dict") == {1: "a", (2, 3): [True]}
    assert candidate("bytes") == b"\\x00\\xff" and candidate("complex") == 1 + 2j
    assert candidate("nan") != candidate("nan") and candidate("inf") == float("-inf")
    assert candidate("big") == 2 ** 100 and candidate("text") == "é\\n\\""
    try:
        candidate("missing")
    except KeyError:
        pass
    else:
        assert False
"""
# Names the test takes from the program: a function that raises, a constant, a helper and a
# module the program imported (the test does not).
NAMES_TEST = """
assert halve(3) == 1.5
try:
    halve(-1)
except ValueError as e:
    assert "negative" in str(e)
else:
    assert False
assert helper(2) == 2 * SCALE == 6
assert math.isclose(halve(1), 0.5)
"""


def test_correct_programs_pass_through_plain_data(reward):
    """Values of every plain type keep their type and value across the pipe, exceptions
    keep their builtin type, and names the test takes from the program (functions,
    constants, modules) are bound."""
    texts = [answer(FIDELITY_PROGRAM)] * 2
    assert reward(texts, test=[FIDELITY_TEST, NAMES_TEST], entry_point=["shape"] * 2) == [1.0] * 2
    wrong = FIDELITY_PROGRAM.replace('"tuple": (1, (2, 3))', '"tuple": [1, [2, 3]]')
    assert reward([answer(wrong)], test=[FIDELITY_TEST], entry_point=["shape"]) == [0.0]


def test_tests_that_pass_objects_cannot_be_graded(reward):
    """A test that hands the program something that is not plain data (a function) cannot be
    graded without running the program's objects in the grader: None (does not apply), with a
    warning, for every program alike."""
    test = "def check(candidate):\n    assert candidate(lambda x: x + 1, 1) == 2\n"
    program = "def apply(f, x):\n    return f(x)\n"
    with pytest.warns(UserWarning, match="sandbox failed.*not plain data|ungradable"):
        assert reward([answer(program)], test=[test], entry_point=["apply"]) == [None]


def test_function_test_verdicts(reward):
    """The program's own failures keep their verdicts: memory at load, an error, a timeout."""
    cases = {
        "memory": "x = bytearray(10 ** 10)\ndef add(a, b):\n    return a + b\n",
        "runtime_error": "def add(a, b):\n    raise TypeError('no')\n",
        "timeout": "def add(a, b):\n    while True:\n        pass\n",
        "wrong_answer": WRONG,
    }
    for verdict, program in cases.items():
        reward.pop_metrics()
        assert reward([answer(program)], test=[CHECK], entry_point=["add"]) == [0.0]
        assert reward.pop_metrics()[verdict] == 1, verdict
