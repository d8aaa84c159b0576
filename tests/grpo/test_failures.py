"""What the commands do when something goes wrong: every case is one line on stderr (no
traceback), a documented exit status, and no file of the user's deleted or overwritten.

Resume checks against the saved config, a failed start that cleans up after itself, a full
disk and a read-only directory (real ones: a small tmpfs and a read-only bind mount in a
private mount namespace), bad files, the output rules of grpo-sft, grpo-sample and grpo-eval,
a second run refused from a live run's directory, SIGINT and SIGTERM at every stage of a run
(real processes that signal themselves at a chosen moment), a checkpoint damaged on disk, and
random SIGKILLs resumed to the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import grpo.cli.eval
import grpo.cli.sample
import grpo.cli.sft
from grpo.cli.train import IN_USE
from grpo.metrics import read_metrics
from grpo.models import make_tiny

from .runs import SMALL_RUN, comparable, grpo_train, steps_done
from .runs import train_in_process as _train


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# --- resume ----------------------------------------------------------------------------------


def test_resume_refuses_changed_flags_unless_overridden(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(capsys, out, "--beta", "0.04")[0] == 0
    saved = (out / "config.json").read_text()
    # The saved config is the resumed run's: --beta need not be repeated.
    code, err = _train(capsys, out, "--resume", "--steps", "2", "--learning-rate", "1e-3")
    assert code == 2
    assert "steps: saved 1, now 2" in err and "learning_rate: saved" in err, err
    assert "--resume-override steps learning_rate" in err
    assert (out / "config.json").read_text() == saved
    assert steps_done(out / "metrics.jsonl") == 1
    code, err = _train(capsys, out, "--resume", "--steps", "2", "--resume-override", "steps")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["steps"] == 2 and config["loss"]["beta"] == 0.04  # what it runs
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert "kl" in read_metrics(out / "metrics.jsonl")[-1]  # beta 0.04 kept
    code, err = _train(capsys, out, "--resume", "--resume-override", "stepz")
    assert code == 2 and "resume_override: unknown fields ['stepz']" in err


# --- a failed start --------------------------------------------------------------------------


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    broken = make_tiny(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "run"
    code, err = _train(capsys, out, "--model", str(broken))
    assert code == 2 and f"{broken / 'config.json'}: not a JSON file" in err, err
    assert not out.exists()  # the directory it created is gone again
    # A directory that existed before keeps existing, empty as it was.
    out.mkdir()
    assert _train(capsys, out, "--model", str(broken))[0] == 2
    assert out.is_dir() and not any(out.iterdir())
    # An older failed start (config.json and the demo's init-model only) does not block a rerun.
    (out / "config.json").write_text(json.dumps({"sampling": {}, "loss": {}, "run": {}}))
    (out / "init-model").mkdir()
    assert _train(capsys, out)[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    code, err = _train(capsys, tmp_path / "run", "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA device is available" in err
    assert not (tmp_path / "run").exists()


# --- bad files -------------------------------------------------------------------------------


def test_bad_files_name_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"beta": 0.04,\n')
    code, err = _train(capsys, tmp_path / "run", "--config", str(config))
    assert code == 2 and f"config file {config}: not valid JSON" in err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("beta: [0.04\n")
    code, err = _train(capsys, tmp_path / "run", "--config", str(yaml_file))
    assert code == 2 and f"config file {yaml_file}: not valid YAML" in err
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "\xff", "answer": "3"}\n')
    code, err = _train(capsys, tmp_path / "run", "--data", str(data))
    assert code == 2 and f"{data}:2: not UTF-8 text (byte 0xff at column 13)" in err
    assert not (tmp_path / "run").exists()


def test_checkpoint_without_trainer_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(capsys, out)[0] == 0
    (out / "checkpoint" / "trainer_state.pt").unlink()
    before = _tree(out)
    code, err = _train(capsys, out, "--resume")
    assert code == 2 and "incomplete checkpoint, missing trainer_state.pt" in err, err
    assert _tree(out) == before


def test_eval_rows_without_answer(tmp_path, capsys):
    model = make_tiny(tmp_path / "m")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1"}\n{"prompt": "2+2"}\n')
    code = grpo.cli.eval.main(["--model", str(model), "--data", str(rows), "--reward", "format",
                               "--samples", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{rows}:1: missing 'answer'" in err and "Traceback" not in err
    assert not (model / "eval.json").exists()


# --- a full disk and a read-only directory ---------------------------------------------------


def _private_mounts() -> bool:
    """unshare can give a process its own mount namespace here (root, or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _private_mounts(), reason="unshare cannot create a mount namespace on this machine"
)


