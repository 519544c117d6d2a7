"""Time-to-readiness of migrated adapters against retraining, in one harness (issue 12).

Every arm is a `loramigrate finetune` run on the NEW base with the same validation items, metric and
evaluation cadence; step 0 is the arm's start (the init evaluated on the same items). Readiness is
measured as the evolving-services ReLoRA paper defines it, against two levels:
  service   the old base + old adapter on the same validation items (primary),
  retrain   the median final level of the retrain arm,
each as the FIRST evaluation that reaches the level and as the SUSTAINED one (from which every later
evaluation stays at or above it). Seconds of a migrated arm include its transfer's wall time (and
the alignment's, in full and shared by 10 adapters); step counts are free of machine noise.

Arms: retrain (a fresh LoRA, the standard recipe: --retrain-args), one migrated arm per --init
NAME=DIR (its own recipe: --migrated-args, or --arm-args NAME=ARGS for that arm alone, e.g. a distilled
arm with --teacher old), and with --scratch N a fresh LoRA on the first N training examples (the retrain
recipe); each with every --seeds value (batch order; fresh init).

Example (Qwen2.5-Coder 0.5B → 1.5B, 2-digit multiplication):
  python scripts/bench_readiness.py --old-base $C/models/qwen2.5-coder-0.5b --new-base $C/models/qwen2.5-coder-1.5b \
      --data $C/data/arith2mul --old-adapter $C/adapters/qwen05-arith2mul --align runs/qwen/align \
      --init transfer=runs/qwen/mul/transfer --steps 30 --eval-every 5 --eval-limit 50 --seeds 0 1 2 \
      --retrain-args "--lr 5e-4 --warmup 10 --rank 16 --alpha 32" --migrated-args "--lr 2e-4" --work /tmp/ready
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
from datetime import date
from pathlib import Path

import torch
from benchlib import curve, first_reaching, manifest, sh


def sustained_from(points: list[tuple[float, float]], level: float) -> float | None:
    """The first x from which every later point stays at or above ``level``."""
    start = None
    for x, v in points:
        if v >= level - 1e-9:
            start = x if start is None else start
        else:
            start = None
    return start


def val_score(w: Path, name: str, base: str, adapter: Path | None, val: Path, limit: int, metric: str) -> float:
    """The metric of base (+ adapter) on the first ``limit`` validation items (an arm's step 0)."""
    out = w / f"eval-{name}.json"
    if not out.is_file():
        sh("eval", "--base", base, *(["--adapter", adapter] if adapter else []), "--data", val, "--limit", limit,
           "--json", out)
    return json.loads(out.read_text())["results"][-1][metric]


def median_or_none(xs: list[float | None]) -> float | None:
    """Median with 'not reached' counted as +∞ (so a majority of misses gives None)."""
    vals = sorted(float("inf") if x is None else x for x in xs)
    m = statistics.median(vals)
    return None if m == float("inf") else m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-base", required=True)
    ap.add_argument("--new-base", required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with train/val.jsonl")
    ap.add_argument("--old-adapter", type=Path, required=True)
    ap.add_argument("--align", type=Path, required=True, help="the pair's alignment (its wall time is counted)")
    ap.add_argument("--init", action="append", required=True, help="NAME=DIR of a migrated init (transfer output)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--retrain-args", default="--lr 5e-4 --warmup 10 --rank 16 --alpha 32")
    ap.add_argument("--migrated-args", default="--lr 2e-4")
    ap.add_argument("--arm-args", action="append", default=[], help="NAME=ARGS: finetune options of one --init arm")
    ap.add_argument("--scratch", type=int, default=0, help="add a fresh arm trained on the first N examples only")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, val = args.data / "train.jsonl", args.data / "val.jsonl"
    from loramigrate.evaluate import METRIC, read_task

    metric = METRIC[read_task(val, 1).kind]
    common = ["--val", val, "--steps", args.steps, "--eval-every", args.eval_every,
              "--eval-limit", args.eval_limit, "--batch-size", args.batch_size]
    service = val_score(w, "old", args.old_base, args.old_adapter, val, args.eval_limit, metric)
    inits = dict(item.split("=", 1) for item in args.init)
    arm_args = {n: args.migrated_args for n in inits} | dict(item.split("=", 1) for item in args.arm_args)
    fresh = {"retrain": train}
    if args.scratch:
        fresh[f"scratch-{args.scratch}"] = w / f"train-first{args.scratch}.jsonl"
        fresh[f"scratch-{args.scratch}"].write_text("".join(train.read_text().splitlines(True)[: args.scratch]))
    new_alone = val_score(w, "new", args.new_base, None, val, args.eval_limit, metric)
    start = {n: new_alone for n in fresh}
    start.update({n: val_score(w, n, args.new_base, Path(d), val, args.eval_limit, metric) for n, d in inits.items()})
    offset = {**{n: 0.0 for n in fresh}, **{n: manifest(Path(d))["wall_s"] for n, d in inits.items()}}
    align_s = manifest(args.align)["wall_s"]
    runs: dict[str, list[dict]] = {}
    for arm in [*fresh, *inits]:
        for seed in args.seeds:
            out = w / f"{arm}-s{seed}"
            if arm in fresh:
                init, data, extra = "fresh", fresh[arm], args.retrain_args
            else:
                init, data, extra = inits[arm], train, arm_args[arm]
            sh("finetune", "--base", args.new_base, "--init", init, "--data", data, *common, *shlex.split(extra),
               "--seed", seed, "-o", out)
            steps = [(0.0, start[arm]), *curve(out, metric, "step")]
            secs = [(offset[arm], start[arm]), *((s + offset[arm], v) for s, v in curve(out, metric))]
            runs.setdefault(arm, []).append({"seed": seed, "steps": steps, "secs": secs})
    retrain_final = statistics.median(r["steps"][-1][1] for r in runs["retrain"])
    levels = {"service": service, "retrain final": retrain_final}
    summary = {"date": str(date.today()), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "metric": metric, "levels": levels, "align_s": align_s, "arms": {}}
    print(f"\n## readiness ({date.today()}, {summary['machine']}); val {metric} on {args.eval_limit} items, "
          f"every {args.eval_every} steps, seeds {args.seeds}\n")
    print(f"service level (old pair) {service:.3f}; retrain's median final {retrain_final:.3f}; align {align_s:.0f} s\n")
    print("| arm | level | first hit: step (median) | sustained: step (median) | sustained s (median) | "
          "sustained ratio vs retrain (steps / s / s with align / s with align ÷ 10) | per seed (sustained step) |")
    print("|---|---|---|---|---|---|---|")
    for name, level in levels.items():
        med = {}
        for arm, rs in runs.items():
            med[arm] = {k: median_or_none([fn(r[k], level) for r in rs])
                        for k, fn in (("steps", sustained_from), ("secs", sustained_from))}
            med[arm]["first"] = median_or_none([first_reaching(r["steps"], level) for r in rs])
        for arm, rs in runs.items():
            m, base = med[arm], med["retrain"]
            ratios = "–"
            if arm != "retrain" and base["secs"] is not None and m["secs"] is not None:
                ratios = " / ".join(f"{x:.1f}×" if x != float("inf") else "∞" for x in (
                    base["steps"] / m["steps"] if m["steps"] else float("inf"), base["secs"] / m["secs"],
                    base["secs"] / (m["secs"] + align_s), base["secs"] / (m["secs"] + align_s / 10)))
            per_seed = ", ".join(str(sustained_from(r["steps"], level)) for r in rs)
            fmt = lambda x: "not reached" if x is None else f"{x:.0f}"  # noqa: E731
            print(f"| {arm} | {name} {level:.3f} | {fmt(m['first'])} | {fmt(m['steps'])} | {fmt(m['secs'])} | "
                  f"{ratios} | {per_seed} |")
            summary["arms"].setdefault(arm, {})[name] = m
    print("\ncurves (step: " + metric + "):")
    for arm, rs in runs.items():
        for r in rs:
            print(f"  {arm} seed {r['seed']}: " + " ".join(f"{x:.0f}:{v:.2f}" for x, v in r["steps"]))
    summary["runs"] = runs
    (w / "readiness.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
