"""Per-step metrics: a JSONL log, a progress bar, optional TensorBoard, and a PNG of the curves.

`RunLogger` is the trainer's single sink for numbers. Every call to `log` appends one JSON
object (`{"step": ..., <metric>: ...}`) to `run_dir/metrics.jsonl` and flushes it, so a crash
loses nothing already logged. `step` counts completed optimizer steps (the first step is 1);
a checkpoint taken after step k records k, and a logger resumed with `start_step=k` drops any
lines a killed run wrote after that checkpoint, so the file never holds a step twice.

Key names the progress bar and `plot` read (all optional; absent keys are skipped):

- ``reward`` (mean total reward) and ``reward/<name>`` (mean of each reward function)
- ``accuracy`` (fraction of correct completions, 0..1) and ``eval_accuracy`` (held-out)
- ``format`` (fraction of completions in the <think>...</think><answer>...</answer> layout,
  whether or not the format reward is trained on)
- ``kl`` (mean k3 KL to the reference model)
- ``completion_length`` and ``completion_length_max`` (tokens per completion)
- ``tokens_per_s`` (generated + trained tokens per second)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from grpo.kernels import reference

from . import distributed as dist_mod
from . import rewards as rewards_mod
from .files import atomic_path, atomic_write

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"


class RunLogger:
    """Writes each step's metrics to `run_dir/metrics.jsonl`, a tqdm bar and TensorBoard.

    start_step: the step of the checkpoint a run resumes from (0 for a fresh run). A fresh run
    starts an empty metrics file; a resumed one keeps the lines with step <= start_step.
    tensorboard: also write scalars to `run_dir/tensorboard` (needs the `tensorboard`
    package; without it, one warning line is printed and the run goes on).
    show_progress: draw the progress bar (on stderr); off for non-interactive logs.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        tensorboard: bool = False,
        show_progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.start_step = start_step
        if start_step > 0:
            _truncate_after(self.path, start_step)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            # A fresh run owns the file: appending after an old run would mix two curves.
            self._file = open(self.path, "w", encoding="utf-8")
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not show_progress,
        )
        self._writer = (
            _summary_writer(self.run_dir / TENSORBOARD_DIR, start_step) if tensorboard else None
        )
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append `metrics` for `step` (floats, ints or one-element tensors; NaN/inf -> null)."""
        values = {key: _to_float(key, value) for key, value in metrics.items()}
        if "step" in values:
            raise ValueError("metrics must not contain the key 'step' (it is the first argument)")
        record = {"step": int(step)}
        record.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        # allow_nan=False: the file stays strict JSON that any reader (jq, pandas) accepts.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, int(step))
        self._bar.set_postfix_str(_postfix(values), refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:  # a second call for the same step (eval figures): only the postfix changes
            self._bar.refresh()

    def message(self, text: str) -> None:
        """Print a line above the progress bar without breaking it."""
        tqdm.write(text)

    def plot(self, path: Path | None = None) -> Path:
        """Draw the curves logged so far to `path` (default `run_dir/curves.png`); return it."""
        out = Path(path) if path is not None else self.run_dir / CURVES_FILE
        return plot_metrics(self.path, out, title=self.run_dir.name)

    def close(self) -> None:
        """Close the bar, the metrics file and the TensorBoard writer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path | str) -> list[dict[str, float]]:
    """The records of a metrics.jsonl file, in order; null values come back as NaN.

    A final line cut short by a crash mid-write is skipped; any other bad line is a
    ValueError naming the file and line.
    """
    return [record for _, record in _parse_lines(Path(path))]


_IMPORTED = time.perf_counter()


