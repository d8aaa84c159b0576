"""Bar chart of a results CSV: ms per provider, grouped by shape.

    python -m benchmarks.plot grpo_loss [--gpu "NVIDIA H100 80GB HBM3"] [--where beta=0.04]

Reads benchmarks/results/<op>.csv and writes benchmarks/results/<op>.png. The CSV keeps every
run, so the chart takes one GPU (by default the one of the newest row), the rows matching
every --where column=value, and for each (shape, provider) the newest of those.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from benchmarks.common import RESULTS_DIR  # noqa: E402


def latest_ms(rows: list[dict[str, str]], where: dict[str, str]) -> dict[tuple[str, str], float]:
    """ms of the newest matching row per (shape, provider) (rows are in append order)."""
    out: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.get("ms") and all(row.get(k) == v for k, v in where.items()):
            out[(row["shape"], row["provider"])] = float(row["ms"])
    return out


def plot(op: str, csv_path: Path, out: Path, gpu: str | None = None,
         where: dict[str, str] | None = None) -> Path:
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{csv_path} has no rows")
    where = {"gpu": gpu or rows[-1]["gpu"], **(where or {})}
    gpu = where["gpu"]
    ms = latest_ms(rows, where)
    if not ms:
        raise SystemExit(f"{csv_path} has no rows matching {where}")
    shapes = list(dict.fromkeys(s for s, _ in ms))
    providers = list(dict.fromkeys(p for _, p in ms))

    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(shapes) * len(providers) ** 0.5), 4.5))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
        ys = [ms.get((s, provider), 0.0) for s in shapes]  # 0: not run at that shape
        bars = ax.bar(xs, ys, width, label=provider)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right")
    ax.set_ylabel("ms (median, lower is better)")
    config = ", ".join(f"{k}={v}" for k, v in where.items() if k != "gpu")
    ax.set_title(f"{op} on {gpu}" + (f" ({config})" if config else ""))
    ax.margins(y=0.2)  # room for the bar labels
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Lay out, write `out` (its folder created) and close the figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", help="grpo_loss, logprobs, advantages, ...")
    parser.add_argument("--csv", type=Path, help="default benchmarks/results/<op>.csv")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/<op>.png")
    parser.add_argument("--gpu", help="default: the gpu of the newest row")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep only rows with this value (repeatable), e.g. beta=0.04")
    args = parser.parse_args(argv)
    if any("=" not in w for w in args.where):
        parser.error("--where takes COLUMN=VALUE")
    where = dict(w.split("=", 1) for w in args.where)
    path = plot(args.op, args.csv or RESULTS_DIR / f"{args.op}.csv",
                args.out or RESULTS_DIR / f"{args.op}.png", args.gpu, where)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
