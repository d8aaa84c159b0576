"""Real grpo-train runs for the tests: one in-process with the fastest flags (`train_in_process`),
and processes for the tests that signal, kill or starve them: a small run's flags, starting
one, waiting for its metrics, and the metrics that must agree across runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from grpo.cli.train import main

REPO = Path(__file__).resolve().parents[2]

FAST = ["--steps", "1", "--sft-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
        "--max-completion-length", "8", "--eval-size", "4", "--micro-batch-size", "4",
        "--no-progress", "--device", "cpu"]


def train_in_process(capsys, out, *flags) -> tuple[int, str]:
    """grpo-train FAST --output-dir out *flags in this process: (exit status, its stderr),
    which must hold no traceback."""
    code = main([*FAST, "--output-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err

SMALL_RUN = ["--steps", "6", "--sft-steps", "2", "--prompts-per-step", "2",
             "--num-generations", "4", "--max-completion-length", "12", "--eval-size", "8",
             "--micro-batch-size", "4", "--no-progress", "--rewards", "accuracy", "format",
             "--no-dynamic-sampling", "--temperature", "1.0", "--device", "cpu"]


def grpo_train(out, *flags, prefix: tuple[str, ...] = (), patch: str = "") -> subprocess.Popen:
    """grpo-train SMALL_RUN --output-dir out *flags, in the background; prefix: a command
    that wraps it (unshare ...); patch: Python code the process runs before grpo-train's
    main (to send itself a signal at a chosen moment)."""
    command = ["-m", "grpo.cli.train"]
    if patch:
        command = ["-c", f"import sys\n{patch}\nfrom grpo.cli.train import main\nsys.exit(main())"]
    return subprocess.Popen([*prefix, sys.executable, *command, *SMALL_RUN,
                             "--output-dir", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def steps_done(metrics_file: Path) -> int:
    return len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0


def interrupt_after(proc, metrics_file: Path, steps: int, signum: int) -> None:
    """Send `signum` once the run has logged `steps` steps."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if steps_done(metrics_file) >= steps:
            proc.send_signal(signum)
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}: {proc.communicate()}")


def comparable(line: dict) -> dict:
    """A metrics line less its timings, which differ between any two runs."""
    return {k: v for k, v in line.items() if not k.startswith(("seconds", "tokens_per_s"))}