def process_seconds() -> float:
    """Seconds since this process started, interpreter start-up and imports included (from
    /proc on Linux; elsewhere since this module was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def plot_metrics(metrics_file: Path | str, out: Path | str, *, title: str = "") -> Path:
    """Plot reward, accuracy and format rate, KL and completion length per step from a
    metrics.jsonl file.

    Writes a 2x2 PNG to `out` through a temporary file, so a reader never sees half an image.
    """
    # Imported here: matplotlib is slow to import and only needed when a plot is asked for.
    # Figure (not pyplot) renders with Agg without touching the global backend or pyplot's
    # figure registry, so this works headless and leaks nothing across calls.
    from matplotlib.figure import Figure

    out = Path(out)
    rows = read_metrics(metrics_file) if Path(metrics_file).is_file() else []
    reward_keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
    panels = [
        (
            "reward",
            [("reward", "mean", "-")] + [(k, k[len("reward/") :], "-") for k in reward_keys],
        ),
        (
            "accuracy and format rate",
            [
                ("accuracy", "train accuracy", "-"),
                ("eval_accuracy", "held-out accuracy", "o-"),
                ("format", "format rate", "-"),
            ],
        ),
        ("KL to reference", [("kl", "kl", "-")]),
        (
            "completion length (tokens)",
            [("completion_length", "mean", "-"), ("completion_length_max", "max", "-")],
        ),
    ]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (name, series) in zip(axes.flat, panels, strict=True):
        drawn = 0
        for key, label, style in series:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.2)
            drawn += 1
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize="small")
        elif drawn == 0:
            empty = (
                "not logged (beta = 0: no reference model)" if name.startswith("KL") else "no data"
            )
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        fig.suptitle(title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # format given: the temp name has no .png
    return out


def _to_float(key: str, value: Any) -> float:
    """A python number, numpy scalar or one-element tensor as a float (bools are rejected)."""
    if isinstance(value, bool):
        raise TypeError(f"metric {key!r} is a bool; log it as 0/1 if it is a figure")
    if hasattr(value, "item"):  # torch / numpy scalars, without importing either here
        if getattr(value, "numel", lambda: 1)() != 1:
            raise TypeError(f"metric {key!r} has shape {tuple(value.shape)}, expected a scalar")
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _postfix(values: Mapping[str, float]) -> str:
    """The few figures users watch during a run, compact enough for one terminal line."""
    parts = []
    if "reward" in values:
        parts.append(f"reward={_compact(values['reward'])}")
    if "accuracy" in values:
        acc = values["accuracy"]
        parts.append(f"acc={100 * acc:.1f}%" if math.isfinite(acc) else "acc=nan")
    if "kl" in values:
        parts.append(f"kl={values['kl']:.2g}")
    if "tokens_per_s" in values:
        parts.append(f"tok/s={_compact(values['tokens_per_s'])}")
    return " ".join(parts)


def _compact(x: float) -> str:
    """3 significant digits, with k/M suffixes for large magnitudes (1234.5 -> '1.23k')."""
    if not math.isfinite(x):
        return str(x)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _parse_lines(path: Path) -> list[tuple[str, dict[str, float]]]:
    """(raw line, record) pairs; tolerates only a truncated last line (a crash mid-write)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a metrics record ({e})") from e
        record = {k: float("nan") if v is None else v for k, v in record.items()}
        record["step"] = step
        out.append((line, record))
    return out


def _truncate_after(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (and any torn last line); rewrite atomically."""
    if not path.is_file():
        return
    kept = [line for line, record in _parse_lines(path) if record["step"] <= step]
    text = "".join(line + "\n" for line in kept)
    if text == path.read_text(encoding="utf-8"):
        return
    atomic_write(path, text)


def _summary_writer(log_dir: Path, start_step: int) -> Any:
    """A TensorBoard SummaryWriter, or None (with one warning) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        tqdm.write(
            f"warning: TensorBoard logging disabled, it needs the tensorboard package "
            f"(pip install tensorboard): {e}"
        )
        return None
    # purge_step hides events a killed run wrote after the checkpoint we resume from, the same
    # rule as for metrics.jsonl (steps > start_step are dropped).
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)


# --- one GRPO step's figures ---------------------------------------------------------------