def _in_namespace(mount: str, out: Path, *flags) -> subprocess.CompletedProcess:
    """grpo-train SMALL_RUN in a private mount namespace where `mount` (a shell command)
    prepared out's parent."""
    script = f'{mount} && exec "$@"'
    proc = grpo_train(out, *flags, prefix=("unshare", "-rm", "sh", "-c", script, "sh"))
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@needs_mounts
@pytest.mark.parametrize("size, where", [("4m", "the cold start"), ("9m", "the checkpoint")])
def test_a_full_disk_says_so(tmp_path, size, where):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    done = _in_namespace(f"mount -t tmpfs -o size={size} none {disk}", out, "--steps", "2")
    assert done.returncode == 1, (where, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("grpo-train: error: cannot write: no space left on device"), last
    assert "free some space, then rerun with --resume" in last and "Traceback" not in done.stderr


@needs_mounts
def test_a_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "mine.txt").write_text("keep")
    done = _in_namespace(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}", ro / "run")
    assert done.returncode == 1, done.stderr
    assert "read-only file system" in done.stderr and "choose a writable --output-dir" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr and [p.name for p in ro.iterdir()] == ["mine.txt"]


# --- grpo-sft, grpo-sample and grpo-eval outputs ---------------------------------------------


def test_sft_output_dir_rules(tmp_path, capsys):
    project = tmp_path / "src"
    project.mkdir()
    (project / "main.py").write_text("print('mine')\n")
    base = ["--task", "arithmetic", "--steps", "1", "--batch-size", "2", "--tiny-hidden", "16",
            "--tiny-layers", "1"]
    for extra in ([], ["--overwrite"]):
        assert grpo.cli.sft.main([*base, "--output-dir", str(project), *extra]) == 2
        assert "not a saved model (found main.py)" in capsys.readouterr().err
    assert [p.name for p in project.iterdir()] == ["main.py"]
    out = tmp_path / "student"
    assert grpo.cli.sft.main([*base, "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "student"]  # no "-init" dir
    first = _tree(out)
    assert grpo.cli.sft.main([*base, "--output-dir", str(out), "--seed", "1"]) == 2
    assert "holds a model; pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == first
    assert grpo.cli.sft.main([*base, "--output-dir", str(out), "--seed", "1", "--overwrite"]) == 0
    assert _tree(out) != first


def test_sample_and_eval_outputs_are_not_overwritten(tmp_path, capsys):
    model = make_tiny(tmp_path / "m")
    common = ["--model", str(model), "--task-args", '{"operators": "+"}', "--samples", "1",
              "--num-prompts", "2", "--max-completion-length", "4", "--no-progress"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        assert grpo.cli.sample.main([*common, "--keep", "all", "--output", str(notes),
                                     *extra]) == 2
        assert "is not a jsonl this command wrote" in capsys.readouterr().err
        assert grpo.cli.eval.main([*common, "--output", str(notes), *extra]) == 2
        assert "is not a report this command wrote" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"
    pairs, report = tmp_path / "pairs.jsonl", tmp_path / "report.json"
    assert grpo.cli.sample.main([*common, "--keep", "all", "--output", str(pairs)]) == 0
    assert grpo.cli.eval.main([*common, "--output", str(report)]) == 0
    for command, path in ((grpo.cli.sample.main, pairs), (grpo.cli.eval.main, report)):
        capsys.readouterr()
        keep = ["--keep", "all"] if command is grpo.cli.sample.main else []
        assert command([*common, *keep, "--output", str(path)]) == 2
        assert "exists; pass --overwrite" in capsys.readouterr().err
        assert command([*common, *keep, "--output", str(path), "--overwrite"]) == 0


# --- one run per directory ------------------------------------------------------------------

# Holds the run before its first GRPO step until the file OUT.go exists.
HOLD = """
import pathlib, time, grpo.trainer
_run_steps = grpo.trainer.GRPOTrainer._run_steps
def run_steps(self, logger):
    while not pathlib.Path(str(self.run_dir) + ".go").exists():
        time.sleep(0.05)
    return _run_steps(self, logger)
grpo.trainer.GRPOTrainer._run_steps = run_steps
"""


def test_a_live_runs_directory_is_refused_to_a_second_run(tmp_path, capsys):
    out = tmp_path / "run"
    live = grpo_train(out, patch=HOLD)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():  # started: past the cold start
        assert live.poll() is None and time.monotonic() < deadline, live.communicate()
        time.sleep(0.05)
    before = _tree(out)
    # A new run, --resume and --overwrite: each refused before it reads or changes anything.
    for flags in ([], ["--resume"], ["--overwrite"]):
        code, err = _train(capsys, out, *flags)
        assert code == IN_USE, (flags, err)
        assert err == (f"grpo-train: error: --output-dir {out} is in use by another run "
                       f"(process {live.pid}): wait for it to end or choose another directory; "
                       f"nothing was changed\n"), err
        assert _tree(out) == before
    (tmp_path / "run.go").touch()
    _, err = live.communicate(timeout=180)
    assert live.returncode == 0, err
    assert steps_done(out / "metrics.jsonl") == int(SMALL_RUN[1])
    # Once it has ended, its directory is free again: --overwrite replaces it.
    assert _train(capsys, out, "--overwrite")[0] == 0
    assert steps_done(out / "metrics.jsonl") == 1


# --- SIGINT and SIGTERM at every stage -------------------------------------------------------

# Code a grpo-train process runs first, to send itself `signum` at one moment of the run.
AT = {
    "start-up": """
import os, grpo.build
_load_policy = grpo.build._load_policy
def load_policy(*args):
    os.kill(os.getpid(), {signum})
    return _load_policy(*args)
grpo.build._load_policy = load_policy
""",
    "cold start": """
import os, grpo.trainer
_run_sft = grpo.trainer.run_sft
def run_sft(*args, **kwargs):
    os.kill(os.getpid(), {signum})
    return _run_sft(*args, **kwargs)
grpo.trainer.run_sft = run_sft
""",
    "last evaluation": """
import os, grpo.trainer
_evaluate = grpo.trainer.GRPOTrainer.evaluate
def evaluate(self):
    if self.state["step"] == self.cfg.optim.steps:
        os.kill(os.getpid(), {signum})
    return _evaluate(self)
grpo.trainer.GRPOTrainer.evaluate = evaluate
""",
    # Ctrl-C during step 2, and again while its checkpoint is written (trainer_state.pt).
    "step, then the save": """
import os, grpo.trainer, grpo.files
_step = grpo.trainer.GRPOTrainer.step
def step(self):
    if self.state["step"] == 1:
        os.kill(os.getpid(), {signum})
    return _step(self)
grpo.trainer.GRPOTrainer.step = step
_torch_save = grpo.files.torch_save
def torch_save(obj, path):
    if obj["state"]["step"] == 2:
        os.kill(os.getpid(), {signum})
    return _torch_save(obj, path)
grpo.files.torch_save = torch_save
""",
    "step, twice": """
import os, grpo.trainer
_step = grpo.trainer.GRPOTrainer.step
def step(self):
    if self.state["step"] == 1:
        os.kill(os.getpid(), {signum})
        os.kill(os.getpid(), {signum})
    return _step(self)
grpo.trainer.GRPOTrainer.step = step
""",
}

# (when, signal, what the one line says, the step of the checkpoint left (None: the start-up
# removed the directory), whether to resume it and compare with an uninterrupted run)
SIGNAL_CASES = [
    ("start-up", signal.SIGINT, "SIGINT during start-up; nothing was kept", None, False),
    ("start-up", signal.SIGTERM, "SIGTERM during start-up; nothing was kept", None, False),
    ("cold start", signal.SIGTERM, "SIGTERM after the cold start", 0, True),
    ("cold start", signal.SIGINT, "SIGINT after the cold start", 0, False),
    ("last evaluation", signal.SIGINT, "SIGINT during the evaluation after GRPO", 3, True),
    ("last evaluation", signal.SIGTERM, "SIGTERM during the evaluation after GRPO", 3, False),
    ("step, then the save", signal.SIGINT, "SIGINT after step 2", 2, True),
    ("step, twice", signal.SIGINT, "SIGINT twice, stopped at once", 0, False),
]
SHORT = ["--steps", "3", "--eval-size", "4"]  # after SMALL_RUN's: these win


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = grpo_train(out, *SHORT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return [comparable(x) for x in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("when, signum, says, step, resume", SIGNAL_CASES,
                         ids=[f"{c[0]}-{c[1].name}" for c in SIGNAL_CASES])
def test_a_signal_anywhere_keeps_the_last_good_state(tmp_path, request, when, signum, says,
                                                       step, resume):
    """The run ends with one line, 128 + signal and the last good state on disk: the
    cold start's own checkpoint, the GRPO steps' when the last evaluation is interrupted, a
    whole checkpoint when a second Ctrl-C comes while it is written; --resume then finishes
    the run as if nothing had happened."""
    out = tmp_path / "run"
    proc = grpo_train(out, *SHORT, patch=AT[when].format(signum=int(signum)))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"grpo-train: interrupted: {says}"), last
    if step is None:
        assert "run the same command again" in last and not out.exists()
        return
    path = out / "checkpoint"
    assert last.endswith(f"checkpoint in {path} (step {step}); continue with the same command "
                         f"and --resume"), last
    assert json.loads((path / "state.json").read_text())["step"] == step
    assert steps_done(out / "metrics.jsonl") >= step  # --resume drops the lines after it
    assert (out / "cold-start").is_dir() and not (out / "final").exists()
    if not resume:
        return
    proc = grpo_train(out, *SHORT, "--resume")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert (out / "final").is_dir()
    metrics = [comparable(x) for x in read_metrics(out / "metrics.jsonl")]
    assert metrics == request.getfixturevalue("uninterrupted")


# --- a damaged checkpoint --------------------------------------------------------------------


def test_a_damaged_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(capsys, out)[0] == 0
    shard = out / "checkpoint" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):  # inside the tensor data
        data[i] ^= 0x55
    shard.write_bytes(bytes(data))
    before = _tree(out)
    code, err = _train(capsys, out, "--resume")
    assert code == 2, err
    assert err.startswith(f"grpo-train: error: {shard}: damaged, its contents differ from the "
                          f"checksum recorded at the save; nothing was loaded"), err
    assert len(err.strip().splitlines()) == 1
    assert _tree(out) == before  # the good files of the run are all still there


# --- SIGKILL at random moments ---------------------------------------------------------------


def test_random_sigkills_resume_to_an_uninterrupted_run(tmp_path):
    """Kill -9 a checkpointing run at random moments (during startup, steps and checkpoint
    writes), restart it each time (--resume once it has a checkpoint, else the same command
    again), and the finished run's metrics equal an uninterrupted one's."""
    rng = random.Random(14)
    whole = grpo_train(tmp_path / "whole", "--save-every", "1")
    out = tmp_path / "run"

    def restart() -> subprocess.Popen:
        again = ["--resume"] if (out / "checkpoint").is_dir() else ["--overwrite"]
        return grpo_train(out, "--save-every", "1", *again)

    kills = 0
    while kills < 3:
        proc = restart()
        # The first kill lands anywhere in the start-up; the others just after a step.
        target = steps_done(out / "metrics.jsonl") + (0 if kills == 0 else rng.randint(1, 2))
        deadline = time.monotonic() + 60
        while steps_done(out / "metrics.jsonl") < target and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(1.5, 5.0) if kills == 0 else rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 3
    proc = restart()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    _, err = whole.communicate(timeout=180)
    assert whole.returncode == 0, err
    a = [comparable(x) for x in read_metrics(out / "metrics.jsonl")]
    b = [comparable(x) for x in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert [x["step"] for x in a] == list(range(1, int(SMALL_RUN[1]) + 1))
    assert a == b, kills
