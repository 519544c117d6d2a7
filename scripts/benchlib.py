"""Shared by the benchmark scripts: running stage commands, reading their logs, the baseline arms."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path


def sh(*args) -> None:
    """Run a `loramigrate` command, echoing it (the exact commands belong in BENCHMARKS.md)."""
    cmd = ["loramigrate", "-q", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def curve(out: Path, metric: str, x: str = "s") -> list[tuple[float, float]]:
    """(seconds or step, validation metric) at each evaluation of a finetune directory."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r[x], r[f"val_{metric}"]) for r in rows if f"val_{metric}" in r]


def step_seconds(out: Path) -> float:
    """Median seconds of a training step, evaluations excluded."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(b["s"] - a["s"] for a, b in zip(rows, rows[1:], strict=False) if "val_loss" not in a)


def first_reaching(points: list[tuple[float, float]], value: float) -> float | None:
    return next((x for x, v in points if v >= value - 1e-9), None)


def add_common_args(ap) -> None:
    ap.add_argument("--old-base", required=True)
    ap.add_argument("--new-base", required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with train/val/test.jsonl")
    ap.add_argument("--work", type=Path, required=True, help="shared with the other benchmarks: finished arms are kept")
    ap.add_argument("--steps", type=int, default=100, help="finetune steps of the migrated and scratch arms")
    ap.add_argument("--retrain-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--test-limit", type=int, default=1000)
    ap.add_argument("--align-args", default="", help="extra options for `loramigrate align`")


def baselines(args) -> list:
    """old adapter (old base), alignment, transfer, full retrain and 100-example scratch (new base).

    Returns the finetune options every arm shares. Stage commands skip what is already done.
    """
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, val = args.data / "train.jsonl", args.data / "val.jsonl"
    small = w / "train-100.jsonl"
    small.write_text("".join(train.read_text().splitlines(keepends=True)[:100]))
    common = ["--val", val, "--batch-size", args.batch_size, "--lr", args.lr, "--eval-every", args.eval_every,
              "--eval-limit", args.eval_limit]
    fresh = ["--init", "fresh", "--rank", args.rank, "--alpha", 2 * args.rank]
    sh("finetune", "--base", args.old_base, "--data", train, "--steps", args.retrain_steps, *fresh, *common, "-o", w / "old")
    sh("align", "--old", args.old_base, "--new", args.new_base, *args.align_args.split(), "-o", w / "align")
    sh("transfer", "--align", w / "align", "--adapter", w / "old", "-o", w / "transfer")
    sh("finetune", "--base", args.new_base, "--data", train, "--steps", args.retrain_steps, *fresh, *common,
       "-o", w / "retrain")
    sh("finetune", "--base", args.new_base, "--data", small, "--steps", args.steps, *fresh, *common, "-o", w / "scratch")
    return common


def plot_curves(curves: dict[str, list[tuple[float, float]]], ready: float, metric: str, path: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, pts in curves.items():
        ax.plot([x for x, _ in pts], [v for _, v in pts], "o-", ms=3, label=arm)
    ax.axhline(ready, color="grey", ls=":", label="retrain final")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"val {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