def step_metrics(
    rollout,
    rewards,
    failures: dict,
    frac_zero_std: float,
    reward_fns: list,
    reward_weights,
    loss_stats: dict,
    *,
    grad_norm: float,
    lr: float,
    seconds: float,
    phases: dict,
    beta: float,
) -> dict[str, float]:
    """The figures of one step over every rank's rows: rewards (over scorable completions,
    as TRL logs them), lengths, the loss statistics, throughput and the phases' seconds.
    rewards (N_all, R) of every rank; rollout and failures this rank's."""
    total = reference.combine_rewards(rewards, reward_weights, unscorable_nan=True)
    lengths = dist_mod.gather_rows(rollout.lengths.float())[0]
    truncated = dist_mod.gather_rows(rollout.truncated.float())[0]
    # The R1 layout, whether or not the format reward is trained on (R1-Zero's curve).
    formatted = dist_mod.gather_rows(torch.tensor(rewards_mod.format_reward(rollout.texts)))[0]
    failed: dict[str, int] = {}
    for part in dist_mod.all_gather_objects(failures):
        for name, count in part.items():
            failed[name] = failed.get(name, 0) + count
    metrics = {
        "reward": float(total.nanmean()),
        "reward_std": float(reference.nanstd(total)),
        "frac_zero_std": frac_zero_std,
        "completion_length": float(lengths.mean()),
        "completion_length_max": float(lengths.max()),
        "truncated": float(truncated.mean()),
        "format": float(formatted.mean()),
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": float(lengths.sum()) / seconds,
        **{f"seconds_{k}": v for k, v in phases.items()},
        **loss_stats,
    }
    if beta == 0:
        metrics.pop("kl", None)  # there is no reference model: nothing was measured
    for j, (name, _) in enumerate(reward_fns):
        column = rewards[:, j]
        metrics[f"reward/{name}"] = float(torch.nanmean(column))
        metrics[f"reward_std/{name}"] = (
            float(column[~column.isnan()].std()) if (~column.isnan()).sum() > 1 else float("nan")
        )
    acc = [n for n, _ in reward_fns if n in rewards_mod.CORRECTNESS]
    metrics["accuracy"] = metrics[f"reward/{acc[0]}"] if acc else float("nan")
    for name, count in failed.items():
        metrics[f"reward_failures/{name}"] = count
    # What rewards counted over the step's scoring (the code reward's verdicts), all ranks.
    for part in dist_mod.all_gather_objects(rewards_mod.reward_metrics(reward_fns)):
        for key, count in part.items():
            metrics[key] = metrics.get(key, 0) + count
    return metrics


def global_token_means(means: dict, tokens) -> dict[str, float]:
    """Token-weighted means over every rank of per-rank means."""
    keys = sorted(means)
    local = [float(means[k]) * float(tokens) for k in keys] + [float(tokens)]
    summed = dist_mod.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
    return {k: v / max(summed[-1], 1.0) for k, v in zip(keys, summed[:-1], strict=True)}


def reduce_loss_stats(totals: dict, tokens: float, extremes: dict) -> dict:
    """The loss statistics of a step's micro-batches: token-weighted means over every rank
    (totals are sums of value x tokens), and the per-sequence extremes (*_min, *_max) as
    extremes, NaN left out."""
    if dist_mod.world_size() > 1:
        keys = sorted(totals)
        summed = dist_mod.all_reduce(
            torch.tensor([totals[k] for k in keys] + [tokens], dtype=torch.float64)
        ).tolist()
        totals, tokens = dict(zip(keys, summed[:-1], strict=True)), summed[-1]
    means = {k: (v if k == "loss" else v / max(tokens, 1.0)) for k, v in totals.items()}
    for key, values in sorted(extremes.items()):
        pick = min if key.endswith("_min") else max
        local = [v for v in values if v == v] or [float("nan")]
        gathered = [v for v in dist_mod.all_gather_objects(pick(local)) if v == v]
        means[key] = pick(gathered) if gathered else float("nan")
    return means


class SilentLogger:
    """Ranks other than 0 log nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass
