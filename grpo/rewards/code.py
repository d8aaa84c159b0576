"""The code reward, DeepSeek-R1's other rule-based reward: run the program against the tests.

``code_reward(completions, **columns) -> list[float | None]`` takes the program from the
completion's ``<answer>`` (its last fenced ```python block, or its whole text) and runs it in
the sandbox of ``grpo.rewards.sandbox`` against the example's tests, in one of the two shapes the
public sets use:

- stdin/stdout: columns ``inputs`` and ``outputs``, lists of strings; an output matches when
  its lines equal the expected ones after trailing whitespace is stripped from each line
  (and trailing empty lines dropped), and the program exits with status 0;
- function tests: ``test``, Python code with asserts or a ``check(candidate)`` function (then
  called with the ``entry_point`` function), or a list of such codes, one test each.

Score: 1.0 when every test passes and 0.0 otherwise (``score="all"``, as R1), or the fraction
passed (``"pass_rate"``). A completion without a program scores 0.0; an example without tests
None (does not apply); a sample whose sandbox failed (not the program's doing) None too, with
a warning. Each sample gets a verdict, its first failing test's (passed, wrong_answer,
runtime_error, timeout, memory, output_limit, sandbox_error, no_code); ``pop_metrics``
returns their counts since the last call, which the trainer logs per step as ``code/<verdict>``.

Samples are graded in parallel (``grpo.rewards.sandbox.run_parallel``), each in one sandbox start,
and identical programs on identical tests are run once per call. With ``score="all"`` a
sample stops at its first failing test; either way it stops at its first timeout. A sample
whose test waits gives its worker to the next one at once, and one still computing after
``slow_after`` does too while no more than one per core have (run_parallel): timeouts
overlap instead of queueing (a busy loop still takes its share of the CPU until then). One
that waited and computes again takes its worker back.

Function tests are graded by a process the program never runs in (grpo/rewards/sandbox_harness.py):
the program answers calls with plain data, and the test's asserts run on those answers in a
clean interpreter, so no object, global, builtin or exit path of the program can pass a test
for it. What remains in the program's hands is its answers, and the names the test takes
from it besides the entry point (docs/code-rewards.md).
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .parsing import extract_answer
from .sandbox import (
    ASSERT_EXIT,
    MEMORY_EXIT,
    NONE_WARNING,
    SANDBOXES,
    Limits,
    Run,
    Sandbox,
    SandboxError,
    run_parallel,
)

__all__ = [
    "SCORES",
    "VERDICTS",
    "CodeReward",
    "CodeSettings",
    "code_reward",
    "extract_program",
    "same_output",
    "slow_after",
    "with_code_settings",
]

SCORES = ("all", "pass_rate")
VERDICTS = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "memory",
    "output_limit",
    "sandbox_error",
    "no_code",
)


@dataclass(frozen=True)
class CodeSettings:
    """How the code reward scores (``score``) and runs programs (``sandbox``: bwrap or none,
    ``limits``, ``workers``: samples graded at once, default the cores)."""

    score: str = "all"
    sandbox: str = "bwrap"
    limits: Limits = field(default_factory=Limits)
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"code score must be one of {list(SCORES)}, got {self.score!r}")
        if self.sandbox not in SANDBOXES:
            raise ValueError(f"code sandbox must be one of {list(SANDBOXES)}, got {self.sandbox!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"code reward workers must be >= 1, got {self.workers}")


# ```python, ```py, ```python3 or a bare ```, up to the closing fence.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(text: str) -> str | None:
    """The program of a completion: in its last ``<answer>``, the last fenced Python block,
    else the whole answer; None without an answer or with an empty one."""
    answer = extract_answer(text)
    if answer is None:
        return None
    blocks = _FENCE.findall(answer)
    program = blocks[-1] if blocks else answer
    return program if program.strip() else None


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def same_output(got: str, expected: str) -> bool:
    """Whether a program's stdout matches the expected output: equal lines after trailing
    whitespace is stripped from each, trailing empty lines ignored."""
    return _lines(got) == _lines(expected)


@dataclass(frozen=True)
class _Job:
    """One sample's program and tests: stdio cases are (stdin, expected stdout), function
    cases (test code, (whether it defines check(candidate), the names it takes from the
    program))."""

    mode: str
    program: str
    entry_point: str | None
    cases: tuple[tuple[str, Any], ...]


@dataclass
class _Grade:
    passed: int
    total: int
    verdict: str
    error: str = ""


def _strings(value: Any, column: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"code reward: {column!r} must be a list of strings, got {value!r:.80}")
    return list(value)


@functools.lru_cache(maxsize=4096)  # the G completions of an example share its tests
def _test_shape(code: str) -> tuple[bool, tuple[str, ...]]:
    """(whether a test defines check(candidate), the names it takes from the program: read
    and never bound in the test, and not builtins). A name bound anywhere in the test counts
    as the test's own: a miss is a NameError in the grader, never the program's definition."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"code reward: a 'test' is not valid Python: {e}") from e
    check = any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body)
    read, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return check, tuple(sorted(read - bound - set(dir(builtins))))


def _cases(inputs: Any, outputs: Any, test: Any, entry_point: Any) -> tuple[str, tuple] | None:
    """(mode, cases) of one example, None when it has no tests. A malformed row is a
    ValueError naming the column (a bug in the dataset, not in the completion)."""
    if inputs is not None or outputs is not None:
        ins, outs = _strings(inputs, "inputs"), _strings(outputs, "outputs")
        if len(ins) != len(outs) or not ins:
            raise ValueError(
                f"code reward: 'inputs' and 'outputs' need the same nonzero length, got "
                f"{len(ins)} and {len(outs)}"
            )
        return "stdio", tuple(zip(ins, outs, strict=True))
    if test is None:
        return None
    tests = [test] if isinstance(test, str) else _strings(test, "test")
    shapes = [_test_shape(t) for t in tests]
    if any(check for check, _ in shapes) and not isinstance(entry_point, str):
        raise ValueError(
            "code reward: a 'test' defines check(candidate) but 'entry_point' is missing"
        )
    return "function", tuple(zip(tests, shapes, strict=True))


def _column(columns: dict[str, Any], name: str, i: int) -> Any:
    value = columns.get(name)
    return value[i] if isinstance(value, (list, tuple)) else None


def _verdict(run: Run, job: _Job, expected: Any) -> str:
    """One test's verdict from what the harness saw."""
    if run.status in ("exit", "signal") and not run.started:
        return "sandbox_error"  # the harness could not set the test up: no program ran
    if run.status in ("timeout", "output_limit"):
        return run.status
    if job.mode == "function" and run.passed:
        return "passed"  # the grader's word, the only way to pass (code and stdout are not)
    if run.status == "ungradable":  # the dataset's test, not the program
        return "sandbox_error"
    if run.status in ("crashed", "fork_failed"):  # the program killed the harness, or
        return "runtime_error"  # its processes filled the process limit
    if run.status == "signal":
        if run.signal == signal.SIGXCPU:
            return "timeout"  # the CPU-seconds limit
        # SIGKILL that is not ours: the kernel's out-of-memory killer.
        return "memory" if run.signal == signal.SIGKILL else "runtime_error"
    if run.code == MEMORY_EXIT:
        return "memory"
    if run.code == ASSERT_EXIT and job.mode == "function":
        return "wrong_answer"  # an assert of the tests failed
    if run.code != 0 or job.mode == "function":
        return "runtime_error"
    got = run.stdout.decode("utf-8", "replace")
    return "passed" if same_output(got, expected) else "wrong_answer"


def _grade(sandbox: Sandbox, job: _Job, stop_at_failure: bool) -> _Grade:
    """Run one sample's tests in one sandbox start."""
    passed, first_failure = 0, None
    try:
        with sandbox.session(job.mode, job.program, job.entry_point) as session:
            for case, extra in job.cases:
                if job.mode == "stdio":
                    run = session.run(stdin=case)
                else:
                    run = session.run(test=case, check=extra[0], names=extra[1])
                verdict = _verdict(run, job, extra)
                if verdict == "sandbox_error":
                    if first_failure:  # the program's own failure stands: no None for it
                        break
                    return _Grade(0, len(job.cases), verdict, run.stderr or run.status)
                if verdict == "passed":
                    passed += 1
                    continue
                first_failure = first_failure or verdict
                # A timeout would likely repeat on the next tests: the batch does not wait.
                if stop_at_failure or verdict == "timeout" or session.dead:
                    break
    except SandboxError as e:
        return _Grade(0, len(job.cases), "sandbox_error", str(e))
    return _Grade(passed, len(job.cases), first_failure or "passed")


def slow_after(limits: Limits) -> float:
    """Seconds after which a sample gives its worker to the next (run_parallel): a quarter
    of the timeout, at most half a second (the example problems take about 0.05 s)."""
    return min(0.5, limits.timeout / 4)


class CodeReward:
    """The code reward with its settings; calls are ``fn(completions, **columns)`` as every
    reward's. ``pop_metrics()``: the verdict counts since the last pop."""

    __name__ = "code_reward"

    def __init__(self, settings: CodeSettings | None = None) -> None:
        self.settings = settings or CodeSettings()
        self.sandbox = Sandbox(self.settings.sandbox, self.settings.limits)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._warned = False

    def prepare(self) -> None:
        """Check the sandbox before any work: SandboxUnavailable (a ValueError) that says how
        to install bubblewrap; with sandbox "none", the warning of what it exposes."""
        if self.settings.sandbox == "none":
            if not self._warned:
                warnings.warn(NONE_WARNING, stacklevel=2)
                self._warned = True
            return
        self.sandbox.ensure_available()

    def __call__(
        self,
        completions: list[str],
        inputs: Sequence[Any] | None = None,
        outputs: Sequence[Any] | None = None,
        test: Sequence[Any] | None = None,
        entry_point: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        self.prepare()
        columns = {"inputs": inputs, "outputs": outputs, "test": test, "entry_point": entry_point}
        jobs: dict[_Job, int] = {}  # identical samples are graded once
        which: list[int | None] = []  # completion -> job, None: no program
        rewards: list[float | None] = [None] * len(completions)
        verdicts: list[str | None] = [None] * len(completions)
        for i, text in enumerate(completions):
            cases = _cases(*(_column(columns, name, i) for name in columns))
            if cases is None:
                which.append(None)
                continue
            program = extract_program(text)
            if program is None:
                which.append(None)
                rewards[i], verdicts[i] = 0.0, "no_code"
                continue
            mode, tests = cases
            job = _Job(mode, program, _column(columns, "entry_point", i), tests)
            which.append(jobs.setdefault(job, len(jobs)))
        stop = self.settings.score == "all"
        grades = run_parallel(
            lambda job: _grade(self.sandbox, job, stop),
            list(jobs),
            workers=self.settings.workers,
            # A sample this slow is likely waiting out a timeout: it frees its worker.
            slow_after=slow_after(self.settings.limits),
        )
        failures = []
        for i, j in enumerate(which):
            if j is None:
                continue
            grade = grades[j]
            verdicts[i] = grade.verdict
            if grade.verdict == "sandbox_error":
                failures.append(grade.error)
            elif stop:
                rewards[i] = float(grade.passed == grade.total)
            else:
                rewards[i] = grade.passed / grade.total
        if failures:
            warnings.warn(
                f"code reward: the sandbox failed on {len(failures)} of {len(completions)} "
                f"samples (scored None): {failures[0]}",
                stacklevel=2,
            )
        with self._lock:
            self._counts.update(v for v in verdicts if v is not None)
        return rewards

    def pop_metrics(self) -> dict[str, int]:
        """Samples per verdict since the last call (every verdict, zeros included)."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return {verdict: counts[verdict] for verdict in VERDICTS}


def settings_from(values: Any) -> CodeSettings:
    """The settings the --code-* fields of `values` give (grpo-train's DataConfig, or the
    parsed flags of grpo-eval and grpo-sample: the same names)."""
    return CodeSettings(
        score=values.code_score,
        sandbox=values.code_sandbox,
        limits=Limits(timeout=values.code_timeout, memory_mb=values.code_memory_mb),
    )


def with_code_settings(reward_fns: list[tuple[str, Any]], settings: CodeSettings) -> list:
    """reward_fns with every code reward replaced by one with these settings, its sandbox
    checked (``CodeReward.prepare``) before any model is loaded."""
    out = []
    for name, fn in reward_fns:
        if isinstance(fn, CodeReward):
            fn = CodeReward(settings)
            fn.prepare()
        out.append((name, fn))
    return out


# The REWARDS entry: default settings (all-or-nothing, bubblewrap, the default limits).
code_reward = CodeReward()
